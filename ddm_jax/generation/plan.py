"""The sampling plan: what `sample.py` and the evaluation generate, decided in one place.

`plan_samples` resolves the sampler settings (the run's config as defaults, checked),
assigns every sample its inputs (a balanced target group for group-conditioned UNets
and for indicator guidance; prompts with classifier-free guidance for Stable Diffusion)
and `plan_generator` builds the matching compiled generator:

    plan = plan_samples(ddm, config, 64, guidance='indicator', guidance_scale=2)
    gen = plan_generator(ddm, mesh, plan)
    params, frozen = sampling_params(ddm, params, frozen)   # SD: LoRA merged
    images = run_plan(gen, plan, params, frozen)
"""
import dataclasses
from typing import Optional

import jax
import numpy as np

from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.errors import ConfigError
from ddm_jax.generation.generator import generate, make_generator
from ddm_jax.generation.guidance import (check_scale, make_guide, make_guided_generator,
                                         parse_target, balanced_groups)
from ddm_jax.generation.prompts import (DEFAULT_CFG_SCALE, CFGModel, inference_params,
                                        prompt_batch)

GUIDANCES = ('none', 'indicator')


@dataclasses.dataclass
class SamplingPlan:
  num_samples: int                        # in all (SD: per prompt x prompts)
  seed: int
  batch_size: int                         # per compiled call (rounded up to the device count)
  sampler: str
  steps: int
  eta: float
  target: np.ndarray                      # the group distribution asked for
  guidance: str = 'none'
  guidance_scale: float = 0.0
  class_labels: Optional[np.ndarray] = None   # group-conditioned UNets: the group asked for
  guide: Optional[dict] = None            # indicator guidance: make_guide(groups, scale)
  cond: Optional[dict] = None             # SD: per-sample prompt tokens, CFG (prompt_batch)
  prompt_info: Optional[dict] = None      # SD: prompts, num_per_prompt, negative, cfg_scale
  prompt_index: Optional[np.ndarray] = None

  @property
  def guide_labels(self):
    return None if self.guide is None else self.guide['labels']

  def per_sample(self):
    """The per-sample inputs worth keeping beside the images ([num_samples] arrays)."""
    out = {'class_labels': self.class_labels, 'guide_labels': self.guide_labels,
           'prompt_index': self.prompt_index}
    return {k: np.asarray(v) for k, v in out.items() if v is not None}

  def describe(self):
    """What sampling.json and the evaluation report record."""
    out = {'sampler': self.sampler, 'steps': self.steps, 'eta': self.eta, 'seed': self.seed,
           'num_samples': self.num_samples, 'guidance': self.guidance}
    if self.guide is not None:
      out.update(guidance_scale=self.guidance_scale, target=self.target.tolist())
    return {**out, **(self.prompt_info or {})}


def resolve_sampler(ddm, config, sampler=None, steps=None, eta=None, arg_prefix=''):
  """(sampler, steps, eta) with the run's `config.sample` as defaults, checked; errors name
  the argument as the caller spells it (`arg_prefix='--'` for the command lines)."""
  sampler = sampler or config.sample.sampler
  steps = config.sample.steps if steps is None else int(steps)
  eta = config.sample.eta if eta is None else float(eta)
  if sampler not in SAMPLERS:
    raise ConfigError(f'{arg_prefix}sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}')
  num_train = ddm.sched.num_train_timesteps
  if not 0 < steps <= num_train:
    raise ConfigError(f'{arg_prefix}steps must be in [1, {num_train}], got {steps}')
  return sampler, steps, float(eta)


def plan_samples(ddm, config, num_samples, *, seed=0, batch_size=256, sampler=None, steps=None,
                 eta=None, target=None, class_label=None, guidance='none', guidance_scale=0.0,
                 prompts=None, negative_prompt=None, cfg_scale=DEFAULT_CFG_SCALE, arg_prefix=''):
  """`num_samples` images (per prompt, for Stable Diffusion: `prompts` default to the
  training prompt). Each sample gets a group so that every prefix of the run holds the
  `target` mix (default uniform) as closely as integers allow (`guidance.balanced_groups`):
  the same assignment conditions a group-conditioned UNet (unless `class_label` fixes one
  group) and steers indicator guidance."""
  if num_samples <= 0:
    raise ConfigError(f'{arg_prefix}num_samples must be positive, got {num_samples}')
  if guidance not in GUIDANCES:
    raise ConfigError(f'guidance must be one of {GUIDANCES}, got {guidance!r}')
  k = int(config.data.num_groups)
  sampler, steps, eta = resolve_sampler(ddm, config, sampler, steps, eta, arg_prefix)
  plan_kw = {}
  if ddm.latent:
    prompts = list(prompts or [ddm.prompt])
    plan_kw['cond'] = prompt_batch(ddm, prompts, num_samples, negative_prompt, cfg_scale)
    plan_kw['prompt_info'] = {'prompts': prompts, 'num_per_prompt': num_samples,
                              'negative_prompt': negative_prompt, 'cfg_scale': cfg_scale,
                              'lora_merged': True}
    plan_kw['prompt_index'] = np.repeat(np.arange(len(prompts)), num_samples)
    num_samples *= len(prompts)
  elif prompts or negative_prompt is not None:
    raise ConfigError('prompts and negative prompts need a Stable Diffusion workdir')
  target = parse_target(target, k)
  guided = guidance == 'indicator'
  groups = None
  if guided or ddm.num_class_embeds:
    groups = balanced_groups(num_samples, target)
  if guided:
    if float(config.loss.w_ind) == 0.0:
      raise ConfigError('this model was trained with loss.w_ind = 0: its indicator never '
                        'learned, so indicator guidance would steer with a random classifier')
    plan_kw['guide'] = make_guide(groups, check_scale(guidance_scale))
  if ddm.num_class_embeds:
    if class_label is None:
      plan_kw['class_labels'] = groups
    elif not 0 <= class_label < k:
      raise ConfigError(f'{arg_prefix}class_label must be in [0, {k}), got {class_label}')
    else:
      plan_kw['class_labels'] = np.full(num_samples, class_label, np.int32)
  elif class_label is not None:
    raise ConfigError('class_label needs a group-conditioned UNet (model.num_class_embeds > 0)')
  if batch_size < 1:
    raise ConfigError(f'{arg_prefix}batch_size must be positive, got {batch_size}')
  return SamplingPlan(num_samples, int(seed), int(batch_size), sampler, steps, eta, target, guidance,
                      float(guidance_scale), **plan_kw)


def plan_generator(ddm, mesh, plan, grad_clip=None, path='unet', variant='plain'):
  """The compiled generator for `plan` (guided or not; SD through classifier-free
  guidance). It depends only on the architecture and the sampler settings, so one serves
  every model of the same shape."""
  model = CFGModel(ddm) if ddm.latent else ddm
  kw = ddm.sampler_kwargs(plan.sampler)
  if plan.guide is not None:
    return make_guided_generator(model, mesh, plan.sampler, plan.steps, plan.eta, grad_clip,
                                 path, sampler_kw=kw, variant=variant)
  return make_generator(model, mesh, plan.sampler, plan.steps, plan.eta, **kw)


def sampling_params(ddm, params, frozen):
  """(params, frozen) to sample with: Stable Diffusion's LoRA folded into the base weights."""
  return inference_params(ddm, params, frozen) if ddm.latent else (params, frozen)


def run_plan(gen, plan, params, frozen, progress=True):
  """All of `plan`'s images, NHWC in [-1, 1]."""
  return generate(gen, params, frozen, plan.num_samples, jax.random.key(plan.seed),
                  plan.batch_size, class_labels=plan.class_labels, progress=progress,
                  guide=plan.guide, cond=plan.cond)
