"""Gradient accumulation (optax.MultiSteps, or the reference's clipped running sum,
k = 4): the params change once every k micro-steps, and so does the EMA, its warm-up
counting optimizer updates; without accumulation the EMA follows every step as before.
The reference's clip order against a replay of it."""
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


def run(k, steps, clip='none'):
  """(params after each step, EMA after each step) with accumulation k."""
  config = tiny_config(**{'optim.grad_accum': k, 'optim.lr': 0.1, 'optim.clip': clip,
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


@pytest.mark.parametrize('k, clip', [(1, 'none'), (4, 'none'), (4, 'reference')])
def test_ema_updates_once_per_optimizer_update(k, clip):
  steps = 3 * k
  params, emas = run(k, steps, clip)
  want, updates = emas[0], 0
  for i in range(1, steps + 1):
    if i % k == 0:  # an optimizer update: the params move, the EMA follows once
      assert not _same(params[i], params[i - 1]), i
      want, updates = _ema(want, params[i], updates), updates + 1
    else:  # an accumulating micro-step: neither moves
      assert _same(params[i], params[i - 1]) and _same(emas[i], emas[i - 1]), i
    _close(emas[i], want)
  assert updates == 3


def _optimizer(clip, k=4, clip_value=0.5):
  cfg = tiny_config(**{'optim.grad_accum': k, 'optim.lr': 0.1, 'optim.clip': clip,
                       'optim.clip_value': clip_value, 'optim.weight_decay': 0.01}).optim
  return cfg, make_optimizer(cfg, 100)


def _replay(tx, grads_seq, params):
  state = tx.init(params)
  out = []
  for g in grads_seq:
    updates, state = tx.update(g, state, params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, params, updates)
    out.append(params)
  return out


@pytest.mark.parametrize('scale', [0.1, 3.0])   # the clip idle, the clip biting
def test_reference_clip_is_clip_value_on_the_running_sum_every_micro_step(scale):
  """optim.clip 'reference' with k = 4: acc = clip(acc + g / 4) after every micro-step,
  AdamW on acc every 4th, the sum zeroed; replayed here with numpy and optax.adamw."""
  import optax  # pylint: disable=import-outside-toplevel
  cfg, tx = _optimizer('reference')
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.standard_normal((3, 5)), jnp.float32)}
  grads = [{'w': jnp.asarray(scale * rng.standard_normal((3, 5)), jnp.float32)}
           for _ in range(8)]
  got = _replay(tx, grads, params)

  adamw = optax.adamw(cfg.lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  opt_state, p, acc, bites = adamw.init(params), params, np.zeros((3, 5), np.float32), 0
  for i, g in enumerate(grads):
    acc = acc + np.asarray(g['w']) / 4
    bites += int((np.abs(acc) > cfg.clip_value).sum())
    acc = np.clip(acc, -cfg.clip_value, cfg.clip_value)
    if i % 4 == 3:
      updates, opt_state = adamw.update({'w': jnp.asarray(acc)}, opt_state, p)
      p = optax.apply_updates(p, updates)
      acc = np.zeros_like(acc)
    np.testing.assert_allclose(got[i]['w'], p['w'], rtol=1e-6, atol=1e-7)
  # clipping the averaged gradient once ('value') is the same step only while nothing bites
  once = _replay(_optimizer('value')[1], grads, params)
  same = np.allclose(once[-1]['w'], got[-1]['w'], rtol=1e-6, atol=1e-7)
  assert same == (bites == 0), bites


def test_reference_clip_without_accumulation_is_clip_by_value():
  rng = np.random.default_rng(1)
  params = {'w': jnp.asarray(rng.standard_normal((4,)), jnp.float32)}
  grads = [{'w': jnp.asarray(3 * rng.standard_normal((4,)), jnp.float32)} for _ in range(3)]
  ref = _replay(_optimizer('reference', k=1)[1], grads, params)
  val = _replay(_optimizer('value', k=1)[1], grads, params)
  for a, b in zip(ref, val):
    np.testing.assert_array_equal(a['w'], b['w'])
