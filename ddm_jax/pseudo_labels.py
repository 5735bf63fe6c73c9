"""Group labels without supervision: k-means on label-free image features.

DDM's abstract promises debiasing without a predefined attribute. When a data
set has no group labels, ``config.data.pseudo_labels = 'kmeans'`` replaces
them, before training, with ``K = data.num_groups`` clusters of the training
images. The features use no label: pixels, standardised per pixel, reduced
with PCA (``data.pseudo_pca_dims`` components, default 16), whitened or not,
then k-means (scikit-learn, ``n_init`` restarts, seeded). Cluster ids are
arbitrary: evaluation compares them with true groups only through
permutation-invariant scores (adjusted Rand index) or through balanced
targets, which do not depend on the numbering.
"""
import numpy as np

from ddm_jax.errors import ConfigError, DataError

# scikit-learn and scipy.optimize are imported in the functions that use them:
# ddm_jax.data imports this module on every run, and at the top they would add
# their import time (sklearn's is long) to it, which only pseudo-labelling and
# cluster evaluation need.

METHODS = ('kmeans',)


def pixel_features(images, pca_dims=16, seed=0):
  """``(N, d)`` PCA features of flattened images (float), ``d = min(pca_dims, N-1, pixels)``."""
  from sklearn.decomposition import PCA  # pylint: disable=import-outside-toplevel -- slow import
  x = np.asarray(images, np.float64).reshape(len(images), -1)
  if x.shape[0] < 2:
    raise DataError(f'pseudo-labels need at least 2 images, got {x.shape[0]}')
  x = x - x.mean(axis=0)
  std = x.std(axis=0)
  x = x / np.where(std > 1e-8, std, 1.0)
  dims = int(min(pca_dims, x.shape[0] - 1, x.shape[1]))
  if dims < 1:
    raise ConfigError(f'pseudo_pca_dims must be >= 1, got {pca_dims}')
  return PCA(n_components=dims, random_state=seed).fit_transform(x)


def kmeans_labels(feats, k, seed=0, n_init=10):
  """K-means cluster ids (int64 ``[N]``) of ``(N, d)`` features, renumbered by size
  (cluster 0 the largest), so the numbering is deterministic for a given seed."""
  from sklearn.cluster import KMeans  # pylint: disable=import-outside-toplevel
  feats = np.asarray(feats, np.float64)
  if not isinstance(k, (int, np.integer)) or k < 2:
    raise ConfigError(f'k-means needs k >= 2 clusters, got {k!r}')
  if feats.shape[0] < k:
    raise DataError(f'{feats.shape[0]} images cannot form {k} clusters')
  raw = KMeans(n_clusters=int(k), n_init=n_init, random_state=seed).fit_predict(feats)
  sizes = np.bincount(raw, minlength=k)
  order = np.argsort(-sizes, kind='stable')  # old id of the new cluster i
  remap = np.empty(k, np.int64)
  remap[order] = np.arange(k)
  return remap[raw]


def pseudo_labels(images, k, method='kmeans', pca_dims=16, seed=0):
  """Pseudo group labels (int64 ``[N]``) of ``images`` (any shape ``[N, ...]``)."""
  if method not in METHODS:
    raise ConfigError(f"data.pseudo_labels must be '' or one of {METHODS}, got {method!r}")
  labels = kmeans_labels(pixel_features(images, pca_dims, seed), k, seed)
  missing = np.flatnonzero(np.bincount(labels, minlength=k) == 0)
  if missing.size:
    raise DataError(f'k-means left cluster(s) {missing.tolist()} empty')
  return labels


def adjusted_rand_index(true_labels, pred_labels):
  """Adjusted Rand index (Hubert & Arabie 1985): 1 = same partition, ~0 = chance."""
  from sklearn.metrics import adjusted_rand_score  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(true_labels), np.asarray(pred_labels)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise DataError(f'label vectors must be equal-length 1-D, got {a.shape} and {b.shape}')
  return float(adjusted_rand_score(a, b))


def best_match_accuracy(true_labels, pred_labels, k):
  """Accuracy of ``pred_labels`` after the best one-to-one renaming of clusters to groups."""
  from scipy.optimize import linear_sum_assignment  # pylint: disable=import-outside-toplevel
  a, b = np.asarray(true_labels, np.int64), np.asarray(pred_labels, np.int64)
  if a.shape != b.shape or a.ndim != 1 or a.size == 0:
    raise DataError(f'label vectors must be equal-length 1-D, got {a.shape} and {b.shape}')
  table = np.zeros((k, k), np.int64)
  np.add.at(table, (b, a), 1)
  rows, cols = linear_sum_assignment(-table)
  return float(table[rows, cols].sum() / a.size)
