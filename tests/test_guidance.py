"""Indicator guidance: stratified assignment, the guided update in closed form, every
sampler in one compiled scan, and a tiny trained DDM pulled toward a target mix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax.ddm import DDM
from ddm_jax.diffusion.schedules import make_schedule
from ddm_jax.errors import ConfigError
from ddm_jax.generation import guidance as G
from ddm_jax.generation.generator import generate, make_generator
from ddm_jax.parallel import make_mesh


# ----------------------------------------------------------------------------- assignment

def test_parse_target():
  np.testing.assert_allclose(G.parse_target('0.5,0.5', 2), [0.5, 0.5])
  np.testing.assert_allclose(G.parse_target('1,3', 2), [0.25, 0.75])  # ratios are normalised
  np.testing.assert_allclose(G.parse_target(None, 4), [0.25] * 4)
  for bad in ('0.5', 'a,b', '-1,2', '0,0'):
    with pytest.raises(ConfigError):
      G.parse_target(bad, 2)


def test_stratified_counts_and_groups():
  np.testing.assert_array_equal(G.stratified_counts(10, [0.5, 0.5]), [5, 5])
  np.testing.assert_array_equal(G.stratified_counts(7, [0.5, 0.5]), [4, 3])  # tie -> lower id
  np.testing.assert_array_equal(G.stratified_counts(10, [0.34, 0.33, 0.33]), [4, 3, 3])
  np.testing.assert_array_equal(G.stratified_counts(9, [0.8, 0.2]), [7, 2])  # 7.2, 1.8
  y = G.stratified_groups(250, [0.5, 0.5], 64, seed=3)
  assert y.shape == (250,) and y.dtype == np.int32
  for start in range(0, 250, 64):  # every batch matches the target exactly
    chunk = y[start:start + 64]
    counts = np.bincount(chunk, minlength=2)
    assert abs(counts[0] - counts[1]) <= 1, counts
  assert not np.array_equal(y[:64], np.sort(y[:64]))  # shuffled within the batch
  np.testing.assert_array_equal(y, G.stratified_groups(250, [0.5, 0.5], 64, seed=3))


def test_make_guide_checks():
  g = G.make_guide([0, 1, 1], 2.0)
  np.testing.assert_array_equal(g['scale'], [2.0, 2.0, 2.0])
  assert g['labels'].dtype == np.int32
  np.testing.assert_array_equal(G.make_guide([0, 1], -1.0)['scale'], [-1, -1])  # push away
  with pytest.raises(ConfigError):
    G.make_guide([0, 1], float('nan'))
  with pytest.raises(ConfigError):
    G.make_indicator_guidance(LinearDDM(), path='pixels')


# ----------------------------------------------------------------------------- closed form

class LinearDDM(DDM):
  """eps_pred = w * x_t; indicator logits = (0, c * sum(eps_pred)).

  For group 1, log p = log sigmoid(z) with z = c w sum(x), so
  grad_x log p = (1 - sigmoid(z)) c w (every pixel); for group 0, -sigmoid(z) c w.
  """

  def __init__(self, w=0.7, c=0.3):
    self.w, self.c = w, c
    self.sched = make_schedule('linear', 1000)
    self.sample_shape = (4, 4, 1)

  def init(self, rng):
    return {}

  def model_fn(self, params, frozen, x, t, **cond):
    return self.w * x

  def sample_cond(self, params, frozen, batch_size, **extra):
    return {}

  def decode(self, frozen, x):
    return x

  def indicator_fn(self, params, eps, x_t=None, t=None):
    z = self.c * eps.reshape(eps.shape[0], -1).sum(-1)
    return jnp.stack([jnp.zeros_like(z), z], -1)


@pytest.mark.parametrize('path', ['unet', 'x0'])
def test_guided_update_matches_closed_form(path):
  ddm = LinearDDM()
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 1))
  t = 300
  labels = np.array([1, 0, 1, 0], np.int32)
  scale = np.array([2.0, 2.0, 0.0, 5.0], np.float32)
  hook = G.make_indicator_guidance(ddm, path=path)
  guided = hook({}, {}, None, {'guide': {'labels': jnp.asarray(labels),
                                         'scale': jnp.asarray(scale)}})
  x0, eps = guided(x, t)

  ac = float(ddm.sched.alphas_cumprod[t])
  a, s = np.sqrt(ac), np.sqrt(1 - ac)
  xn = np.asarray(x, np.float64)
  z = ddm.c * ddm.w * xn.reshape(4, -1).sum(-1)
  sig = 1 / (1 + np.exp(-z))
  # d(indicator input)/dx per pixel: w through the UNet; for path 'x0' the direct
  # x_t / s term of eps = (x_t - a x0) / s is removed: w - 1/s.
  d_in = ddm.w if path == 'unet' else ddm.w - 1 / s
  dlogp = np.where(labels == 1, 1 - sig, -sig) * ddm.c * d_in  # per-pixel gradient
  eps_ref = ddm.w * xn - (scale * s * dlogp)[:, None, None, None]
  np.testing.assert_allclose(eps, eps_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x0, (xn - s * eps_ref) / a, rtol=1e-5, atol=1e-5)
  # Scale 0: exactly the unguided prediction.
  np.testing.assert_array_equal(np.asarray(eps)[2], np.asarray(ddm.w * x)[2])


def test_guidance_variants_change_only_what_they_say():
  """norm: every guided sample's eps moves by RMS (S / NORM_UNIT) s; early: t < T/2 is
  unguided, t >= T/2 is plain guidance; stop: a sample the guide already puts in its group
  with p >= STOP_PROB is left alone, the others get plain guidance."""
  ddm = LinearDDM(w=0.7, c=2.0)
  x = jax.random.normal(jax.random.key(3), (6, 4, 4, 1))
  guide = {'labels': jnp.asarray([1, 0, 1, 0, 1, 0], jnp.int32),
           'scale': jnp.asarray([3.0] * 6, jnp.float32)}
  run = lambda variant, t: [np.asarray(v) for v in G.make_indicator_guidance(
      ddm, variant=variant)({}, {}, None, {'guide': guide})(x, t)]
  unguided_eps = np.asarray(ddm.w * x)
  for t in (300, 800):
    plain_eps = run('plain', t)[1]
    s = np.sqrt(1 - float(ddm.sched.alphas_cumprod[t]))
    delta = unguided_eps - run('norm', t)[1]
    rms = np.sqrt((delta.reshape(6, -1) ** 2).mean(-1))
    np.testing.assert_allclose(rms, 3.0 / G.NORM_UNIT * s, rtol=1e-4)
    early = run('early', t)[1]
    np.testing.assert_array_equal(early, plain_eps if t >= 500 else unguided_eps)
    z = ddm.c * ddm.w * np.asarray(x).reshape(6, -1).sum(-1)
    p_target = np.where(np.asarray(guide['labels']) == 1, 1, 0) * (1 / (1 + np.exp(-z))) + \
        np.where(np.asarray(guide['labels']) == 0, 1, 0) * (1 / (1 + np.exp(z)))
    done = p_target >= G.STOP_PROB
    assert done.any() and not done.all()
    stop = run('stop', t)[1]
    np.testing.assert_allclose(stop[done], unguided_eps[done], rtol=1e-6)
    np.testing.assert_allclose(stop[~done], plain_eps[~done], rtol=1e-6)
  with pytest.raises(ConfigError, match='variant'):
    G.make_indicator_guidance(ddm, variant='bold')


class ConvDDM(LinearDDM):
  """LinearDDM whose 'UNet' is one 3x3 convolution over 8x8 images (the digits' size)."""

  def __init__(self):
    super().__init__()
    self.sample_shape = (8, 8, 1)

  def model_fn(self, params, frozen, x, t, **cond):
    from jax import lax
    from ddm_jax.models.cpu_conv import conv_general_dilated
    w = jnp.full((3, 3, 1, 1), 0.1, jnp.float32)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
    return conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn)


def test_guidance_gradient_runs_8x8_convolutions_as_im2col():
  """Inside a sampler's scan XLA:CPU gives an input-gradient convolution a kernel layout its
  fast convolution refuses (4x slower guided sampling, benchmarks/guided.py), so the guidance
  traces 8x8 convolutions as im2col; elsewhere (a train step) 8x8 stays a convolution."""
  ddm = ConvDDM()
  guide = {'labels': jnp.array([1, 0], jnp.int32), 'scale': jnp.array([2.0, 2.0])}
  x = jnp.ones((2, 8, 8, 1))
  guided = G.make_indicator_guidance(ddm)({}, {}, None, {'guide': guide})
  plain_grad = jax.grad(lambda x: ddm.indicator_fn({}, ddm.model_fn({}, {}, x, 0)).sum())
  assert 'conv_general_dilated' not in str(jax.make_jaxpr(lambda x: guided(x, 300))(x))
  assert 'conv_general_dilated' in str(jax.make_jaxpr(plain_grad)(x))


def test_clip_comes_before_the_guidance_term():
  """With clip_x0 the unguided x0 is clipped first; the guidance deltas are added after,
  and S = 0 returns exactly (clip(x0), eps), what the unguided sampler uses."""
  ddm = LinearDDM(w=0.2)
  x = 3.0 * jax.random.normal(jax.random.key(1), (2, 4, 4, 1))
  t = 900
  guide = {'labels': jnp.array([1, 1], jnp.int32), 'scale': jnp.array([0.0, 2.0])}
  plain = G.make_indicator_guidance(ddm)({}, {}, None, {'guide': guide})(x, t)
  clipped = G.make_indicator_guidance(ddm, clip_x0=1.0)({}, {}, None, {'guide': guide})(x, t)
  np.testing.assert_allclose(clipped[0][0], np.clip(plain[0][0], -1, 1), rtol=1e-6)
  np.testing.assert_allclose(clipped[1], plain[1], rtol=1e-6)  # eps untouched by the clip
  ac = float(ddm.sched.alphas_cumprod[t])
  unguided_x0 = np.clip((np.asarray(x[1]) - np.sqrt(1 - ac) * ddm.w * np.asarray(x[1])) /
                        np.sqrt(ac), -1, 1)
  delta = np.asarray(plain[0][1]) - (np.asarray(x[1]) * (1 - np.sqrt(1 - ac) * ddm.w) /
                                      np.sqrt(ac))
  np.testing.assert_allclose(clipped[0][1], unguided_x0 + delta, rtol=1e-4, atol=1e-4)


def test_guidance_needs_guide():
  hook = G.make_indicator_guidance(LinearDDM())
  with pytest.raises(ConfigError):
    hook({}, {}, None, {})


class GaussianDDM(LinearDDM):
  """Data ~ N(0, I): the exact eps prediction is sqrt(1 - abar_t) * x_t; the indicator
  calls a sample group 1 when its predicted noise (hence x) has positive mean."""

  def model_fn(self, params, frozen, x, t, **cond):
    s = jnp.sqrt(1.0 - self.sched.alphas_cumprod[t]).reshape(-1, 1, 1, 1)
    return s * x

  def indicator_fn(self, params, eps, x_t=None, t=None):
    z = 4.0 * eps.reshape(eps.shape[0], -1).mean(-1)
    return jnp.stack([-z, z], -1)


@pytest.mark.parametrize('sampler,steps', [('ddim', 20), ('ddpm', 20), ('dpm++2m', 15)])
def test_every_sampler_follows_the_assigned_group(sampler, steps):
  ddm = GaussianDDM()
  mesh = make_mesh()
  n = 128
  labels = G.stratified_groups(n, [0.5, 0.5], n, seed=0)
  unguided = generate(make_generator(ddm, mesh, sampler, steps, clip_x0=1.0), {}, {}, n,
                      jax.random.key(1), n, progress=False)
  gen = G.make_guided_generator(ddm, mesh, sampler, steps)  # x0 clipped before the term
  guided = generate(gen, {}, {}, n, jax.random.key(1), n, progress=False,
                    guide=G.make_guide(labels, 3.0))
  side = lambda imgs: imgs.reshape(n, -1).mean(-1) > 0
  base_hit = np.mean(side(unguided) == (labels == 1))
  hit = np.mean(side(guided) == (labels == 1))
  assert 0.3 < base_hit < 0.7, base_hit  # unguided: the sign ignores the assignment
  assert hit > 0.9, hit
  # Scale 0 through the guided program reproduces unguided sampling on the same seed.
  same = generate(gen, {}, {}, n, jax.random.key(1), n, progress=False,
                  guide=G.make_guide(labels, 0.0))
  np.testing.assert_allclose(same, unguided, atol=1e-5)


# ----------------------------------------------------------------------------- a tiny DDM

@pytest.fixture(scope='module')
def tiny_trained(tmp_path_factory):
  """A tiny pixel DDM trained briefly on digits at 4:1 (group 0 : group 1)."""
  from tests.helpers import train_tiny
  root = tmp_path_factory.mktemp('guidance')
  workdir = train_tiny(str(root / 'run'), str(root / 'data'), full_size=True, **{
      'data.proportions': (0.8, 0.2), 'model.block_out_channels': (16, 32),
      'model.norm_num_groups': 8, 'indicator.hidden': (64,), 'train.num_steps': 200,
      'train.batch_size': 32, 'train.checkpoint_every': 200, 'train.sample_every': 0,
      'train.log_every': 100, 'optim.warmup_steps': 20, 'loss.w_rec': 0.9, 'loss.w_ind': 0.1})
  return workdir, root


def test_sample_cli_guidance_moves_tiny_model_toward_target(tiny_trained):
  """sample.py --guidance=indicator on a tiny DDM: with target (0, 1) the evaluator sees
  far more group-1 images than unguided sampling from the same seed."""
  import json
  from ddm_jax.cli.sample import main as sample_main
  from ddm_jax.training.setup import load_trained
  from ddm_jax.evaluation import classifier, context as R
  workdir, root = tiny_trained
  common = ['--workdir', workdir, '--num_samples', '200', '--steps', '10', '--seed', '0']
  assert sample_main(common + ['--output', str(root / 'plain')]) == 0
  assert sample_main(common + ['--output', str(root / 'guided'), '--guidance=indicator',
                               '--target=0,1', '--guidance_scale=4']) == 0
  guided = np.load(root / 'guided' / 'samples.npz')
  np.testing.assert_array_equal(guided['guide_labels'], np.ones(200))
  info = json.load(open(root / 'guided' / 'sampling.json'))
  assert info['guidance'] == 'indicator' and info['target'] == [0.0, 1.0]
  assert info['guidance_scale'] == 4.0

  ctx = R.EvalContext(load_trained(workdir).config,
                      R.EvalSettings(cache_dir=str(root / 'cache'), evaluator_steps=200))
  share = lambda d: classifier.predict(
      ctx.evaluator, np.load(root / d / 'samples.npz')['images'] / 127.5 - 1.0).argmax(1).mean()
  p_plain, p_guided = share('plain'), share('guided')
  print(f'group-1 share: unguided {p_plain:.3f}, guided toward group 1 {p_guided:.3f}')
  assert p_guided > p_plain + 0.2, (p_plain, p_guided)

  # Usage errors: one line, exit 2.
  assert sample_main(common + ['--target=0.5,0.5']) == 2  # --target without --guidance
  assert sample_main(common + ['--guidance=indicator', '--target=1,2,3']) == 2


_SHARDED = r'''
import jax, numpy as np, sys
sys.path.insert(0, {root!r})
from tests.test_guidance import GaussianDDM
from ddm_jax.generation import guidance as G
from ddm_jax.generation.generator import generate
from ddm_jax.parallel import make_mesh
assert jax.device_count() == 4
ddm = GaussianDDM()
gen = G.make_guided_generator(ddm, make_mesh(), 'ddim', 8)
labels = G.stratified_groups(32, [0.5, 0.5], 32, seed=0)
out = generate(gen, {{}}, {{}}, 32, jax.random.key(1), 32, progress=False,
               guide=G.make_guide(labels, 3.0))
np.save({path!r}, out)
'''


def test_guided_sampling_is_batch_sharded(tmp_path):
  """Four virtual devices: the guide pytree is sharded with the batch, results unchanged."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = str(tmp_path / 'sharded.npy')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', _SHARDED.format(root=root, path=path)], env=env,
                 check=True, cwd=root, timeout=600)
  ddm = GaussianDDM()
  labels = G.stratified_groups(32, [0.5, 0.5], 32, seed=0)
  single = generate(G.make_guided_generator(ddm, make_mesh(), 'ddim', 8), {}, {}, 32,
                    jax.random.key(1), 32, progress=False, guide=G.make_guide(labels, 3.0))
  np.testing.assert_allclose(np.load(path), single, atol=1e-5)


def test_move_clip_only_for_clipping_samplers():
  assert G.move_clip('ddim', {'clip_x0': 1.0}) == ({}, 1.0)
  assert G.move_clip('ddpm', {'clip_x0': 1.0, 'x': 2}) == ({'x': 2}, 1.0)
  assert G.move_clip('dpm++2m', {'clip_x0': 1.0}) == ({}, None)  # never clipped: still not
  assert G.move_clip('ddim', {}) == ({}, None)


@pytest.mark.parametrize('target', [[0.5, 0.5], [0.8, 0.2], [0.2, 0.3, 0.5], [1 / 3] * 3])
def test_balanced_groups_every_prefix_holds_the_target(target):
  """The plan's assignment: any run length (and so any batch size or host split) is
  balanced to within one sample per group, and image j's group depends on j only."""
  y = G.balanced_groups(257, target)
  assert y.dtype == np.int32 and y.shape == (257,)
  counts = np.zeros(len(target))
  for j, g in enumerate(y):
    counts[g] += 1
    assert np.all(np.abs(counts - (j + 1) * np.asarray(target)) < 1 + 1e-9), (j, counts)
  np.testing.assert_array_equal(G.balanced_groups(40, target), y[:40])
