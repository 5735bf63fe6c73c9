"""The pretrained base of the paper-regime experiment (ddm_jax.experiments.regime): the
UNet of configs/digits.py trained once on all ten digits, balanced, with the plain
denoising loss (w_ind = 0). Only its UNet is used: every fine-tune starts from it."""
from . import digits


def get_config():
  c = digits.get_config()
  c.data.groups = tuple((d,) for d in range(10))
  c.data.num_groups = 10
  c.data.proportions = (0.1,) * 10
  c.data.split = 'balanced'     # every digit's generator pool: no test/evaluator image
  c.loss.w_rec, c.loss.w_ind = 1.0, 0.0
  c.train.num_steps = 3000
  c.train.checkpoint_every = 1000
  c.train.sample_every = 0
  return c
