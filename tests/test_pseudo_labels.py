"""Pseudo group labels without supervision (k-means on pixel PCA) and their scores."""
import ml_collections
import numpy as np
import pytest

from configs import digits as digits_config
from ddm_jax import data, pseudo_labels as pl
from ddm_jax.errors import ConfigError, DataError


def _blobs(n0=60, n1=30, seed=0):
  """Two groups of 8x8 'images': a bright top half vs a bright bottom half, plus noise."""
  rng = np.random.default_rng(seed)
  a = np.zeros((n0, 8, 8, 1)); a[:, :4] = 1.0
  b = np.zeros((n1, 8, 8, 1)); b[:, 4:] = 1.0
  x = np.concatenate([a, b]) + 0.3 * rng.standard_normal((n0 + n1, 8, 8, 1))
  y = np.r_[np.zeros(n0, int), np.ones(n1, int)]
  perm = rng.permutation(n0 + n1)
  return x[perm], y[perm]


def test_adjusted_rand_index_hand_values():
  assert pl.adjusted_rand_index([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
  # 2x2 contingency of ones: index 0, expected 2*2/6, max 2 -> (0 - 2/3) / (2 - 2/3) = -0.5
  assert pl.adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
  with pytest.raises(DataError):
    pl.adjusted_rand_index([0, 1], [0, 1, 1])


def test_best_match_accuracy():
  assert pl.best_match_accuracy([0, 0, 1, 1], [1, 1, 0, 0], 2) == 1.0
  assert pl.best_match_accuracy([0, 0, 0, 1], [1, 1, 0, 0], 2) == pytest.approx(0.75)


def test_kmeans_recovers_separated_groups_and_numbers_by_size():
  x, y = _blobs()
  labels = pl.pseudo_labels(x, 2, seed=0)
  assert labels.shape == y.shape and labels.dtype == np.int64
  assert pl.adjusted_rand_index(y, labels) == pytest.approx(1.0)
  # Renumbered by size: cluster 0 is the larger group (60 vs 30).
  np.testing.assert_array_equal(np.bincount(labels), [60, 30])
  np.testing.assert_array_equal(labels, pl.pseudo_labels(x, 2, seed=0))  # deterministic


def test_kmeans_on_pure_noise_is_near_chance():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((200, 8, 8, 1))
  y = rng.integers(0, 2, 200)
  assert abs(pl.adjusted_rand_index(y, pl.pseudo_labels(x, 2))) < 0.1


def test_bad_arguments():
  x, _ = _blobs(5, 5)
  with pytest.raises(ConfigError):
    pl.pseudo_labels(x, 2, method='spectral')
  with pytest.raises(ConfigError):
    pl.pseudo_labels(x, 1)
  with pytest.raises(DataError):
    pl.pseudo_labels(x[:1], 2)


def _cfg(**kw):
  cfg = ml_collections.ConfigDict(digits_config.get_config().data.to_dict())
  for k, v in kw.items():
    cfg[k] = v
  return cfg


def test_pipeline_replaces_labels_with_clusters(tmp_path):
  data_dir = str(tmp_path / 'data')
  true = data.make_source(_cfg(), data_dir, 'train').labels
  src = data.make_source(_cfg(pseudo_labels='kmeans'), data_dir, 'train')
  assert len(src) == len(true)
  # Digits 0 and 1 are far apart in pixel space: k-means recovers them almost exactly.
  assert pl.adjusted_rand_index(true, src.labels) > 0.9
  # Items carry the pseudo label, and true labels are untouched when the option is off.
  assert {src[i]['label'] for i in range(len(src))} == {0, 1}
  np.testing.assert_array_equal(data.make_source(_cfg(), data_dir, 'train').labels, true)
  with pytest.raises(ConfigError):
    data.make_source(_cfg(pseudo_labels='nope'), data_dir, 'train')
