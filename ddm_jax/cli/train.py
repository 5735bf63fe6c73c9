"""train.py: train (or resume) a DDM in a workdir."""
import argparse
import os
import signal

from ddm_jax import parallel
from ddm_jax.cli.common import cli, load_config, parse, split_overrides
from ddm_jax.training.loop import train


@cli
def main(argv):
  overrides, rest = split_overrides(argv)
  p = argparse.ArgumentParser(prog='train.py', description='Train a Debiasing Diffusion Model.')
  p.add_argument('--config', required=True, help='config file, e.g. configs/digits.py')
  p.add_argument('--workdir', required=True, help='checkpoints, metrics and samples go here')
  p.add_argument('--no_progress', action='store_true')
  hosts = p.add_argument_group('several processes (hosts); each starts the same command')
  hosts.add_argument('--coordinator_address', default=None,
                     help='host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or the '
                     'TPU/SLURM runtime when --config.train.distributed=True)')
  hosts.add_argument('--num_processes', type=int, default=None, help='default: $JAX_NUM_PROCESSES')
  hosts.add_argument('--process_id', type=int, default=None, help='default: $JAX_PROCESS_ID')
  args = parse(p, rest)
  config = load_config(args.config, overrides)
  if args.coordinator_address or args.num_processes or args.process_id is not None:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)

  stop = {'requested': False}

  def on_term(signum, frame):  # preemption: finish the step, checkpoint, exit 0
    stop['requested'] = True
  signal.signal(signal.SIGTERM, on_term)

  train(config, args.workdir, should_stop=lambda: stop['requested'],
        progress=not args.no_progress)
  print(f'workdir: {os.path.abspath(args.workdir)} (checkpoints/, metrics.jsonl, '
        f'tensorboard/, samples/)')
