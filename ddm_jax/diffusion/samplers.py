"""Samplers as a small registry; each runs its timesteps as one `lax.scan`.

A sampler sees the model only through `denoise(x_t, t) -> (x0_pred, eps_pred)`,
so classifier-free or indicator guidance wraps `denoise` and every sampler gets it.
Randomness for step i comes from `fold_in(key, i)`: a key fully determines a run.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.diffusion.schedules import _bcast, to_x0_eps

SAMPLERS = {}


def register(name):
  def wrap(fn):
    SAMPLERS[name] = fn
    return fn
  return wrap


def leading_timesteps(num_train, steps, offset=0):
  """diffusers' 'leading' spacing (DDPM/DDIM/PNDM default): t = i * (T // steps)."""
  if not 0 < steps <= num_train:
    raise ValueError(f'steps must be in [1, {num_train}], got {steps}')
  ratio = num_train // steps
  ts = (np.arange(steps) * ratio)[::-1].astype(np.int32) + offset
  return ts, ts - ratio


def linspace_timesteps(num_train, steps):
  """DPM-Solver's default 'linspace' spacing over [0, T-1]."""
  if not 0 < steps <= num_train:
    raise ValueError(f'steps must be in [1, {num_train}], got {steps}')
  return np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1].astype(np.int32)


def make_denoiser(model_fn: Callable, sched):
  """model_fn(x_t, t[B]) -> raw network output, turned into (x0, eps)."""
  def denoise(x, t):
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    return to_x0_eps(sched, model_fn(x, tb), x, tb)
  return denoise


def _abar(sched, t, final_alpha):
  """alphas_cumprod at t, or `final_alpha` where t < 0 (the step past the end)."""
  return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], final_alpha)


@register('ddim')
def ddim(denoise, sched, x, key, steps=50, eta=0.0, final_alpha=1.0, clip_x0=None):
  """DDIM (Song et al. 2021); eta=1 gives DDPM-like ancestral noise."""
  ts, prevs = leading_timesteps(sched.num_train_timesteps, steps)

  def body(x, inp):
    i, t, tp = inp
    x0, eps = denoise(x, t)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a_t, a_p = sched.alphas_cumprod[t], _abar(sched, tp, final_alpha)
    sigma = eta * jnp.sqrt((1 - a_p) / (1 - a_t)) * jnp.sqrt(1 - a_t / a_p)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    x = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1 - a_p - sigma ** 2, 0.0)) * eps + sigma * noise
    return x, None

  x, _ = jax.lax.scan(body, x, (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(prevs)))
  return x


@register('ddpm')
def ddpm(denoise, sched, x, key, steps=1000, final_alpha=1.0, clip_x0=None, **_):
  """Ancestral DDPM (Ho et al. 2020), 'fixed_small' variance, with diffusers' step skipping."""
  ts, prevs = leading_timesteps(sched.num_train_timesteps, steps)

  def body(x, inp):
    i, t, tp = inp
    x0, _ = denoise(x, t)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a_t, a_p = sched.alphas_cumprod[t], _abar(sched, tp, final_alpha)
    cur_alpha = a_t / a_p
    mean = (jnp.sqrt(a_p) * (1 - cur_alpha) * x0 + jnp.sqrt(cur_alpha) * (1 - a_p) * x) / (1 - a_t)
    var = jnp.maximum((1 - a_p) / (1 - a_t) * (1 - cur_alpha), 1e-20)
    noise = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise, None

  x, _ = jax.lax.scan(body, x, (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(prevs)))
  return x


@register('dpm++2m')
def dpmpp_2m(denoise, sched, x, key=None, steps=25, **_):
  """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, ending at sigma=0
  with a first-order step (diffusers' default final_sigmas_type='zero')."""
  ts = jnp.asarray(linspace_timesteps(sched.num_train_timesteps, steps))
  ac = sched.alphas_cumprod
  alpha = jnp.concatenate([jnp.sqrt(ac[ts]), jnp.ones(1)])     # alpha, sigma at each step
  sigma = jnp.concatenate([jnp.sqrt(1 - ac[ts]), jnp.zeros(1)])  # plus the final sigma = 0
  lam = jnp.log(alpha[:-1]) - jnp.log(sigma[:-1])
  n = len(ts)

  def body(carry, i):
    x, x0_prev = carry
    x0, _ = denoise(x, ts[i])
    # e^{-h} = (sigma_t / alpha_t) / (sigma_s / alpha_s), finite even at sigma_t = 0.
    exp_neg_h = (sigma[i + 1] * alpha[i]) / (alpha[i + 1] * sigma[i])
    first = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * (exp_neg_h - 1) * x0
    h = -jnp.log(jnp.maximum(exp_neg_h, 1e-30))
    h_prev = lam[i] - lam[jnp.maximum(i - 1, 0)]
    d1 = (x0 - x0_prev) * h / jnp.where(h_prev > 0, h_prev, 1.0)
    second = first - 0.5 * alpha[i + 1] * (exp_neg_h - 1) * d1
    use_second = (i > 0) & (i < n - 1)
    return (jnp.where(use_second, second, first), x0), None

  (x, _), _ = jax.lax.scan(body, (x, jnp.zeros_like(x)), jnp.arange(n))
  return x


def sample(name, denoise, sched, shape, key, **kwargs):
  """Draw x_T ~ N(0, I) from `key` and run sampler `name`."""
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; use one of {sorted(SAMPLERS)}')
  k_init, k_steps = jax.random.split(key)
  x = jax.random.normal(k_init, shape, jnp.float32)
  return SAMPLERS[name](denoise, sched, x, k_steps, **kwargs)
