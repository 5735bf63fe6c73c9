"""The embedded digits in the reference DDM format, for Stable Diffusion runs.

The paper's digit experiment fine-tunes SD-1.5 on two digit classes mixed at a ratio,
as 32x32 RGB images with a group label and a prompt each. This writes scikit-learn's
bundled digits that way, drawing exactly the images the pixel path's `biased_digits`
draws for the same groups, ratio and seed (`builders.digits_splits`):

    OUT/train/images/00000.png ...   the biased training split (upsampled, RGB)
    OUT/train/labels.json             one group index per image, in file order
    OUT/train/prompts.txt             one prompt per image (the same generic text for all)
    OUT/heldout/...                   the held-out split, balanced, in the same layout
    OUT/reference_digits.json         groups, shares, seed, counts and source rows

`configs/sd15_digits.py` reads `train/` as `data.image_dir/labels_file/prompts_file`
and `heldout/` as `data.heldout_dir` (the evaluation's `test` split).
"""
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image

from ddm_jax.data import builders, subsample
from ddm_jax.errors import DataError
from ddm_jax.files import write_json

# The reference's digit prompts file is not published; any text shared by every image
# keeps generation unconditioned on the group, which is what the method needs.
DEFAULT_PROMPT = 'a handwritten digit'
DEFAULT_OUT = os.path.join('~', '.cache', 'ddm_jax', 'sd_digits')  # configs/sd15_digits.py reads it
SUMMARY = 'reference_digits.json'
FOLDERS = {'train': 'train', 'test': 'heldout'}  # biased_digits split -> folder


def write_reference_digits(out, groups=((0,), (1,)), proportions=(0.8, 0.2), seed=0,
                           resolution=32, prompt=DEFAULT_PROMPT):
  """Writes OUT (see the module docstring) and returns its summary dict. An existing
  OUT is replaced only when it is an earlier output of this function."""
  config = builders.biased_digits_config(groups, proportions, seed)  # validates all three
  if not isinstance(resolution, (int, np.integer)) or resolution < 8:
    raise DataError(f'resolution must be an integer >= 8, got {resolution!r}')
  if not prompt or '\n' in prompt:
    raise DataError(f'prompt must be one non-empty line, got {prompt!r}')
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(os.path.join(out, SUMMARY)):
    raise DataError(f'{out} exists and is not a reference-digits folder ({SUMMARY} missing); '
                    'choose another --out')
  images, digits = builders.load_sklearn_digits()
  splits = builders.digits_splits(digits, config.groups, config.proportions, config.seed)
  group_of = builders.digit_to_group(config.groups)
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.reference_digits_', dir=parent)
  try:
    counts = {}
    for split, folder in FOLDERS.items():
      rows = splits[split]
      labels = group_of[digits[rows]]
      _write_folder(os.path.join(tmp, folder), images[rows], labels, resolution, prompt)
      counts[folder] = np.bincount(labels, minlength=len(config.groups)).tolist()
    summary = {'groups': [list(g) for g in config.groups], 'proportions': list(config.proportions),
               'seed': config.seed, 'resolution': int(resolution), 'prompt': prompt,
               'group_counts': counts,
               'sklearn_rows': {FOLDERS[s]: splits[s].tolist() for s in FOLDERS}}
    write_json(os.path.join(tmp, SUMMARY), summary)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return summary


def _write_folder(folder, images, labels, resolution, prompt):
  """images/NNNNN.png (RGB, bilinear to `resolution`, as the pixel path resizes),
  labels.json and prompts.txt, all in file-name order."""
  os.makedirs(os.path.join(folder, 'images'))
  for i, image in enumerate(images):
    gray = builders.resize_square(Image.fromarray(image[..., 0]), resolution)
    gray.convert('RGB').save(os.path.join(folder, 'images', f'{i:05d}.png'))
  with open(os.path.join(folder, 'labels.json'), 'w', encoding='utf-8') as f:
    json.dump([int(v) for v in labels], f)
  with open(os.path.join(folder, 'prompts.txt'), 'w', encoding='utf-8') as f:
    f.write(''.join(f'{prompt}\n' for _ in labels))


def parse_ratio(text, num_groups, key='--ratio'):
  """'4:1', '4,1' or '0.8,0.2' -> normalised shares (DataError naming `key`)."""
  parts = str(text).replace(':', ',').split(',')
  try:
    values = [float(p) for p in parts]
  except ValueError:
    raise DataError(f'{key} must be numbers separated by ":" or ",", got {text!r}') from None
  return tuple(float(s) for s in subsample.normalize_ratio(values, num_groups, key))
