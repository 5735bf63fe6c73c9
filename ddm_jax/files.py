"""Atomic file writes: readers (and a killed run) see the old file or the new, never half."""
import contextlib
import json
import os


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary name beside `path` (same extension, so numpy and PIL keep it) to
  write to; on success it replaces `path`, on failure it is removed."""
  root, ext = os.path.splitext(path)
  tmp = f'{root}.tmp{ext}'
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


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
