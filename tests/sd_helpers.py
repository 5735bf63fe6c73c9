"""Tiny Stable Diffusion DDMs for tests: a random diffusers folder (no torch), a
LatentDDM on it with non-trivial LoRA/indicator params, and a workdir holding them as a
checkpoint (written directly, without compiling a train step)."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.config import apply_overrides, load_config_file
from ddm_jax.ddm import load_latent_ddm
from tests.sd_folder import write_tiny_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESOLUTION = 16  # the tiny VAE downsamples by 2: 8x8x4 latents


def sd_config(folder, **overrides):
  c = load_config_file(os.path.join(REPO, 'configs', 'sd15_lora.py'))
  return apply_overrides(c, {'model.pretrained': folder, 'data.resolution': str(RESOLUTION),
                             'data.prompt': 'a photo of a human face',
                             **{k: str(v) for k, v in overrides.items()}})


def tiny_folder(root):
  folder = os.path.join(str(root), 'sd')
  if not os.path.isdir(folder):
    write_tiny_pipeline(folder)
  return folder


def perturbed(params, seed, scale=0.2):
  """LoRA B matrices (zero at init) and everything else get random values, so an
  adapter that is dropped or transposed cannot go unnoticed."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), jnp.float32),
      params)


def tiny_ddm(root, seed=0, **overrides):
  """(config, LatentDDM, params with random non-zero LoRA and indicator)."""
  config = sd_config(tiny_folder(root), **overrides)
  ddm = load_latent_ddm(config)
  params = perturbed(ddm.init(jax.random.key(seed)), seed + 1)
  return config, ddm, params


def write_workdir(workdir, config, params, step=1):
  """A train.py workdir whose latest checkpoint holds `params` (and as EMA params where
  the config keeps an EMA)."""
  from ddm_jax.training.checkpoint import Checkpointer
  from ddm_jax.training.optim import make_optimizer
  from ddm_jax.training.state import create_train_state
  state = create_train_state(params, make_optimizer(config.optim, config.train.num_steps),
                             config.train.ema_decay)
  ckpt = Checkpointer(str(workdir), async_save=False)
  ckpt.save(step, state, config)
  ckpt.wait()
  ckpt.close()
  return str(workdir)
