"""Atomic file writes: readers (and a killed run) see the old file or the new, never half."""
import contextlib
import errno
import json
import os
import re
import tempfile
import zipfile

import numpy as np


# `name.tmp<pid>.ext`: per process, since several hosts may write one file
_TEMPORARY = re.compile(r'^(?P<root>.+)\.tmp\d+(?P<ext>\.[^.]*)?$')


def temporary_target(name):
  """The file a temporary of `atomic_path` was to become (a basename), or None when `name`
  is not one. A SIGKILL skips the clean-up below, so a resumed writer finds these."""
  m = _TEMPORARY.match(name)
  return m and m['root'] + (m['ext'] or '')


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary name beside `path` (same extension, so numpy and PIL keep it) to
  write to; on success it replaces `path`, on failure it is removed (and an OSError that
  names no file, such as a full disk's, is raised again naming `path`)."""
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{os.getpid()}{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError) and e.filename is None:  # a full disk fails a write() unnamed
      raise OSError(e.errno, e.strerror or str(e), path) from e
    raise


def check_writable_dir(path):
  """Raises an OSError naming `path` unless files can be written in folder `path`: it is a
  folder that takes a new file or, if it does not exist yet, the nearest existing folder
  above it is. Creates nothing (a probe file is removed at once). Commands call it on
  their output before their long work, which would otherwise fail only at the end."""
  where = os.path.abspath(os.path.expanduser(path))
  while not os.path.lexists(where) and os.path.dirname(where) != where:
    where = os.path.dirname(where)
  if not os.path.isdir(where):
    raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
  try:
    fd, probe = tempfile.mkstemp(prefix='.write_probe_', dir=where)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise OSError(e.errno, e.strerror or str(e), path) from e


def write_text(path, text):
  with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def write_json(path, obj, **kw):
  write_text(path, json.dumps(obj, indent=2, **kw))


def write_bytes(path, data: bytes, sync=False):
  """`sync`: fsync before the rename (a cache entry that must survive a power cut)."""
  with atomic_path(path) as tmp, open(tmp, 'wb') as f:
    f.write(data)
    if sync:
      f.flush()
      os.fsync(f.fileno())


def write_npz(path, arrays):
  """An `.npz` (as `np.savez`, uncompressed) whose bytes depend on the arrays alone:
  `np.savez` stamps each entry with the current time. A value is an array, or a
  `(shape, dtype, chunks)` triple whose C-order chunks are streamed in one by one, so a
  large array (every image of a sampling job) is written with flat memory."""
  with atomic_path(path) as tmp, zipfile.ZipFile(tmp, 'w', zipfile.ZIP_STORED,
                                                 allowZip64=True) as zf:
    for name, value in arrays.items():
      if isinstance(value, tuple):
        shape, dtype, chunks = value
      else:
        value = np.asarray(value)
        shape, dtype, chunks = value.shape, value.dtype, [value]
      info = zipfile.ZipInfo(f'{name}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      with zf.open(info, 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(f, {
            'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
            'shape': tuple(int(d) for d in shape)})
        for chunk in chunks:
          f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
