"""Public readers of a selection: grain batches for training, arrays for evaluation.

Reading never needs TensorFlow (`as_data_source` on array_record).
"""
import functools

import grain
import numpy as np

from ddm_jax.data.common import get
from ddm_jax.data.preprocessing import preprocess_fn
from ddm_jax.data.selection import make_source
from ddm_jax.errors import DataError


def make_dataset(data_cfg, data_dir, split, batch_size, seed, process_index=0, process_count=1,
                 extra_fn=None):
  """The grain `MapDataset` behind `make_iterator` (shuffle per epoch, repeat, batch).

  One global order of examples, whatever the number of processes: process p takes rows
  [p*B, (p+1)*B) of every global batch of B*process_count examples (B = `batch_size`,
  the per-process batch) and reads and decodes only those, so the global batches, and
  hence training, are the same on one host or many.

  `extra_fn(raw_example) -> dict` adds model-specific host features (e.g. the
  prompt's token ids for Stable Diffusion) to each preprocessed example."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index {process_index} is not in [0, {process_count})')
  if batch_size < 1:
    raise DataError(f'batch size must be positive, got {batch_size}')
  source = make_source(data_cfg, data_dir, split)
  if len(source) == 0:
    raise DataError(f'{get(data_cfg, "name")}[{split}] has no examples')
  ds = grain.MapDataset.source(source).shuffle(seed=int(seed) % 2**32).repeat()
  if process_count > 1:
    order, rows, total = ds, batch_size, batch_size * process_count
    ds = grain.MapDataset.range(len(order) // process_count).map(
        lambda k: order[(k // rows) * total + process_index * rows + k % rows])
  fn = preprocess_fn(data_cfg)
  if extra_fn is not None:
    fn = functools.partial(_with_extra, fn, extra_fn)
  return ds.map(fn).batch(batch_size, drop_remainder=True)


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
  # grain's default read-ahead is 500 batches on 16 threads: while a run starts, that
  # Python work fights the tracing and the compile for the GIL and the cores (a warm digits
  # train.py started much later); 16 batches keep the threads busy.
  return iter(ds.to_iter_dataset(grain.ReadOptions(prefetch_buffer_size=16)))


def load_arrays(data_cfg, data_dir, split, limit=None):
  """(images f32 [N,R,R,C] in [-1,1], labels i32 [N]) in source order, for evaluation."""
  source = make_source(data_cfg, data_dir, split)
  count = len(source) if limit is None else min(int(limit), len(source))
  fn = preprocess_fn(data_cfg)
  examples = [fn(source[i]) for i in range(count)]
  resolution, channels = int(get(data_cfg, 'resolution')), int(get(data_cfg, 'channels', 3))
  if not examples:
    return np.zeros((0, resolution, resolution, channels), np.float32), np.zeros((0,), np.int32)
  return (np.stack([e['image'] for e in examples]),
          np.asarray([e['label'] for e in examples], np.int32))
