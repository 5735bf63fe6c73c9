"""The evaluation pipeline (ddm_jax.evaluation.report, evaluate.py): the evaluator gate,
scoring wired to the metrics, and the CLI end to end on a tiny group-conditioned DDM."""
import json
import math
import os

import numpy as np
import pytest

from configs import digits
from ddm_jax.errors import ConfigError, DataError
from ddm_jax.evaluation import fairness
from ddm_jax.evaluation import context as R
from ddm_jax.evaluation.scoring import score


@pytest.fixture(scope='module')
def roots(tmp_path_factory):
  root = tmp_path_factory.mktemp('fair_eval')
  return {'data': str(root / 'data'), 'cache': str(root / 'cache'), 'root': root}


def _config(roots, **data):
  c = digits.get_config()
  c.data.data_dir = roots['data']
  for k, v in data.items():
    c.data[k] = v
  return c


@pytest.fixture(scope='module')
def ctx(roots):
  return R.EvalContext(_config(roots), R.EvalSettings(cache_dir=roots['cache'], num_samples=100))


def test_evaluator_on_digits_is_accurate_and_cached(ctx, roots):
  info = ctx.evaluator_info
  assert info['heldout_accuracy'] >= 0.95, info
  assert info['heldout_split'] == 'test' and info['train_split'] == 'evaluator'
  assert ctx.splits['reference'] == ['evaluator', 'test'] and ctx.pool_split == 'balanced'
  assert ctx.ref_labels.size == info['n_train'] + info['n_heldout']
  np.testing.assert_allclose(ctx.train_proportions, [0.8, 0.2], atol=0.01)
  again = R.EvalContext(_config(roots), R.EvalSettings(cache_dir=roots['cache'], num_samples=100))
  assert again.evaluator_info['from_cache'] and again.evaluator_info['cache'] == info['cache']
  # A different training ratio and seed share the evaluator split, hence the evaluator.
  other = R.EvalContext(_config(roots, proportions=(0.5, 0.5), shuffle_seed=3),
                        R.EvalSettings(cache_dir=roots['cache'], num_samples=100))
  assert other.evaluator_info['from_cache'] and other.evaluator_info['cache'] == info['cache']
  np.testing.assert_allclose(other.train_proportions, [0.5, 0.5], atol=0.01)
  np.testing.assert_array_equal(other.ref_feats, ctx.ref_feats)  # the same real reference set


def test_evaluator_cache_key_identifies_the_data(roots):
  """A 7-vs-8 evaluation never reuses a cached 0-vs-1 evaluator: the key holds the groups
  (and the builder version); for other data the fields that select images and labels."""
  from ddm_jax.data.builders import BiasedDigits
  from ddm_jax.evaluation import classifier
  splits = {'evaluator': 'evaluator', 'heldout': 'test'}
  key = lambda **d: R.evaluator_cache_key(_config(roots, **d).data, splits)  # noqa: E731
  k01, k78 = key(), key(groups=((7,), (8,)))
  assert k01 != k78 and k78['groups'] == [[7], [8]]
  assert k01['builder_version'] == str(BiasedDigits.VERSION)
  assert key(proportions=(0.5, 0.5), shuffle_seed=4) == k01  # ratio and seed: same evaluator
  x, y = np.zeros((4, 8, 8, 1), np.float32), np.array([0, 1, 0, 1])
  train_fn = lambda *a, **kw: ({'w': np.zeros(1)}, 1.0)  # noqa: E731
  paths = {classifier.load_or_train_evaluator(roots['root'] / 'keys', k, x, y, 2,
                                              train_fn=train_fn).path for k in (k01, k78)}
  assert len(paths) == 2  # same arrays, different pairs: different cache entries
  generic = dict(name='some_tfds', label_key='label', class_filter=(3, 5))
  g = R.evaluator_cache_key(_config(roots, **generic).data, splits)
  assert g['class_filter'] == [3, 5] and g['label_key'] == 'label'
  assert g != R.evaluator_cache_key(_config(roots, **{**generic, 'class_filter': (1, 2)}).data,
                                    splits)


def test_floor_refuses_fairness_figures(roots):
  with pytest.raises(DataError, match='below the floor'):
    R.EvalContext(_config(roots), R.EvalSettings(cache_dir=roots['cache'], evaluator_steps=1,
                                                 num_samples=100, accuracy_floor=0.999))


def test_score_of_real_images(ctx):
  """Scoring real images: the figures are the metrics' values on the evaluator's labels."""
  imgs = ctx.ref_images
  scores, pred = score(ctx, imgs)
  f, q = scores['fairness'], scores['quality']
  # Real 0s and 1s: the ten-digit check finds (almost) none off target, and the proportions
  # are those of the samples it keeps.
  assert f['off_target'] == pytest.approx(np.mean(pred < 0)) and f['off_target'] < 0.03, f
  assert ctx.evaluator_info['digit_evaluator_heldout_accuracy'] > 0.9
  p = np.bincount(pred[pred >= 0], minlength=2) / np.sum(pred >= 0)
  np.testing.assert_allclose(f['proportions'], p)
  assert f['fd'] == pytest.approx(np.linalg.norm(p - 0.5))
  assert f['fd_paper'] == pytest.approx(abs(p[0] - 0.5))
  assert f['fd_paper'] == pytest.approx(f['fd'] / math.sqrt(2))
  assert f['kl'] == pytest.approx(fairness.kl_divergence(p))
  assert all(lo <= v <= hi for lo, v, hi in zip(f['ci95_lo'], p, f['ci95_hi']))
  # The reference set against itself: Fréchet distance ~0, precision = recall = 1.
  assert abs(q['fcd']) < 1e-3
  assert q['precision'] == 1.0 and q['recall'] == 1.0
  assert q['fcd_vs_train'] > q['fcd']  # the training split is biased, the reference is not
  # One group only: FD is the distance of (1, 0) to uniform; the other group is missing.
  only0 = imgs[ctx.ref_labels == 0]
  s0, pred0 = score(ctx, only0, guide_labels=np.zeros(len(only0), int))
  assert s0['fairness']['proportions'][0] > 0.95
  assert s0['fairness']['guide_hit_rate'] == pytest.approx(np.mean(pred0 == 0))
  with pytest.raises(DataError):  # SPD needs samples conditioned on every group
    score(ctx, only0[:10], cond_labels=np.zeros(10, int))


def test_equal_n_quality_of_real_images(ctx):
  """Real pool images (never reference images) as the 'samples': every group has
  >= quality_n of them and KID is at the level of the real-vs-real floor; too few
  samples in a group: None."""
  from ddm_jax import data as data_lib
  from ddm_jax.evaluation import classifier, quality
  x, _ = data_lib.load_arrays(R.true_group_data_cfg(ctx.config.data), ctx.data_dir, 'balanced')
  x = x[np.random.default_rng(1).permutation(len(x))]
  scores, pred = score(ctx, x)
  e = scores['quality']['equal_n']
  feats = classifier.logits_and_features(ctx.evaluator, x, 500)[1]

  def equal_n(idx, groups):  # of the samples x[idx], assigned to `groups`
    return quality.equal_n_quality(feats[idx], groups, ctx.ref_feats, ctx.ref_labels,
                                   ctx.pool_feats, ctx.pool_labels, ctx.num_groups,
                                   ctx.settings.quality_n, seed=ctx.settings.seed)

  assert equal_n(np.arange(len(x)), pred) == e  # score() reuses its features and groups
  assert e['n'] == ctx.settings.quality_n == 50
  assert e['group_counts'] == np.bincount(pred[pred >= 0], minlength=2).tolist()
  assert all(v is not None for k in ('kid', 'kid_floor', 'fcd', 'fcd_floor') for v in e[k])
  assert e['kid_mean'] == pytest.approx(np.mean(e['kid']))
  spread = max(abs(v) for v in e['kid_floor']) + 1e-9
  assert abs(e['kid_mean'] - e['kid_floor_mean']) < 5 * spread, e
  assert np.isfinite(e['fcd_mean']) and np.isfinite(e['fcd_floor_mean'])
  # half of group 1's samples swapped for group 0's: group 1 is further from its references
  mixed = np.concatenate([np.flatnonzero(pred == 0)[50:75], np.flatnonzero(pred == 1)[:25]])
  worse = equal_n(mixed, np.ones(len(mixed), int))
  assert worse['kid'][1] > e['kid'][1] and worse['kid'][0] is None
  few = np.flatnonzero(pred == 0)[:10].tolist() + np.flatnonzero(pred == 1).tolist()
  e2 = equal_n(few, pred[few])
  assert e2['group_counts'][0] == 10 and e2['kid'][0] is None and e2['fcd'][0] is None
  assert e2['kid_mean'] is None and e2['fcd_mean'] is None and e2['kid'][1] is not None
  assert e2['kid_floor'] == e['kid_floor']  # the floor does not depend on the samples


def test_settings_validation():
  with pytest.raises(ConfigError):
    R.EvalSettings(guidance='cfg').validate()
  with pytest.raises(ConfigError):
    R.EvalSettings(guidance='indicator', guidance_scale=float('nan')).validate()
  R.EvalSettings(guidance='indicator', guidance_scale=-1).validate()  # pushes away: allowed
  with pytest.raises(ConfigError):
    R.EvalSettings(num_samples=3).validate()
  with pytest.raises(ConfigError):
    R.EvalSettings(accuracy_floor=1.5).validate()
  for bad in (1, 2.5, True):
    with pytest.raises(ConfigError):
      R.EvalSettings(quality_n=bad).validate()


def test_true_group_cfg_drops_pseudo_labels(roots):
  c = _config(roots, pseudo_labels='kmeans')
  assert R.true_group_data_cfg(c.data).pseudo_labels == ''
  assert c.data.pseudo_labels == 'kmeans'  # the original is untouched


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def tiny_conditional(roots):
  """A tiny group-conditioned DDM (num_class_embeds = 2), briefly trained."""
  from tests.helpers import train_tiny
  return train_tiny(str(roots['root'] / 'cond_run'), roots['data'], full_size=True, **{
      'model.block_out_channels': (16, 32), 'model.num_class_embeds': 2,
      'indicator.hidden': (32,), 'train.num_steps': 60, 'train.batch_size': 32,
      'train.checkpoint_every': 60, 'train.sample_every': 0, 'train.log_every': 30,
      'optim.warmup_steps': 5})


def test_evaluate_cli_end_to_end(tiny_conditional, roots, capsys):
  from ddm_jax.cli.evaluate import main as evaluate_main
  wd = tiny_conditional
  common = ['--workdir', wd, '--num_samples', '64', '--steps', '4', '--cache_dir', roots['cache'],
            '--no_progress']
  assert evaluate_main(common + ['--target', '1,1']) == 0
  out = os.path.join(wd, 'eval')
  for name in ('report.json', 'report.md', 'proportions.png', 'samples_by_group.png',
               'samples.npz'):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  rep = json.load(open(os.path.join(out, 'report.json')))
  f, q, ind = rep['fairness'], rep['quality'], rep['indicator']
  assert rep['num_samples'] == 64 and rep['seed'] == 0 and rep['config']['model']['num_class_embeds'] == 2
  # the proportions count the samples the ten-digit check keeps (a tiny model draws junk)
  assert f['n'] == round(64 * (1 - f['off_target'])) and f['n'] > 0
  assert len(f['proportions']) == 2 and sum(f['proportions']) == pytest.approx(1)
  assert f['fd'] == pytest.approx(fairness.fairness_discrepancy(f['proportions']))
  # Conditioned on each group in equal numbers: SPD is the gap of the two hit rates.
  rates = f['conditioned_hit_rates']
  assert f['spd'] == pytest.approx(max(rates) - min(rates))
  assert 0 <= ind['entropy_mean'] <= math.log(2) + 1e-9 and ind['entropy_std'] >= 0
  for key in ('fcd', 'fcd_vs_train', 'precision', 'recall', 'noise_floor_fcd'):
    assert np.isfinite(q[key]), key
  assert rep['data']['evaluator']['heldout_accuracy'] >= 0.95
  e = q['equal_n']
  assert set(e) == {'n', 'group_counts', 'kid', 'kid_mean', 'kid_floor', 'kid_floor_mean',
                    'fcd', 'fcd_mean', 'fcd_floor', 'fcd_floor_mean'}
  assert e['n'] == 50 and sum(e['group_counts']) == f['n'] and len(e['kid']) == 2
  # 64 samples cannot put 50 in both groups: the short group's figures are None
  assert None in e['kid'] and e['kid_mean'] is None and e['fcd_mean'] is None
  assert all(np.isfinite(v) for v in e['kid_floor'] + e['fcd_floor'])
  md = open(os.path.join(out, 'report.md')).read()
  assert 'SPD' in md and 'Fréchet' in md and 'noise floor' in md
  assert 'KID x 1e3 per group at n=50' in md and 'FCD per group at n=50' in md
  assert 'FD' in capsys.readouterr().out

  # Guided: a separate folder, the assignment reported, same seed.
  assert evaluate_main(common + ['--guidance', 'indicator', '--guidance_scale', '2']) == 0
  g = json.load(open(os.path.join(out, 'indicator_s2', 'report.json')))
  assert g['sampling']['guidance'] == 'indicator' and 'guide_hit_rate' in g['fairness']

  # A weak evaluator: one clear line, exit 2, nothing reported.
  bad = os.path.join(str(roots['root']), 'bad_eval')
  assert evaluate_main(common + ['--evaluator_steps', '1', '--accuracy_floor', '0.999',
                                 '--out_dir', bad]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error:') and 'below the floor' in err and not os.path.exists(bad)
  assert evaluate_main(['--workdir', str(roots['root'] / 'missing')]) == 2


def test_before_after_picture(tiny_conditional, roots, monkeypatch, capsys):
  """The end of `make demo`: unguided and guided samples of one model side by side, each
  with the FD its evaluation report holds."""
  from ddm_jax.cli.compare import main as compare_main
  from PIL import Image
  monkeypatch.setenv('DDM_EVAL_CACHE', roots['cache'])
  out = str(roots['root'] / 'before_after.png')
  assert compare_main(['--workdir', tiny_conditional, '--num_samples', '32', '--steps', '4',
                       '--guidance_scale', '4', '--out', out]) == 0
  printed = capsys.readouterr().out
  assert Image.open(out).size[0] > 2 * Image.open(out).size[1] / 2  # two grids side by side
  # each panel says what it is, beside the shares the model was trained at
  assert 'training split: group shares (0.80, 0.20)' in printed
  assert 'DDM, unguided: FD' in printed and 'DDM + indicator guidance, S = 4: FD' in printed
  for sub in ('unguided', 'S4'):
    rep = json.load(open(os.path.join(tiny_conditional, 'eval', 'before_after', sub,
                                      'report.json')))
    assert rep['num_samples'] == 32
    assert f"FD {rep['fairness']['fd']:.4f}" in printed
  assert compare_main(['--workdir', tiny_conditional, '--num_samples', '4']) != 0
