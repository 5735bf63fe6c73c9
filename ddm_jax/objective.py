"""The DDM objective: w_rec * MSE(eps_pred, target) + w_ind * CE(indicator(eps_pred), group).

The indicator reads the network's raw output (the predicted noise for epsilon
prediction), and the cross-entropy's gradient flows through it into the UNet:
no stop-gradient, no gradient reversal, as in the reference implementation.
"""
import jax
import jax.numpy as jnp
import optax

from ddm_jax.diffusion.schedules import add_noise, training_target


def ddm_loss(model_fn, indicator_fn, params, x0, labels, rng, sched, w_rec, w_ind):
  """model_fn(params, x_t, t) -> network output; indicator_fn(params, eps_pred) -> logits.

  Returns (loss, metrics). Noise and timesteps are drawn from `rng` over the whole
  (global) batch, so the result does not depend on how the batch is sharded.
  """
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  x_t = add_noise(sched, x0, noise, t)
  eps_pred = model_fn(params, x_t, t)
  loss_rec = jnp.mean((eps_pred - training_target(sched, x0, noise, t)) ** 2)
  logits = indicator_fn(params, eps_pred)
  loss_ind = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  loss = w_rec * loss_rec + w_ind * loss_ind
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {'loss': loss, 'loss_rec': loss_rec, 'loss_ind': loss_ind, 'indicator_acc': acc}
