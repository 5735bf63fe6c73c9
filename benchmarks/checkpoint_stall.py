"""How long `Checkpointer.save` holds up the training loop, against the checkpoint code of
an earlier revision, in one process.

python benchmarks/checkpoint_stall.py [--mb 1000] [--preset NAME ...] [--rounds 3] [--before REV]

The stall is the time `save()` takes to return (orbax's async write goes on behind it);
'written' is until the checkpoint is committed, 'restore' a checked restore of it. The
states: 100 float32 leaves of `--mb` MB in all, in params and ema_params (--mb 0: none),
and the train state of each `--preset` (benchmarks/presets.py, as benchmarks/jax_side.py
builds it, with that preset's run config), on the default devices. REV's
ddm_jax/training/checkpoint.py (default 4bbe65e: the digest of the whole state fetched and
hashed on the caller's thread) is read with `git show` and imported beside the current
one; the two take turns. Prints one JSON line per state; BENCHMARKS.md quotes them.
"""
import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module_at(rev, folder):
  path = os.path.join(folder, 'checkpoint_before.py')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(subprocess.run(['git', 'show', f'{rev}:ddm_jax/training/checkpoint.py'], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout)
  spec = importlib.util.spec_from_file_location('checkpoint_before', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _states(args):
  """[(name, state, config)]: the synthetic state, then each preset's train state."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  out = []
  if args.mb:
    n = args.mb * (1 << 20) // 4 // 100
    out.append((f'{args.mb} MB', {part: {f'l{i}': jnp.full((n,), i + shift, jnp.float32)
                                         for i in range(50)}
                                  for part, shift in (('params', 0.0), ('ema_params', 0.5))},
                {'model': {}}))
  for name in args.preset:
    from benchmarks import jax_side, presets  # pylint: disable=import-outside-toplevel
    bench = jax_side.TrainStep(presets.parse_preset(name)).build()
    out.append((name, bench.state, bench.config))
  return out


def _turns(state, config, modules, rounds, tmp):
  """{module name: [{stall_s, written_s, restore_s}] per round}, the modules taking turns."""
  import jax  # pylint: disable=import-outside-toplevel
  abstract = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
  jax.block_until_ready(state)
  rows = {name: [] for name in modules}
  for _ in range(rounds):
    for name, module in modules.items():
      work = tempfile.mkdtemp(dir=tmp)
      ck = module.Checkpointer(work)
      t = time.perf_counter()
      ck.save(1, state, config)
      stall = time.perf_counter() - t
      ck.wait()
      written = time.perf_counter() - t
      t = time.perf_counter()
      ck.restore(1, abstract, with_data=False)
      rows[name].append({'stall_s': round(stall, 3), 'written_s': round(written, 3),
                         'restore_s': round(time.perf_counter() - t, 3)})
      ck.close()
      shutil.rmtree(work)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--mb', type=int, default=1000)
  parser.add_argument('--preset', action='append', default=[])
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--before', default='4bbe65e')
  args = parser.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddm_jax.training import checkpoint  # pylint: disable=import-outside-toplevel
  with tempfile.TemporaryDirectory() as tmp:
    modules = {'before': _module_at(args.before, tmp), 'after': checkpoint}
    for name, state, config in _states(args):
      rows = _turns(state, config, modules, args.rounds, tmp)
      mb = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(state)) / 2 ** 20
      print(json.dumps({'state': name, 'mb': round(mb, 1), 'rev': args.before,
                        'backend': jax.default_backend(), 'device': jax.devices()[0].device_kind,
                        'load': os.getloadavg()[0], **rows,
                        'stall_ratio': round(float(np.median([r['stall_s'] for r in rows['after']])
                                                   / np.median([r['stall_s'] for r in
                                                                rows['before']])), 3)}),
            flush=True)


if __name__ == '__main__':
  main()
