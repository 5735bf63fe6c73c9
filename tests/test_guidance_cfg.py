"""Indicator guidance reads what the indicator was trained on: the noise estimate of the
*conditional* prediction (never the classifier-free-guidance blend, never raw v), the
gradient goes through that prediction, and CFG blends the guided conditional prediction.
Closed forms on a linear double, then the same plumbing on the tiny Stable Diffusion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.diffusion.schedules import make_schedule
from ddm_jax.diffusion.samplers import make_denoiser
from ddm_jax.generation import guidance as G
from ddm_jax.generation.prompts import CFGModel, inference_params, prompt_batch
from tests.helpers import rel_err
from tests.sd_helpers import tiny_ddm

B = 3


class CtxDDM:
  """out = w x + context (context [B, 1, 1, 1]); logits (0, c * sum(eps)). Records every
  input the indicator sees."""

  def __init__(self, prediction_type='epsilon', w=0.6, c=0.05):
    self.w, self.c = w, c
    self.sched = make_schedule('linear', 1000, prediction_type=prediction_type)
    self.seen = []

  def model_fn(self, params, frozen, x, t, context=None):
    return self.w * x + context

  def indicator_fn(self, params, eps, x_t=None, t=None):
    jax.debug.callback(lambda v: self.seen.append(np.asarray(v, np.float64)), eps)
    z = self.c * eps.reshape(eps.shape[0], -1).sum(-1)
    return jnp.stack([jnp.zeros_like(z), z], -1)


def _closed_form(base, x, t, ctx_c, ctx_u, g, labels, scale):
  """(x0, eps, indicator input) the guided CFG step must give, in float64 numpy."""
  ac = float(base.sched.alphas_cumprod[t])
  a, s = np.sqrt(ac), np.sqrt(1 - ac)
  out_c, out_u = base.w * x + ctx_c, base.w * x + ctx_u
  v_pred = base.sched.prediction_type == 'v_prediction'
  to_eps = (lambda out: s * x + a * out) if v_pred else (lambda out: out)
  eps_c = to_eps(out_c)
  z = base.c * eps_c.reshape(len(x), -1).sum(-1)
  sig = 1 / (1 + np.exp(-z))
  d_eps = (s + a * base.w) if v_pred else base.w  # d eps_c / d x per pixel
  grad = (np.where(labels == 1, 1 - sig, -sig) * base.c * d_eps)[:, None, None, None]
  out = out_u + g[:, None, None, None] * (out_c - out_u)  # CFG blend of the unguided outputs
  eps = to_eps(out)
  x0 = (x - s * eps) / a
  k = (g * scale)[:, None, None, None]  # CFG scales the guided conditional term too
  return x0 + k * (s * s / a) * grad, eps - k * s * grad, eps_c


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_indicator_reads_the_conditional_noise_estimate_and_cfg_blends_the_guided_one(
    prediction_type):
  base = CtxDDM(prediction_type)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, 4, 4, 1))
  ctx_c = rng.standard_normal((B, 1, 1, 1)) * 3
  ctx_u = -ctx_c  # far apart, so the blend and the conditional prediction differ clearly
  g = np.array([7.5, 7.5, 3.0])
  labels, scale = np.array([1, 0, 1], np.int32), np.array([2.0, 1.0, 0.0], np.float32)
  t = 400
  hook = G.make_indicator_guidance(CFGModel(base))
  cond = {'context': jnp.asarray(ctx_c, jnp.float32), 'uncond_context': jnp.asarray(ctx_u, jnp.float32),
          'cfg_scale': jnp.asarray(g, jnp.float32),
          'guide': {'labels': jnp.asarray(labels), 'scale': jnp.asarray(scale)}}
  x0, eps = hook({}, {}, None, cond)(jnp.asarray(x, jnp.float32), t)
  want_x0, want_eps, eps_c = _closed_form(base, x, t, ctx_c, ctx_u, g, labels, scale)

  seen, = base.seen  # one indicator call per step: the conditional prediction's noise
  np.testing.assert_allclose(seen, eps_c, rtol=1e-5, atol=1e-5)
  blend = CFGModel(base).model_fn({}, {}, x, np.full(B, t), **{k: cond[k] for k in
                                                              ('context', 'uncond_context', 'cfg_scale')})
  assert np.abs(seen - np.asarray(blend)).max() > 1.0  # the CFG blend is far from what it read
  np.testing.assert_allclose(eps, want_eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x0, want_x0, rtol=1e-4, atol=1e-4)


def test_without_cfg_the_conditional_prediction_is_the_model():
  """cfg_scale <= 1: prompt_batch sends no negative prompt; the hook guides the plain
  prediction (CFG weight 1)."""
  base = CtxDDM()
  x = np.random.default_rng(1).standard_normal((B, 4, 4, 1))
  ctx = np.full((B, 1, 1, 1), 0.5)
  labels, scale = np.array([1, 1, 0], np.int32), np.full(B, 1.5, np.float32)
  cond = {'context': jnp.asarray(ctx, jnp.float32),
          'guide': {'labels': jnp.asarray(labels), 'scale': jnp.asarray(scale)}}
  x0, eps = G.make_indicator_guidance(CFGModel(base))({}, {}, None, cond)(
      jnp.asarray(x, jnp.float32), 700)
  want_x0, want_eps, _ = _closed_form(base, x, 700, ctx, ctx, np.ones(B), labels, scale)
  np.testing.assert_allclose(eps, want_eps, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(x0, want_x0, rtol=1e-4, atol=1e-4)


def test_tiny_stable_diffusion_guidance_steers_the_prompt_prediction(tmp_path_factory):
  """On the real LatentDDM + CFGModel: scale 0 gives the unguided CFG step, and the
  guided step's shift is w * S * s * grad of log p(y | conditional noise estimate)."""
  _, ddm, params = tiny_ddm(tmp_path_factory.mktemp('sdguide'), seed=2,
                            **{'indicator.hidden': '(16,)'})
  model = CFGModel(ddm)
  params, frozen = inference_params(ddm, params, ddm.frozen())
  batch = prompt_batch(ddm, ['a photo of a human face'], 2, cfg_scale=7.5)
  labels = jnp.asarray([1, 0], jnp.int32)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2,) + ddm.sample_shape), jnp.float32)
  t = 600
  hook = G.make_indicator_guidance(model)

  @jax.jit
  def run(x):
    cond = model.sample_cond(params, frozen, 2, **{k: jnp.asarray(v) for k, v in batch.items()})
    step = lambda s: hook(params, frozen, None, {**cond, 'guide': {
        'labels': labels, 'scale': jnp.full((2,), s, jnp.float32)}})(x, t)
    unguided = make_denoiser(lambda x_t, tt: model.model_fn(params, frozen, x_t, tt, **cond),
                             ddm.sched)(x, t)
    tb = jnp.full((2,), t, jnp.int32)

    def log_p(x_in):  # the indicator on the conditional prediction alone (epsilon model)
      out = ddm.model_fn(params, frozen, x_in, tb, context=cond['context'])
      logp = jax.nn.log_softmax(ddm.indicator_fn(params, out, x_in, tb), -1)
      return jnp.take_along_axis(logp, labels[:, None], -1).sum()
    return step(0.0), step(2.0), unguided, jax.grad(log_p)(x)

  (x0_0, eps_0), (_, eps_2), (x0_u, eps_u), grad = jax.device_get(run(x))
  assert rel_err(eps_0, eps_u) < 1e-5 and rel_err(x0_0, x0_u) < 1e-5
  s = float(np.sqrt(1 - ddm.sched.alphas_cumprod[t]))
  want = eps_u - 7.5 * 2.0 * s * grad
  assert np.abs(grad).max() > 0
  assert rel_err(eps_2, want) < 1e-4
