"""Safe readers for per-image group labels and prompts.

Label files come from users (the reference DDM format ships `labels.pkl`), so
nothing here may execute code from a file: pickles go through an unpickler that
refuses every global, `.npy` files load with `allow_pickle=False`.
"""
import csv
import json
import numbers
import os
import pickle

import numpy as np

from ddm_jax.errors import DataError

LABEL_SUFFIXES = ('.json', '.csv', '.txt', '.npy', '.pkl', '.pickle')


class _NoGlobalsUnpickler(pickle.Unpickler):
  """Loads only plain containers and scalars: any class or function is refused."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(f'global {module}.{name} is not allowed')


def read_labels(path, num_groups=None, names=None):
  """Reads group labels as int64 [N] from .json/.csv/.txt/.npy/.pkl.

  A JSON or pickled dict maps file name -> label; it is ordered by `names`
  (the image file names) when given, else by sorted key. With `num_groups`
  every label must lie in [0, num_groups).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise DataError(f'labels file {path} does not exist')
  suffix = os.path.splitext(path)[1].lower()
  if suffix not in LABEL_SUFFIXES:
    raise DataError(f'labels file {path}: unsupported suffix {suffix!r}, expected one of {LABEL_SUFFIXES}')
  if os.path.getsize(path) == 0:
    raise DataError(f'labels file {path} is empty')
  reader = {'.json': _load_json, '.csv': _load_csv, '.txt': _load_csv, '.npy': _load_npy,
            '.pkl': _load_pickle, '.pickle': _load_pickle}[suffix]
  values = reader(path)
  if isinstance(values, dict):
    values = _order_dict(values, names, path)
  labels = _to_int_array(values, path)
  _check_range(labels, num_groups, path)
  return labels


def read_prompts(path):
  """Reads one prompt per line (stripped); an empty line is an error."""
  path = os.fspath(path)
  try:
    with open(path, encoding='utf-8') as f:
      text = f.read()
  except FileNotFoundError:
    raise DataError(f'prompts file {path} does not exist') from None
  except UnicodeDecodeError as e:
    raise DataError(f'prompts file {path} is not UTF-8 text: {e.reason} at byte {e.start}') from None
  if text.endswith('\n'):
    text = text[:-1]
  if not text.strip():
    raise DataError(f'prompts file {path} is empty')
  prompts = [line.strip() for line in text.split('\n')]
  for number, prompt in enumerate(prompts, start=1):
    if not prompt:
      raise DataError(f'prompts file {path}: line {number} is empty')
  return prompts


def _load_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f'labels file {path} is not valid JSON: {_one_line(e)}') from None


def _load_csv(path):
  """One integer per line, or a header row with a `label` column."""
  try:
    with open(path, encoding='utf-8', newline='') as f:
      rows = [row for row in csv.reader(f) if any(cell.strip() for cell in row)]
  except (UnicodeDecodeError, csv.Error) as e:
    raise DataError(f'labels file {path} is not readable CSV: {_one_line(e)}') from None
  if not rows:
    raise DataError(f'labels file {path} is empty')
  header = [cell.strip().lower() for cell in rows[0]]
  if 'label' in header:
    column = header.index('label')
    if any(len(row) <= column for row in rows[1:]):
      raise DataError(f'labels file {path}: some rows have no `label` column')
    cells = [row[column] for row in rows[1:]]
  elif all(len(row) == 1 for row in rows):
    cells = [row[0] for row in rows]
  else:
    raise DataError(f'labels file {path}: expected one integer per line or a `label` column')
  return [_parse_int(cell, path, line) for line, cell in enumerate(cells, start=1)]


def _parse_int(cell, path, line):
  try:
    return int(cell.strip())
  except ValueError:
    raise DataError(f'labels file {path}: entry {line} ({cell.strip()!r}) is not an integer') from None


def _load_npy(path):
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as e:
    raise DataError(f'labels file {path} is not a plain .npy array: {_one_line(e)}') from None


def _load_pickle(path):
  try:
    with open(path, 'rb') as f:
      return _NoGlobalsUnpickler(f).load()
  except Exception as e:  # pylint: disable=broad-except -- any failure means an unusable file
    raise DataError(f'labels file {path}: refused or unreadable pickle ({_one_line(e)}); '
                    'only plain lists of ints load, save labels as .json/.csv/.npy instead') from None


def _order_dict(mapping, names, path):
  if names is None:
    names = sorted(mapping)
  missing = [name for name in names if name not in mapping]
  if missing:
    raise DataError(f'labels file {path} has no label for {len(missing)} image(s), e.g. {missing[0]!r}')
  return [mapping[name] for name in names]


def _to_int_array(values, path):
  if isinstance(values, np.ndarray):
    if values.ndim != 1:
      raise DataError(f'labels file {path}: expected a 1-D array, got shape {values.shape}')
    if values.dtype != np.bool_ and not np.issubdtype(values.dtype, np.integer):
      raise DataError(f'labels file {path}: labels are not integers (dtype {values.dtype})')
    values = values.tolist()
  if not isinstance(values, (list, tuple)):
    raise DataError(f'labels file {path}: expected a list of integers, got {type(values).__name__}')
  if not values:
    raise DataError(f'labels file {path} holds no labels')
  for i, value in enumerate(values):
    if not isinstance(value, numbers.Integral):
      raise DataError(f'labels file {path}: label {i} ({value!r:.40}) is not an integer')
  try:
    return np.asarray([int(v) for v in values], dtype=np.int64)
  except OverflowError:
    raise DataError(f'labels file {path}: a label does not fit in int64') from None


def _check_range(labels, num_groups, path):
  upper = num_groups if num_groups is not None else np.iinfo(np.int64).max
  bad = np.flatnonzero((labels < 0) | (labels >= upper))
  if bad.size:
    bound = f'[0, {num_groups})' if num_groups is not None else '>= 0'
    raise DataError(f'labels file {path}: label {bad[0]} is {labels[bad[0]]}, outside {bound}')


def _one_line(error):
  return ' '.join(str(error).split())
