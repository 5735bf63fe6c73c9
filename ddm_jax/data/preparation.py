"""From `data.name` to a prepared TFDS builder, offline.

Our own builders (EMBEDDED) prepare here without network; any other TFDS data
set must already be prepared in `data_dir`, else `DataError` at once (a real
TFDS download without network retries for minutes).
"""
import contextlib
import logging
import os
import sys

import tensorflow_datasets as tfds

from ddm_jax.data import builders
from ddm_jax.data.common import first_line, get
from ddm_jax.errors import DataError

DEFAULT_DATA_DIR = os.path.expanduser('~/.cache/ddm_jax/data')
EMBEDDED = ('biased_digits', 'reference_folder')
_BUILDERS = {}  # our own builders, per class/config/data_dir
_REPORTED = set()  # metadata.json files whose skipped images were reported


def resolve_data_dir(data_cfg, workdir=None):
  """`data.data_dir` if set, else $DDM_DATA_DIR, else ~/.cache/ddm_jax/data (absolute).

  `workdir` is accepted for callers that pass it; the default is deliberately
  independent of the run folder so prepared data is shared between runs.
  """
  del workdir
  data_dir = get(data_cfg, 'data_dir') or os.environ.get('DDM_DATA_DIR') or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(os.path.expandvars(data_dir)))


def prepare(data_cfg, data_dir):
  """Returns a prepared TFDS builder; prepares our own builders offline if needed."""
  builder = make_builder(data_cfg, data_dir)
  name = get(data_cfg, 'name')
  with _quiet_tfds() if name in EMBEDDED else contextlib.nullcontext():
    prepared = builder.is_prepared()
  if prepared:
    _check_file_format(builder, data_dir)
    _report_skipped(builder)
    return builder
  if name not in EMBEDDED:
    raise DataError(f'data set {name!r} is not prepared in {data_dir}; prepare it on a machine with '
                    f'network (tfds build {name} --data_dir=DIR --file_format=array_record) and '
                    'copy DIR here, or set data.data_dir / $DDM_DATA_DIR to where it is')
  os.makedirs(data_dir, exist_ok=True)
  with _quiet_tfds(progress=False):  # seconds of work: four bars per split would be noise
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
  name = get(data_cfg, 'name')
  if not name:
    raise DataError('data.name is empty; use biased_digits, reference_folder or a TFDS name')
  data_dir = os.path.abspath(os.fspath(data_dir))
  if name == 'biased_digits':
    config = builders.biased_digits_config(
        get(data_cfg, 'groups', ((0,), (1,))), get(data_cfg, 'proportions', (0.8, 0.2)),
        get(data_cfg, 'shuffle_seed', 0))
    return _embedded_builder(builders.BiasedDigits, config, data_dir)
  if name == 'reference_folder':
    config = builders.reference_folder_config(
        _require(data_cfg, 'image_dir'), _require(data_cfg, 'labels_file'),
        get(data_cfg, 'prompts_file', ''), get(data_cfg, 'resolution'),
        get(data_cfg, 'num_groups', 0), get(data_cfg, 'skip_bad', False),
        get(data_cfg, 'heldout_dir', ''))
    return _embedded_builder(builders.ReferenceFolder, config, data_dir)
  if not os.path.isdir(data_dir):
    raise DataError(f'data dir {data_dir} for data set {name!r} does not exist; '
                    'set data.data_dir or $DDM_DATA_DIR to a folder holding prepared TFDS data')
  try:
    return tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise DataError(f'data.name {name!r} is not a TFDS data set known here: {first_line(e)}') from None


class _QuietTFDS(logging.Filter):
  """Drops TFDS's log lines that say nothing about our own builders: "Using custom data
  configuration" (every config of ours is one, per groups/ratio/folder) and "Variant folder
  ... has no dataset_info.json" (a folder being prepared)."""

  def filter(self, record):
    return not str(record.msg).startswith(('Using custom data configuration', 'Variant folder'))


@contextlib.contextmanager
def _quiet_tfds(progress=True):
  """Our builders' construction and preparation without TFDS's notes (and, unless
  `progress`, without its per-split progress bars)."""
  quiet, absl_logger = _QuietTFDS(), logging.getLogger('absl')
  absl_logger.addFilter(quiet)
  if not progress:
    tfds.display_progress_bar(False)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)
    if not progress:
      tfds.display_progress_bar(True)


def _embedded_builder(cls, config, data_dir):
  """One builder per (class, config name, data_dir), built without TFDS's custom-config warning."""
  key = (cls, config.name, data_dir)
  if key not in _BUILDERS:
    with _quiet_tfds():
      _BUILDERS[key] = cls(config=config, data_dir=data_dir, file_format='array_record')
  return _BUILDERS[key]


def _check_file_format(builder, data_dir):
  file_format = builder.info.file_format
  if file_format is not None and file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise DataError(f'data set {builder.name!r} in {data_dir} is stored as {file_format.value}; '
                    'reading without TensorFlow needs --file_format=array_record')


def _require(cfg, key):
  value = get(cfg, key)
  if not value:
    raise DataError(f'data.{key} must be set for data set {cfg.get("name")!r}')
  return value
