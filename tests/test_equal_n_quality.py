"""KID (unbiased, cubic polynomial kernel) and quality at an equal number of samples per
group (ddm_jax.evaluation.quality.kid / equal_n_quality): numpy only."""
import numpy as np
import pytest

from ddm_jax.errors import DataError
from ddm_jax.evaluation import quality

D = 8


def gauss(rng, n, shift=0.0):
  return rng.normal(size=(n, D)) + shift


def reference_kid(a, b):
  """The U-statistic written out pair by pair (Bińkowski et al. 2018, eq. 4)."""
  k = lambda x, y: (x @ y / a.shape[1] + 1.0) ** 3  # noqa: E731
  n, m = len(a), len(b)
  kaa = sum(k(a[i], a[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kbb = sum(k(b[i], b[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kab = sum(k(a[i], b[j]) for i in range(n) for j in range(m)) / (n * m)
  return kaa + kbb - 2 * kab


def test_kid_matches_the_written_out_estimator(monkeypatch):
  rng = np.random.default_rng(0)
  a, b = gauss(rng, 9), gauss(rng, 13, 0.5)
  want = reference_kid(a, b)
  assert quality.kid(a, b) == pytest.approx(want, rel=1e-10)
  monkeypatch.setattr(quality, '_BLOCK_ELEMS', 20)  # many row blocks: the same number
  assert quality.kid(a, b) == pytest.approx(want, rel=1e-10)
  assert quality.kid(b, a) == pytest.approx(want, rel=1e-10)  # symmetric


def test_kid_same_distribution_is_unbiased_at_any_n():
  """Two samples of one Gaussian: KID ~ 0, and its mean over repeats at n=10 agrees with
  the mean at n=200 (the Fréchet distance's would differ by its small-n bias)."""
  rng = np.random.default_rng(1)
  ref = gauss(rng, 400)
  assert abs(quality.kid(gauss(rng, 400), ref)) < 0.02
  def repeats(n, reps):
    vals = np.array([quality.kid(gauss(rng, n), ref) for _ in range(reps)])
    return vals.mean(), vals.std(ddof=1) / np.sqrt(reps)
  (m10, se10), (m200, se200) = repeats(10, 400), repeats(200, 100)
  assert abs(m10 - m200) < 4 * np.hypot(se10, se200), (m10, se10, m200, se200)
  assert abs(m10) < 4 * se10 + 1e-3 and abs(m200) < 4 * se200 + 1e-3
  fd = lambda n: np.mean([quality.frechet_distance_from_features(gauss(rng, n), ref)  # noqa: E731
                          for _ in range(20)])
  assert fd(10) > 5 * fd(200)  # what KID avoids: FD's bias at small n


def test_kid_grows_with_the_shift():
  rng = np.random.default_rng(2)
  ref = gauss(rng, 300)
  kids = [quality.kid(gauss(rng, 100, s), ref) for s in (0.25, 0.5, 1.0, 2.0)]
  assert kids[0] > 0 and all(x < y for x, y in zip(kids, kids[1:])), kids


def test_kid_input_checks():
  rng = np.random.default_rng(3)
  with pytest.raises(DataError):
    quality.kid(gauss(rng, 1), gauss(rng, 5))  # one row: no pairs
  with pytest.raises(DataError):
    quality.kid(gauss(rng, 5), rng.normal(size=(5, D + 1)))
  with pytest.raises(DataError):
    quality.kid(np.full((3, D), np.nan), gauss(rng, 5))


def test_equal_n_quality_per_group():
  rng = np.random.default_rng(4)
  ref = np.concatenate([gauss(rng, 80), gauss(rng, 80, 3.0)])
  ref_labels = np.repeat([0, 1], 80)
  pool = np.concatenate([gauss(rng, 60), gauss(rng, 60, 3.0)])
  pool_labels = np.repeat([0, 1], 60)
  # group 0: 40 good samples; group 1: 7 samples only (the minority)
  gen = np.concatenate([gauss(rng, 40), gauss(rng, 7, 3.0)])
  gen_groups = np.repeat([0, 1], [40, 7])
  out = quality.equal_n_quality(gen, gen_groups, ref, ref_labels, pool, pool_labels, 2, n=20)
  assert out['n'] == 20 and out['group_counts'] == [40, 7]
  assert out['kid'][0] == pytest.approx(quality.kid(gen[:20], ref[:80]))  # the first n samples
  assert out['fcd'][0] == pytest.approx(quality.frechet_distance_from_features(ref[:80], gen[:20]))
  assert out['kid'][1] is None and out['fcd'][1] is None
  assert out['kid_mean'] is None and out['fcd_mean'] is None
  assert all(v is not None for v in out['kid_floor'] + out['fcd_floor'])
  assert out['kid_floor_mean'] == pytest.approx(np.mean(out['kid_floor']))
  assert out['fcd_floor_mean'] == pytest.approx(np.mean(out['fcd_floor']))
  # samples from the wrong place score worse than the real floor
  bad = quality.equal_n_quality(gauss(rng, 40, 1.5), np.zeros(40, int), ref, ref_labels, pool,
                                pool_labels, 2, n=20)
  assert bad['kid'][0] > max(out['kid_floor'][0], 0) + 0.05
  # too small a pool: no floor for that group
  small = quality.equal_n_quality(gen, gen_groups, ref, ref_labels, pool[:70], pool_labels[:70],
                                  2, n=20)
  assert small['kid_floor'][1] is None and small['kid_floor_mean'] is None
  assert small['kid_floor'][0] is not None
  with pytest.raises(DataError):
    quality.equal_n_quality(gen, gen_groups, ref, ref_labels, pool, pool_labels, 2, n=1)
