"""Evaluators plugged in through `evaluate.py --evaluator=tests.eval_plugins:FACTORY`
(ddm_jax.evaluation.classifier.GroupEvaluator): small numpy ones for the tests."""
import numpy as np


class NearestCentroid:
  """Logits: minus the squared distance to each group's mean image; features: the image
  averaged over 2x2 blocks."""

  def __init__(self, images, labels, num_groups):
    self.means = np.stack([images[labels == g].mean(0) for g in range(num_groups)])

  def logits_and_features(self, images, batch_size):
    del batch_size  # numpy: one pass
    diff = images[:, None] - self.means[None]
    logits = -np.square(diff).reshape(len(images), len(self.means), -1).sum(-1)
    n, h, w, c = images.shape
    feats = images[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))
    return logits, feats.reshape(n, -1)


class Constant(NearestCentroid):
  """Calls every image group 0: a useless evaluator the accuracy floor must refuse."""

  def logits_and_features(self, images, batch_size):
    logits, feats = super().logits_and_features(images, batch_size)
    return np.tile([[1.0, 0.0]], (len(images), 1)), feats


def centroid(images, labels, num_groups, seed=0):
  del seed
  return NearestCentroid(images, labels, num_groups)


def constant(images, labels, num_groups, seed=0):
  del seed
  return Constant(images, labels, num_groups)


def not_an_evaluator(images, labels, num_groups, seed=0):
  return object()
