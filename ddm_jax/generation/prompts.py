"""Stable Diffusion text-to-image sampling: prompts, negative prompts, classifier-free
guidance, LoRA merged (the scheduler options come from `LatentDDM.sampler_kwargs`).

`CFGModel` wraps a `LatentDDM` for `generation.generator.make_generator`: its `sample_cond`
encodes per-sample prompt tokens (and negative-prompt tokens), its `model_fn` runs the
UNet once on the batch-doubled input `[x; x]` with contexts `[negative; prompt]` and
returns `uncond + s * (cond - uncond)`, as diffusers' `StableDiffusionPipeline` does
(guidance_rescale=0; guidance only when the scale is > 1). Samplers, the sharding and
other guidance hooks see an ordinary model; indicator guidance (generation.guidance) takes
the conditional prediction apart with `cfg_parts`, since its indicator was trained on that.

    params, frozen = inference_params(ddm, params, frozen)       # LoRA merged
    gen = make_generator(CFGModel(ddm), mesh, 'pndm', 40, **ddm.sampler_kwargs('pndm'))
    cond = prompt_batch(ddm, ['a photo of a face'], 4, negative_prompt='', cfg_scale=7.5)
    images = generate(gen, params, frozen, 4, key, 4, cond=cond)  # [-1, 1] NHWC
"""
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.errors import ConfigError

DEFAULT_SAMPLER = 'pndm'   # StableDiffusionPipeline's scheduler for SD 1.x
DEFAULT_STEPS = 40         # the reference's num_inference_steps
DEFAULT_CFG_SCALE = 7.5    # diffusers' guidance_scale default


class CFGModel:
  """A LatentDDM seen through classifier-free guidance (every other attribute is the
  wrapped model's)."""

  def __init__(self, ddm):
    self.ddm = ddm

  def __getattr__(self, name):  # only for names CFGModel itself lacks
    if name == 'ddm':
      raise AttributeError(name)
    return getattr(self.ddm, name)

  def sample_cond(self, params, frozen, batch_size, input_ids=None, negative_ids=None,
                  cfg_scale=None):
    """Per-sample token ids [B, 77] -> text contexts; without ids, the config's prompt."""
    if input_ids is None:
      return self.ddm.sample_cond(params, frozen, batch_size)
    cond = {'context': self.ddm.encode_text(params, frozen, input_ids)}
    if negative_ids is not None:
      if cfg_scale is None:
        raise ConfigError('negative_ids need a cfg_scale per sample')
      cond['uncond_context'] = self.ddm.encode_text(params, frozen, negative_ids)
      cond['cfg_scale'] = cfg_scale
    return cond

  def model_fn(self, params, frozen, x_t, t, context=None, uncond_context=None, cfg_scale=None,
               **kwargs):
    if uncond_context is None:
      return self.ddm.model_fn(params, frozen, x_t, t, context=context, **kwargs)
    both = lambda a, b: jnp.concatenate([a, b], axis=0)
    out = self.ddm.model_fn(params, frozen, both(x_t, x_t), both(t, t),
                            context=both(uncond_context, context), **kwargs)
    uncond, cond = jnp.split(out, 2, axis=0)
    return cfg_blend(uncond, cond, cfg_scale)


def cfg_blend(uncond, cond, cfg_scale):
  """Classifier-free guidance: `uncond + s * (cond - uncond)` with one scale per sample."""
  scale = per_sample(jnp.asarray(cfg_scale, cond.dtype), cond)
  return uncond + scale * (cond - uncond)


def per_sample(values, like):
  """[B] -> [B, 1, ...] broadcastable against `like` ([B, ...])."""
  return values.reshape((-1,) + (1,) * (like.ndim - 1))


def cfg_parts(model, cond):
  """`(network, conditional kwargs, unconditional kwargs or None, CFG scale [B] or None)`
  of `model.model_fn(..., **cond)`: for guidance that must read the prompt's own
  prediction (the one the indicator was trained on) before the CFG blend. A model
  without classifier-free guidance is its own network with `cond` unchanged."""
  if not isinstance(model, CFGModel):
    return model, cond, None, None
  cond = dict(cond)
  uncond, scale = cond.pop('uncond_context', None), cond.pop('cfg_scale', None)
  if uncond is None:
    return model.ddm, cond, None, None
  return model.ddm, cond, {**cond, 'context': uncond}, scale


def inference_params(ddm, params, frozen):
  """(params, frozen) with the UNet/text-encoder LoRA folded into the base weights (one
  matmul per adapted kernel instead of a LoRA branch at every step); the trainable tree
  keeps only the indicator (for indicator guidance). Merged from `frozen` itself: every
  leaf but the adapted kernels is `frozen`'s own array (no second copy of the base)."""
  merged = ddm.merged_params(params, frozen)
  frozen = {**frozen, **jax.device_put(merged, _sharding_of(frozen))}
  return {k: v for k, v in params.items() if k not in ('unet_lora', 'text_lora')}, frozen


def _sharding_of(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return getattr(leaves[0], 'sharding', None) if leaves else None


def split_prompts(values: Union[str, Sequence[str], None]):
  """CLI prompts: repeated flags and/or ';'-separated lists -> a list of non-empty prompts."""
  if values is None:
    return []
  if isinstance(values, str):
    values = [values]
  out = [p.strip() for v in values for p in v.split(';')]
  return [p for p in out if p]


def prompt_batch(ddm, prompts: Sequence[str], num_per_prompt: int, negative_prompt=None,
                 cfg_scale: float = DEFAULT_CFG_SCALE):
  """Per-sample conditioning for `generate(..., cond=...)`, prompt-major: sample
  `i` gets prompt `i // num_per_prompt`. `negative_prompt` is one string (or None: the
  empty prompt, as diffusers) or one per prompt. Guidance runs only for cfg_scale > 1."""
  prompts = list(prompts)
  if not prompts:
    raise ConfigError('at least one prompt is needed')
  if num_per_prompt < 1:
    raise ConfigError(f'num_per_prompt must be positive, got {num_per_prompt}')
  cfg_scale = float(cfg_scale)
  if not np.isfinite(cfg_scale) or cfg_scale < 0:
    raise ConfigError(f'cfg_scale must be a finite number >= 0, got {cfg_scale}')
  repeat = lambda a: np.repeat(np.asarray(a), num_per_prompt, axis=0)
  cond = {'input_ids': repeat(ddm.tokenize(prompts))}
  if cfg_scale > 1:
    if negative_prompt is None or isinstance(negative_prompt, str):
      negative = [negative_prompt or ''] * len(prompts)
    else:
      negative = list(negative_prompt)
      if len(negative) != len(prompts):
        raise ConfigError(f'{len(negative)} negative prompts for {len(prompts)} prompts')
    cond['negative_ids'] = repeat(ddm.tokenize(negative))
    cond['cfg_scale'] = np.full(len(prompts) * num_per_prompt, cfg_scale, np.float32)
  return cond
