"""From a `c.data` config to batches: TFDS array_record -> random-access source -> grain.

Reading never needs TensorFlow (`as_data_source` on array_record) and never
downloads: our builders prepare offline, any other TFDS data set must already
be prepared in `data_dir`, else `DataError` at once (a real TFDS download
without network retries for minutes).
"""
import functools
import os
import sys

import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from ddm_jax.data import builders
from ddm_jax.data import sampling
from ddm_jax.errors import DataError

DEFAULT_DATA_DIR = os.path.expanduser('~/.cache/ddm_jax/data')
EMBEDDED = ('biased_digits', 'reference_folder')
_SELECTION_CACHE = {}  # filtered (indices, labels) per data set/split/selection
_BUILDERS = {}  # our own builders, per class/config/data_dir
_REPORTED = set()  # metadata.json files whose skipped images were reported


def resolve_data_dir(data_cfg, workdir=None):
  """`data.data_dir` if set, else $DDM_DATA_DIR, else ~/.cache/ddm_jax/data (absolute).

  `workdir` is accepted for callers that pass it; the default is deliberately
  independent of the run folder so prepared data is shared between runs.
  """
  del workdir
  data_dir = _get(data_cfg, 'data_dir') or os.environ.get('DDM_DATA_DIR') or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.path.expandvars(data_dir)))


def prepare(data_cfg, data_dir):
  """Returns a prepared TFDS builder; prepares our own builders offline if needed."""
  builder = make_builder(data_cfg, data_dir)
  if builder.is_prepared():
    _check_file_format(builder, data_dir)
    _report_skipped(builder)
    return builder
  name = _get(data_cfg, 'name')
  if name not in EMBEDDED:
    raise DataError(f'data set {name!r} is not prepared in {data_dir}; prepare it on a machine with '
                    f'network (tfds build {name} --data_dir=DIR --file_format=array_record) and '
                    'copy DIR here, or set data.data_dir / $DDM_DATA_DIR to where it is')
  os.makedirs(data_dir, exist_ok=True)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  _report_skipped(builder)
  return builder


def skipped_images(builder):
  """[{'file', 'error'}] of the images `data.skip_bad` left out when `builder` was prepared."""
  metadata = getattr(builder.info, 'metadata', None)
  return list((metadata or {}).get('skipped_images', []))


def _report_skipped(builder):
  """One warning per prepared data set and process."""
  skipped = skipped_images(builder)
  report = os.path.join(os.fspath(builder.data_path), 'metadata.json')
  if skipped and report not in _REPORTED:
    _REPORTED.add(report)
    print(f'warning: data.skip_bad left out {len(skipped)} unreadable image(s) of '
          f'{builder.builder_config.image_dir}, e.g. {skipped[0]["file"]}; all are listed in '
          f'{report} (skipped_images)', file=sys.stderr, flush=True)


def make_builder(data_cfg, data_dir):
  """The TFDS builder named by `data.name` (no preparation, no network)."""
  name = _get(data_cfg, 'name')
  if not name:
    raise DataError('data.name is empty; use biased_digits, reference_folder or a TFDS name')
  data_dir = os.path.abspath(os.fspath(data_dir))
  if name == 'biased_digits':
    config = builders.biased_digits_config(
        _get(data_cfg, 'groups', ((0,), (1,))), _get(data_cfg, 'proportions', (0.8, 0.2)),
        _get(data_cfg, 'shuffle_seed', 0))
    return _embedded_builder(builders.BiasedDigits, config, data_dir)
  if name == 'reference_folder':
    config = builders.reference_folder_config(
        _require(data_cfg, 'image_dir'), _require(data_cfg, 'labels_file'),
        _get(data_cfg, 'prompts_file', ''), _get(data_cfg, 'resolution'),
        _get(data_cfg, 'num_groups', 0), _get(data_cfg, 'skip_bad', False))
    return _embedded_builder(builders.ReferenceFolder, config, data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'data dir {data_dir} for data set {name!r} does not exist; '
                    'set data.data_dir or $DDM_DATA_DIR to a folder holding prepared TFDS data')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise DataError(f'data.name {name!r} is not a TFDS data set known here: {_first_line(e)}') from None


def _embedded_builder(cls, config, data_dir):
  """One builder per (class, config name, data_dir): tfds warns on every custom-config build."""
  key = (cls, config.name, data_dir)
  if key not in _BUILDERS:
    _BUILDERS[key] = cls(config=config, data_dir=data_dir, file_format='array_record')
  return _BUILDERS[key]


def _check_file_format(builder, data_dir):
  file_format = builder.info.file_format
  if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(f'data set {builder.name!r} in {data_dir} is stored as {file_format.value}; '
                    'reading without TensorFlow needs --file_format=array_record')


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
  image_key = _get(data_cfg, 'image_key', 'image')
  key = (os.fspath(builder.data_path), split, len(base), _selection_key(data_cfg))
  if key not in _SELECTION_CACHE:
    raw = _scan_labels(builder, split, base, _get(data_cfg, 'label_key', 'label'), image_key)
    indices, labels = _select(raw, data_cfg, f'{builder.name}[{split}]')
    _SELECTION_CACHE[key] = indices, _maybe_pseudo_labels(base, indices, labels, data_cfg,
                                                          image_key)
  indices, labels = _SELECTION_CACHE[key]
  source = GroupSource(base, indices, labels, image_key)
  _check_image(source[0]['image'], image_key, f'{builder.name}[{split}]')
  return source


def _data_source(builder, split):
  try:
    return builder.as_data_source(split)
  except (ValueError, KeyError) as e:
    splits = ', '.join(builder.info.splits.keys()) if builder.is_prepared() else '?'
    raise DataError(f'split {split!r} of {builder.name!r} is not readable ({_first_line(e)}); '
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
  num_groups = int(_get(data_cfg, 'num_groups', 2))
  indices, labels = np.arange(raw.size, dtype=np.int64), raw
  class_filter = tuple(int(v) for v in (_get(data_cfg, 'class_filter') or ()))
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
  group_ratio = _get(data_cfg, 'group_ratio') or ()
  if len(group_ratio):
    shares = sampling.normalize_ratio(group_ratio, num_groups, 'data.group_ratio')
    keep = sampling.subsample(labels, shares, int(_get(data_cfg, 'shuffle_seed', 0)))
    indices, labels = indices[keep], labels[keep]
    if not indices.size:
      raise DataError(f'{what}: data.group_ratio {tuple(group_ratio)} leaves no example')
  return indices, labels


def _maybe_pseudo_labels(base, indices, labels, data_cfg, image_key):
  """`data.pseudo_labels` ('' = off, 'kmeans'): replace the group labels of the selection
  by clusters of its own images (ddm_jax.pseudo_labels); the true labels are not read."""
  method = _get(data_cfg, 'pseudo_labels', '')
  if not method:
    return labels
  from ddm_jax import pseudo_labels as pl  # pylint: disable=import-outside-toplevel
  resolution, channels = int(_get(data_cfg, 'resolution')), int(_get(data_cfg, 'channels', 3))
  images = np.stack([to_model_image(np.asarray(_lookup(base[int(i)], image_key, 'data.image_key')),
                                    resolution, channels) for i in indices])
  return pl.pseudo_labels(images, int(_get(data_cfg, 'num_groups', 2)), method,
                          pca_dims=int(_get(data_cfg, 'pseudo_pca_dims', 16)),
                          seed=int(_get(data_cfg, 'shuffle_seed', 0)))


def _selection_key(data_cfg):
  keys = ('label_key', 'class_filter', 'group_ratio', 'num_groups', 'shuffle_seed',
          'pseudo_labels', 'pseudo_pca_dims', 'resolution', 'channels')
  return tuple(repr(_get(data_cfg, k)) for k in keys)


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


# ----------------------------------------------------------------------------- preprocessing


def preprocess(example, resolution, channels):
  """One example -> `{'image': float32 [R,R,C] in [-1,1], 'label': int32}` (train and eval)."""
  return {'image': to_model_image(example['image'], resolution, channels),
          'label': np.int32(example['label'])}


def to_model_image(image, resolution, channels):
  """uint8 [H,W,C] -> float32 [R,R,channels] in [-1,1]: PIL colour conversion and bilinear resize."""
  if channels not in (1, 3):
    raise DataError(f'data.channels must be 1 or 3, got {channels}')
  pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
  pil = builders.resize_square(pil.convert('L' if channels == 1 else 'RGB'), resolution)
  array = np.asarray(pil, dtype=np.float32)
  array = array[..., None] if channels == 1 else array
  return array / 127.5 - 1.0


def _preprocess_fn(data_cfg):
  return functools.partial(preprocess, resolution=int(_get(data_cfg, 'resolution')),
                           channels=int(_get(data_cfg, 'channels', 3)))


# ----------------------------------------------------------------------------- public readers


def make_dataset(data_cfg, data_dir, split, batch_size, seed, process_index=0, process_count=1,
                 extra_fn=None):
  """The grain `MapDataset` behind `make_iterator` (shard, shuffle per epoch, repeat, batch).

  `extra_fn(raw_example) -> dict` adds model-specific host features (e.g. the
  prompt's token ids for Stable Diffusion) to each preprocessed example."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count})')
  if batch_size < 1:
    raise DataError(f'batch size must be positive, got {batch_size}')
  source = make_source(data_cfg, data_dir, split)
  ds = grain.MapDataset.source(source)[process_index::process_count]
  if len(ds) == 0:
    raise DataError(f'{_get(data_cfg, "name")}[{split}] has {len(source)} examples, too few for '
                    f'{process_count} processes')
  fn = _preprocess_fn(data_cfg)
  if extra_fn is not None:
    fn = functools.partial(_with_extra, fn, extra_fn)
  ds = ds.shuffle(seed=int(seed) % 2**32).repeat().map(fn)
  return ds.batch(batch_size, drop_remainder=True)


def _with_extra(fn, extra_fn, example):
  return {**fn(example), **extra_fn(example)}


def make_iterator(data_cfg, data_dir, split, batch_size, seed, process_index=0, process_count=1,
                  extra_fn=None):
  """Endless per-process batches `{'image': f32 [B,R,R,C], 'label': i32 [B]}`.

  Process i reads the records i, i + count, ... of the source (disjoint shards
  that cover it), reshuffled every epoch from `seed`. `batch_size` is the
  per-process batch. The returned grain `DatasetIterator` checkpoints exactly
  with `get_state()` / `set_state()`.
  """
  ds = make_dataset(data_cfg, data_dir, split, batch_size, seed, process_index, process_count,
                    extra_fn)
  return iter(ds.to_iter_dataset())


def load_arrays(data_cfg, data_dir, split, limit=None):
  """(images f32 [N,R,R,C] in [-1,1], labels i32 [N]) in source order, for evaluation."""
  source = make_source(data_cfg, data_dir, split)
  count = len(source) if limit is None else min(int(limit), len(source))
  fn = _preprocess_fn(data_cfg)
  examples = [fn(source[i]) for i in range(count)]
  resolution, channels = int(_get(data_cfg, 'resolution')), int(_get(data_cfg, 'channels', 3))
  if not examples:
    return np.zeros((0, resolution, resolution, channels), np.float32), np.zeros((0,), np.int32)
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))


def group_counts(data_cfg, data_dir, split):
  """int64 [num_groups]: how many examples of `split` fall in each group."""
  labels = make_source(data_cfg, data_dir, split).labels
  return np.bincount(labels, minlength=int(_get(data_cfg, 'num_groups', 2)))


# ----------------------------------------------------------------------------- helpers


def _get(cfg, key, default=None):
  value = cfg.get(key, default)
  return default if value is None else value


def _require(cfg, key):
  value = _get(cfg, key)
  if not value:
    raise DataError(f'data.{key} must be set for data set {cfg.get("name")!r}')
  return value


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


def _first_line(error):
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
