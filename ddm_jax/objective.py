"""The DDM objective: w_rec * MSE(out, target) + w_ind * CE(indicator(eps_pred), group).

`group_weights` (config loss.group_weights) weighs each sample's MSE by its group's
weight, e.g. inverse group frequencies: loss_rec = mean_i w[group_i] * mse_i.
An indicator with input 'x_t' (a noise-aware classifier) reads x_t and t instead of
the predicted noise; `indicator_fn` gets all three and picks.

The indicator reads the predicted noise: the network's output itself for epsilon
prediction (as the reference implementation does), its noise estimate for
v-prediction (`predicted_noise`), so the method and guidance mean the same input
whatever the parametrisation. The cross-entropy's gradient flows through it into the
UNet: no stop-gradient, no gradient reversal, as in the reference implementation.
"""
import jax
import jax.numpy as jnp
import optax

from ddm_jax.diffusion.schedules import add_noise, to_x0_eps, training_target


def predicted_noise(sched, out, x_t, t):
  """The noise estimate in the network output `out` at (x_t, t): `out` itself for
  epsilon prediction (no arithmetic, so it is bit for bit the reference's input), and
  eps = sqrt(1 - abar) x_t + sqrt(abar) v for v-prediction. Training, guidance and the
  evaluation's indicator figures all feed the indicator through this."""
  if sched.prediction_type == 'epsilon':
    return out
  return to_x0_eps(sched, out, x_t, t)[1]


def ddm_loss(model_fn, indicator_fn, params, x0, labels, rng, sched, w_rec, w_ind,
             group_weights=None):
  """model_fn(params, x_t, t) -> network output; indicator_fn(params, eps_pred, x_t, t)
  -> logits. `group_weights` (K floats, or None/() for none): the per-sample MSE is
  weighted by its group's weight, loss_rec = mean_i w[labels_i] * mse_i.

  Returns (loss, metrics). Noise and timesteps are drawn from `rng` over the whole
  (global) batch, so the result does not depend on how the batch is sharded.
  """
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (x0.shape[0],), 0, sched.num_train_timesteps)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  x_t = add_noise(sched, x0, noise, t)
  target = training_target(sched, x0, noise, t)

  def terms(out):
    """(loss_rec, loss_ind, logits) of the network output `out`."""
    sq = (out - target) ** 2
    if group_weights is not None and len(group_weights):
      mse = jnp.mean(sq.reshape(sq.shape[0], -1), axis=-1)
      loss_rec = jnp.mean(jnp.asarray(group_weights, jnp.float32)[labels] * mse)
    else:
      loss_rec = jnp.mean(sq)
    logits = indicator_fn(params, predicted_noise(sched, out, x_t, t), x_t, t)
    loss_ind = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    return loss_rec, loss_ind, logits

  out = model_fn(params, x_t, t)
  loss_rec, loss_ind, logits = terms(out)
  loss = w_rec * loss_rec + w_ind * loss_ind
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {'loss': loss, 'loss_rec': loss_rec, 'loss_ind': loss_ind, 'indicator_acc': acc,
                'ind_grad_ratio': indicator_pull(terms, out, w_rec, w_ind)}


def indicator_pull(terms, out, w_rec, w_ind):
  """|d(w_ind CE)/d out| / |d(w_rec MSE)/d out|: how hard the indicator term pulls on the
  network output (the predicted noise, where the CE gradient enters the UNet) relative to
  the denoising term; what alpha means for a given indicator. 0 without a denoising term.
  A metric only: it reads a stopped copy of `out`, so no parameter gradient changes."""
  def weighted(o):
    loss_rec, loss_ind, _ = terms(o)
    return jnp.stack([w_rec * loss_rec, w_ind * loss_ind])
  _, pull_back = jax.vjp(weighted, jax.lax.stop_gradient(out))   # one forward, two pulls
  (g_rec,), (g_ind,) = pull_back(jnp.array([1.0, 0.0])), pull_back(jnp.array([0.0, 1.0]))
  den = jnp.sqrt(jnp.sum(g_rec ** 2))
  return jnp.where(den > 0, jnp.sqrt(jnp.sum(g_ind ** 2)) / jnp.where(den > 0, den, 1.0), 0.0)
