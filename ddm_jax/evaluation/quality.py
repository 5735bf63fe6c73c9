"""Sample-quality metrics in the evaluator's feature space (numpy/scipy).

Inception weights cannot be downloaded here, so the features are the
penultimate activations of our own group classifier (``classifier.features``).
The distance below is therefore a *Fréchet classifier distance* (FCD): the
Fréchet distance formula of FID in a small task-specific feature space. Its
numbers are comparable only between runs that use the same evaluator, and
never with published FID values. ``kid`` is the unbiased kernel distance (KID) in the
same features; ``equal_n_quality`` compares groups at one sample size.
"""
import warnings

import numpy as np
from scipy import linalg

from ddm_jax.errors import DataError

# Rows of the pairwise-distance matrix per block: bounds memory to about
# _BLOCK_ELEMS float64 numbers (128 MiB) whatever the set sizes.
_BLOCK_ELEMS = 1 << 24


def _feats(x, name, min_rows=2):
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2:
    raise DataError(f'{name} must have shape (N, D), got {x.shape}')
  if x.shape[0] < min_rows:
    raise DataError(f'{name} needs at least {min_rows} rows, got {x.shape[0]}')
  if not np.all(np.isfinite(x)):
    raise DataError(f'{name} contains NaN or inf')
  return x


def feature_stats(feats):
  """``(mu, sigma)``: mean and unbiased covariance (ddof=1) of ``(N, D)`` features."""
  x = _feats(feats, 'feats')
  return x.mean(axis=0), np.atleast_2d(np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

  ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))``, computed
  as in the FID reference code: if ``sqrtm`` of the product is not finite
  (near-singular covariances, e.g. fewer samples than dimensions) both
  covariances get ``eps * I`` added; the numerical imaginary part is dropped.
  """
  mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
  s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
    raise DataError(f'shape mismatch: mu1 {mu1.shape}, mu2 {mu2.shape}, '
                    f'sigma1 {s1.shape}, sigma2 {s2.shape}')
  diff = mu1 - mu2
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # singular input; handled below
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
      offset = np.eye(d) * eps
      covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def frechet_distance_from_features(feats1, feats2, eps=1e-6):
  """Fréchet (classifier) distance between two ``(N, D)`` feature sets."""
  f1, f2 = _feats(feats1, 'feats1'), _feats(feats2, 'feats2')
  if f1.shape[1] != f2.shape[1]:
    raise DataError(f'feature dims differ: {f1.shape[1]} vs {f2.shape[1]}')
  return frechet_distance(*feature_stats(f1), *feature_stats(f2), eps=eps)


def _row_blocks(n_rows, n_cols):
  step = max(1, _BLOCK_ELEMS // max(1, n_cols))
  for start in range(0, n_rows, step):
    yield slice(start, min(n_rows, start + step))


def _sq_dists(a, b, b_sq):
  # ||a||^2 + ||b||^2 - 2 a.b, clipped: rounding can make it slightly negative.
  d = (a * a).sum(1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
  return np.maximum(d, 0.0)


def _knn_radii_sq(x, k):
  """Squared distance of each row to its k-th nearest other row."""
  x_sq = (x * x).sum(1)
  out = np.empty(x.shape[0])
  for sl in _row_blocks(x.shape[0], x.shape[0]):
    d = _sq_dists(x[sl], x, x_sq)
    d[np.arange(d.shape[0]), np.arange(sl.start, sl.stop)] = 0.0  # self is exactly 0
    # Index k of the sorted row skips self (index 0): the k-th neighbour.
    out[sl] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(ref, ref_radii_sq, query):
  """Share of query rows inside at least one ref ball (radius = ref's k-NN radius)."""
  ref_sq = (ref * ref).sum(1)
  inside = np.zeros(query.shape[0], dtype=bool)
  for sl in _row_blocks(query.shape[0], ref.shape[0]):
    inside[sl] = np.any(_sq_dists(query[sl], ref, ref_sq) <= ref_radii_sq[None, :], axis=1)
  return float(inside.mean())


def precision_recall(real_feats, fake_feats, k=3):
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  Each set's manifold is the union of balls around its points with radius the
  distance to the point's k-th nearest neighbour in the same set. Precision is
  the share of fake samples inside the real manifold, recall the share of real
  samples inside the fake manifold. Returns ``(precision, recall)``.
  """
  if not isinstance(k, (int, np.integer)) or k < 1:
    raise DataError(f'k must be a positive integer, got {k!r}')
  real = _feats(real_feats, 'real_feats', min_rows=k + 1)
  fake = _feats(fake_feats, 'fake_feats', min_rows=k + 1)
  if real.shape[1] != fake.shape[1]:
    raise DataError(f'feature dims differ: {real.shape[1]} vs {fake.shape[1]}')
  precision = _coverage(real, _knn_radii_sq(real, k), fake)
  recall = _coverage(fake, _knn_radii_sq(fake, k), real)
  return precision, recall


def noise_floor(real_feats, seed=0, k=3):
  """FD and P/R of one random half of the real features against the other.

  The values a perfect generator would get at this sample size: the FD it
  reports is not 0 and P/R not 1, so compare generated-vs-real numbers to
  these. Returns a dict with ``fd``, ``precision``, ``recall`` and ``n_half``.
  """
  x = _feats(real_feats, 'real_feats', min_rows=2 * (k + 1))
  perm = np.random.default_rng(seed).permutation(x.shape[0])
  half = x.shape[0] // 2
  a, b = x[perm[:half]], x[perm[half:2 * half]]
  p, r = precision_recall(a, b, k=k)
  return {'fd': frechet_distance_from_features(a, b), 'precision': p, 'recall': r,
          'n_half': half}


def _poly_kernel_sum(a, b, d, skip_diagonal=False):
  """Sum of k(a_i, b_j) = (a_i . b_j / d + 1)^3 over all pairs, in row blocks (float64);
  with ``skip_diagonal`` (a is b) the i == j terms are left out."""
  total = 0.0
  for sl in _row_blocks(a.shape[0], b.shape[0]):
    k = (a[sl] @ b.T / d + 1.0) ** 3
    if skip_diagonal:
      k[np.arange(k.shape[0]), np.arange(sl.start, sl.stop)] = 0.0
    total += float(k.sum())
  return total


def kid(feats_a, feats_b):
  """Kernel Inception (here: classifier) Distance, Bińkowski et al. 2018.

  The unbiased U-statistic estimate of the squared MMD between the two feature sets'
  distributions under the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3``:
  ``mean_{i!=j} k(a_i, a_j) + mean_{i!=j} k(b_i, b_j) - 2 mean_{i,j} k(a_i, b_j)``.
  Unbiased, so its expectation does not depend on the set sizes (unlike the Fréchet
  distance), and it can be slightly negative when the distributions are equal. Uses all
  pairs (no subsets), in float64.
  """
  a, b = _feats(feats_a, 'feats_a'), _feats(feats_b, 'feats_b')
  if a.shape[1] != b.shape[1]:
    raise DataError(f'feature dims differ: {a.shape[1]} vs {b.shape[1]}')
  n, m, d = a.shape[0], b.shape[0], a.shape[1]
  k_aa = _poly_kernel_sum(a, a, d, skip_diagonal=True) / (n * (n - 1))
  k_bb = _poly_kernel_sum(b, b, d, skip_diagonal=True) / (m * (m - 1))
  k_ab = _poly_kernel_sum(a, b, d) / (n * m)
  return float(k_aa + k_bb - 2.0 * k_ab)


def _mean_or_none(values):
  return None if any(v is None for v in values) else float(np.mean(values))


def equal_n_quality(gen_feats, gen_groups, ref_feats, ref_labels, pool_feats, pool_labels,
                    num_groups, n, seed=0):
  """Quality per group at an equal number of samples ``n``, with its real-vs-real floor.

  For group g: the first ``n`` generated samples assigned to g (``gen_groups``, in
  generation order) against all reference images of g: KID (``kid``) and FCD
  (``frechet_distance_from_features``); the floor is the same two figures for ``n``
  real images of g drawn (``seed``) from the generator-side pool (``pool_*``: real
  images that are not reference images) against the same reference images. FCD is
  biased at small n; comparing it only at the same n, next to its floor, keeps it
  comparable between models. A group with fewer than ``n`` generated (or pool, for the
  floor) images, or fewer than 2 reference images, gets None.
  """
  gen, ref, pool = (_feats(gen_feats, 'gen_feats', 0), _feats(ref_feats, 'ref_feats', 0),
                    _feats(pool_feats, 'pool_feats', 0))
  gen_groups, ref_labels, pool_labels = (np.asarray(gen_groups), np.asarray(ref_labels),
                                         np.asarray(pool_labels))
  n = int(n)
  if n < 2:
    raise DataError(f'n must be >= 2, got {n}')
  rng = np.random.default_rng(seed)
  out = {'n': n, 'group_counts': [], 'kid': [], 'kid_floor': [], 'fcd': [], 'fcd_floor': []}
  for g in range(int(num_groups)):
    fg, rg, pg = gen[gen_groups == g], ref[ref_labels == g], pool[pool_labels == g]
    out['group_counts'].append(int(fg.shape[0]))
    enough_ref = rg.shape[0] >= 2
    if fg.shape[0] >= n and enough_ref:
      out['kid'].append(kid(fg[:n], rg))
      out['fcd'].append(frechet_distance_from_features(rg, fg[:n]))
    else:
      out['kid'].append(None)
      out['fcd'].append(None)
    if pg.shape[0] >= n and enough_ref:
      real = pg[np.sort(rng.choice(pg.shape[0], n, replace=False))]
      out['kid_floor'].append(kid(real, rg))
      out['fcd_floor'].append(frechet_distance_from_features(rg, real))
    else:
      out['kid_floor'].append(None)
      out['fcd_floor'].append(None)
  for name in ('kid', 'kid_floor', 'fcd', 'fcd_floor'):
    out[f'{name}_mean'] = _mean_or_none(out[name])
  return out
