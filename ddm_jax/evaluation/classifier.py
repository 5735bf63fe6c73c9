"""The evaluator: a small CNN group classifier, its training and an on-disk cache.

The evaluator labels generated images with a group (for the fairness metrics)
and supplies penultimate features (for the Fréchet classifier distance and
precision/recall). It is trained on real images with group labels, and its
held-out accuracy gates every fairness number: a biased or weak evaluator
would report its own bias as the generator's (``check_accuracy_floor``).

Params are a plain pytree (``module.init(...)['params']``); the module's sizes
are read back from the kernel shapes, so a params pytree alone is enough to
``predict`` or take ``features``.

**Other evaluators** (faces and other large images, where a small CNN trained on a
few images is not enough): ``evaluate.py --evaluator=MODULE:FACTORY`` (or
``EvalSettings.evaluator``) imports ``FACTORY`` and calls

    FACTORY(images, labels, num_groups, seed=seed) -> evaluator

with the real evaluator split (float32 NHWC in [-1, 1], int32 group labels) to train
on, or to ignore for a pretrained classifier. The evaluator is any object with

    evaluator.logits_and_features(images, batch_size) -> (logits [N, K], features [N, F])

(``GroupEvaluator``). It is scored on the held-out split like the CNN and held to the
same accuracy floor; its features feed the Fréchet distance and precision/recall.
"""
import functools
import hashlib
import json
import os
import time
import warnings
import importlib
from typing import Any, Mapping, NamedTuple, Protocol, Tuple, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from ddm_jax.errors import ConfigError, DataError
from ddm_jax.files import write_bytes

_CACHE_FORMAT = 1
_PARAMS_FILE = 'params.msgpack'
_META_FILE = 'evaluator.json'


class Evaluator(nn.Module):
  """Conv(w) -> Conv(2w, /2) -> Conv(2w, /2) -> global mean -> Dense(features) -> Dense(groups).

  Input NHWC in [-1, 1], 1 or 3 channels, H, W >= 8. Swish everywhere so the
  penultimate features have no dead (constant-zero) units, which would make
  their covariance singular in the Fréchet distance.
  """
  num_groups: int
  width: int = 32
  features: int = 64

  @nn.compact
  def __call__(self, x):
    x = nn.swish(nn.Conv(self.width, (3, 3), name='conv1')(x))
    x = nn.swish(nn.Conv(2 * self.width, (3, 3), strides=(2, 2), name='conv2')(x))
    x = nn.swish(nn.Conv(2 * self.width, (3, 3), strides=(2, 2), name='conv3')(x))
    x = x.mean(axis=(1, 2))
    feats = nn.swish(nn.Dense(self.features, name='penultimate')(x))
    return nn.Dense(self.num_groups, name='logits')(feats), feats


@runtime_checkable
class GroupEvaluator(Protocol):
  """What the evaluation asks of a plugged-in evaluator (see the module docstring)."""

  def logits_and_features(self, images: np.ndarray,
                          batch_size: int) -> Tuple[np.ndarray, np.ndarray]:
    ...


class CachedEvaluator(NamedTuple):
  params: Any        # the params pytree
  accuracy: float    # held-out accuracy recorded at training time
  path: str          # cache entry folder
  from_cache: bool   # True when loaded instead of trained


def _params_of(p):
  """(params, (groups, width, features, channels)) of our CNN's params pytree."""
  if isinstance(p, Mapping) and set(p) == {'params'}:  # a full variables dict
    p = p['params']
  try:
    k1 = p['conv1']['kernel']
    return p, (p['logits']['kernel'].shape[-1], k1.shape[-1],
               p['penultimate']['kernel'].shape[-1], k1.shape[2])
  except (KeyError, TypeError, AttributeError, IndexError) as e:
    raise ConfigError(f'not an Evaluator params pytree (missing {e})') from e


@functools.lru_cache(maxsize=None)
def _apply_fn(num_groups, width, features):
  model = Evaluator(num_groups, width, features)
  return jax.jit(lambda p, x: model.apply({'params': p}, x))


def _check_images(images, name='images', channels=None):
  x = np.asarray(images)
  if x.ndim != 4:
    raise DataError(f'{name} must be NHWC with 4 dims, got shape {x.shape}')
  if x.shape[-1] not in (1, 3):
    raise DataError(f'{name} must have 1 or 3 channels (NHWC), got shape {x.shape}')
  if min(x.shape[1:3]) < 8:
    raise DataError(f'{name} must be at least 8x8, got {x.shape[1]}x{x.shape[2]}')
  if channels is not None and x.shape[-1] != channels:
    raise DataError(f'{name} have {x.shape[-1]} channels, the evaluator expects {channels}')
  x = x.astype(np.float32)
  if x.size and (not np.all(np.isfinite(x)) or x.min() < -1.001 or x.max() > 1.001):
    raise DataError(f'{name} must be finite and scaled to [-1, 1], got range '
                    f'[{np.nanmin(x):.3g}, {np.nanmax(x):.3g}]')
  return x


def _check_labels(labels, n, num_groups, name='labels'):
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'{name} must be {n} integer group ids, got {y.dtype} {y.shape}')
  if n and (y.min() < 0 or y.max() >= num_groups):
    raise DataError(f'{name} must lie in [0, {num_groups}), got [{y.min()}, {y.max()}]')
  return y.astype(np.int32)


def logits_and_features(evaluator, images, batch_size):
  """(logits [N, K], features [N, F]) of `evaluator`: our CNN, as its params pytree (or
  flax's full variables) or a ``CachedEvaluator``, or a plugged-in ``GroupEvaluator``."""
  if isinstance(evaluator, CachedEvaluator):
    evaluator = evaluator.params
  if not isinstance(evaluator, Mapping) and isinstance(evaluator, GroupEvaluator):
    return _plugged(evaluator, _check_images(images), batch_size)
  p, (groups, width, feats, channels) = _params_of(evaluator)
  x = _check_images(images, channels=channels)
  fn = _apply_fn(groups, width, feats)
  n = x.shape[0]
  bs = max(1, min(batch_size, n))
  logits, feats_out = [], []
  for start in range(0, n, bs):
    chunk = x[start:start + bs]
    m = chunk.shape[0]
    if m < bs:  # pad the tail so every call reuses one compiled shape
      chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], chunk.dtype)])
    lg, ft = fn(p, chunk)
    logits.append(np.asarray(lg)[:m])
    feats_out.append(np.asarray(ft)[:m])
  if not logits:
    return np.zeros((0, groups), np.float32), np.zeros((0, feats), np.float32)
  return np.concatenate(logits), np.concatenate(feats_out)


def _plugged(evaluator, x, batch_size):
  """A GroupEvaluator's output, checked: one finite row of logits and features per image."""
  name = type(evaluator).__name__
  try:
    logits, feats = evaluator.logits_and_features(x, batch_size)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'evaluator {name}.logits_and_features failed: {e}') from e
  logits, feats = np.asarray(logits, np.float32), np.asarray(feats, np.float32)
  if logits.ndim != 2 or feats.ndim != 2 or len(logits) != len(x) or len(feats) != len(x):
    raise ConfigError(f'evaluator {name} must return logits [N, K] and features [N, F] for '
                      f'{len(x)} images, got {logits.shape} and {feats.shape}')
  if not (np.all(np.isfinite(logits)) and np.all(np.isfinite(feats))):
    raise ConfigError(f'evaluator {name} returned non-finite logits or features')
  return logits, feats


def load_factory(spec):
  """'package.module:function' -> the function (ConfigError naming `spec` otherwise)."""
  module, _, name = str(spec).partition(':')
  if not module or not name:
    raise ConfigError(f"evaluator must be 'cnn' or 'module:factory', got {spec!r}")
  try:
    factory = getattr(importlib.import_module(module), name)
  except ImportError as e:
    raise ConfigError(f'evaluator {spec!r}: cannot import {module} ({e})') from None
  except AttributeError:
    raise ConfigError(f'evaluator {spec!r}: {module} has no {name}') from None
  if not callable(factory):
    raise ConfigError(f'evaluator {spec!r} is not callable')
  return factory


def plugged_evaluator(spec, images, labels, num_groups, seed=0):
  """The evaluator `spec` ('module:factory') builds from the evaluator split."""
  evaluator = load_factory(spec)(images, labels, num_groups, seed=seed)
  if not callable(getattr(evaluator, 'logits_and_features', None)):
    raise ConfigError(f'evaluator {spec!r} returned {type(evaluator).__name__}, which has no '
                      'logits_and_features(images, batch_size) method')
  return evaluator


def predict(evaluator, images, batch_size=256):
  """Logits ``(N, num_groups)`` for NHWC images in [-1, 1], in batches."""
  return logits_and_features(evaluator, images, batch_size)[0]


def features(evaluator, images, batch_size=256):
  """Penultimate features ``(N, features)`` for NHWC images in [-1, 1], in batches."""
  return logits_and_features(evaluator, images, batch_size)[1]


def accuracy(evaluator, images, labels, batch_size=256):
  """``(accuracy, per_group_accuracy)``; per-group entries are NaN for absent groups."""
  logits = predict(evaluator, images, batch_size)
  num_groups = logits.shape[1]
  y = _check_labels(labels, logits.shape[0], num_groups)
  if y.size == 0:
    raise DataError('accuracy needs at least one labelled image')
  ok = logits.argmax(1) == y
  n = np.bincount(y, minlength=num_groups)
  hits = np.bincount(y, weights=ok, minlength=num_groups)
  with np.errstate(invalid='ignore', divide='ignore'):
    per_group = np.where(n > 0, hits / np.maximum(n, 1), np.nan)
  return float(ok.mean()), per_group


def _shift(x, key, max_shift):
  """Random translation by up to max_shift pixels per image (edge padding)."""
  n, h, w, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (max_shift, max_shift), (max_shift, max_shift), (0, 0)),
                   mode='edge')
  offs = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, x.shape[-1]))
  return jax.vmap(crop)(padded, offs)


def holdout_split(labels, num_groups, holdout, rng):
  """Stratified ``(train_idx, val_idx)``: ``holdout`` of each group is held out."""
  if not 0 < holdout < 1:
    raise ConfigError(f'holdout must be in (0, 1), got {holdout}')
  y = np.asarray(labels)
  val = np.zeros(y.size, bool)
  for g in range(num_groups):  # per group, so a rare group is still scored
    idx = rng.permutation(np.flatnonzero(y == g))
    val[idx[:int(round(holdout * idx.size))]] = True
  return np.flatnonzero(~val), np.flatnonzero(val)


def batch_indices(labels, num_groups, steps, batch_size, balance, rng):
  """``(steps, batch_size)`` sample indices; with ``balance`` each group is
  drawn equally often whatever its share of the data."""
  y = np.asarray(labels)
  counts = np.bincount(y, minlength=num_groups)
  w = (1.0 / np.maximum(counts, 1))[y] if balance else np.ones(y.size)
  return rng.choice(y.size, size=(steps, batch_size), p=w / w.sum())


def train_evaluator(images, labels, num_groups, *, seed=0, steps=300, batch_size=64,
                    learning_rate=3e-3, width=32, features=64, val_images=None,
                    val_labels=None, holdout=0.2, augment=True, balance=True):
  """Train the evaluator with Adam; returns ``(params, held_out_accuracy)``.

  Without ``val_images`` a stratified ``holdout`` share of the data is kept
  out of training and scored. ``balance`` samples batches with equal group
  weight, so a skewed training set does not teach the evaluator a prior that
  would leak into the measured group proportions. ``augment`` applies random
  translations of up to ``max(1, H // 16)`` pixels (no flips: they change
  digits' identity).
  """
  if not isinstance(num_groups, (int, np.integer)) or num_groups < 2:
    raise ConfigError(f'num_groups must be an integer >= 2, got {num_groups!r}')
  if steps < 1 or batch_size < 1:
    raise ConfigError(f'steps and batch_size must be >= 1, got {steps}, {batch_size}')
  x = _check_images(images)
  y = _check_labels(labels, x.shape[0], num_groups)
  rng = np.random.default_rng(seed)
  if val_images is None:
    if val_labels is not None:
      raise ConfigError('val_labels given without val_images')
    tr, va = holdout_split(y, num_groups, holdout, rng)
    xv, yv, x, y = x[va], y[va], x[tr], y[tr]
  else:
    xv = _check_images(val_images, 'val_images', channels=x.shape[-1])
    yv = _check_labels(val_labels, xv.shape[0], num_groups, 'val_labels')
  counts = np.bincount(y, minlength=num_groups)
  if np.any(counts == 0):
    raise DataError(f'no training images for group(s) {np.flatnonzero(counts == 0).tolist()}')
  if yv.size == 0:
    raise DataError('the held-out set is empty; give more data or val_images')

  model = Evaluator(num_groups, width, features)
  key = jax.random.PRNGKey(seed)
  params = model.init(key, jnp.zeros((1,) + x.shape[1:], jnp.float32))['params']
  warmup = max(1, min(50, steps // 10))
  sched = optax.warmup_cosine_decay_schedule(
      0.0, learning_rate, warmup_steps=warmup, decay_steps=max(steps, warmup + 1))
  tx = optax.adam(sched)
  opt_state = tx.init(params)
  max_shift = max(1, x.shape[1] // 16)

  @jax.jit
  def step(params, opt_state, xb, yb, step_key):
    if augment:
      xb = _shift(xb, step_key, max_shift)

    def loss_fn(p):
      logits, _ = model.apply({'params': p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  idx = batch_indices(y, num_groups, steps, batch_size, balance, rng)
  aug_key = jax.random.fold_in(key, 1)
  for t in range(steps):
    params, opt_state, _ = step(params, opt_state, x[idx[t]], y[idx[t]],
                                jax.random.fold_in(aug_key, t))
  params = jax.tree.map(np.asarray, params)
  return params, accuracy(params, xv, yv)[0]


def check_accuracy_floor(acc, floor=0.95):
  """Raise ``DataError`` when the evaluator's held-out accuracy is below ``floor``."""
  if not np.isfinite(acc) or acc < floor:
    raise DataError(
        f'evaluator held-out accuracy {acc:.4f} is below the floor {floor:.4f}: its '
        'group labels are not trustworthy enough for fairness metrics (train longer, '
        'use more or cleaner labelled data, or lower the floor knowingly)')
  return acc


def _fingerprint(*arrays):
  h = hashlib.sha256()
  for a in arrays:
    if a is None:
      h.update(b'none')
      continue
    a = np.ascontiguousarray(a)
    h.update(f'{a.dtype.str}{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def load_or_train_evaluator(cache_dir, key_dict, images, labels, num_groups, *,
                            val_images=None, val_labels=None, train_fn=None,
                            **train_kwargs):
  """Load the evaluator cached under ``key_dict``, or train and cache it.

  The cache key is ``key_dict`` plus ``num_groups``, ``train_kwargs`` and a
  SHA-256 of the training/validation arrays, so changed data or settings never
  hit a stale entry. The entry is ``cache_dir/<sha256 of the key JSON>[:20]/``
  with ``params.msgpack`` (flax msgpack) and ``evaluator.json`` (key and
  held-out accuracy), each written to a temp file then ``os.replace``d; the
  JSON goes last, so its presence marks a complete entry. An unreadable entry
  is retrained with a warning. ``train_fn`` (default ``train_evaluator``) is
  called as ``train_fn(images, labels, num_groups, val_images=..., val_labels=...,
  **train_kwargs)`` and returns ``(params, accuracy)``.
  """
  full_key = {'format': _CACHE_FORMAT, 'key': key_dict, 'num_groups': int(num_groups),
              'train_kwargs': train_kwargs,
              'data_sha256': _fingerprint(images, labels, val_images, val_labels)}
  try:
    key_json = json.dumps(full_key, sort_keys=True, separators=(',', ':'), allow_nan=False)
  except (TypeError, ValueError) as e:
    raise ConfigError(f'evaluator cache key must be JSON-serialisable: {e}') from e
  digest = hashlib.sha256(key_json.encode()).hexdigest()
  path = os.path.join(os.fspath(cache_dir), digest[:20])
  meta_path, params_path = os.path.join(path, _META_FILE), os.path.join(path, _PARAMS_FILE)

  if os.path.exists(meta_path):
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      if meta['key_sha256'] != digest:
        raise ValueError('key mismatch')
      with open(params_path, 'rb') as f:
        params = serialization.msgpack_restore(f.read())
      _params_of(params)
      return CachedEvaluator(params, float(meta['accuracy']), path, True)
    except Exception as e:  # noqa: BLE001 -- any damage means: retrain
      warnings.warn(f'evaluator cache entry {path} is unreadable ({e}); retraining')

  train_fn = train_fn or train_evaluator
  params, acc = train_fn(images, labels, num_groups, val_images=val_images,
                         val_labels=val_labels, **train_kwargs)
  params = jax.tree.map(np.asarray, params)
  os.makedirs(path, exist_ok=True)
  write_bytes(params_path, serialization.msgpack_serialize(params), sync=True)
  meta = {'key': full_key, 'key_sha256': digest, 'accuracy': float(acc),
          'created_unix': time.time()}
  write_bytes(meta_path, json.dumps(meta, indent=2, sort_keys=True).encode(), sync=True)
  return CachedEvaluator(params, float(acc), path, False)
