"""Schedules, forward noising, targets and samplers against closed forms, oracles and diffusers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.diffusion import samplers as S
from ddm_jax.diffusion import schedules as sch

T = 1000


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_closed_form():
  s = sch.make_schedule('linear', T, 1e-4, 0.02)
  betas = np.asarray(s.betas, np.float64)
  i = np.arange(T)
  np.testing.assert_allclose(betas, 1e-4 + i * (0.02 - 1e-4) / (T - 1), rtol=1e-6)
  assert betas[0] == pytest.approx(1e-4, rel=1e-6) and betas[-1] == pytest.approx(0.02, rel=1e-6)
  expected = np.cumprod(1.0 - (1e-4 + i * (0.02 - 1e-4) / (T - 1)))
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), expected, rtol=2e-5)
  # The DDPM paper's famous value: alpha_bar_T ~ 4.04e-5.
  assert float(s.alphas_cumprod[-1]) == pytest.approx(4.0358e-5, rel=1e-3)
  assert s.num_train_timesteps == T and s.betas.dtype == jnp.float32


def test_scaled_linear_schedule_is_stable_diffusions():
  s = sch.make_schedule('scaled_linear', T, 0.00085, 0.012)
  i = np.arange(T)
  betas = (math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)) ** 2
  np.testing.assert_allclose(np.asarray(s.betas), betas, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), np.cumprod(1 - betas), rtol=2e-5)
  assert float(s.betas[0]) == pytest.approx(0.00085, rel=1e-6)
  assert float(s.betas[-1]) == pytest.approx(0.012, rel=1e-6)
  # Not the plain linear schedule: sqrt(beta), not beta, is linear.
  lin = sch.make_schedule('linear', T, 0.00085, 0.012)
  assert abs(float(s.betas[T // 2]) - float(lin.betas[T // 2])) > 1e-4
  assert float(s.alphas_cumprod[-1]) == pytest.approx(0.0046, abs=2e-4)  # SD 1.5's final alpha_bar


def test_squaredcos_schedule_matches_cosine_alpha_bar():
  s = sch.make_schedule('squaredcos_cap_v2', T)
  abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
  expected = np.array([abar((i + 1) / T) / abar(0.0) for i in range(T)])  # telescoping product
  betas = np.asarray(s.betas, np.float64)
  uncapped = np.array([1 - abar((i + 1) / T) / abar(i / T) < 0.999 for i in range(T)])
  assert uncapped[:-1].all() and not uncapped[-1]  # only the last beta hits the cap
  assert betas[-1] == pytest.approx(0.999, rel=1e-6)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod)[:-1], expected[:-1], rtol=1e-4, atol=1e-7)
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


def test_schedule_rejects_unknown_names():
  with pytest.raises(ValueError, match='schedule'):
    sch.make_schedule('quadratic')
  with pytest.raises(ValueError, match='prediction_type'):
    sch.make_schedule('linear', prediction_type='sample')


@pytest.mark.parametrize('name,start,end', [('linear', 1e-4, 0.02), ('scaled_linear', 0.00085, 0.012),
                                            ('squaredcos_cap_v2', 1e-4, 0.02)])
def test_schedules_match_diffusers(name, start, end):
  pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end,
                                beta_schedule=name)
  s = sch.make_schedule(name, T, start, end)
  np.testing.assert_allclose(np.asarray(s.betas), ref.betas.numpy(), rtol=1e-6, atol=1e-9)
  np.testing.assert_allclose(np.asarray(s.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=1e-5,
                             atol=1e-9)


@pytest.fixture(scope='module')
def batch():
  k1, k2 = jax.random.split(jax.random.key(3))
  x0 = np.asarray(jax.random.uniform(k1, (4, 3, 3, 2), minval=-1, maxval=1), np.float64)
  noise = np.asarray(jax.random.normal(k2, (4, 3, 3, 2)), np.float64)
  t = np.array([0, 17, 500, 999], np.int32)
  return x0, noise, t


@pytest.mark.parametrize('prediction_type', ['epsilon', 'v_prediction'])
def test_add_noise_targets_and_inverse(batch, prediction_type):
  x0, noise, t = batch
  s = sch.make_schedule('linear', T, prediction_type=prediction_type)
  ac = np.asarray(s.alphas_cumprod, np.float64)[t][:, None, None, None]
  x_t = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * noise
  np.testing.assert_allclose(np.asarray(sch.add_noise(s, x0, noise, t)), x_t, rtol=1e-5, atol=1e-6)
  target = noise if prediction_type == 'epsilon' else np.sqrt(ac) * noise - np.sqrt(1 - ac) * x0
  np.testing.assert_allclose(np.asarray(sch.training_target(s, x0, noise, t)), target,
                             rtol=1e-5, atol=1e-6)
  # A perfect network output is turned back into the true (x0, eps), even at t = T-1 where
  # x0 from eps divides by sqrt(abar) ~ 6e-3.
  x0_hat, eps_hat = sch.to_x0_eps(s, jnp.asarray(target, jnp.float32), jnp.asarray(x_t, jnp.float32), t)
  np.testing.assert_allclose(np.asarray(x0_hat), x0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(eps_hat), noise, atol=1e-5)


def test_v_and_eps_parametrisations_agree(batch):
  x0, noise, t = batch
  se = sch.make_schedule('linear', T, prediction_type='epsilon')
  sv = sch.make_schedule('linear', T, prediction_type='v_prediction')
  x_t = sch.add_noise(se, x0, noise, t)
  from_eps = sch.to_x0_eps(se, sch.training_target(se, x0, noise, t), x_t, t)
  from_v = sch.to_x0_eps(sv, sch.training_target(sv, x0, noise, t), x_t, t)
  np.testing.assert_allclose(np.asarray(from_eps[1]), np.asarray(from_v[1]), atol=1e-5)
  np.testing.assert_allclose(np.asarray(from_eps[0]), np.asarray(from_v[0]), atol=1e-4)


# ----------------------------------------------------------------------------- samplers

SHAPE = (3, 4, 4, 2)
SAMPLER_CASES = [('ddim', {'eta': 0.0}), ('ddim', {'eta': 1.0}), ('ddpm', {}), ('dpm++2m', {})]


def fake_model(x, t):
  """A fixed deterministic 'network': eps = 0.1 x_t + sin(t / 100)."""
  return 0.1 * x + jnp.sin(t.astype(jnp.float32) / 100.0)[:, None, None, None]


@pytest.fixture(scope='module')
def linear_sched():
  return sch.make_schedule('linear', T)


@pytest.mark.parametrize('name,kw,stochastic', [('ddim', {'eta': 0.0}, False),
                                                ('ddim', {'eta': 1.0}, True),
                                                ('ddpm', {}, True), ('dpm++2m', {}, False)])
def test_sampler_deterministic_for_a_key(linear_sched, name, kw, stochastic):
  """Compiled (one scan): a key fixes the output; only ancestral samplers use the step key;
  the compiled run equals the eager one that the other tests below check in detail."""
  denoise = S.make_denoiser(fake_model, linear_sched)
  run = jax.jit(lambda x, key: S.SAMPLERS[name](denoise, linear_sched, x, key, steps=6, **kw))
  x = jax.random.normal(jax.random.key(5), SHAPE)
  a = np.asarray(run(x, jax.random.key(1)))
  assert a.shape == SHAPE and a.dtype == np.float32 and np.isfinite(a).all()
  np.testing.assert_array_equal(a, np.asarray(run(x, jax.random.key(1))))
  other_key = np.asarray(run(x, jax.random.key(2)))
  assert (np.abs(a - other_key).max() > 1e-3) == stochastic
  assert np.abs(a - np.asarray(run(x + 0.5, jax.random.key(1)))).max() > 1e-3
  with jax.disable_jit():
    np.testing.assert_allclose(a, np.asarray(S.SAMPLERS[name](denoise, linear_sched, x, jax.random.key(1),
                                                              steps=6, **kw)), rtol=1e-5, atol=1e-5)
    # sample(): x_T and the step key both come from one key.
    key = jax.random.key(3)
    k_init, k_steps = jax.random.split(key)
    full = np.asarray(S.sample(name, denoise, linear_sched, SHAPE, key, steps=6, **kw))
    np.testing.assert_array_equal(full, np.asarray(S.sample(name, denoise, linear_sched, SHAPE, key,
                                                            steps=6, **kw)))
    assert np.abs(full - np.asarray(S.sample(name, denoise, linear_sched, SHAPE, jax.random.key(4),
                                             steps=6, **kw))).max() > 1e-3
  np.testing.assert_allclose(full, np.asarray(run(jax.random.normal(k_init, SHAPE), k_steps)),
                             rtol=1e-5, atol=1e-5)


def _oracle(sched, x_star):
  """The exact denoiser when the data distribution is the single point x*."""
  def denoise(x, t):
    ac = sched.alphas_cumprod[t]
    return jnp.broadcast_to(x_star, x.shape), (x - jnp.sqrt(ac) * x_star) / jnp.sqrt(1 - ac)
  return denoise


@pytest.mark.parametrize('name,kw', SAMPLER_CASES)
def test_oracle_denoiser_recovers_the_data_point(name, kw):
  sched = sch.make_schedule('scaled_linear', T, 0.00085, 0.012)
  x_star = jax.random.uniform(jax.random.key(7), SHAPE, minval=-1, maxval=1)
  with jax.disable_jit():  # eager: these small scans would each compile (slow here)
    out = S.sample(name, _oracle(sched, x_star), sched, SHAPE, jax.random.key(8), steps=10, **kw)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x_star), atol=1e-4)


def test_ddim_eta0_oracle_keeps_the_noise_direction_at_every_step():
  """With the oracle, DDIM (eta=0) visits x_t = sqrt(abar_t) x* + sqrt(1-abar_t) eps_T at
  every step t, not only at the end (each input of the denoiser is recorded)."""
  sched = sch.make_schedule('linear', T)
  x_star = jax.random.uniform(jax.random.key(1), SHAPE, minval=-1, maxval=1)
  eps_T = jax.random.normal(jax.random.key(2), SHAPE)
  ac = np.asarray(sched.alphas_cumprod, np.float64)
  x_T = np.sqrt(ac[900]) * x_star + np.sqrt(1 - ac[900]) * eps_T  # 10 leading steps start at 900
  seen = []
  oracle = _oracle(sched, x_star)

  def recording(x, t):
    jax.debug.callback(lambda x, t: seen.append((int(t), np.asarray(x))), x, t)
    return oracle(x, t)

  with jax.disable_jit():
    out = S.ddim(recording, sched, jnp.asarray(x_T, jnp.float32), jax.random.key(0), steps=10, eta=0.0)
  assert [t for t, _ in seen] == list(range(900, -1, -100))
  for t, x in seen:
    np.testing.assert_allclose(x, np.sqrt(ac[t]) * x_star + np.sqrt(1 - ac[t]) * eps_T, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out), np.asarray(x_star), atol=1e-4)


def test_timestep_spacings():
  ts, prev = S.leading_timesteps(1000, 10)
  np.testing.assert_array_equal(ts, np.arange(900, -1, -100))
  np.testing.assert_array_equal(prev, ts - 100)
  np.testing.assert_array_equal(S.linspace_timesteps(1000, 4), [999, 749, 500, 250])
  for bad in (0, 1001):
    with pytest.raises(ValueError):
      S.leading_timesteps(1000, bad)
    with pytest.raises(ValueError):
      S.linspace_timesteps(1000, bad)
  with pytest.raises(ValueError, match='unknown sampler'):
    S.sample('euler', None, None, SHAPE, jax.random.key(0))


# ----------------------------------------------------------------------------- vs diffusers


@pytest.fixture(scope='module')
def torch_diffusers():
  torch = pytest.importorskip('torch')
  diffusers = pytest.importorskip('diffusers')
  return torch, diffusers


def _torch_model(torch, x, t):
  return 0.1 * x + torch.sin(torch.tensor(float(t)) / 100.0)


def _step_noises(key, n):
  return [np.asarray(jax.random.normal(jax.random.fold_in(key, i), SHAPE)) for i in range(n)]


@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('schedule', ['linear', 'scaled_linear'])
def test_ddim_matches_diffusers(torch_diffusers, eta, schedule):
  torch, diffusers = torch_diffusers
  start, end = (1e-4, 0.02) if schedule == 'linear' else (0.00085, 0.012)
  steps = 8
  ref = diffusers.DDIMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end,
                                beta_schedule=schedule, clip_sample=False, set_alpha_to_one=True)
  ref.set_timesteps(steps)
  sched = sch.make_schedule(schedule, T, start, end)
  ts, _ = S.leading_timesteps(T, steps)
  np.testing.assert_array_equal(ref.timesteps.numpy(), ts)
  x = jax.random.normal(jax.random.key(4), SHAPE)
  key = jax.random.key(9)
  with jax.disable_jit():
    ours = np.asarray(S.ddim(S.make_denoiser(fake_model, sched), sched, x, key, steps=steps, eta=eta))
  noises = _step_noises(key, steps)
  xt = torch.from_numpy(np.array(x))
  for i, t in enumerate(ref.timesteps):  # the whole run: every step must match
    kw = {'variance_noise': torch.from_numpy(noises[i])} if eta else {}
    xt = ref.step(_torch_model(torch, xt, int(t)), t, xt, eta=eta, **kw).prev_sample
  np.testing.assert_allclose(ours, xt.numpy(), rtol=1e-4, atol=1e-5)


def test_ddpm_matches_diffusers(torch_diffusers, monkeypatch):
  torch, diffusers = torch_diffusers
  from diffusers.schedulers import scheduling_ddpm
  steps = 8
  ref = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule='linear', clip_sample=False,
                                variance_type='fixed_small')
  ref.set_timesteps(steps)
  sched = sch.make_schedule('linear', T)
  x = jax.random.normal(jax.random.key(4), SHAPE)
  key = jax.random.key(11)
  with jax.disable_jit():
    ours = np.asarray(S.ddpm(S.make_denoiser(fake_model, sched), sched, x, key, steps=steps))
  noises = iter(_step_noises(key, steps))
  monkeypatch.setattr(scheduling_ddpm, 'randn_tensor',
                      lambda *a, **k: torch.from_numpy(next(noises)))
  xt = torch.from_numpy(np.array(x))
  for t in ref.timesteps:
    xt = ref.step(_torch_model(torch, xt, int(t)), t, xt).prev_sample
  assert int(ref.timesteps[-1]) == 0
  np.testing.assert_allclose(ours, xt.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('steps', [1, 2, 5, 20])  # 1, 2: first order only
def test_dpmpp_2m_matches_diffusers(torch_diffusers, steps):
  torch, diffusers = torch_diffusers
  ref = diffusers.DPMSolverMultistepScheduler(
      num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
      algorithm_type='dpmsolver++', solver_order=2)
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(ref.timesteps.numpy(), S.linspace_timesteps(T, steps))
  sched = sch.make_schedule('scaled_linear', T, 0.00085, 0.012)
  x = jax.random.normal(jax.random.key(4), SHAPE)
  with jax.disable_jit():
    ours = np.asarray(S.dpmpp_2m(S.make_denoiser(fake_model, sched), sched, x, steps=steps))
  xt = torch.from_numpy(np.array(x))
  for t in ref.timesteps:
    xt = ref.step(_torch_model(torch, xt, int(t)), t, xt).prev_sample
  ref_np = xt.numpy()
  assert np.abs(ours - ref_np).max() <= 1e-4 * np.abs(ref_np).max()
