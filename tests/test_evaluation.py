"""Tests of ddm_jax.evaluation against hand-computed values."""
import json
import math
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ddm_jax.errors import ConfigError, DataError
from ddm_jax.evaluation import classifier, fairness, plots, quality


# ---------------------------------------------------------------- fairness

def test_proportions():
  np.testing.assert_allclose(fairness.proportions([0, 0, 1, 2], 3), [0.5, 0.25, 0.25])
  # A group never predicted still gets its (zero) entry.
  np.testing.assert_allclose(fairness.proportions([1, 1], 3), [0.0, 1.0, 0.0])
  with pytest.raises(DataError):
    fairness.proportions([0, 3], 3)
  with pytest.raises(DataError):
    fairness.proportions([], 2)


def test_fairness_discrepancy_and_paper_form():
  # (0.8, 0.2) vs uniform: diff (0.3, -0.3) -> L2 = 0.3 * sqrt(2); paper form 0.3.
  assert fairness.fairness_discrepancy([0.8, 0.2]) == pytest.approx(0.42426406871192845)
  assert fairness.fd_paper_form([0.8, 0.2]) == pytest.approx(0.3)
  assert fairness.fd_paper_form([0.2, 0.8]) == pytest.approx(0.3)
  for p in ([0.5, 0.5], [0.63, 0.37], [1.0, 0.0]):
    assert fairness.fd_paper_form(p) == pytest.approx(fairness.fairness_discrepancy(p) / math.sqrt(2))
  # Three groups: diff (1/6, -1/12, -1/12) -> sqrt(1/36 + 2/144) = sqrt(1/24).
  assert fairness.fairness_discrepancy([0.5, 0.25, 0.25]) == pytest.approx(0.2041241452319315)
  assert fairness.fairness_discrepancy([0.5, 0.5], [0.8, 0.2]) == pytest.approx(0.42426406871192845)
  assert fairness.fairness_discrepancy([0.5, 0.5]) == 0.0
  with pytest.raises(DataError):
    fairness.fd_paper_form([0.5, 0.25, 0.25])
  with pytest.raises(DataError):
    fairness.fairness_discrepancy([0.7, 0.7])
  with pytest.raises(DataError):
    fairness.fairness_discrepancy([0.5, 0.5], [1.0, 0.0, 0.0])


def test_kl_divergence():
  # 0.75 ln 1.5 + 0.25 ln 0.5
  assert fairness.kl_divergence([0.75, 0.25], [0.5, 0.5]) == pytest.approx(0.13081203594113694)
  assert fairness.kl_divergence([0.75, 0.25]) == pytest.approx(0.13081203594113694)
  assert fairness.kl_divergence([0.3, 0.7], [0.3, 0.7]) == pytest.approx(0.0, abs=1e-15)
  # 0 log 0 = 0: only the populated group counts.
  assert fairness.kl_divergence([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))
  # A zero target entry with mass in p_hat is floored at eps: finite, large.
  kl = fairness.kl_divergence([0.5, 0.5], [1.0, 0.0])
  assert kl == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / fairness.KL_EPS))


def test_statistical_parity_difference():
  cond = [0, 0, 0, 0, 1, 1, 1, 1, 1]
  pred = [0, 0, 0, 1, 1, 1, 0, 0, 0]
  rates, spd = fairness.statistical_parity_difference(cond, pred, 2)
  np.testing.assert_allclose(rates, [0.75, 0.4])
  assert spd == pytest.approx(0.35)
  rates, spd = fairness.statistical_parity_difference([0, 1, 2], [0, 1, 2], 3)
  np.testing.assert_allclose(rates, [1, 1, 1])
  assert spd == 0.0
  with pytest.raises(DataError):  # nothing conditioned on group 2
    fairness.statistical_parity_difference([0, 1], [0, 1], 3)


def test_entropy():
  h = fairness.entropy([[0.0, 0.0], [0.0, 0.0, ], [math.log(3), 0.0], [100.0, 0.0]])
  # softmax(ln 3, 0) = (0.75, 0.25): -(0.75 ln 0.75 + 0.25 ln 0.25)
  np.testing.assert_allclose(h, [math.log(2), math.log(2), 0.5623351446188083, 0.0], atol=1e-12)
  np.testing.assert_allclose(fairness.entropy(np.zeros((2, 4))), [math.log(4)] * 2)
  # -inf logit: that class has p = 0 and contributes exactly 0.
  np.testing.assert_allclose(fairness.entropy([[0.0, 0.0, -np.inf]]), [math.log(2)])
  mean, std = fairness.entropy_stats([[0.0, 0.0], [1000.0, 0.0]])
  assert mean == pytest.approx(math.log(2) / 2)
  assert std == pytest.approx(math.log(2) / 2)
  with pytest.raises(DataError):
    fairness.entropy([0.0, 1.0])


def test_bootstrap_ci_covers_truth():
  p_true = np.array([0.3, 0.5, 0.2])
  rng = np.random.default_rng(123)
  covered = np.zeros(3, int)
  for rep in range(100):
    labels = rng.choice(3, size=300, p=p_true)
    lo, hi = fairness.bootstrap_ci(labels, 3, n_boot=1000, seed=rep)
    p_hat = fairness.proportions(labels, 3)
    assert np.all(lo <= p_hat) and np.all(p_hat <= hi)
    covered += (lo <= p_true) & (p_true <= hi)
  assert np.all(covered >= 90), covered
  # Width matches the normal approximation 2 * 1.96 * sqrt(p (1 - p) / n)
  # (n large so the label lattice and bootstrap noise stay within a few %).
  labels = rng.choice(3, size=3000, p=p_true)
  p_hat = fairness.proportions(labels, 3)
  lo, hi = fairness.bootstrap_ci(labels, 3, n_boot=4000, seed=0)
  np.testing.assert_allclose(hi - lo, 2 * 1.959964 * np.sqrt(p_hat * (1 - p_hat) / 3000), rtol=0.06)
  lo90, hi90 = fairness.bootstrap_ci(labels, 3, n_boot=4000, alpha=0.1, seed=0)
  np.testing.assert_allclose(hi90 - lo90, 2 * 1.644854 * np.sqrt(p_hat * (1 - p_hat) / 3000), rtol=0.06)
  # Seeded: same call, same interval; more samples, narrower interval.
  labels = rng.choice(3, size=300, p=p_true)
  a, b = fairness.bootstrap_ci(labels, 3, seed=7), fairness.bootstrap_ci(labels, 3, seed=7)
  np.testing.assert_array_equal(a, b)
  lo_big, hi_big = fairness.bootstrap_ci(np.tile(labels, 16), 3, seed=7)
  assert np.all(hi_big - lo_big < (a[1] - a[0]) / 2)


# ---------------------------------------------------------------- quality

def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  v1, v2 = rng.uniform(0.1, 3.0, 5), rng.uniform(0.1, 3.0, 5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
  got = quality.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-6)
  # 1-D: mu 0 vs 1, var 1 vs 4 -> 1 + 1 + 4 - 2 * 2 = 2.
  assert quality.frechet_distance([0.0], [[1.0]], [1.0], [[4.0]]) == pytest.approx(2.0, rel=1e-9)
  # Equal full covariances: the trace terms cancel, only the mean term is left.
  a = rng.normal(size=(6, 6))
  s = a @ a.T + 0.5 * np.eye(6)
  got = quality.frechet_distance(mu1[:1].repeat(6), s, np.zeros(6), s)
  assert got == pytest.approx(6 * mu1[0] ** 2, rel=1e-6)
  with pytest.raises(DataError):
    quality.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))


def test_frechet_distance_from_features():
  rng = np.random.default_rng(1)
  f = rng.normal(size=(500, 8))
  mu, sigma = quality.feature_stats(f)
  np.testing.assert_allclose(mu, f.mean(0))
  np.testing.assert_allclose(sigma, np.cov(f, rowvar=False))
  assert abs(quality.frechet_distance_from_features(f, f)) < 1e-6
  shifted = quality.frechet_distance_from_features(f, f + 2.0)  # mean term only: 8 * 4
  assert shifted == pytest.approx(32.0, rel=1e-6)
  # Fewer samples than dims: singular covariances take the eps path, result finite.
  g = rng.normal(size=(5, 20))
  assert np.isfinite(quality.frechet_distance_from_features(g, g + 0.1))


def _brute_pr(real, fake, k):
  def radii(x):
    return np.array([np.sort(np.linalg.norm(x - p, axis=1))[k] for p in x])
  def cover(ref, r, q):
    return np.mean([np.any(np.linalg.norm(ref - p, axis=1) <= r) for p in q])
  return cover(real, radii(real), fake), cover(fake, radii(fake), real)


def test_precision_recall(monkeypatch):
  real = np.array([[0.0], [1.0], [2.0], [3.0]])
  fake = np.array([[0.0], [0.1], [5.0], [5.1]])
  # k=1: real radii all 1 -> fakes 0 and 0.1 inside, 5 and 5.1 outside: P = 0.5;
  # fake radii all 0.1 -> only real 0 is inside: R = 0.25.
  assert quality.precision_recall(real, fake, k=1) == pytest.approx((0.5, 0.25))
  # On the boundary counts as inside: fake 4 is exactly radius 1 from real 3.
  # Fake radii (k=1): 0.1, 0.1, 1.1, 1.1 -> reals 0 and 3 covered.
  fake = np.array([[0.0], [0.1], [4.0], [5.1]])
  assert quality.precision_recall(real, fake, k=1) == pytest.approx((0.75, 0.5))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(200, 4))
  assert quality.precision_recall(x, x.copy(), k=3) == (1.0, 1.0)
  far = rng.normal(size=(150, 4)) + 100.0
  assert quality.precision_recall(x, far, k=3) == (0.0, 0.0)
  # Overlapping clouds, against a loop implementation, with tiny blocks forcing
  # the batched path through many row blocks.
  y = rng.normal(size=(120, 4)) * 1.5 + 0.5
  ref = _brute_pr(x, y, 3)
  assert quality.precision_recall(x, y, k=3) == pytest.approx(ref)
  monkeypatch.setattr(quality, '_BLOCK_ELEMS', 1000)
  assert quality.precision_recall(x, y, k=3) == pytest.approx(ref)
  assert 0.0 < ref[0] < 1.0 and 0.0 < ref[1] < 1.0
  with pytest.raises(DataError):
    quality.precision_recall(x[:3], y, k=3)


def test_noise_floor():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(400, 6))
  nf = quality.noise_floor(x, seed=0)
  assert nf == quality.noise_floor(x, seed=0)
  assert nf['n_half'] == 200
  assert 0.0 < nf['fd'] < 0.5  # sampling noise only; a unit mean shift would add 6
  assert 0.8 < nf['precision'] <= 1.0 and 0.8 < nf['recall'] <= 1.0


# ---------------------------------------------------------------- classifier

def _digits01():
  from sklearn.datasets import load_digits
  d = load_digits()
  keep = d.target < 2
  # 8x8 in [0, 16] -> 16x16 nearest, NHWC, [-1, 1]
  x = d.images[keep].repeat(2, axis=1).repeat(2, axis=2)[..., None] / 16.0 * 2.0 - 1.0
  return x.astype(np.float32), d.target[keep].astype(np.int32)


@pytest.fixture(scope='module')
def digits_evaluator():
  x, y = _digits01()
  perm = np.random.default_rng(0).permutation(len(y))
  n_val = len(y) // 5
  val, tr = perm[:n_val], perm[n_val:]
  params, acc = classifier.train_evaluator(x[tr], y[tr], 2, seed=0, steps=200,
                                           val_images=x[val], val_labels=y[val])
  return dict(params=params, acc=acc, x=x, y=y, val=val, tr=tr)


def test_evaluator_accuracy_on_digits(digits_evaluator):
  e = digits_evaluator
  assert e['acc'] >= 0.95, e['acc']
  x, y, val = e['x'], e['y'], e['val']
  logits = classifier.predict(e['params'], x[val], batch_size=50)  # several padded batches
  assert logits.shape == (len(val), 2)
  assert np.mean(logits.argmax(1) == y[val]) == pytest.approx(e['acc'])
  acc, per_group = classifier.accuracy(e['params'], x[val], y[val])
  assert acc == pytest.approx(e['acc']) and np.all(per_group >= 0.9)
  feats = classifier.features(e['params'], x[val])
  assert feats.shape == (len(val), 64) and np.all(np.isfinite(feats))
  # Batching does not change results.
  np.testing.assert_allclose(classifier.features(e['params'], x[val], batch_size=7), feats,
                             rtol=1e-5, atol=1e-6)
  # The classifier's features separate the groups: FD between them is large
  # compared with the noise floor within one group.
  fd_between = quality.frechet_distance_from_features(feats[y[val] == 0], feats[y[val] == 1])
  assert fd_between > 10 * quality.noise_floor(classifier.features(e['params'], x[y == 0]))['fd']


def test_evaluator_input_checks(digits_evaluator):
  p = digits_evaluator['params']
  x = digits_evaluator['x'][:4]
  with pytest.raises(DataError, match=r'\[-1, 1\]'):
    classifier.predict(p, (x + 1) * 127.5)  # uint8-range images
  with pytest.raises(DataError, match='channels'):
    classifier.predict(p, np.repeat(x, 3, axis=-1))  # trained on 1 channel
  with pytest.raises(DataError, match='8x8'):
    classifier.predict(p, x[:, :4, :4])
  with pytest.raises(ConfigError):
    classifier.predict({'conv1': {}}, x)
  # Any resolution >= 8 and 3 channels run (global pooling).
  # Shapes only (eval_shape): a random init would cost seconds of compile here.
  m = classifier.Evaluator(num_groups=3, width=4, features=8)
  shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), np.zeros((1, 8, 8, 3), np.float32))
  p3 = jax.tree.map(lambda s: np.full(s.shape, 0.1, s.dtype), shapes['params'])
  assert classifier.predict(p3, np.zeros((5, 24, 8, 3), np.float32)).shape == (5, 3)
  assert classifier.features(p3, np.zeros((5, 8, 8, 3), np.float32)).shape == (5, 8)


def test_holdout_split_and_balanced_batches():
  y = np.array([0] * 80 + [1] * 20)
  tr, va = classifier.holdout_split(y, 2, 0.2, np.random.default_rng(0))
  assert np.bincount(y[va]).tolist() == [16, 4]  # 20% of each group
  assert sorted(np.concatenate([tr, va]).tolist()) == list(range(100))
  with pytest.raises(ConfigError):
    classifier.holdout_split(y, 2, 1.0, np.random.default_rng(0))
  idx = classifier.batch_indices(y, 2, 200, 64, True, np.random.default_rng(0))
  assert idx.shape == (200, 64)
  assert np.mean(y[idx]) == pytest.approx(0.5, abs=0.02)  # balanced despite 80:20
  idx = classifier.batch_indices(y, 2, 200, 64, False, np.random.default_rng(0))
  assert np.mean(y[idx]) == pytest.approx(0.2, abs=0.02)


def test_check_accuracy_floor():
  assert classifier.check_accuracy_floor(0.97) == 0.97
  with pytest.raises(DataError, match=r'0\.9100.*0\.9500'):
    classifier.check_accuracy_floor(0.91)
  with pytest.raises(DataError):
    classifier.check_accuracy_floor(0.98, floor=0.99)
  with pytest.raises(DataError):
    classifier.check_accuracy_floor(float('nan'))


def test_cache_loads_instead_of_retraining(tmp_path, digits_evaluator):
  e = digits_evaluator
  x, y = e['x'][e['tr']], e['y'][e['tr']]
  calls = []

  def train_fn(images, labels, num_groups, **kw):
    calls.append(kw)
    return e['params'], e['acc']

  key = {'dataset': 'digits01', 'resolution': 16}
  first = classifier.load_or_train_evaluator(tmp_path, key, x, y, 2, train_fn=train_fn, steps=200)
  assert not first.from_cache and len(calls) == 1
  assert calls[0]['steps'] == 200
  files = sorted(os.listdir(first.path))
  assert files == ['evaluator.json', 'params.msgpack']  # no temp files left
  meta = json.loads(open(os.path.join(first.path, 'evaluator.json')).read())
  assert meta['accuracy'] == pytest.approx(e['acc']) and meta['key']['key'] == key

  second = classifier.load_or_train_evaluator(tmp_path, dict(reversed(key.items())), x, y, 2,
                                              train_fn=train_fn, steps=200)
  assert second.from_cache and len(calls) == 1 and second.path == first.path
  assert second.accuracy == pytest.approx(e['acc'])
  np.testing.assert_array_equal(classifier.predict(second, x[:20]),
                                classifier.predict(e['params'], x[:20]))

  # Other key, other settings or other data: a new entry, trained.
  classifier.load_or_train_evaluator(tmp_path, {**key, 'resolution': 32}, x, y, 2,
                                     train_fn=train_fn, steps=200)
  classifier.load_or_train_evaluator(tmp_path, key, x, y, 2, train_fn=train_fn, steps=300)
  classifier.load_or_train_evaluator(tmp_path, key, x[1:], y[1:], 2, train_fn=train_fn, steps=200)
  assert len(calls) == 4 and len(os.listdir(tmp_path)) == 4

  # A damaged entry is retrained, not trusted.
  with open(os.path.join(first.path, 'params.msgpack'), 'wb') as f:
    f.write(b'garbage')
  with pytest.warns(UserWarning, match='unreadable'):
    third = classifier.load_or_train_evaluator(tmp_path, key, x, y, 2, train_fn=train_fn, steps=200)
  assert not third.from_cache and len(calls) == 5
  assert classifier.load_or_train_evaluator(tmp_path, key, x, y, 2, train_fn=train_fn,
                                            steps=200).from_cache

  with pytest.raises(ConfigError):
    classifier.load_or_train_evaluator(tmp_path, {'f': object()}, x, y, 2, train_fn=train_fn)


# ---------------------------------------------------------------- plots

def _png(path):
  assert os.path.getsize(path) > 0
  with Image.open(path) as im:
    assert im.format == 'PNG'
    im.load()
    return np.asarray(im)


def test_plot_group_proportions_and_xy(tmp_path):
  p = tmp_path / 'sub' / 'props.png'
  plots.plot_group_proportions(p, [0.7, 0.3], [0.65, 0.25], [0.75, 0.35], [0.5, 0.5],
                               p_train=[0.8, 0.2], group_names=['zero', 'one'])
  assert _png(p).ndim == 3
  q = tmp_path / 'sweep.png'
  plots.plot_xy(q, [0, 0.01, 0.05], {'FD': [0.3, 0.2, 0.1],
                                     'p0': ([0.8, 0.7, 0.6], [0.7, 0.6, 0.5], [0.9, 0.8, 0.7])},
                'indicator weight', 'value', 'sweep')
  _png(q)
  # a series measured at fewer x: NaN there, the line joins the points it has
  r = tmp_path / 'gaps.png'
  plots.plot_xy(r, [0, 8, 16, 32], {'4:1': ([0.6, 0.02, 0.0, float('nan')],
                                            [0.5, 0.01, 0.0, float('nan')],
                                            [0.7, 0.03, 0.0, float('nan')]),
                                    '9:1': [0.7, 0.1, 0.04, 0.01]}, 'S', 'FD')
  _png(r)
  with pytest.raises(DataError):
    plots.plot_group_proportions(p, [0.7, 0.3], [0.6], [0.8, 0.4], [0.5, 0.5])


def test_save_grid_sorted_by_group(tmp_path):
  # Group 0 images black, group 1 white, interleaved: the grid must sort them.
  n0, n1 = 3, 5
  imgs = np.concatenate([-np.ones((n0, 8, 8, 1)), np.ones((n1, 8, 8, 1))])
  labels = np.array([0] * n0 + [1] * n1)
  order = np.random.default_rng(0).permutation(n0 + n1)
  path = tmp_path / 'grid.png'
  plots.save_grid_sorted_by_group(path, imgs[order], labels[order], cols=4, pad=2, upscale=1)
  g = _png(path)
  # Bands: group 0 -> 1 row, group 1 -> 2 rows (5 images over 4 columns).
  assert g.shape == ((10 + 2) + 4 + (2 * 10 + 2), 4 * 10 + 2)  # band, separator, band
  assert np.all(g[2:10, 2:10] == 0)            # first cell: a group-0 (black) image
  assert np.all(g[12:16] == 255)               # separator between the bands
  assert np.all(g[18:26, 2:10] == 255)         # first cell of group 1: white image
  rgb = np.random.default_rng(1).uniform(-1, 1, (6, 16, 16, 3))
  plots.save_grid_sorted_by_group(tmp_path / 'rgb.png', rgb, np.array([2, 0, 2, 2, 0, 1]))
  assert _png(tmp_path / 'rgb.png').shape[-1] == 3
