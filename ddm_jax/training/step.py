"""The compiled DDM train step: state, global batch, frozen weights, hyperparameters ->
new state, metrics."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ddm_jax import trace_cache
from ddm_jax.config import RUNTIME_LR_SCHEDULES
from ddm_jax.objective import ddm_loss
from ddm_jax.training.optim import make_optimizer, trained_subtrees
from ddm_jax.training.state import ema_after_update


def hyperparameters(config):
  """The values of config.RUNTIME_KEYS the step takes as its argument `hyper` (host arrays):
  the key of train.seed, loss.w_rec, loss.w_ind, optim.lr and, where set,
  loss.group_weights. Arguments, not constants: every run of a sweep over them (seeds,
  alphas, learning rates, reweighting) runs the same compiled program (the lr only under
  config.RUNTIME_LR_SCHEDULES)."""
  hyper = {'key': np.asarray(jax.random.key_data(jax.random.key(config.train.seed))),
           'w_rec': np.float32(config.loss.w_rec), 'w_ind': np.float32(config.loss.w_ind),
           'lr': np.float32(config.optim.lr)}
  weights = tuple(config.loss.get('group_weights', ()))
  if weights:
    hyper['group_weights'] = np.asarray(weights, np.float32)
  return hyper


def make_train_step(ddm, config):
  """Returns the un-jitted step(state, batch, frozen, hyper) (`hyper`: `hyperparameters`).
  Randomness is fold_in(key(seed), step): nothing depends on how a run was split or
  sharded."""
  decay, trainable = config.train.ema_decay, config.train.get('trainable', 'all')
  trained = trained_subtrees(trainable)
  runtime_lr = config.optim.schedule in RUNTIME_LR_SCHEDULES

  def only_trainable(p):
    """With train.trainable = 'indicator' or 'lora' no gradient reaches the other subtrees
    (no weight gradient of a frozen subtree is computed; grad_norm is the trained ones')."""
    if trained is None:
      return p
    return {k: v if k in trained else jax.lax.stop_gradient(v) for k, v in p.items()}

  def keep_frozen(new, old):
    """The frozen subtrees exactly as they were (zero updates and the EMA's arithmetic
    could otherwise flip a bit of them)."""
    if trained is None or new is None:
      return new
    return {k: new[k] if k in trained else old[k] for k in new}

  def step(state, batch, frozen, hyper):
    # the optimizer of train.optim at this run's learning rate (its state's structure is
    # the one TrainSetup made with the config's)
    tx = make_optimizer(config.optim, config.train.num_steps, trainable,
                        lr=hyper['lr'] if runtime_lr else None)
    rng = jax.random.fold_in(jax.random.wrap_key_data(hyper['key']), state.step)
    k_batch, k_loss = jax.random.split(rng)
    x0, labels, cond = ddm.prepare_batch(frozen, batch, k_batch)
    model_fn = lambda p, x_t, t: ddm.model_fn(p, frozen, x_t, t, **cond)
    loss_fn = lambda p: ddm_loss(model_fn, ddm.indicator_fn, only_trainable(p), x0, labels,
                                 k_loss, ddm.sched, hyper['w_rec'], hyper['w_ind'],
                                 hyper.get('group_weights'))
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    metrics['grad_norm'] = optax.global_norm(grads)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])

    def update(state):
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = keep_frozen(optax.apply_updates(state.params, updates), state.params)
      ema = None if state.ema_params is None else keep_frozen(ema_after_update(
          tx, opt_state, state.ema_params, params, decay, state.step), state.ema_params)
      return state.replace(params=params, opt_state=opt_state, ema_params=ema)

    # A non-finite step changes nothing but the step and the counters, so no NaN
    # ever reaches the parameters (or a checkpoint); the loop decides to stop or go on.
    # lax.cond, not a jnp.where over the state: the update then writes the donated
    # buffers in place (the where made XLA copy every optimizer buffer each step).
    new = jax.lax.cond(finite, update, lambda state: state, state)
    new = new.replace(step=state.step + 1,
                      nonfinite_count=state.nonfinite_count + (~finite).astype(jnp.int32),
                      first_nonfinite_step=jnp.where(
                          (~finite) & (state.first_nonfinite_step < 0), state.step,
                          state.first_nonfinite_step))
    return new, metrics

  return step


def jit_train_step(step, state_sharding, batch_sharding, replicated, description=None):
  """The jitted step, state donated; `description` (trace_cache.describe) lets its trace be
  cached."""
  return trace_cache.jit(step, description,
                         in_shardings=(state_sharding, batch_sharding, replicated, replicated),
                         out_shardings=(state_sharding, replicated), donate_argnums=(0,))
