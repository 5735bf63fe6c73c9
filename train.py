"""Train a DDM: python train.py --config=configs/digits.py --workdir=DIR [--config.KEY=VALUE ...]"""
import sys

from ddm_jax.cli.train import main

if __name__ == '__main__':
  sys.exit(main())
