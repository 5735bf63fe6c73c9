"""TFDS builders that prepare offline into array_record (read back without TensorFlow).

* `biased_digits`: scikit-learn's bundled 8x8 digits, grouped by digit class and
  subsampled to a chosen group ratio: the embedded, network-free demo data. Splits
  `test` and `evaluator` (20 % of each digit each, fixed per digit) never overlap
  `balanced` (the other 60 %), which `train` subsamples (`digits_splits`).
* `reference_folder`: the reference DDM data format (a folder of images, one
  group label per image, one prompt per image); with `data.heldout_dir`, a second such
  folder becomes the `test` split the evaluation holds out.

Images are stored as `tfds.features.Tensor(uint8)`: `tfds.features.Image`
would need TensorFlow to encode numpy arrays.
"""
import dataclasses
import hashlib
import json
import os

import numpy as np
from PIL import Image, UnidentifiedImageError
import tensorflow_datasets as tfds

from ddm_jax.data import labels as labels_lib
from ddm_jax.data import subsample
from ddm_jax.errors import DataError

TEST_FRACTION = 0.2       # of each digit: `test` (the evaluator's validation images)
EVALUATOR_FRACTION = 0.2  # of each digit: `evaluator` (the evaluator's training images)
# Seeds, with the digit, the one permutation of each digit's rows that fixes its
# `test` / `evaluator` / pool membership: never the data shuffle seed or the groups,
# so an image is in the same split for every pair, ratio and seed.
SPLIT_SEED = 20240601
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.tif', '.tiff')


# ----------------------------------------------------------------------------- biased_digits


@dataclasses.dataclass(eq=False)
class BiasedDigitsConfig(tfds.core.BuilderConfig):
  groups: tuple = ((0,), (1,))
  proportions: tuple = (0.8, 0.2)
  seed: int = 0


def biased_digits_config(groups, proportions, seed=0):
  """A validated config whose name encodes its content, e.g. `g0_g1_p80-20_s0`.

  The name selects the prepared folder, so two configs that differ in any
  field never share data; proportions are normalised first (4:1 == 0.8:0.2).
  """
  groups = _check_groups(groups)
  shares = subsample.normalize_ratio(proportions, len(groups), 'data.proportions')
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
    raise DataError(f'data.shuffle_seed must be a non-negative int, got {seed!r}')
  percent = '-'.join(f'{100 * s:.6g}'.replace('.', 'p') for s in shares)
  name = '_'.join('g' + ''.join(map(str, g)) for g in groups) + f'_p{percent}_s{int(seed)}'
  return BiasedDigitsConfig(name=name, groups=groups, proportions=tuple(float(s) for s in shares),
                            seed=int(seed), description=f'digit groups {groups} at {percent}')


def _check_groups(groups):
  try:
    groups = tuple(tuple(int(d) for d in g) for g in groups)
  except (TypeError, ValueError):
    raise DataError(f'data.groups must be a tuple of tuples of digits, got {groups!r}') from None
  flat = [d for g in groups for d in g]
  if len(groups) < 2 or any(not g for g in groups):
    raise DataError(f'data.groups needs at least two non-empty groups, got {groups}')
  if any(d < 0 or d > 9 for d in flat) or len(set(flat)) != len(flat):
    raise DataError(f'data.groups must hold distinct digits 0..9, got {groups}')
  return groups


def load_sklearn_digits():
  """(images uint8 [N,8,8,1] scaled from 0..16 to 0..255, digits int64 [N])."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top -- slow import
  bunch = load_digits()
  images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int64)


def digit_rows(digits, digit):
  """(test, evaluator, pool) row indices of one digit, each sorted.

  Fixed by the digit alone (`SPLIT_SEED`): `test` = TEST_FRACTION and `evaluator`
  = EVALUATOR_FRACTION of the digit's rows, the pool the rest."""
  rows = np.random.default_rng([SPLIT_SEED, int(digit)]).permutation(
      np.flatnonzero(digits == digit))
  n_test = int(round(TEST_FRACTION * rows.size))
  n_ev = int(round(EVALUATOR_FRACTION * rows.size))
  return (np.sort(rows[:n_test]), np.sort(rows[n_test:n_test + n_ev]),
          np.sort(rows[n_test + n_ev:]))


def digits_splits(digits, groups, proportions, seed):
  """Row indices of each split: `test`, `evaluator`, `balanced` (the pool), `train` (biased).

  Every included digit is cut once, the same way whatever `groups`, `proportions`
  or `seed` (`digit_rows`): `test` (20 %) and `evaluator` (20 %) are real images
  no generator trains on, not even a base trained on all ten digits' pools;
  `balanced` is the remaining 60 %. `train` subsamples `balanced` with `seed` so
  group shares match `proportions` within one image.
  """
  test, evaluator, pool = [], [], []
  for digit in sorted(d for g in groups for d in g):
    t, e, p = digit_rows(digits, digit)
    test.append(t)
    evaluator.append(e)
    pool.append(p)
  pool = np.sort(np.concatenate(pool))
  group_of = digit_to_group(groups)
  train = pool[subsample.subsample(group_of[digits[pool]], np.asarray(proportions), seed)]
  return {'train': train, 'balanced': pool, 'evaluator': np.sort(np.concatenate(evaluator)),
          'test': np.sort(np.concatenate(test))}


def digit_to_group(groups):
  """int64 [10]: the group of each digit, -1 for digits in no group."""
  table = np.full(10, -1, np.int64)
  for g, members in enumerate(groups):
    table[list(members)] = g
  return table


class _Offline:
  """Our builders prepare from local files, never a download: TFDS's banner ("Downloading
  and preparing dataset Unknown size (download: Unknown size ...)") and its closing
  "downloaded and prepared" line would only mislead."""

  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass


class BiasedDigits(_Offline, tfds.core.GeneratorBasedBuilder):
  """scikit-learn 8x8 digits, grouped by class and biased to a group ratio."""

  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'Splits fixed per digit, independent of seed and groups: test 20 %, the new '
               '`evaluator` 20 %, balanced (the pool) 60 %; train subsamples the pool.',
  }

  def _info(self):
    scalar = lambda: tfds.features.Tensor(shape=(), dtype=np.int64)  # noqa: E731
    return tfds.core.DatasetInfo(
        builder=self,
        description='scikit-learn 8x8 digits; label = group index, digit = class.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': scalar(),
            'digit': scalar(),
            'index': scalar(),  # row in load_digits(): identifies an image across splits
        }),
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is in the scikit-learn wheel
    config = self.builder_config
    images, digits = load_sklearn_digits()
    splits = digits_splits(digits, config.groups, config.proportions, config.seed)
    group_of = digit_to_group(config.groups)
    return {name: self._generate_examples(images, digits, group_of, rows)
            for name, rows in splits.items()}

  def _generate_examples(self, images, digits, group_of, rows):
    for row in rows:
      yield int(row), {'image': images[row], 'label': group_of[digits[row]],
                       'digit': digits[row], 'index': row}


# ----------------------------------------------------------------------------- reference_folder


@dataclasses.dataclass(eq=False)
class ReferenceFolderConfig(tfds.core.BuilderConfig):
  image_dir: str = ''
  labels_file: str = ''
  prompts_file: str = ''
  resolution: int = 512
  num_groups: int = 0  # 0: do not bound labels here (the pipeline checks them)
  skip_bad: bool = False  # skip unreadable images (listed in the prepared folder's metadata.json)
  heldout_dir: str = ''  # a folder in HELDOUT_LAYOUT: prepared as the `test` split


def reference_folder_config(image_dir, labels_file, prompts_file, resolution, num_groups=0,
                            skip_bad=False, heldout_dir=''):
  """A validated config named after its resolution and a fingerprint of the inputs.

  The fingerprint covers paths, sizes and modification times (and `skip_bad`), so
  editing the folder or the label file prepares a fresh copy instead of reusing stale data.
  `heldout_dir` (optional) holds held-out images for evaluation (`heldout_layout`).
  """
  if not isinstance(resolution, (int, np.integer)) or resolution <= 0:
    raise DataError(f'data.resolution must be a positive int, got {resolution!r}')
  absolute = lambda p: os.path.abspath(os.path.expanduser(p)) if p else ''
  config = ReferenceFolderConfig(
      name='pending', image_dir=absolute(image_dir), labels_file=absolute(labels_file),
      prompts_file=absolute(prompts_file), resolution=int(resolution),
      num_groups=int(num_groups or 0), skip_bad=bool(skip_bad), heldout_dir=absolute(heldout_dir))
  watched = []
  for sources in split_sources(config).values():  # fail now, not in the middle of preparing
    files, _, _ = read_reference(sources, config.num_groups)
    watched += [os.path.join(sources[0], f) for f in files] + [p for p in sources[1:] if p]
  stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in watched]
  key = [config.resolution, stats] + ([True] if config.skip_bad else [])
  digest = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:12]
  return dataclasses.replace(config, name=f'r{config.resolution}_{digest}',
                             description=f'images in {config.image_dir}')


HELDOUT_LAYOUT = 'images/, labels.{json,csv,txt,npy,pkl} and optionally prompts.txt'


def heldout_layout(folder):
  """(image_dir, labels_file, prompts_file or '') of a reference-format folder laid out
  as `images/`, one `labels.<suffix>` and an optional `prompts.txt` (what
  `data.reference_digits.write_reference_digits` writes), else DataError naming it."""
  if not os.path.isdir(folder):
    raise DataError(f'data.heldout_dir {folder} does not exist')
  labels = [os.path.join(folder, f'labels{suffix}') for suffix in labels_lib.LABEL_SUFFIXES]
  labels = [p for p in labels if os.path.isfile(p)]
  if len(labels) != 1 or not os.path.isdir(os.path.join(folder, 'images')):
    raise DataError(f'data.heldout_dir {folder} must hold {HELDOUT_LAYOUT}; found '
                    f'{sorted(os.listdir(folder)) or "nothing"}')
  prompts = os.path.join(folder, 'prompts.txt')
  return os.path.join(folder, 'images'), labels[0], prompts if os.path.isfile(prompts) else ''


def split_sources(config):
  """{split: (image_dir, labels_file, prompts_file)}: `train`, and `test` from the held-out folder."""
  out = {'train': (config.image_dir, config.labels_file, config.prompts_file)}
  if config.heldout_dir:
    out['test'] = heldout_layout(config.heldout_dir)
  return out


def list_images(image_dir):
  """Image file names in `image_dir`, sorted (the order labels and prompts follow)."""
  if not os.path.isdir(image_dir):
    raise DataError(f'image folder {image_dir} does not exist')
  names = sorted(n for n in os.listdir(image_dir)
                 if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith('.'))
  if not names:
    raise DataError(f'image folder {image_dir} holds no images ({", ".join(IMAGE_SUFFIXES)})')
  return names


def read_reference(sources, num_groups=0):
  """(file names, labels int64, prompts) of `sources` = (image_dir, labels_file,
  prompts_file or '') with matching counts, else DataError."""
  image_dir, labels_file, prompts_file = sources
  files = list_images(image_dir)
  labels = labels_lib.read_labels(labels_file, num_groups or None, names=files)
  prompts = labels_lib.read_prompts(prompts_file) if prompts_file else [''] * len(files)
  if not len(files) == len(labels) == len(prompts):
    prompt_part = f', {len(prompts)} prompts in {prompts_file}' if prompts_file else ''
    raise DataError(f'count mismatch: {len(files)} images in {image_dir}, '
                    f'{len(labels)} labels in {labels_file}{prompt_part}')
  return files, labels, prompts


def load_rgb(path, resolution):
  """An image file as uint8 [R,R,3]: RGB, shorter side resized to R (bilinear), centre-cropped.

  Grayscale, palette, alpha and CMYK images are converted to RGB, 16-bit ones scaled
  to 8 bits; an unreadable, truncated or empty file is a DataError naming it."""
  try:
    with Image.open(path) as image:
      image = _to_rgb(image, path)
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except -- PIL raises many types on bad files
    reason = ' '.join(str(e).split()) or type(e).__name__
    if isinstance(e, UnidentifiedImageError) or os.path.getsize(path) == 0:
      reason = 'not an image file' + (' (0 bytes)' if os.path.getsize(path) == 0 else '')
    raise DataError(f'cannot read image {path}: {reason}') from None
  return np.asarray(resize_square(image, resolution))


def _to_rgb(image, path):
  """PIL image -> RGB. 16-bit (I;16*) is scaled by 1/257; 32-bit integer images
  must hold 8- or 16-bit values; float images have no defined range and are refused."""
  mode = image.mode
  if mode.startswith('I;16') or mode == 'I':
    array = np.asarray(image).astype(np.int64)
    top = 255 if mode == 'I' and array.size and 0 <= array.min() and array.max() <= 255 else 65535
    if array.size and (array.min() < 0 or array.max() > top):
      raise DataError(f'cannot read image {path}: mode {mode} values {array.min()}..{array.max()} '
                      'are outside 0..65535; save it as 8- or 16-bit')
    return Image.fromarray(np.round(array * (255.0 / top)).astype(np.uint8), 'L').convert('RGB')
  if mode == 'F':
    raise DataError(f'cannot read image {path}: floating-point image (mode F) has no defined '
                    'value range; save it as 8- or 16-bit')
  return image.convert('RGB')


def resize_square(image, resolution):
  """Centre-crops a PIL image to a square and resizes it to `resolution` (bilinear)."""
  width, height = image.size
  side = min(width, height)
  if width != height:
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
  if side != resolution:
    image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
  return image


class ReferenceFolder(_Offline, tfds.core.GeneratorBasedBuilder):
  """A folder of images + a group-label file + a prompts file (reference DDM format)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}

  def _info(self):
    r = self.builder_config.resolution
    return tfds.core.DatasetInfo(
        builder=self,
        description='Images with per-image group labels and prompts.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8),
            'label': tfds.features.Tensor(shape=(), dtype=np.int64),
            'prompt': tfds.features.Text(),
            'filename': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # record i is the i-th readable file in sorted order
        metadata=tfds.core.MetadataDict(),  # 'skipped_images': [{file, error}] (skip_bad)
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    config = self.builder_config
    return {split: self._generate_examples(sources[0], *read_reference(sources, config.num_groups))
            for split, sources in split_sources(config).items()}

  def _generate_examples(self, image_dir, files, labels, prompts):
    """With `skip_bad`, an unreadable image is left out together with its label and
    prompt, and listed in the data set's metadata.json (`skipped_images`)."""
    config = self.builder_config
    skipped = self.info.metadata.setdefault('skipped_images', [])
    skipped_here = 0
    for i, (name, label, prompt) in enumerate(zip(files, labels, prompts)):
      try:
        image = load_rgb(os.path.join(image_dir, name), config.resolution)
      except DataError as e:
        if not config.skip_bad:
          raise DataError(f'{e} (set data.skip_bad=True to skip unreadable images)') from None
        skipped.append({'file': name, 'error': str(e)})
        skipped_here += 1
        continue
      yield i, {'image': image, 'label': label, 'prompt': prompt, 'filename': name}
    if skipped_here == len(files):
      raise DataError(f'none of the {len(files)} images in {image_dir} is readable, '
                      f'e.g. {skipped[-1]["error"]}')
