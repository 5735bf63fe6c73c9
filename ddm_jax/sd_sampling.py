"""Stable Diffusion text-to-image sampling: prompts, negative prompts, classifier-free
guidance, the scheduler from the folder's `scheduler_config.json`, LoRA merged.

`CFGModel` wraps a `LatentDDM` for `ddm_jax.sampling.make_generator`: its `sample_cond`
encodes per-sample prompt tokens (and negative-prompt tokens), its `model_fn` runs the
UNet once on the batch-doubled input `[x; x]` with contexts `[negative; prompt]` and
returns `uncond + s * (cond - uncond)`, as diffusers' `StableDiffusionPipeline` does
(guidance_rescale=0; guidance only when the scale is > 1). Samplers, the sharding and
other guidance hooks (ddm_jax.guidance's indicator guidance reads `ddm.model_fn`, so it
steers the guided prediction) see an ordinary model.

    sd = CFGModel(ddm)
    params, frozen = inference_params(ddm, params, frozen)       # LoRA merged
    gen = make_sd_generator(ddm, mesh, 'pndm', 40)
    cond = prompt_batch(ddm, ['a photo of a face'], 4, negative_prompt='', cfg_scale=7.5)
    images = generate(gen, params, frozen, 4, key, 4, cond=cond)  # [-1, 1] NHWC
"""
import sys
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.diffusion.samplers import SAMPLERS, scheduler_kwargs
from ddm_jax.errors import ConfigError
from ddm_jax.sampling import make_generator

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
    scale = jnp.asarray(cfg_scale, out.dtype).reshape((-1,) + (1,) * (out.ndim - 1))
    return uncond + scale * (cond - uncond)


def inference_params(ddm, params, frozen):
  """(params, frozen) with the UNet/text-encoder LoRA folded into the base weights (one
  matmul per adapted kernel instead of a LoRA branch at every step); the trainable tree
  keeps only the indicator (for indicator guidance)."""
  merged = ddm.merged_params(params)
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


def make_sd_generator(ddm, mesh, sampler=DEFAULT_SAMPLER, steps=DEFAULT_STEPS, eta=0.0,
                      guidance=None, **sampler_kw):
  """`make_generator` for a LatentDDM with classifier-free guidance and the sampler
  configured from the folder's scheduler config (steps_offset, set_alpha_to_one,
  timestep_spacing, clip_sample: as `<Scheduler>.from_config(scheduler_config)`);
  `sampler_kw` override those. Returns (gen, notes): notes name scheduler options we
  do not implement."""
  if sampler not in SAMPLERS:
    raise ConfigError(f'unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)}')
  kw, notes = scheduler_kwargs(sampler, ddm.scheduler_config, ddm.sched)
  model = ddm if isinstance(ddm, CFGModel) else CFGModel(ddm)
  return make_generator(model, mesh, sampler, steps, eta, guidance=guidance,
                        **{**kw, **sampler_kw}), notes


class CLISetup:
  """What `sample.py` needs for a Stable Diffusion workdir (see `setup_cli`)."""

  def __init__(self, model, params, frozen, cond, prompts, per_prompt, negative_prompt,
               cfg_scale):
    self.model, self.params, self.frozen, self.cond = model, params, frozen, cond
    self.prompts, self.per_prompt = prompts, per_prompt
    self.negative_prompt, self.cfg_scale = negative_prompt, cfg_scale
    self.sampler, self.steps = DEFAULT_SAMPLER, DEFAULT_STEPS
    self.prompt_index = np.repeat(np.arange(len(prompts)), per_prompt)

  def sampler_kwargs(self, sampler, log=lambda m: print(m, file=sys.stderr)):
    """The scheduler config's options for `sampler`; unimplemented ones are logged."""
    kw, notes = scheduler_kwargs(sampler, self.model.scheduler_config, self.model.sched)
    for note in notes:
      log(f'note: scheduler_config.json has {note}')
    return kw

  @property
  def info(self):
    return {'prompts': self.prompts, 'num_per_prompt': self.per_prompt,
            'negative_prompt': self.negative_prompt, 'cfg_scale': self.cfg_scale,
            'lora_merged': True}


def setup_cli(args, ddm, params, frozen):
  """sample.py on a Stable Diffusion workdir: LoRA merged into the base weights, the
  prompts (`--prompt`, repeatable or ';'-separated; default the training prompt) with
  `--negative_prompt` and `--cfg_scale`. `--num_samples` counts images per prompt:
  `args.num_samples` becomes the total (prompt-major order)."""
  prompts = split_prompts(args.prompt) or [ddm.prompt]
  per_prompt = args.num_samples
  cond = prompt_batch(ddm, prompts, per_prompt, args.negative_prompt, args.cfg_scale)
  params, frozen = inference_params(ddm, params, frozen)
  args.num_samples = per_prompt * len(prompts)
  return CLISetup(CFGModel(ddm), params, frozen, cond, prompts, per_prompt,
                  args.negative_prompt, args.cfg_scale)
