"""The train state: one pytree holding everything a step changes."""
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any       # trainable: {'unet': ..., 'indicator': ...} (or LoRA + indicator)
  opt_state: Any
  ema_params: Any   # exponential moving average of params, used for sampling; None without EMA
  nonfinite_count: jnp.ndarray       # steps whose loss or gradient was NaN/Inf (update skipped)
  first_nonfinite_step: jnp.ndarray  # -1 while every step has been finite

  @property
  def sample_params(self):
    """The params to sample with: the EMA where one is kept."""
    return self.params if self.ema_params is None else self.ema_params


def create_train_state(params, tx, ema_decay):
  """An EMA copy of the params is kept while `ema_decay` (train.ema_decay) > 0: with decay 0
  it would only equal the params, at the cost of a params-sized buffer and a pass over it
  every step."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    ema_params=jax.tree_util.tree_map(jnp.copy, params) if ema_decay > 0 else None,
                    nonfinite_count=jnp.zeros((), jnp.int32),
                    first_nonfinite_step=jnp.full((), -1, jnp.int32))


def ema_update(ema, params, decay, step):
  """EMA with the usual warm-up min(decay, (1 + step) / (10 + step)), so a short
  run's EMA is not dominated by the random initialisation; `step` counts the
  optimizer updates before this one."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def ema_after_update(tx, opt_state, ema, params, decay, step):
  """`ema` after the micro-step that left `opt_state`: under gradient accumulation
  (`optax.MultiSteps`, optim.ClippedSumAccumulation) the params change once every k
  micro-steps, and so does the EMA, with its warm-up counting those updates; otherwise
  once per `step`. Updating it on every micro-step would make its decay per real update
  decay^k."""
  if not hasattr(tx, 'has_updated'):
    return ema_update(ema, params, decay, step)
  return jax.lax.cond(tx.has_updated(opt_state),
                      lambda e: ema_update(e, params, decay, opt_state.gradient_step - 1),
                      lambda e: e, ema)
