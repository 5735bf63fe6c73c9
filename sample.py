"""Sample from a trained DDM: python sample.py --workdir=DIR --num_samples=N [--sampler=ddim --steps=50 --seed=0]"""
import sys

from ddm_jax.cli import sample_main

if __name__ == '__main__':
  sys.exit(sample_main())
