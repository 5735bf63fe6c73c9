"""A few DDM train steps on a fixed global batch, for tests/test_parallel.py.

Run in a fresh interpreter (XLA_FLAGS decides the number of CPU devices before
jax is imported). With --num_processes > 1 it joins a localhost cluster and feeds
only its own slice of the global batch, as a real multi-host run does. Builds the
state and the step with `ddm_jax.training.setup.TrainSetup`, as `training.loop.train` does. Process 0 writes
OUT.npz (losses, params, EMA params); every process writes OUT.process<i>.json.

Multi-process CPU collectives (gloo) give up when a peer arrives more than ~30 s
late, and on a loaded machine one process may compile that much slower than the
other; so every program that communicates is compiled ahead of time and the
processes meet at a coordination-service barrier (long timeout) before running it.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--out', required=True)
  p.add_argument('--data_dir', required=True)
  p.add_argument('--steps', type=int, default=3)
  p.add_argument('--batch_size', type=int, default=8)
  p.add_argument('--num_processes', type=int, default=1)
  p.add_argument('--process_id', type=int, default=0)
  p.add_argument('--port', type=int, default=0)
  args = p.parse_args()

  import jax  # pylint: disable=import-outside-toplevel
  if args.num_processes > 1:
    address = f'127.0.0.1:{args.port}'
    jax.distributed.initialize(coordinator_address=address, coordinator_bind_address=address,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=120, heartbeat_timeout_seconds=60,
                               shutdown_timeout_seconds=60)
  def compiled(fn, *example_args):
    """AOT-compile fn, then wait until every process has compiled it too."""
    exe = fn.lower(*example_args).compile()
    if args.num_processes > 1:
      from jax._src import distributed  # pylint: disable=import-outside-toplevel
      distributed.global_state.client.wait_at_barrier(f'compiled_{len(barriers)}', 600_000)
      barriers.append(1)
    return exe

  barriers = []
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddm_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  from ddm_jax import parallel  # pylint: disable=import-outside-toplevel
  from ddm_jax.ddm import build_ddm  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.setup import TrainSetup  # pylint: disable=import-outside-toplevel
  from tests.helpers import enable_compile_cache, tiny_config  # pylint: disable=import-outside-toplevel
  enable_compile_cache()

  config = tiny_config(args.data_dir, **{'train.batch_size': args.batch_size,
                                         'train.num_steps': args.steps})
  local_batch = parallel.check_batch_divides(config.train.batch_size)
  images, labels = data_lib.load_arrays(config.data, args.data_dir, 'train', limit=args.batch_size)
  assert images.shape[0] == args.batch_size
  i = jax.process_index()
  local = {'image': images[i * local_batch:(i + 1) * local_batch],
           'label': labels[i * local_batch:(i + 1) * local_batch]}

  setup = TrainSetup(build_ddm(config), config)
  repl = setup.repl
  state = setup.init_state()
  frozen = setup.frozen()
  step_fn = setup.step_fn()

  batch = parallel.global_batch(setup.mesh, local)
  sharding = batch['image'].sharding
  gathered = parallel.to_host(compiled(jax.jit(lambda x: x, out_shardings=repl), batch)(batch))
  info = {'process_index': i, 'process_count': jax.process_count(),
          'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
          'batch_global_shape': list(batch['image'].shape),
          'batch_num_devices': len(sharding.device_set),
          'batch_shard_shapes': [list(s.data.shape) for s in batch['image'].addressable_shards],
          'batch_is_global_batch': bool(np.array_equal(gathered['image'], images)
                                        and np.array_equal(gathered['label'], labels))}
  step_fn = compiled(step_fn, state, batch, frozen, setup.hyper)
  losses = []
  for _ in range(args.steps):
    state, metrics = step_fn(state, batch, frozen, setup.hyper)
    losses.append(parallel.to_host(metrics))
  host = parallel.to_host({'params': state.params, 'ema': state.ema_params, 'step': state.step})
  info['step'] = int(host['step'])
  with open(f'{args.out}.process{i}.json', 'w', encoding='utf-8') as f:
    json.dump(info, f)
  if i == 0:
    flat = {}
    for prefix in ('params', 'ema'):
      for path, leaf in jax.tree_util.tree_flatten_with_path(host[prefix])[0]:
        flat[prefix + jax.tree_util.keystr(path)] = leaf
    for key in ('loss', 'loss_rec', 'loss_ind', 'grad_norm'):
      flat['metric/' + key] = np.array([m[key] for m in losses])
    np.savez(args.out, **flat)
  if args.num_processes > 1:
    jax.distributed.shutdown()
  print('ok', json.dumps(info), flush=True)


if __name__ == '__main__':
  main()
