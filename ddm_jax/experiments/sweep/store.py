"""The sweep's results file: one JSON line per finished evaluation."""
import json
import os

from ddm_jax.files import write_text


def _line(row):
  return json.dumps(row, default=float) + '\n'


class Results:
  """Append-only JSONL of finished evaluations; the ids in it are skipped on resume."""

  def __init__(self, path):
    self.path = path
    self.rows = []
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        text = f.read()
      damaged = bool(text) and not text.endswith('\n')
      for line in text.splitlines():
        if not line.strip():
          continue
        try:
          self.rows.append(json.loads(line))
        except json.JSONDecodeError:
          damaged = True  # a line cut by a kill mid-write: that cell simply runs again
      if damaged:  # rewrite without the cut line, so new rows start on a line of their own
        write_text(path, ''.join(_line(r) for r in self.rows))
    self.done = {r['id'] for r in self.rows}

  def add(self, row):
    # Appended and synced, not rewritten: a kill can cut at most this one line.
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(_line(row))
      f.flush()
      os.fsync(f.fileno())
    self.rows.append(row)
    self.done.add(row['id'])
