"""train.py: train (or resume) a DDM in a workdir."""
import argparse
import os
import signal

from ddm_jax.cli.common import cli, load_config, split_overrides
from ddm_jax.training.loop import train


@cli
def main(argv):
  overrides, rest = split_overrides(argv)
  p = argparse.ArgumentParser(prog='train.py', description='Train a Debiasing Diffusion Model.')
  p.add_argument('--config', required=True, help='config file, e.g. configs/digits.py')
  p.add_argument('--workdir', required=True, help='checkpoints, metrics and samples go here')
  p.add_argument('--no_progress', action='store_true')
  args = p.parse_args(rest)
  config = load_config(args.config, overrides)

  stop = {'requested': False}

  def on_term(signum, frame):  # preemption: finish the step, checkpoint, exit 0
    stop['requested'] = True
  signal.signal(signal.SIGTERM, on_term)

  train(config, args.workdir, should_stop=lambda: stop['requested'],
        progress=not args.no_progress)
  print(f'workdir: {os.path.abspath(args.workdir)} (checkpoints/, metrics.jsonl, '
        f'tensorboard/, samples/)')
