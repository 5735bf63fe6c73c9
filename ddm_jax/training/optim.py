"""Optax optimizer from `config.optim`: clipping, AdamW, lr schedule, accumulation.

optim.clip:
- 'reference': the official DDM loop's order. Each micro-step adds grad / k to the running
  sum and clips that *sum* by value (`(loss / k).backward()` then `clip_grad_value_` on
  `.grad`); every k-th micro-step AdamW takes the sum and the sum is zeroed. Without
  accumulation (k = 1) it is 'value'.
- 'value': clip the (averaged) gradient by value once per update, before AdamW.
- 'norm': clip by global norm once per update; 'none'.
Once the clip bites, 'reference' and 'value' differ under accumulation (the sum of clipped
partial sums is not the clipped mean).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


def lr_schedule(optim_cfg, num_updates, lr=None):
  """`lr`: the peak learning rate, default optim.lr (the train step passes its argument)."""
  lr, warm = optim_cfg.lr if lr is None else lr, optim_cfg.warmup_steps
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if optim_cfg.schedule == 'warmup':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.constant_schedule(lr)], [max(warm, 1)])
  if optim_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(num_updates, warm + 1))
  raise ValueError(f'unknown lr schedule {optim_cfg.schedule!r}')


# train.trainable -> the subtrees of params the optimizer updates (None: all of them)
TRAINED = {'all': None, 'indicator': ('indicator',), 'lora': ('unet_lora', 'indicator')}


def trained_subtrees(trainable='all'):
  if trainable not in TRAINED:
    raise ValueError(f'unknown train.trainable {trainable!r}')
  return TRAINED[trainable]


def trainable_labels(params, trainable='all'):
  """'train' or 'freeze' for every leaf of `params` under config train.trainable: with
  'indicator', only params['indicator'] is trained; with 'lora', the UNet's LoRA adapters
  and the indicator (the UNet itself stays as it was)."""
  keys = trained_subtrees(trainable)
  if keys is None:
    return jax.tree_util.tree_map(lambda _: 'train', params)
  return {k: jax.tree_util.tree_map(lambda _, k=k: 'train' if k in keys else 'freeze', v)
          for k, v in params.items()}


class ClippedSumState(NamedTuple):
  mini_step: jnp.ndarray       # micro-steps accumulated since the last update
  gradient_step: jnp.ndarray   # updates applied so far
  acc_grads: Any               # the running, clipped sum
  inner_state: Any


class ClippedSumAccumulation:
  """Gradient accumulation as the reference does it: acc = clip(acc + g / k, +-clip_value)
  after every micro-step; `inner` (AdamW) is applied to acc every k-th micro-step, the
  others return zero updates. Has optax.MultiSteps' `has_updated` and `gradient_step`, so
  the EMA follows real updates under either accumulation."""

  def __init__(self, inner, every_k, clip_value):
    self.inner, self.k, self.clip_value = inner, int(every_k), float(clip_value)

  def init(self, params):
    return ClippedSumState(jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32),
                           jax.tree_util.tree_map(jnp.zeros_like, params), self.inner.init(params))

  def update(self, grads, state, params=None):
    c, k = self.clip_value, self.k
    acc = jax.tree_util.tree_map(lambda a, g: jnp.clip(a + g / k, -c, c), state.acc_grads, grads)

    def apply(_):
      updates, inner = self.inner.update(acc, state.inner_state, params)
      return updates, ClippedSumState(jnp.zeros((), jnp.int32), state.gradient_step + 1,
                                      jax.tree_util.tree_map(jnp.zeros_like, acc), inner)

    def hold(_):
      return (jax.tree_util.tree_map(jnp.zeros_like, acc),
              state._replace(mini_step=state.mini_step + 1, acc_grads=acc))
    return jax.lax.cond(state.mini_step == k - 1, apply, hold, None)

  def has_updated(self, state):
    return (state.mini_step == 0) & (state.gradient_step > 0)


def make_optimizer(optim_cfg, num_steps, trainable='all', lr=None):
  """`num_steps` counts micro-batches; with grad_accum = k the schedule sees
  num_steps // k updates, and optax.MultiSteps (with optim.clip 'reference',
  ClippedSumAccumulation) applies one every k steps.
  `trainable` (train.trainable): 'indicator' updates params['indicator'] only, 'lora'
  params['unet_lora'] and params['indicator']; the rest gets zero updates and keeps no
  optimizer state (the train step also keeps those leaves and their EMA exactly as they
  were). `lr` overrides optim.lr (a traced value in the train step: the optimizer state's
  structure does not depend on it)."""
  k = optim_cfg.grad_accum
  per_micro_step = optim_cfg.clip == 'reference' and k > 1   # the clip lives in the accumulation
  clip = {'reference': lambda: [] if per_micro_step else [optax.clip(optim_cfg.clip_value)],
          'value': lambda: [optax.clip(optim_cfg.clip_value)],   # clip_grad_value_, once
          'norm': lambda: [optax.clip_by_global_norm(optim_cfg.clip_value)],
          'none': lambda: []}[optim_cfg.clip]()
  tx = optax.chain(*clip, optax.adamw(lr_schedule(optim_cfg, max(num_steps // k, 1), lr),
                                      b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                      weight_decay=optim_cfg.weight_decay))
  if trainable != 'all':
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))
  if per_micro_step:
    return ClippedSumAccumulation(tx, k, optim_cfg.clip_value)
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx
