"""Indicator guidance: steer sampling to a target group distribution with DDM's own indicator.

DDM trains its indicator on the UNet's predicted noise at uniformly random
timesteps, so ``log_softmax(indicator(eps_pred(x_t, t)))`` is a noise-aware
group classifier ``log p(y | x_t)``. Classifier guidance (Dhariwal & Nichol
2021) in epsilon form then reads

    eps' = eps - S * sqrt(1 - abar_t) * grad_{x_t} log p(y | x_t)
    x0'  = (x_t - sqrt(1 - abar_t) * eps') / sqrt(abar_t)

where the gradient flows through the UNet and the indicator. Each sample is
assigned a target group before sampling (``balanced_groups``: every prefix of a
run matches the target distribution up to rounding; ``stratified_groups`` shuffles
within chunks instead), and the
guidance pulls sample i toward its group ``y_i``. The wrapped denoiser is
traced into the sampler's single ``lax.scan`` (DDIM, DDPM, DPM-Solver++), so
guided sampling stays one compiled program, batch-sharded like the unguided.
"""
import inspect

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax import kernels
from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.diffusion.schedules import alpha_sigma, to_x0_eps
from ddm_jax.errors import ConfigError
from ddm_jax.generation.generator import make_generator
from ddm_jax.generation.prompts import cfg_blend, cfg_parts, per_sample
from ddm_jax.objective import predicted_noise

GUIDE_KEY = 'guide'  # make_generator hands the per-sample guide pytree to the hook under this key


def parse_target(text, num_groups):
  """'0.5,0.5' (or a sequence) -> float64 probability vector of length num_groups.

  Ratios are accepted and normalised ('1,1' == '0.5,0.5'); ``None``/'' means uniform.
  """
  if text is None or (isinstance(text, str) and not text.strip()):
    return np.full(num_groups, 1.0 / num_groups)
  try:
    vals = [float(v) for v in (text.split(',') if isinstance(text, str) else text)]
  except (TypeError, ValueError):
    raise ConfigError(f'target must be comma-separated numbers, got {text!r}') from None
  p = np.asarray(vals, np.float64)
  if p.size != num_groups:
    raise ConfigError(f'target has {p.size} entries but the model has {num_groups} groups')
  if not np.all(np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
    raise ConfigError(f'target must be non-negative with a positive sum, got {text!r}')
  return p / p.sum()


def stratified_counts(n, target):
  """Integer counts summing to ``n`` closest to ``n * target`` (largest remainder)."""
  target = np.asarray(target, np.float64)
  raw = n * target
  counts = np.floor(raw).astype(np.int64)
  rest = n - counts.sum()
  if rest:
    # Ties broken by group index, so the result is deterministic.
    order = np.lexsort((np.arange(raw.size), -(raw - counts)))
    counts[order[:rest]] += 1
  return counts


def stratified_groups(num, target, batch_size, seed=0):
  """Target group of each of ``num`` samples, drawn in chunks of ``batch_size``.

  Every chunk (the batch the sampler sees) holds ``stratified_counts`` of each
  group, shuffled within the chunk with ``seed``; the last, shorter chunk is
  stratified on its own length. Returns int32 ``[num]``.
  """
  if num < 1 or batch_size < 1:
    raise ConfigError(f'num and batch_size must be positive, got {num}, {batch_size}')
  rng = np.random.default_rng(seed)
  out = []
  for start in range(0, num, batch_size):
    m = min(batch_size, num - start)
    labels = np.repeat(np.arange(len(target)), stratified_counts(m, target))
    out.append(rng.permutation(labels))
  return np.concatenate(out).astype(np.int32)


def balanced_groups(num, target):
  """The target group of images 0..num-1 such that every prefix holds the target mix as
  closely as integers allow: image j goes to the group furthest below its share of j + 1
  (ties: the lower id). Image j's group depends on j and `target` only, so a job of any
  length, batch size or host split is balanced, and its first n images are too."""
  target = np.asarray(target, np.float64)
  counts = np.zeros(target.size)
  out = np.empty(int(num), np.int32)
  for j in range(int(num)):
    g = int(np.argmax((j + 1) * target - counts - 1e-9 * np.arange(target.size)))
    out[j] = g
    counts[g] += 1
  return out


PATHS = ('unet', 'x0')

# How the guidance term is applied (`make_indicator_guidance(variant=...)`); every variant's
# parameter is fixed here, not tuned, so choosing a variant selects nothing else:
#   plain  classifier guidance as written above;
#   norm   each sample's gradient rescaled to RMS 1 / NORM_UNIT: the term S s grad then moves
#          eps by (S / NORM_UNIT) s per pixel whatever the classifier's confidence (at S =
#          NORM_UNIT as far as the noise itself); no rare huge push, no vanishing one;
#   early  guide only the first EARLY_FRACTION of the trajectory (t >= (1 - f) T), where a
#          digit's identity is decided, and let the last steps refine it unguided;
#   stop   per sample and step: no push while the guide already gives the sample's group
#          p >= STOP_PROB (stop pushing a sample once it is in its group; resume if it leaves).
VARIANTS = ('plain', 'norm', 'early', 'stop')
NORM_UNIT = 32.0
EARLY_FRACTION = 0.5
STOP_PROB = 0.9


def check_scale(scale):
  """A finite float; a negative scale pushes samples *away* from their assigned group."""
  scale = float(scale)
  if not np.isfinite(scale):
    raise ConfigError(f'guidance scale must be a finite number, got {scale}')
  return scale


def make_guide(labels, scale):
  """The per-sample guide pytree for ``generate(..., guide=...)``: target group and scale.

  ``scale`` is one number (the same for every sample) or one per sample; it is
  a traced input, so one compiled guided sampler serves every scale.
  """
  labels = np.asarray(labels, np.int32)
  if labels.ndim != 1:
    raise ConfigError(f'guide labels must be 1-D, got shape {labels.shape}')
  scale = np.broadcast_to(np.asarray(scale, np.float32), labels.shape)
  for s in np.unique(scale):
    check_scale(s)
  return {'labels': labels, 'scale': np.array(scale)}


def make_indicator_guidance(ddm, grad_clip=None, path='unet', clip_x0=None, variant='plain'):
  """A ``guidance(params, frozen, denoise, cond) -> denoise`` hook for ``make_generator``.

  ``cond['guide']`` is the ``make_guide`` pytree: each sample's target group
  (int [B]) and guidance scale (float [B]); the other entries of ``cond``
  (e.g. ``class_labels``) condition the UNet as usual. The hook runs the UNet
  once per step with its VJP: the same forward gives the network output and,
  through the indicator, the gradient of the assigned group's log-probability
  w.r.t. ``x_t``. ``grad_clip`` (optional) caps the per-sample L2 norm of that
  gradient, a guard against rare huge gradients. A sample with scale 0 gets
  exactly the unguided update.

  The indicator reads what it was trained on (``objective.predicted_noise``): the
  noise estimate of the *conditional* prediction. With classifier-free guidance
  (``generation.prompts.CFGModel``) the gradient is taken through the prompt's
  prediction alone, the unconditional one runs without a VJP, and CFG then blends
  the guided conditional prediction: ``uncond + w (cond - S s grad - uncond)``, so
  the guidance term is scaled by the CFG scale ``w`` as the prompt's is (the
  sampled density is ``p(x)^(1-w) [p(x|c) p(y|x_t)^S]^w``).

  ``path`` picks which dependence of the indicator's input on ``x_t`` the
  gradient follows. The noise estimate is ``eps_hat = (x_t - a x0_hat(x_t)) / s``:
  it depends on ``x_t`` directly (the ``x_t / s`` term) and through the denoised
  estimate ``x0_hat``. ``'unet'`` (the default, the plain gradient of the
  composite classifier) follows both; ``'x0'`` stops the direct term, so the
  gradient moves ``x_t`` only as far as that changes what the UNet thinks the
  clean image is. The value the indicator reads is the same in both; only the
  gradient differs. A noise-aware classifier (``indicator.input = 'x_t'``) reads x_t and
  t itself: its gradient is taken w.r.t. x_t directly, not through the UNet, and only
  ``'unet'`` (the plain gradient) applies.

  ``clip_x0``: clip the *unguided* x0 estimate to ``[-clip_x0, clip_x0]``
  before the guidance term is added, and run the sampler itself without
  clipping (``make_guided_generator`` does both). Order matters: a sampler
  that clips the guided x0 but keeps the guided eps (DDIM) throws away the
  guidance term's x0 part, which at high noise is amplified by ``1/a`` far out
  of range, and keeps only its eps part, which points the other way:
  measured on the digits, such guidance steered samples *away* from their
  group. Guided-diffusion (Dhariwal & Nichol) clips first too.

  ``variant`` (``VARIANTS``): plain classifier guidance, or one that normalises the
  gradient, guides only the early part of the trajectory, or stops per sample (see above).
  """
  if variant not in VARIANTS:
    raise ConfigError(f'guidance variant must be one of {VARIANTS}, got {variant!r}')
  if grad_clip is not None and not grad_clip > 0:
    raise ConfigError(f'grad_clip must be positive, got {grad_clip}')
  if path not in PATHS:
    raise ConfigError(f'guidance path must be one of {PATHS}, got {path!r}')
  reads_x_t = getattr(ddm, 'indicator_input', 'eps') == 'x_t'
  if reads_x_t and path != 'unet':
    raise ConfigError(f"guidance path {path!r} follows the UNet's noise estimate; this "
                      "model's indicator reads x_t (indicator.input='x_t'): use path 'unet'")

  def guidance(params, frozen, denoise, cond):
    del denoise  # rebuilt below from the same UNet call that yields the gradient
    guide = cond.get(GUIDE_KEY)
    if guide is None:
      raise ConfigError('indicator guidance needs a target group and scale per sample '
                        '(generate(..., guide=make_guide(labels, scale)))')
    labels = guide['labels']
    net, cond_kw, uncond_kw, cfg_scale = cfg_parts(
        ddm, {k: v for k, v in cond.items() if k != GUIDE_KEY})
    sched = ddm.sched

    def guided(x, t):
      k = kernels.current()   # a gradient in a scan: see Kernels.im2col_max_pixels_loop_grad
      with kernels.using(im2col_max_pixels=max(k.im2col_max_pixels,
                                               k.im2col_max_pixels_loop_grad)):
        return guided_step(x, t)

    def guided_step(x, t):
      tb = jnp.full((x.shape[0],), t, jnp.int32)

      def picked(logits):  # samples are independent: grad of the sum = per-sample grads
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        return picked.sum(), picked

      if reads_x_t:
        # A noise-aware classifier log p(y | x_t, t): the gradient flows through x_t
        # directly; the UNet runs once, without a VJP (the indicator is handed its
        # noise estimate too, as a constant).
        out = net.model_fn(params, frozen, x, tb, **cond_kw)
        eps_c = jax.lax.stop_gradient(predicted_noise(sched, out, x, tb))
        grad, logp = jax.grad(lambda x_in: picked(ddm.indicator_fn(params, eps_c, x_in, tb)),
                              has_aux=True)(x)
      else:
        def log_prob(x_in):
          out = net.model_fn(params, frozen, x_in, tb, **cond_kw)
          eps = predicted_noise(sched, out, x_in, tb)
          if path == 'x0':  # same value; the direct d eps / d x_t = I / s term removed
            _, s = alpha_sigma(sched, tb, x_in)
            eps = eps - (x_in - jax.lax.stop_gradient(x_in)) / s
          total, logp = picked(ddm.indicator_fn(params, eps, x_in, tb))
          return total, (out, logp)

        grad, (out, logp) = jax.grad(log_prob, has_aux=True)(x)
      axes = tuple(range(1, grad.ndim))
      if grad_clip:
        norm = jnp.sqrt(jnp.sum(grad ** 2, axis=axes, keepdims=True))
        grad = grad * jnp.minimum(1.0, grad_clip / jnp.maximum(norm, 1e-12))
      scale = per_sample(guide['scale'], x)
      if variant == 'norm':
        rms = jnp.sqrt(jnp.mean(grad ** 2, axis=axes, keepdims=True))
        grad = grad / (NORM_UNIT * jnp.maximum(rms, 1e-12))
      elif variant == 'early':
        scale = scale * (t >= (1 - EARLY_FRACTION) * sched.num_train_timesteps)
      elif variant == 'stop':
        scale = scale * per_sample(jnp.exp(logp) < STOP_PROB, x)
      if uncond_kw is not None:
        # CFG of the guided conditional prediction: the unguided blend, plus w times the
        # guidance term (the blend is affine, so blending outputs or (x0, eps) is the same).
        out = cfg_blend(net.model_fn(params, frozen, x, tb, **uncond_kw), out, cfg_scale)
        scale = scale * per_sample(cfg_scale, x)
      x0, eps = to_x0_eps(sched, out, x, tb)
      if clip_x0:
        x0 = jnp.clip(x0, -clip_x0, clip_x0)
      a, s = alpha_sigma(sched, tb, x)
      # eps' = eps - S s grad and the matching x0' = x0 + S s^2 / a grad: the deltas keep
      # x_t = a x0 + s eps, and S = 0 returns exactly what the unguided sampler uses.
      return x0 + scale * (s * s / a) * grad, eps - scale * s * grad

    return guided

  guidance.description = ('indicator guidance', grad_clip, path, clip_x0, variant)  # trace cache
  return guidance


def move_clip(sampler, sampler_kw):
  """``(sampler_kw without clip_x0, clip)``: the clip a sampler would apply to x0, handed
  to the guidance instead (``make_indicator_guidance(clip_x0=...)``). Samplers that do
  not clip (DPM-Solver++, PNDM) keep their behaviour: clip is then None."""
  kw = dict(sampler_kw)
  clip = kw.pop('clip_x0', None)
  fn = SAMPLERS.get(sampler)
  if fn is None or 'clip_x0' not in inspect.signature(fn).parameters:
    clip = None
  return kw, clip


def make_guided_generator(ddm, mesh, sampler='ddim', steps=50, eta=0.0, grad_clip=None,
                          path='unet', sampler_kw=None, variant='plain'):
  """``make_generator`` with indicator guidance; the x0 clipping of pixel models moves
  from the sampler into the guidance, ahead of the guidance term (see ``clip_x0``).
  ``sampler_kw`` defaults to ``ddm.sampler_kwargs(sampler)``."""
  kw, clip = move_clip(sampler, ddm.sampler_kwargs(sampler) if sampler_kw is None else sampler_kw)
  hook = make_indicator_guidance(ddm, grad_clip, path, clip_x0=clip, variant=variant)
  return make_generator(ddm, mesh, sampler, steps, eta, guidance=hook, **kw)

