"""Train-step benchmark on a config (default: the digits demo).

python benchmarks/train_step.py [--config=configs/digits.py] [--steps=50] [--config.KEY=VALUE ...]
Prints one JSON line: compile time, steady steps/s and images/s, peak RSS.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ddm_jax import parallel  # noqa: E402
from ddm_jax.cli.common import load_config, split_overrides  # noqa: E402
from ddm_jax.ddm import build_ddm  # noqa: E402
from ddm_jax.training.setup import TrainSetup  # noqa: E402


def main(argv):
  overrides, rest = split_overrides(argv)
  p = argparse.ArgumentParser()
  p.add_argument('--config', default='configs/digits.py')
  p.add_argument('--steps', type=int, default=50)
  args = p.parse_args(rest)
  config = load_config(args.config, overrides)
  setup = TrainSetup(build_ddm(config), config)
  state = setup.init_state()
  b, r, c = config.train.batch_size, config.data.resolution, config.data.channels
  rng = np.random.default_rng(0)
  batch = parallel.global_batch(setup.mesh, {
      'image': rng.uniform(-1, 1, (b, r, r, c)).astype(np.float32),
      'label': rng.integers(0, config.data.num_groups, b).astype(np.int32)})
  frozen = setup.frozen()
  step = setup.step_fn()

  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen, setup.hyper).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch, frozen, setup.hyper)   # warm-up, excluded
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch, frozen, setup.hyper)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t0) / args.steps
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  print(json.dumps({
      'bench': 'train_step', 'config': args.config, 'overrides': overrides,
      'devices': jax.device_count(), 'backend': jax.default_backend(),
      'cpu': platform.processor() or platform.machine(), 'cores': os.cpu_count(),
      'batch': b, 'resolution': r, 'params': int(n_params),
      'compile_s': round(compile_s, 3), 'step_ms': round(dt * 1e3, 3),
      'steps_per_s': round(1 / dt, 3), 'images_per_s': round(b / dt, 1),
      'peak_rss_mib': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      'loss': float(m['loss'])}))


if __name__ == '__main__':
  main(sys.argv[1:])
