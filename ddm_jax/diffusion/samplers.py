"""Samplers as a small registry; each runs its timesteps as one `lax.scan`.

A sampler sees the model only through `denoise(x_t, t) -> (x0_pred, eps_pred)`,
so classifier-free or indicator guidance wraps `denoise` and every sampler gets it.
Randomness for step i comes from `fold_in(key, i)` (per sample with one key per sample,
`step_noise`): a key fully determines a run.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.diffusion.schedules import to_x0_eps

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


SPACINGS = ('leading', 'trailing', 'linspace')


def _check_spacing(num_train, steps, spacing):
  if not 0 < steps <= num_train:
    raise ValueError(f'steps must be in [1, {num_train}], got {steps}')
  if spacing not in SPACINGS:
    raise ValueError(f'unknown timestep_spacing {spacing!r}; use one of {SPACINGS}')


def spaced_timesteps(num_train, steps, spacing='leading', offset=0):
  """The descending model timesteps of diffusers' DDPM/DDIM/PNDM `set_timesteps` for
  `timestep_spacing` and `steps_offset` (the offset applies to 'leading' only)."""
  _check_spacing(num_train, steps, spacing)
  if spacing == 'leading':
    ts = (np.arange(steps) * (num_train // steps))[::-1] + offset
  elif spacing == 'trailing':
    ts = np.round(np.arange(num_train, 0, -num_train / steps)).astype(np.int64) - 1
  else:
    ts = np.linspace(0, num_train - 1, steps).round()[::-1]
  ts = ts.astype(np.int32)
  if ts.max() >= num_train or ts.min() < 0:
    raise ValueError(f'steps_offset={offset} puts a timestep outside [0, {num_train})')
  return ts


def dpm_timesteps(num_train, steps, spacing='linspace', offset=0):
  """DPMSolverMultistepScheduler's timesteps (no lambda clipping, no Karras sigmas)."""
  _check_spacing(num_train, steps, spacing)
  if spacing == 'linspace':
    ts = np.linspace(0, num_train - 1, steps + 1).round()[::-1][:-1]
  elif spacing == 'leading':
    ts = (np.arange(steps + 1) * (num_train // (steps + 1))).round()[::-1][:-1] + offset
  else:
    ts = np.arange(num_train, 0, -num_train / steps).round() - 1
  ts = ts.astype(np.int32)
  if ts.max() >= num_train or ts.min() < 0:
    raise ValueError(f'steps_offset={offset} puts a timestep outside [0, {num_train})')
  return ts


def make_denoiser(model_fn: Callable, sched):
  """model_fn(x_t, t[B]) -> raw network output, turned into (x0, eps)."""
  def denoise(x, t):
    tb = jnp.full((x.shape[0],), t, jnp.int32)
    return to_x0_eps(sched, model_fn(x, tb), x, tb)
  return denoise


def step_noise(key, i, x):
  """N(0, I) shaped like `x` for step `i`: from fold_in(key, i), or, when `key` holds one
  key per sample ([B]), sample b's from fold_in(key[b], i), so that a sample's noise never
  depends on the batch it is drawn in (batch size, devices, hosts)."""
  if jnp.ndim(key) == 0:
    return jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
  return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], x.dtype))(key)


def _abar(sched, t, final_alpha):
  """alphas_cumprod at t, or `final_alpha` where t < 0 (the step past the end)."""
  return jnp.where(t >= 0, sched.alphas_cumprod[jnp.maximum(t, 0)], final_alpha)


@register('ddim')
def ddim(denoise, sched, x, key, steps=50, eta=0.0, final_alpha=1.0, clip_x0=None,
         steps_offset=0, timestep_spacing='leading'):
  """DDIM (Song et al. 2021); eta=1 gives DDPM-like ancestral noise. As diffusers'
  DDIMScheduler: the step goes from t to t - T // steps, and past the end to
  `final_alpha` (1.0 for set_alpha_to_one, else alphas_cumprod[0])."""
  ts = spaced_timesteps(sched.num_train_timesteps, steps, timestep_spacing, steps_offset)
  prevs = ts - sched.num_train_timesteps // steps

  def body(x, inp):
    i, t, tp = inp
    x0, eps = denoise(x, t)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a_t, a_p = sched.alphas_cumprod[t], _abar(sched, tp, final_alpha)
    sigma = eta * jnp.sqrt((1 - a_p) / (1 - a_t)) * jnp.sqrt(1 - a_t / a_p)
    noise = step_noise(key, i, x)
    x = jnp.sqrt(a_p) * x0 + jnp.sqrt(jnp.maximum(1 - a_p - sigma ** 2, 0.0)) * eps + sigma * noise
    return x, None

  x, _ = jax.lax.scan(body, x, (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(prevs)))
  return x


@register('ddpm')
def ddpm(denoise, sched, x, key, steps=1000, final_alpha=1.0, clip_x0=None, steps_offset=0,
         timestep_spacing='leading', **_):
  """Ancestral DDPM (Ho et al. 2020), 'fixed_small' variance, with diffusers' step
  skipping: each step goes to the next timestep of the list (the last one to -1)."""
  ts = spaced_timesteps(sched.num_train_timesteps, steps, timestep_spacing, steps_offset)
  prevs = np.append(ts[1:], -1).astype(np.int32)

  def body(x, inp):
    i, t, tp = inp
    x0, _ = denoise(x, t)
    if clip_x0:
      x0 = jnp.clip(x0, -clip_x0, clip_x0)
    a_t, a_p = sched.alphas_cumprod[t], _abar(sched, tp, final_alpha)
    cur_alpha = a_t / a_p
    mean = (jnp.sqrt(a_p) * (1 - cur_alpha) * x0 + jnp.sqrt(cur_alpha) * (1 - a_p) * x) / (1 - a_t)
    var = jnp.maximum((1 - a_p) / (1 - a_t) * (1 - cur_alpha), 1e-20)
    noise = step_noise(key, i, x)
    return mean + jnp.where(t > 0, jnp.sqrt(var), 0.0) * noise, None

  x, _ = jax.lax.scan(body, x, (jnp.arange(len(ts)), jnp.asarray(ts), jnp.asarray(prevs)))
  return x


@register('dpm++2m')
def dpmpp_2m(denoise, sched, x, key=None, steps=25, timestep_spacing='linspace', steps_offset=0,
             **_):
  """DPM-Solver++(2M) (Lu et al. 2022), data prediction, multistep, ending at sigma=0
  with a first-order step (diffusers' default final_sigmas_type='zero')."""
  ts = jnp.asarray(dpm_timesteps(sched.num_train_timesteps, steps, timestep_spacing, steps_offset))
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


# PLMS coefficients on (current, last, second-to-last, third-to-last) model outputs by how
# many outputs the history holds (diffusers' PNDMScheduler.step_plms).
_PLMS = {1: (1.0, 0.0, 0.0, 0.0), 2: (1.5, -0.5, 0.0, 0.0),
         3: (23 / 12, -16 / 12, 5 / 12, 0.0), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def plms_plan(num_train, steps, spacing='leading', offset=0):
  """diffusers' PNDM with skip_prk_steps=True, unrolled on the host: for each of the
  `steps + 1` model calls, (model t, step from t, step to t, 4 PLMS coefficients,
  whether the output joins the history, whether the step restarts from the saved sample).

  The second call is the pseudo-improved-Euler correction: it re-runs the first step
  from the same sample with the mean of the first two model outputs."""
  ts = spaced_timesteps(num_train, steps, spacing, offset)[::-1]  # ascending, as diffusers
  plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
  ratio = num_train // steps
  rows, history = [], 0
  for i, t in enumerate(plms):
    if i == 1:
      rows.append((t, t + ratio, t, (0.5, 0.5, 0.0, 0.0), False, True))
    else:
      history = min(history + 1, 4)
      rows.append((t, t, t - ratio, _PLMS[history], True, False))
  t_model, t_from, t_to, coef, append, restart = (np.asarray(c) for c in zip(*rows))
  return (t_model.astype(np.int32), t_from.astype(np.int32), t_to.astype(np.int32),
          coef.astype(np.float32), append, restart)


@register('pndm')
def pndm(denoise, sched, x, key=None, steps=50, final_alpha=None, steps_offset=0,
         timestep_spacing='leading', **_):
  """PNDM as Stable Diffusion runs it (diffusers' PNDMScheduler, skip_prk_steps=True):
  pseudo linear multistep (PLMS, Liu et al. 2022), `steps + 1` model calls.
  `final_alpha` defaults to alphas_cumprod[0] (set_alpha_to_one=False)."""
  t_model, t_from, t_to, coef, append, restart = plms_plan(
      sched.num_train_timesteps, steps, timestep_spacing, steps_offset)
  ac = sched.alphas_cumprod
  if final_alpha is None:
    final_alpha = ac[0]
  v_pred = sched.prediction_type == 'v_prediction'

  def body(carry, inp):
    x, saved, h1, h2, h3 = carry
    i, t, tf, tt, c, app, rst = inp
    x0, eps = denoise(x, t)
    if v_pred:  # PNDM combines the raw network outputs: recover v from (x0, eps)
      e = jnp.sqrt(ac[t]) * eps - jnp.sqrt(1 - ac[t]) * x0
    else:
      e = eps
    out = c[0] * e + c[1] * h1 + c[2] * h2 + c[3] * h3
    sample = jnp.where(rst, saved, x)
    saved = jnp.where(i == 0, x, saved)
    h1, h2, h3 = (jnp.where(app, a, b) for a, b in ((e, h1), (h1, h2), (h2, h3)))
    a_t, a_p = ac[tf], _abar(sched, tt, final_alpha)
    if v_pred:
      out = jnp.sqrt(a_t) * out + jnp.sqrt(1 - a_t) * sample
    denom = a_t * jnp.sqrt(1 - a_p) + jnp.sqrt(a_t * (1 - a_t) * a_p)
    x = jnp.sqrt(a_p / a_t) * sample - (a_p - a_t) * out / denom
    return (x, saved, h1, h2, h3), None

  zeros = jnp.zeros_like(x)
  xs = (jnp.arange(len(t_model)), jnp.asarray(t_model), jnp.asarray(t_from), jnp.asarray(t_to),
        jnp.asarray(coef), jnp.asarray(append), jnp.asarray(restart))
  (x, *_), _ = jax.lax.scan(body, (x, zeros, zeros, zeros, zeros), xs)
  return x


def model_timesteps(name, num_train, steps, timestep_spacing=None, steps_offset=0, **_):
  """The timesteps at which sampler `name` calls the model, in order (for inspection
  and parity tests against a diffusers scheduler's `.timesteps`)."""
  if name == 'pndm':
    return plms_plan(num_train, steps, timestep_spacing or 'leading', steps_offset)[0]
  if name == 'dpm++2m':
    return dpm_timesteps(num_train, steps, timestep_spacing or 'linspace', steps_offset)
  if name in ('ddim', 'ddpm'):
    return spaced_timesteps(num_train, steps, timestep_spacing or 'leading', steps_offset)
  raise ValueError(f'unknown sampler {name!r}; use one of {sorted(SAMPLERS)}')


# The diffusers scheduler each sampler reproduces, with that class's defaults for the
# options we honour (a scheduler_config.json of another class gives its values, as
# `SchedulerClass.from_config` does).
SCHEDULER_CLASSES = {'ddim': 'DDIMScheduler', 'ddpm': 'DDPMScheduler', 'pndm': 'PNDMScheduler',
                     'dpm++2m': 'DPMSolverMultistepScheduler'}
_CLASS_DEFAULTS = {
    'ddim': dict(set_alpha_to_one=True, steps_offset=0, clip_sample=True, clip_sample_range=1.0,
                 timestep_spacing='leading'),
    'ddpm': dict(steps_offset=0, clip_sample=True, clip_sample_range=1.0, timestep_spacing='leading'),
    'pndm': dict(set_alpha_to_one=False, steps_offset=0, timestep_spacing='leading'),
    'dpm++2m': dict(steps_offset=0, timestep_spacing='linspace'),
}
# Options that change the arithmetic in ways we do not implement: value we implement.
_UNSUPPORTED = {
    'thresholding': False, 'variance_type': 'fixed_small', 'skip_prk_steps': True,
    'algorithm_type': 'dpmsolver++', 'solver_order': 2, 'solver_type': 'midpoint',
    'use_karras_sigmas': False, 'use_exponential_sigmas': False, 'use_beta_sigmas': False,
    'use_lu_lambdas': False, 'use_flow_sigmas': False, 'final_sigmas_type': 'zero',
    'rescale_betas_zero_snr': False, 'timestep_type': 'discrete',
}
_APPLIES = {'thresholding': ('ddim', 'ddpm', 'dpm++2m'), 'variance_type': ('ddpm',),
            'skip_prk_steps': ('pndm',), 'rescale_betas_zero_snr': ('ddim', 'ddpm', 'dpm++2m')}


def scheduler_kwargs(name, scheduler_config, sched):
  """Keyword arguments for sampler `name` from a diffusers `scheduler_config.json`
  mapping, so that it runs as `SCHEDULER_CLASSES[name].from_config(scheduler_config)`:
  steps_offset, timestep_spacing, set_alpha_to_one (-> final_alpha) and clip_sample.

  Returns (kwargs, notes): `notes` name options of the config that we do not implement
  (e.g. PNDM's Runge-Kutta warm-up, skip_prk_steps=False); the sampler runs without them."""
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; use one of {sorted(SAMPLERS)}')
  cfg = {**_CLASS_DEFAULTS.get(name, {}), **{k: v for k, v in scheduler_config.items()
                                             if k in _CLASS_DEFAULTS.get(name, {})}}
  kw = {}
  if 'steps_offset' in cfg:
    kw['steps_offset'] = int(cfg['steps_offset'])
  if 'timestep_spacing' in cfg:
    kw['timestep_spacing'] = cfg['timestep_spacing']
  if 'set_alpha_to_one' in cfg:
    kw['final_alpha'] = 1.0 if cfg['set_alpha_to_one'] else float(sched.alphas_cumprod[0])
  if 'clip_sample' in cfg:
    kw['clip_x0'] = float(cfg['clip_sample_range']) if cfg['clip_sample'] else None
  notes = []
  for key, ours in _UNSUPPORTED.items():
    applies = _APPLIES.get(key, ('dpm++2m',))
    if name in applies and key in scheduler_config and scheduler_config[key] not in (ours, None):
      notes.append(f'{key}={scheduler_config[key]!r} (we run {ours!r})')
  if name == 'pndm' and not scheduler_config.get('skip_prk_steps', False):
    if not any(n.startswith('skip_prk_steps') for n in notes):
      notes.append('skip_prk_steps=False (PNDMScheduler default; we run True: PLMS without '
                   'the Runge-Kutta warm-up, as Stable Diffusion does)')
  return kw, notes


def sample(name, denoise, sched, shape, key, **kwargs):
  """Draw x_T ~ N(0, I) from `key` and run sampler `name`."""
  if name not in SAMPLERS:
    raise ValueError(f'unknown sampler {name!r}; use one of {sorted(SAMPLERS)}')
  k_init, k_steps = jax.random.split(key)
  x = jax.random.normal(k_init, shape, jnp.float32)
  return SAMPLERS[name](denoise, sched, x, k_steps, **kwargs)
