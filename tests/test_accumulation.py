"""Gradient accumulation (optax.MultiSteps, k = 4): the params change once every k
micro-steps, and so does the EMA, its warm-up counting optimizer updates; without
accumulation the EMA follows every step as before."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.ddm.protocol import DDM
from ddm_jax.diffusion.schedules import make_schedule
from ddm_jax.training.optim import make_optimizer
from ddm_jax.training.state import create_train_state
from ddm_jax.training.step import hyperparameters, make_train_step
from tests.helpers import tiny_config

DECAY = 0.9


class LinearDDM(DDM):
  """A one-weight network and a one-matrix indicator: compiles in a moment."""
  sched = make_schedule('linear', 1000)

  def init(self, rng):
    return {'w': jnp.ones((2,)), 'indicator': jnp.zeros((8, 2))}

  def model_fn(self, params, frozen, x_t, t, **cond):
    return x_t * params['w']

  def indicator_fn(self, params, eps, x_t=None, t=None):
    return eps.reshape(eps.shape[0], -1) @ params['indicator']


def run(k, steps):
  """(params after each step, EMA after each step) with accumulation k."""
  config = tiny_config(**{'optim.grad_accum': k, 'optim.lr': 0.1, 'optim.clip': 'none',
                          'train.ema_decay': DECAY})
  ddm = LinearDDM()
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = create_train_state(ddm.init(None), tx, DECAY)
  step = jax.jit(make_train_step(ddm, config))
  hyper = hyperparameters(config)
  rng = np.random.default_rng(0)
  params, emas = [state.params], [state.ema_params]
  for _ in range(steps):
    batch = {'image': jnp.asarray(rng.standard_normal((4, 2, 2, 2)), jnp.float32),
             'label': jnp.asarray(rng.integers(0, 2, 4), jnp.int32)}
    state, _ = step(state, batch, {}, hyper)
    params.append(jax.device_get(state.params))
    emas.append(jax.device_get(state.ema_params))
  return params, emas


def _ema(ema, p, updates_before):
  d = min(DECAY, (1 + updates_before) / (10 + updates_before))
  return jax.tree_util.tree_map(lambda e, q: d * np.asarray(e) + (1 - d) * np.asarray(q), ema, p)


def _close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize('k', [1, 4])
def test_ema_updates_once_per_optimizer_update(k):
  steps = 3 * k
  params, emas = run(k, steps)
  want, updates = emas[0], 0
  for i in range(1, steps + 1):
    if i % k == 0:  # an optimizer update: the params move, the EMA follows once
      assert not _same(params[i], params[i - 1]), i
      want, updates = _ema(want, params[i], updates), updates + 1
    else:  # an accumulating micro-step: neither moves
      assert _same(params[i], params[i - 1]) and _same(emas[i], emas[i - 1]), i
    _close(emas[i], want)
  assert updates == 3
