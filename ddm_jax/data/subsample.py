"""Deterministic subsampling of a labelled pool to a target group ratio.

Shared by the `biased_digits` builder (its `train` split) and the generic TFDS
path (`data.group_ratio`), so both bias a data set the same way.
"""
import numpy as np

from ddm_jax.errors import DataError


def normalize_ratio(ratio, num_groups, key):
  """Returns `ratio` as float64 shares summing to 1; `key` names it in errors."""
  try:
    shares = np.asarray(ratio, dtype=np.float64).reshape(-1)
  except (TypeError, ValueError):
    raise DataError(f'{key} must be a sequence of numbers, got {ratio!r}') from None
  if shares.size != num_groups:
    raise DataError(f'{key} has {shares.size} entries but there are {num_groups} groups')
  if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
    raise DataError(f'{key} must be non-negative with a positive sum, got {tuple(ratio)}')
  return shares / shares.sum()


def ratio_counts(available, shares):
  """Per-group counts whose shares match `shares` within one image, using the most images.

  The total is the largest T with shares[g] * T <= available[g] for every
  group; T is then split by largest remainder, so count[g] = floor or ceil of
  shares[g] * T.
  """
  available = np.asarray(available, dtype=np.int64)
  positive = shares > 0
  total = int(np.floor(np.min(available[positive] / shares[positive]) + 1e-9))
  exact = shares * total
  counts = np.floor(exact + 1e-9).astype(np.int64)
  order = np.argsort(-(exact - counts), kind='stable')
  counts[order[:total - counts.sum()]] += 1
  return np.minimum(counts, available)


def subsample(labels, shares, seed):
  """Sorted indices into `labels` (ints in [0, len(shares))) drawn to match `shares`."""
  labels = np.asarray(labels)
  counts = ratio_counts(np.bincount(labels, minlength=len(shares)), shares)
  rng = np.random.default_rng(seed)
  picked = [rng.permutation(np.flatnonzero(labels == g))[:n] for g, n in enumerate(counts)]
  return np.sort(np.concatenate(picked)).astype(np.int64)
