"""Noise schedules, forward noising and training targets (diffusers' conventions)."""
import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction')


def make_betas(schedule, num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02):
  """Betas in float64 numpy, so closed forms and diffusers agree to the last bit."""
  n = num_train_timesteps
  if schedule == 'linear':
    return np.linspace(beta_start, beta_end, n, dtype=np.float64)
  if schedule == 'scaled_linear':  # Stable Diffusion's: linear in sqrt(beta)
    return np.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=np.float64) ** 2
  if schedule == 'squaredcos_cap_v2':  # Nichol & Dhariwal's cosine alpha_bar, betas capped at 0.999
    abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])
  raise ValueError(f'unknown beta schedule {schedule!r}; use one of {SCHEDULES}')


class Schedule(NamedTuple):
  betas: jnp.ndarray           # [T] float32
  alphas_cumprod: jnp.ndarray  # [T] float32
  prediction_type: str = 'epsilon'

  @property
  def num_train_timesteps(self):
    return self.betas.shape[0]


def make_schedule(schedule='linear', num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                  prediction_type='epsilon'):
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'unknown prediction_type {prediction_type!r}; use one of {PREDICTION_TYPES}')
  betas = make_betas(schedule, num_train_timesteps, beta_start, beta_end)
  # diffusers computes alphas_cumprod in float32 from float32 betas; match it.
  betas32 = betas.astype(np.float32)
  return Schedule(jnp.asarray(betas32), jnp.asarray(np.cumprod(1.0 - betas32, dtype=np.float32)),
                  prediction_type)


def schedule_from_config(diffusion_cfg):
  """From our config's `diffusion` section (pixel models)."""
  return make_schedule(diffusion_cfg.schedule, diffusion_cfg.num_train_timesteps,
                       diffusion_cfg.beta_start, diffusion_cfg.beta_end,
                       diffusion_cfg.prediction_type)


def schedule_from_scheduler_config(cfg):
  """From a diffusers `scheduler_config.json` mapping (Stable Diffusion folders), with
  diffusers' defaults for missing keys."""
  return make_schedule(cfg.get('beta_schedule', 'scaled_linear'),
                       cfg.get('num_train_timesteps', 1000), cfg.get('beta_start', 0.00085),
                       cfg.get('beta_end', 0.012), cfg.get('prediction_type', 'epsilon'))


def _bcast(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def alpha_sigma(sched, t, like):
  ac = sched.alphas_cumprod[t]
  return _bcast(jnp.sqrt(ac), like), _bcast(jnp.sqrt(1.0 - ac), like)


def add_noise(sched, x0, noise, t):
  """q(x_t | x_0): sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
  a, s = alpha_sigma(sched, t, x0)
  return a * x0 + s * noise


def training_target(sched, x0, noise, t):
  if sched.prediction_type == 'epsilon':
    return noise
  a, s = alpha_sigma(sched, t, x0)
  return a * noise - s * x0  # v-prediction (Salimans & Ho 2022)


def to_x0_eps(sched, model_out, x_t, t):
  """Convert the network output into (x0 prediction, eps prediction)."""
  a, s = alpha_sigma(sched, t, x_t)
  if sched.prediction_type == 'epsilon':
    eps = model_out
    return (x_t - s * eps) / a, eps
  x0 = a * x_t - s * model_out
  return x0, s * x_t + a * model_out
