"""Sampling jobs: a sampling plan streamed to disk shard by shard, resumable, split over hosts.

    OUT/sampling.json            the manifest: the job (sampler, steps, eta, seed, checkpoint
                                 step, ...), shard size and count, throughput, `complete`
    OUT/00000.png ...            every image, written as its batch finishes
    OUT/shards/shard_00000.npz   uint8 `images` of shard k (images [k*S, (k+1)*S)) with
                                 their global `index` and per-sample inputs; written
                                 (atomically) after its PNGs, so its presence marks the
                                 shard done
    OUT/shards/shard_00000.json  the host and throughput of that shard
    OUT/samples.npz, grid.png    every image (merged with flat memory) and the first 256,
                                 once every shard is done

Image i depends on (seed, i) and the model only (`generator`), so a job gives the same
images whatever the batch size, device count or host count. Host h of H takes shards
h, h + H, ...: hosts never talk to each other. A killed job restarted with the same
arguments skips the finished shards and writes the same bytes as an uninterrupted one.
"""
import glob
import json
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from ddm_jax.errors import ConfigError, DataError
from ddm_jax.files import temporary_target, write_json, write_npz
from ddm_jax.generation.generator import effective_batch_size, iter_batches
from ddm_jax.images import save_grid, save_png, to_uint8

DEFAULT_SHARD_SIZE = 1000
MANIFEST = 'sampling.json'
STATUS_KEYS = ('num_shards', 'shards_done', 'complete', 'images_per_sec', 'seconds',
               'hosts')


def shard_path(out, k, ext='npz'):
  return os.path.join(out, 'shards', f'shard_{k:05d}.{ext}')


def _read_json(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _claim(out, job):
  """Write the job's manifest, or check that the one in `out` describes the same job."""
  path = os.path.join(out, MANIFEST)
  if os.path.exists(path):
    try:
      old = _read_json(path)
    except ValueError:
      old = None  # a manifest cut by a kill: this job writes it again
    if old is not None:
      old_job = {k: v for k, v in old.items() if k not in STATUS_KEYS}
      diff = sorted(k for k in set(old_job) | set(job) if old_job.get(k) != job.get(k))
      if diff:
        raise ConfigError(f'{out} holds another sampling job (it differs in {", ".join(diff)}); '
                          'use another --output or remove that folder')
      return
  write_json(path, {**job, 'complete': False})


def run_job(gen, plan, params, frozen, out, job_info=None, shard_size=DEFAULT_SHARD_SIZE,
            host_index=0, num_hosts=1, progress=True):
  """Generate this host's shards of `plan` into `out` (those not done yet); then, if every
  shard of the job is done, write samples.npz, grid.png and the completed manifest.
  Returns True when the job is complete."""
  if shard_size < 1:
    raise ConfigError(f'shard_size must be positive, got {shard_size}')
  if not 0 <= host_index < num_hosts:
    raise ConfigError(f'host index {host_index} is not in [0, {num_hosts})')
  n = plan.num_samples
  num_shards = -(-n // shard_size)
  os.makedirs(os.path.join(out, 'shards'), exist_ok=True)
  _claim(out, {**plan.describe(), **(job_info or {}), 'shard_size': shard_size})
  per_sample = plan.per_sample()
  mine = range(host_index, num_shards, num_hosts)
  bounds = {k: (k * shard_size, min((k + 1) * shard_size, n)) for k in mine}
  todo = [k for k in mine if not os.path.exists(shard_path(out, k))]
  _remove_temporaries(out, todo, shard_size)
  bs = effective_batch_size(min(shard_size, n), plan.batch_size, getattr(gen, 'num_devices', None))
  total = sum(hi - lo for lo, hi in bounds.values())
  pbar = tqdm(total=total, initial=total - sum(bounds[k][1] - bounds[k][0] for k in todo),
              unit='img', desc='sampling' + (f' (host {host_index}/{num_hosts})'
                                             if num_hosts > 1 else ''),
              disable=not progress, dynamic_ncols=True)
  key = jax.random.key(plan.seed)
  for k in todo:
    lo, hi = bounds[k]
    t0 = time.time()
    parts = []
    for start, imgs in iter_batches(gen, params, frozen, key, lo, hi, bs, plan.class_labels,
                                    plan.guide, plan.cond):
      u8 = to_uint8(imgs)
      for j, img in enumerate(u8):
        save_png(os.path.join(out, f'{start + j:05d}.png'), img)
      parts.append(u8)
      pbar.update(len(u8))
    seconds = time.time() - t0
    # the timings first: the .npz marks the shard done, so a kill between the two redoes it
    write_json(shard_path(out, k, 'json'), {'images': hi - lo, 'seconds': seconds,
                                            'images_per_sec': (hi - lo) / max(seconds, 1e-9),
                                            'host': host_index, 'batch_size': bs})
    write_npz(shard_path(out, k), {'images': np.concatenate(parts), 'index': np.arange(lo, hi),
                                   **{name: a[lo:hi] for name, a in per_sample.items()}})
  pbar.close()
  return finish(out, num_shards)


def _remove_temporaries(out, todo, shard_size):
  """Delete what a killed run left half-written: temporaries of the shards this host is
  about to redo or that are done (not another host's unfinished ones: it may be writing
  them right now)."""
  todo = set(todo)
  for folder in (out, os.path.join(out, 'shards')):
    for name in os.listdir(folder):
      target = temporary_target(name)
      stem = target and os.path.splitext(target)[0]
      if not stem:
        continue
      if folder == out and stem.isdigit():
        shard = int(stem) // shard_size
      elif folder != out and stem.startswith('shard_') and stem[6:].isdigit():
        shard = int(stem[6:])
      else:
        continue
      if shard in todo or os.path.exists(shard_path(out, shard)):
        os.remove(os.path.join(folder, name))


def finish(out, num_shards):
  """When every shard is done: samples.npz (streamed merge), grid.png and the manifest's
  status. Several hosts may get here at once; they write the same bytes."""
  done = [k for k in range(num_shards) if os.path.exists(shard_path(out, k))]
  path = os.path.join(out, MANIFEST)
  manifest = _read_json(path)
  stats = [_read_json(p) for p in sorted(glob.glob(os.path.join(out, 'shards', 'shard_*.json')))]
  seconds = sum(s['seconds'] for s in stats)
  status = {'num_shards': num_shards, 'shards_done': len(done),
            'complete': len(done) == num_shards, 'seconds': seconds,
            'images_per_sec': sum(s['images'] for s in stats) / max(seconds, 1e-9),
            'hosts': sorted({s['host'] for s in stats})}
  if status['complete']:
    _merge(out, num_shards, manifest)
  write_json(path, {**{k: v for k, v in manifest.items() if k not in STATUS_KEYS}, **status})
  return status['complete']


def _merge(out, num_shards, manifest):
  shards = [np.load(shard_path(out, k)) for k in range(num_shards)]
  try:
    first = shards[0]['images']
    n = sum(s['images'].shape[0] for s in shards)
    arrays = {'images': ((n,) + first.shape[1:], np.uint8, (s['images'] for s in shards)),
              'seed': np.asarray(manifest['seed']),
              'step': np.asarray(manifest.get('checkpoint_step', -1))}
    for name in shards[0].files:
      if name not in ('images', 'index'):
        arrays[name] = np.concatenate([s[name] for s in shards])
    write_npz(os.path.join(out, 'samples.npz'), arrays)
    save_grid(os.path.join(out, 'grid.png'), first[:256].astype(np.float32) / 127.5 - 1.0)
  finally:
    for s in shards:
      s.close()


def read_samples(out):
  """A finished job's images (float in [-1, 1]), per-sample inputs and manifest."""
  path = os.path.join(out, MANIFEST)
  if not os.path.exists(path):
    raise DataError(f'{out} is not a sampling job folder (no {MANIFEST}); write one with sample.py')
  manifest = _read_json(path)
  if not manifest.get('complete'):
    raise DataError(f'the sampling job in {out} is not finished ({manifest.get("shards_done", 0)} '
                    f'of {manifest.get("num_shards", "?")} shards); run sample.py again with the '
                    'same arguments to finish it')
  with np.load(os.path.join(out, 'samples.npz')) as f:
    data = {k: f[k] for k in f.files}
  images = data.pop('images').astype(np.float32) / 127.5 - 1.0
  return images, data, manifest
