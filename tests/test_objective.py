"""The DDM objective: value by hand, and where its gradients go."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.ddm import PixelDDM
from ddm_jax.diffusion.schedules import make_schedule
from ddm_jax.objective import ddm_loss
from tests.helpers import tiny_config

B, R, C, K = 6, 4, 2, 3


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.fixture(scope='module')
def toy():
  """A linear 'UNet' and a linear indicator whose outputs are easy to recompute in numpy."""
  ks = jax.random.split(jax.random.key(0), 4)
  params = {'unet': {'w': jnp.float32(0.7), 'b': jax.random.normal(ks[0], (C,))},
            'indicator': {'W': 0.1 * jax.random.normal(ks[1], (R * R * C, K))}}
  x0 = jax.random.uniform(ks[2], (B, R, R, C), minval=-1, maxval=1)
  labels = jnp.array([0, 1, 2, 0, 1, 1], jnp.int32)
  return params, x0, labels


def _toy_fns(seen):
  def model_fn(p, x_t, t):
    seen.append((np.asarray(x_t, np.float64), np.asarray(t)))
    return p['unet']['w'] * x_t + p['unet']['b'] * (t[:, None, None, None] / 1000.0)

  def indicator_fn(p, eps_pred, x_t, t):
    return eps_pred.reshape(eps_pred.shape[0], -1) @ p['indicator']['W']
  return model_fn, indicator_fn


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
@pytest.mark.parametrize('w_rec,w_ind', [(0.95, 0.05), (1.0, 0.0), (0.0, 1.0)])
def test_loss_equals_hand_computation(toy, prediction_type, w_rec, w_ind):
  params, x0, labels = toy
  sched = make_schedule('linear', 1000, prediction_type=prediction_type)
  seen = []
  model_fn, indicator_fn = _toy_fns(seen)
  rng = jax.random.key(42)
  loss, m = ddm_loss(model_fn, indicator_fn, params, x0, labels, rng, sched, w_rec, w_ind)

  (x_t, t), = seen
  assert t.shape == (B,) and t.dtype == np.int32 and np.all((0 <= t) & (t < 1000))
  # The documented draws: t ~ U{0..T-1} from the first half of split(rng), eps ~ N(0, I) from the second.
  k_t, k_n = jax.random.split(rng)
  np.testing.assert_array_equal(t, np.asarray(jax.random.randint(k_t, (B,), 0, 1000)))
  noise = np.asarray(jax.random.normal(k_n, x0.shape), np.float64)
  ac = np.asarray(sched.alphas_cumprod, np.float64)[t][:, None, None, None]
  x0n = np.asarray(x0, np.float64)
  np.testing.assert_allclose(x_t, np.sqrt(ac) * x0n + np.sqrt(1 - ac) * noise, atol=1e-5)

  out = 0.7 * x_t + np.asarray(params['unet']['b'], np.float64) * (t[:, None, None, None] / 1000.0)
  target = noise if prediction_type == 'epsilon' else np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0n
  mse = np.mean((out - target) ** 2)
  # the indicator reads the predicted noise: the output itself, or s x_t + a v for v-prediction
  eps = out if prediction_type == 'epsilon' else np.sqrt(1 - ac) * x_t + np.sqrt(ac) * out
  logits = eps.reshape(B, -1) @ np.asarray(params['indicator']['W'], np.float64)
  ce = -np.mean(_log_softmax(logits)[np.arange(B), np.asarray(labels)])
  np.testing.assert_allclose(float(m['loss_rec']), mse, rtol=1e-5)
  np.testing.assert_allclose(float(m['loss_ind']), ce, rtol=1e-5)
  np.testing.assert_allclose(float(loss), w_rec * mse + w_ind * ce, rtol=1e-5)
  np.testing.assert_allclose(float(m['loss']), float(loss), rtol=0)
  acc = np.mean(np.argmax(logits, -1) == np.asarray(labels))
  np.testing.assert_allclose(float(m['indicator_acc']), acc)
  # how hard each term pulls on the network output: |w_ind dCE/d out| / |w_rec dMSE/d out|
  g_mse = 2 * (out - target) / out.size
  p = np.exp(_log_softmax(logits))
  d_logits = (p - np.eye(K)[np.asarray(labels)]) / B
  g_ce = (d_logits @ np.asarray(params['indicator']['W'], np.float64).T).reshape(out.shape)
  if prediction_type == 'v_prediction':
    g_ce = np.sqrt(ac) * g_ce
  want = 0.0 if w_rec == 0 else (w_ind * np.linalg.norm(g_ce)) / (w_rec * np.linalg.norm(g_mse))
  np.testing.assert_allclose(float(m['ind_grad_ratio']), want, rtol=1e-4, atol=1e-7)


def test_loss_depends_on_rng_only_through_the_key(toy):
  params, x0, labels = toy
  sched = make_schedule('linear', 1000)
  model_fn, indicator_fn = _toy_fns([])
  f = lambda key: float(ddm_loss(model_fn, indicator_fn, params, x0, labels, key, sched, 0.95, 0.05)[0])  # noqa: E731
  assert f(jax.random.key(1)) == f(jax.random.key(1))
  assert f(jax.random.key(1)) != f(jax.random.key(2))


# ----------------------------------------------------------------------------- gradients (real UNet)


@pytest.fixture(scope='module')
def unet_grads():
  """Gradients of the real tiny DDM's objective at (w_rec, w_ind) pairs; one compile."""
  config = tiny_config()
  ddm = PixelDDM(config)
  params = ddm.init(jax.random.key(0))
  k_x, k_l = jax.random.split(jax.random.key(1))
  x0 = jax.random.uniform(k_x, (4,) + ddm.sample_shape, minval=-1, maxval=1)
  labels = jnp.array([0, 1, 0, 1], jnp.int32)
  model_fn = lambda p, x_t, t: ddm.model_fn(p, {}, x_t, t)  # noqa: E731

  @jax.jit
  def grads(w_rec, w_ind):
    loss_fn = lambda p: ddm_loss(model_fn, ddm.indicator_fn, p, x0, labels, jax.random.key(7),  # noqa: E731
                                 ddm.sched, w_rec, w_ind)[0]
    return jax.grad(loss_fn)(params)

  cases = {(0.95, 0.05): None, (0.95, 0.0): None, (1.0, 0.0): None, (0.0, 1.0): None}
  return {k: jax.tree_util.tree_map(np.asarray, grads(jnp.float32(k[0]), jnp.float32(k[1])))
          for k in cases}


def _leaves(tree):
  return jax.tree_util.tree_leaves(tree)


def test_indicator_gradient_reaches_the_unet(unet_grads):
  with_ind, without = unet_grads[(0.95, 0.05)], unet_grads[(0.95, 0.0)]
  diffs = [np.abs(a - b).max() for a, b in zip(_leaves(with_ind['unet']), _leaves(without['unet']))]
  assert max(diffs) > 0
  # Not only the output layer: the CE gradient flows back through the whole UNet.
  ce_only = unet_grads[(0.0, 1.0)]['unet']
  nonzero = [bool(np.any(g != 0)) for g in _leaves(ce_only)]
  assert sum(nonzero) > 0.9 * len(nonzero), f'{sum(nonzero)}/{len(nonzero)} UNet leaves get CE gradient'
  assert np.any(ce_only['conv_in']['kernel'] != 0)


def test_zero_indicator_weight_gives_exactly_zero_indicator_gradient(unet_grads):
  for g in _leaves(unet_grads[(0.95, 0.0)]['indicator']):
    assert np.all(g == 0)
  assert all(np.any(g != 0) for g in _leaves(unet_grads[(0.95, 0.05)]['indicator']))


def test_gradient_is_the_weighted_sum_of_the_two_terms(unet_grads):
  g_rec, g_ind = unet_grads[(1.0, 0.0)], unet_grads[(0.0, 1.0)]
  mixed = unet_grads[(0.95, 0.05)]
  for a, r, i in zip(_leaves(mixed), _leaves(g_rec), _leaves(g_ind)):
    np.testing.assert_allclose(a, 0.95 * r + 0.05 * i, rtol=1e-4, atol=1e-6)
