"""The group selection of a split: which records are read, and with which group label.

Labels are scanned once per data set/split/selection, then filtered
(`data.class_filter`), range-checked (`data.num_groups`), subsampled
(`data.group_ratio`) and, with `data.pseudo_labels`, replaced by clusters.
"""
import functools
import os

import numpy as np
import tensorflow_datasets as tfds

from ddm_jax import pseudo_labels as pl
from ddm_jax.data import subsample
from ddm_jax.data.common import first_line, get
from ddm_jax.data.preparation import prepare
from ddm_jax.data.preprocessing import to_model_image
from ddm_jax.errors import DataError

_SELECTION_CACHE = {}  # filtered (indices, labels) per data set/split/selection


class GroupSource:
  """Random access to `{'image': uint8 [H,W,C], 'label': int[, 'prompt': str]}` of a selection."""

  def __init__(self, base, indices, labels, image_key):
    self._base = base
    self.indices = indices  # int64 record index in the underlying split
    self.labels = labels  # int64 group index per element, already validated
    self._image_key = image_key

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    if not -len(self) <= i < len(self):
      raise IndexError(f'index {i} out of range for a source of {len(self)}')
    example = self._base[int(self.indices[i])]
    image = np.asarray(_lookup(example, self._image_key, 'data.image_key'))
    out = {'image': image[..., None] if image.ndim == 2 else image, 'label': int(self.labels[i])}
    if 'prompt' in example:
      prompt = example['prompt']
      out['prompt'] = prompt.decode('utf-8') if isinstance(prompt, bytes) else str(prompt)
    return out


def make_source(data_cfg, data_dir, split):
  """A `GroupSource` over `split`: labels read, filtered, validated and subsampled once."""
  builder = prepare(data_cfg, data_dir)
  base = _data_source(builder, split)
  image_key = get(data_cfg, 'image_key', 'image')
  key = (os.fspath(builder.data_path), split, len(base), _selection_key(data_cfg))
  if key not in _SELECTION_CACHE:
    raw = _scan_labels(builder, split, base, get(data_cfg, 'label_key', 'label'), image_key)
    indices, labels = _select(raw, data_cfg, f'{builder.name}[{split}]')
    _SELECTION_CACHE[key] = indices, _maybe_pseudo_labels(base, indices, labels, data_cfg,
                                                          image_key)
  indices, labels = _SELECTION_CACHE[key]
  source = GroupSource(base, indices, labels, image_key)
  _check_image(source[0]['image'], image_key, f'{builder.name}[{split}]')
  return source


def group_counts(data_cfg, data_dir, split):
  """int64 [num_groups]: how many examples of `split` fall in each group."""
  labels = make_source(data_cfg, data_dir, split).labels
  return np.bincount(labels, minlength=int(get(data_cfg, 'num_groups', 2)))


def _data_source(builder, split):
  try:
    return builder.as_data_source(split)
  except (ValueError, KeyError) as e:
    splits = ', '.join(builder.info.splits.keys()) if builder.is_prepared() else '?'
    raise DataError(f'split {split!r} of {builder.name!r} is not readable ({first_line(e)}); '
                    f'splits: {splits}') from None


def _scan_labels(builder, split, base, label_key, image_key):
  """int64 label of every record (about 0.1 ms each when images are left encoded)."""
  if len(base) == 0:
    raise DataError(f'split {split!r} of {builder.name!r} is empty')
  source = _label_source(builder, split, base, image_key)
  labels = np.empty(len(source), np.int64)
  for row in range(len(source)):
    labels[row] = _as_label(_lookup(source[row], label_key, 'data.label_key'), label_key, row)
  return labels


def _label_source(builder, split, base, image_key):
  """`base`, or a twin that skips decoding encoded images (JPEG/PNG) so the scan is fast."""
  try:
    feature = _lookup(builder.info.features, image_key, 'data.image_key')
  except DataError:
    return base
  if not isinstance(feature, tfds.features.Image):
    return base
  decoders = functools.reduce(lambda inner, k: {k: inner}, reversed(image_key.split('/')),
                              tfds.decode.SkipDecoding())
  try:
    source = builder.as_data_source(split, decoders=decoders)
    source[0]  # pylint: disable=pointless-statement -- tfds mock sources need TF here
    return source
  except ImportError:
    return base


def _select(raw, data_cfg, what):
  """(indices, labels) after class_filter (relabel to 0..K-1), range check and group_ratio."""
  num_groups = int(get(data_cfg, 'num_groups', 2))
  indices, labels = np.arange(raw.size, dtype=np.int64), raw
  class_filter = tuple(int(v) for v in (get(data_cfg, 'class_filter') or ()))
  if class_filter:
    if len(set(class_filter)) != len(class_filter):
      raise DataError(f'data.class_filter has repeated values: {class_filter}')
    keep = np.isin(raw, class_filter)
    indices = indices[keep]
    order = np.argsort(class_filter)  # position in filter order of each sorted value
    labels = order[np.searchsorted(np.asarray(class_filter)[order], raw[keep])].astype(np.int64)
    if not indices.size:
      raise DataError(f'{what}: no example has a label in data.class_filter {class_filter}')
  bad = np.flatnonzero((labels < 0) | (labels >= num_groups))
  if bad.size:
    raise DataError(f'{what}: example {indices[bad[0]]} has group label {labels[bad[0]]}, '
                    f'outside [0, {num_groups}) (data.num_groups)')
  group_ratio = get(data_cfg, 'group_ratio') or ()
  if len(group_ratio):
    shares = subsample.normalize_ratio(group_ratio, num_groups, 'data.group_ratio')
    keep = subsample.subsample(labels, shares, int(get(data_cfg, 'shuffle_seed', 0)))
    indices, labels = indices[keep], labels[keep]
    if not indices.size:
      raise DataError(f'{what}: data.group_ratio {tuple(group_ratio)} leaves no example')
  return indices, labels


def _maybe_pseudo_labels(base, indices, labels, data_cfg, image_key):
  """`data.pseudo_labels` ('' = off, 'kmeans'): replace the group labels of the selection
  by clusters of its own images (ddm_jax.pseudo_labels); the true labels are not read."""
  method = get(data_cfg, 'pseudo_labels', '')
  if not method:
    return labels
  resolution, channels = int(get(data_cfg, 'resolution')), int(get(data_cfg, 'channels', 3))
  images = np.stack([to_model_image(np.asarray(_lookup(base[int(i)], image_key, 'data.image_key')),
                                    resolution, channels) for i in indices])
  return pl.pseudo_labels(images, int(get(data_cfg, 'num_groups', 2)), method,
                          pca_dims=int(get(data_cfg, 'pseudo_pca_dims', 16)),
                          seed=int(get(data_cfg, 'shuffle_seed', 0)))


def _selection_key(data_cfg):
  keys = ('label_key', 'class_filter', 'group_ratio', 'num_groups', 'shuffle_seed',
          'pseudo_labels', 'pseudo_pca_dims', 'resolution', 'channels')
  return tuple(repr(get(data_cfg, k)) for k in keys)


def _as_label(value, label_key, row):
  value = np.asarray(value)
  if value.ndim != 0 or not (value.dtype == np.bool_ or np.issubdtype(value.dtype, np.integer)):
    raise DataError(f'data.label_key {label_key!r} of example {row} is not an integer or boolean '
                    f'scalar (dtype {value.dtype}, shape {value.shape})')
  return int(value)


def _check_image(image, image_key, what):
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise DataError(f'data.image_key {image_key!r} of {what} is not a uint8 HxWxC image with 1, 3 '
                    f'or 4 channels (dtype {image.dtype}, shape {image.shape})')


def _lookup(tree, key, what):
  """`tree['a']['b']` for key 'a/b' (nested TFDS features such as 'attributes/Male')."""
  node = tree
  for part in key.split('/'):
    try:
      node = node[part]
    except (KeyError, TypeError, IndexError):
      keys = list(node.keys()) if hasattr(node, 'keys') else []
      raise DataError(f'{what} {key!r}: no feature {part!r} (available: {keys})') from None
  return node
