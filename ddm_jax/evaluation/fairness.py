"""Fairness metrics on an attribute classifier's predictions (numpy only).

Conventions: ``pred_labels`` are integer group ids in ``[0, num_groups)`` that
the evaluator assigned to generated images; ``p_hat`` is the vector of
predicted group proportions. FD follows Choi et al. 2020 (L2 distance to the
uniform distribution); ``fd_paper_form`` is the |p_0 - 0.5| number of the DDM
demo table, which for two groups equals the L2 FD divided by sqrt(2).
"""
import numpy as np

from ddm_jax.errors import DataError

# KL floor for the target distribution: a target group with zero mass that
# still receives predictions would give +inf; flooring gives a large finite
# number (about p * log(p / 1e-12) <= 27.6 nats) that still sorts as "worst".
KL_EPS = 1e-12


def _labels(pred_labels, num_groups, name='pred_labels'):
  if not isinstance(num_groups, (int, np.integer)) or num_groups < 1:
    raise DataError(f'num_groups must be a positive integer, got {num_groups!r}')
  y = np.asarray(pred_labels)
  if y.ndim != 1:
    raise DataError(f'{name} must be 1-D, got shape {y.shape}')
  if y.size == 0:
    raise DataError(f'{name} is empty')
  if not np.issubdtype(y.dtype, np.integer):
    if not np.all(np.equal(np.mod(y, 1), 0)):
      raise DataError(f'{name} must hold integer group ids, got dtype {y.dtype}')
    y = y.astype(np.int64)
  if y.min() < 0 or y.max() >= num_groups:
    raise DataError(f'{name} must lie in [0, {num_groups}), got range '
                    f'[{y.min()}, {y.max()}]')
  return y


def _distribution(p, name):
  p = np.asarray(p, dtype=np.float64)
  if p.ndim != 1 or p.size == 0:
    raise DataError(f'{name} must be a non-empty 1-D vector, got shape {p.shape}')
  if np.any(~np.isfinite(p)) or np.any(p < 0) or abs(p.sum() - 1.0) > 1e-6:
    raise DataError(f'{name} must be a probability vector (>= 0, sums to 1), got {p}')
  return p


def _target(p_hat, p_target):
  if p_target is None:
    return np.full_like(p_hat, 1.0 / p_hat.size)
  q = _distribution(p_target, 'p_target')
  if q.shape != p_hat.shape:
    raise DataError(f'p_target has {q.size} groups but p_hat has {p_hat.size}')
  return q


def proportions(pred_labels, num_groups):
  """Share of samples predicted in each group, shape ``(num_groups,)``."""
  y = _labels(pred_labels, num_groups)
  return np.bincount(y, minlength=num_groups) / y.size


def bootstrap_ci(pred_labels, num_groups, n_boot=1000, alpha=0.05, seed=0):
  """Percentile-bootstrap ``(lo, hi)`` of each group's proportion.

  Resampling n labels with replacement and counting per group is exactly a
  Multinomial(n, p_hat) draw, so we draw the ``(n_boot, num_groups)`` counts
  directly: the same distribution as index resampling at O(n_boot * groups)
  cost instead of O(n_boot * n).
  """
  if not 0 < alpha < 1:
    raise DataError(f'alpha must be in (0, 1), got {alpha}')
  if n_boot < 1:
    raise DataError(f'n_boot must be >= 1, got {n_boot}')
  y = _labels(pred_labels, num_groups)
  p_hat = np.bincount(y, minlength=num_groups) / y.size
  rng = np.random.default_rng(seed)
  boot = rng.multinomial(y.size, p_hat, size=n_boot) / y.size
  lo, hi = np.percentile(boot, [100 * alpha / 2, 100 * (1 - alpha / 2)], axis=0)
  return lo, hi


def fairness_discrepancy(p_hat, p_target=None):
  """Choi et al. 2020 FD: ``||p_hat - p_target||_2``; uniform target by default."""
  p = _distribution(p_hat, 'p_hat')
  return float(np.linalg.norm(p - _target(p, p_target)))


def fd_paper_form(p_hat):
  """The DDM demo table's FD for two groups: ``|p_0 - 0.5|``.

  With two groups ``p_hat - (0.5, 0.5) = (d, -d)``, so the L2 FD is
  ``sqrt(2) * |d|`` and this form equals ``fairness_discrepancy(p_hat) / sqrt(2)``.
  """
  p = _distribution(p_hat, 'p_hat')
  if p.size != 2:
    raise DataError(f'fd_paper_form is defined for two groups, got {p.size}')
  return float(abs(p[0] - 0.5))


def kl_divergence(p_hat, p_target=None, eps=KL_EPS):
  """``KL(p_hat || p_target)`` in nats; uniform target by default.

  Epsilon policy: terms with ``p_hat == 0`` are exactly 0 (0 log 0 = 0), and
  ``p_target`` is floored at ``eps`` only inside the log, so the result is
  exact whenever the target has full support and finite otherwise.
  """
  p = _distribution(p_hat, 'p_hat')
  q = _target(p, p_target)
  m = p > 0
  return float(np.sum(p[m] * (np.log(p[m]) - np.log(np.maximum(q[m], eps)))))


def statistical_parity_difference(cond_labels, pred_labels, num_groups):
  """Per conditioned group g, the rate of its samples classified as g; SPD = max - min.

  For attribute-conditioned generation: ``cond_labels[i]`` is the group sample
  i was asked for, ``pred_labels[i]`` the group the evaluator saw, or -1 for a sample of
  no group (off target: a miss). Returns ``(rates, spd)`` with ``rates`` of shape
  ``(num_groups,)``.
  """
  c = _labels(cond_labels, num_groups, 'cond_labels')
  raw = np.asarray(pred_labels)
  y = np.where(raw == -1, -1, _labels(np.where(raw == -1, 0, raw), num_groups))
  if c.shape != y.shape:
    raise DataError(f'cond_labels {c.shape} and pred_labels {y.shape} differ in length')
  n = np.bincount(c, minlength=num_groups)
  if np.any(n == 0):
    raise DataError(f'no samples conditioned on group(s) {np.flatnonzero(n == 0).tolist()}')
  hits = np.bincount(c[c == y], minlength=num_groups)
  rates = hits / n
  return rates, float(rates.max() - rates.min())


def entropy(logits):
  """Entropy (nats) of ``softmax(logits)`` for each row of a ``(N, K)`` array."""
  z = np.asarray(logits, dtype=np.float64)
  if z.ndim != 2 or z.shape[1] < 1:
    raise DataError(f'logits must have shape (N, K), got {z.shape}')
  if np.any(np.isnan(z)) or np.any(np.isposinf(z)) or np.any(np.isneginf(z.max(axis=1))):
    raise DataError('logits contain NaN, +inf or an all -inf row')
  z = z - z.max(axis=1, keepdims=True)  # stable log-softmax
  logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  p = np.exp(logp)
  # 0 log 0 = 0, also for -inf logits (masked groups) where logp is -inf.
  return -(p * np.where(p > 0, logp, 0.0)).sum(axis=1)


def entropy_stats(logits):
  """``(mean, std)`` of the per-row entropy; population std (ddof=0)."""
  h = entropy(logits)
  if h.size == 0:
    raise DataError('entropy_stats needs at least one row of logits')
  return float(h.mean()), float(h.std())
