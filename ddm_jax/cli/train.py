"""train.py: train (or resume) a DDM in a workdir."""
import os
import signal
import sys

from ddm_jax import parallel
from ddm_jax.cli.common import (CONFIG_HELP, OVERRIDES_EPILOG, add_progress_flag, cli,
                                load_config, make_parser, parse, result, split_overrides)
from ddm_jax.files import check_writable_dir
from ddm_jax.training.loop import train


def build_parser():
  p = make_parser('train', 'Train a Debiasing Diffusion Model, or resume the one in --workdir.',
                  epilog=OVERRIDES_EPILOG)
  p.add_argument('--config', required=True, help=CONFIG_HELP)
  p.add_argument('--workdir', required=True,
                 help='checkpoints/, metrics.jsonl, tensorboard/, samples/ and config.json go '
                 'here; an existing workdir resumes from its latest checkpoint')
  add_progress_flag(p)
  hosts = p.add_argument_group('several processes (hosts); each starts the same command')
  hosts.add_argument('--coordinator_address', default=None,
                     help='host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS, or the '
                     'TPU/SLURM runtime when --config.train.distributed=True)')
  hosts.add_argument('--num_processes', type=int, default=None,
                     help='number of processes (default: $JAX_NUM_PROCESSES)')
  hosts.add_argument('--process_id', type=int, default=None,
                     help="this process's index (default: $JAX_PROCESS_ID)")
  return p


@cli
def main(argv):
  overrides, rest = split_overrides(argv)
  args = parse(build_parser(), rest)
  config = load_config(args.config, overrides)
  for folder in (args.workdir, os.path.join(args.workdir, 'checkpoints'),  # refused now, not
                 os.path.join(args.workdir, 'tensorboard')):              # after the first steps
    check_writable_dir(folder)
  if args.coordinator_address or args.num_processes or args.process_id is not None:
    parallel.initialize_distributed(args.coordinator_address, args.num_processes,
                                    args.process_id)

  stop = {'requested': False}

  def on_term(signum, frame):  # preemption: finish the step, checkpoint, exit 0
    stop['requested'] = True
  signal.signal(signal.SIGTERM, on_term)

  train(config, args.workdir, should_stop=lambda: stop['requested'],
        progress=not args.no_progress)
  result(f'workdir: {os.path.abspath(args.workdir)} (checkpoints/, metrics.jsonl, '
         f'tensorboard/, samples/)')


if __name__ == '__main__':
  sys.exit(main())
