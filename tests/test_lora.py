"""Functional LoRA on the latent (Stable Diffusion) DDM: a fresh adapter is exactly the
base model, merging equals the unmerged branch, training moves only LoRA/indicator
params, rematerialisation changes nothing numerically, bf16 compute keeps float32 params.
No torch: the tiny diffusers folder is written by tests/sd_folder.py."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from ddm_jax.ddm import load_latent_ddm
from ddm_jax.models import lora as lora_lib
from ddm_jax.generation.prompts import inference_params
from ddm_jax.training.optim import make_optimizer
from ddm_jax.training.state import create_train_state
from ddm_jax.training.step import hyperparameters, make_train_step
from tests.sd_helpers import perturbed, sd_config, tiny_folder


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  return tiny_folder(tmp_path_factory.mktemp('lora'))


@pytest.fixture(scope='module')
def ddm(folder):
  return load_latent_ddm(sd_config(folder, **{'indicator.hidden': '(16,)'}))


def inputs(ddm, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  ids = jnp.asarray(ddm.tokenize(['a photo of a human face', 'the cat'][:batch]))
  x = jnp.asarray(rng.standard_normal((batch,) + ddm.sample_shape), jnp.float32)
  return ids, x, jnp.asarray([17, 903][:batch], jnp.int32)


_COMPILED = {}


def forward(ddm):
  """jit(params, frozen, ids, x, t) -> UNet output with the text context from ids
  (one compiled function per model, shared by the tests)."""
  key = ('forward', id(ddm))
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(lambda p, f, ids, x, t: ddm.model_fn(p, f, x, t, input_ids=ids))
  return _COMPILED[key]


def loss_and_grads(model):
  """jit(params, frozen, ids, x, t) -> ((loss, output), grads) through the text encoder,
  the UNet and the indicator."""
  key = ('grads', id(model))
  if key not in _COMPILED:
    def loss(p, f, ids, x, t):
      out = model.model_fn(p, f, x, t, input_ids=ids)
      value = jnp.mean(out.astype(jnp.float32) ** 2) + jnp.mean(model.indicator_fn(p, out, x, t) ** 2)
      return value, out
    _COMPILED[key] = jax.jit(jax.value_and_grad(loss, has_aux=True))
  return _COMPILED[key]


def test_targets_follow_peft_names(ddm):
  params = ddm.init(jax.random.key(0))
  unet_paths = sorted(params['unet_lora'])
  assert unet_paths and all(p.rsplit('.', 1)[1] in ('to_q', 'to_v') for p in unet_paths)
  # every attn1/attn2 of every transformer block, down, mid and up
  assert {p.split('.')[-2] for p in unet_paths} == {'attn1', 'attn2'}
  assert any(p.startswith('mid_block') for p in unet_paths)
  text_paths = sorted(params['text_lora'])
  assert text_paths == [f'encoder.layers_{i}.self_attn.{n}' for i in range(2)
                        for n in ('q_proj', 'v_proj')]
  a = params['unet_lora'][unet_paths[0]]
  assert a['lora_A'].shape[1] == a['lora_B'].shape[0] == 8 and not np.any(np.asarray(a['lora_B']))
  with pytest.raises(ValueError, match='no Dense or Conv layer named'):
    lora_lib.init_lora(jax.random.key(0), ddm.frozen()['unet'], ('to_nowhere',), 4)


def test_zero_b_is_exactly_the_base_model(ddm):
  params = ddm.init(jax.random.key(1))
  frozen = ddm.frozen()
  ids, x, t = inputs(ddm)
  run = forward(ddm)
  with_lora = np.asarray(run(params, frozen, ids, x, t))
  base = np.asarray(run({'indicator': params['indicator']}, frozen, ids, x, t))  # no adapters
  np.testing.assert_array_equal(with_lora, base)


def test_merge_equals_unmerged(ddm):
  params = perturbed(ddm.init(jax.random.key(2)), 5)
  frozen = ddm.frozen()
  ids, x, t = inputs(ddm)
  run = forward(ddm)
  unmerged = np.asarray(run(params, frozen, ids, x, t))
  merged_params, merged_frozen = inference_params(ddm, params, frozen)
  assert set(merged_params) == {'indicator'}
  merged = np.asarray(run(merged_params, merged_frozen, ids, x, t))
  base = np.asarray(run(merged_params, frozen, ids, x, t))
  scale = np.abs(unmerged).max()
  assert np.abs(unmerged - base).max() / scale > 1e-2  # the adapters matter here
  assert np.abs(merged - unmerged).max() / scale < 1e-5
  # merge() is `kernel + alpha/r * A @ B` on exactly the adapted kernels
  path = sorted(params['unet_lora'])[0]
  key = tuple(path.split('.')) + ('kernel',)
  ab = params['unet_lora'][path]
  want = (flatten_dict(frozen['unet'])[key]
          + 4.0 * np.asarray(ab['lora_A']) @ np.asarray(ab['lora_B']))  # alpha / r = 32 / 8
  np.testing.assert_allclose(np.asarray(flatten_dict(merged_frozen['unet'])[key]), want,
                             rtol=1e-6, atol=1e-6)


def test_convolution_adapters(folder):
  """LoRA on convolutions (peft's Conv2d form: A the layer's own window into r channels,
  B 1x1): a fresh adapter is the base model, merging equals the unmerged branch,
  including strided and shortcut convolutions."""
  conv = load_latent_ddm(sd_config(folder, **{
      'indicator.hidden': '(16,)', 'lora.unet_targets': "('to_q', 'conv1', 'conv_shortcut', 'conv')"}))
  params = conv.init(jax.random.key(3))
  shapes = {p.rsplit('.', 1)[1]: params['unet_lora'][p]['lora_A'].shape for p in params['unet_lora']}
  assert shapes['conv1'][:2] == (3, 3) and shapes['conv1'][-1] == 8
  assert shapes['conv_shortcut'][:2] == (1, 1) and len(shapes['to_q']) == 2
  assert any('downsamplers' in p for p in params['unet_lora'])   # a stride-2 convolution
  frozen = conv.frozen()
  ids, x, t = inputs(conv)
  run = jax.jit(lambda p, f, ids, x, t: conv.model_fn(p, f, x, t, input_ids=ids))
  base = np.asarray(run({'indicator': params['indicator']}, frozen, ids, x, t))
  # B = 0 adds exact zeros; XLA may still fuse the base convolutions differently (~1e-6)
  np.testing.assert_allclose(np.asarray(run(params, frozen, ids, x, t)), base, atol=1e-5)
  params = perturbed(params, 6)
  unmerged = np.asarray(run(params, frozen, ids, x, t))
  merged = np.asarray(run(*inference_params(conv, params, frozen), ids, x, t))
  scale = np.abs(unmerged).max()
  assert np.abs(unmerged - base).max() / scale > 1e-2
  assert np.abs(merged - unmerged).max() / scale < 1e-5


def test_training_moves_only_lora_and_indicator(folder):
  config = sd_config(folder, **{'indicator.hidden': '(16,)', 'optim.grad_accum': 1,
                                'optim.lr': 1e-2, 'train.batch_size': 2})
  ddm = load_latent_ddm(config)
  tx = make_optimizer(config.optim, config.train.num_steps)
  state = create_train_state(ddm.init(jax.random.key(0)), tx, config.train.ema_decay)
  assert set(state.params) == {'unet_lora', 'text_lora', 'indicator'}
  # the optimizer holds moments for the trainable params only (AdamW: two per leaf)
  n_train = sum(a.size for a in jax.tree_util.tree_leaves(state.params))
  n_opt = sum(a.size for a in jax.tree_util.tree_leaves(state.opt_state))
  n_base = sum(a.size for a in jax.tree_util.tree_leaves(ddm.frozen()))
  assert 2 * n_train <= n_opt < 2 * n_train + 16 and n_train < n_base / 10

  frozen = ddm.frozen()
  before_frozen = jax.tree_util.tree_map(np.array, frozen)
  before = jax.tree_util.tree_map(np.array, state.params)
  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
           'label': jnp.asarray([0, 1], jnp.int32),
           'input_ids': jnp.asarray(ddm.tokenize(['a face', 'a face']))}
  step = jax.jit(make_train_step(ddm, config))
  for _ in range(2):
    state, metrics = step(state, batch, frozen, hyperparameters(config))
  assert int(state.step) == 2 and np.isfinite(float(metrics['loss']))
  # every trainable leaf moved (LoRA B from zero, A, the indicator) ...
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, before)
  assert all(jax.tree_util.tree_leaves(moved)), moved
  # ... and not one base weight did
  jax.tree_util.tree_map(np.testing.assert_array_equal, ddm.frozen(), before_frozen)


def test_remat_matches_no_remat(ddm):
  params = perturbed(ddm.init(jax.random.key(3)), 7)
  frozen = ddm.frozen()
  ids, x, t = inputs(ddm)
  remat = copy.copy(ddm)
  remat.unet = ddm.unet.clone(remat=True)
  assert remat.unet.remat and not ddm.unet.remat
  (l0, _), g0 = loss_and_grads(ddm)(params, frozen, ids, x, t)
  (l1, _), g1 = loss_and_grads(remat)(params, frozen, ids, x, t)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g0)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.abs(np.asarray(b)).max() + 1e-12))


def test_bfloat16_compute_float32_params(folder, ddm):
  half = load_latent_ddm(sd_config(folder, **{'indicator.hidden': '(16,)', 'model.dtype': 'bfloat16'}))
  frozen = half.frozen()
  assert half.unet.dtype == jnp.bfloat16 and half.text_encoder.dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree_util.tree_leaves(frozen)} == {jnp.dtype(jnp.float32)}
  params = perturbed(half.init(jax.random.key(3)), 7)
  assert {a.dtype for a in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  ids, x, t = inputs(half)
  (l16, out16), g16 = loss_and_grads(half)(params, frozen, ids, x, t)
  (l32, out32), _ = loss_and_grads(ddm)(params, frozen, ids, x, t)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(g)))
             for g in jax.tree_util.tree_leaves(g16))
  # bf16 has an 8-bit mantissa: close to the float32 run, not equal
  rel = float(np.abs(np.asarray(out16, np.float32) - np.asarray(out32)).max()
              / np.abs(np.asarray(out32)).max())
  assert 0 < rel < 0.1, rel
  assert abs(float(l16) - float(l32)) / float(l32) < 0.05
