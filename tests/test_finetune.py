"""Fine-tuning from a pretrained base: train.init_from, train.trainable, loss.group_weights
and indicator.input = 'x_t' (a noise-aware classifier trained on a frozen UNet, used for
guidance)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd15_lora
from ddm_jax.config import validate
from ddm_jax.ddm import build_ddm
from ddm_jax.diffusion.schedules import add_noise, make_schedule
from ddm_jax.errors import CheckpointError, ConfigError
from ddm_jax.generation import guidance as G
from ddm_jax.generation.generator import generate
from ddm_jax.objective import ddm_loss
from ddm_jax.training.checkpoint import (Checkpointer, check_compatible, config_from_json,
                                         config_to_json)
from ddm_jax.training.loop import train
from ddm_jax.training.optim import trainable_labels
from ddm_jax.training.setup import TrainSetup, load_trained
from tests.helpers import tiny_config, train_tiny


def _np(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _flat(tree):
  return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(_np(tree))}


@pytest.fixture(scope='module')
def base(data_dir, tmp_path_factory):
  """An unconditional tiny base, 2 steps, with an EMA (tiny_config's ema_decay 0.9)."""
  return str(train_tiny(tmp_path_factory.mktemp('base'), data_dir,
                        **{'train.num_steps': 2, 'train.checkpoint_every': 2}))


def _setup(config):
  validate(config)
  return TrainSetup(build_ddm(config), config)


def test_init_from_copies_the_base_unet_and_keeps_new_leaves(base, data_dir):
  config = tiny_config(data_dir, **{'model.num_class_embeds': 2, 'train.init_from': base})
  state, info = _setup(config).init_state_from(base)
  want = _flat(load_trained(base).params['unet'])   # the base's EMA weights
  got = _flat(state.params['unet'])
  assert info['source'] == 'ema_params' and info['step'] == 2
  assert info['kept'] == ['class_embedding/embedding'] and info['unused'] == []
  assert info['copied'] == len(want) == len(got) - 1
  for path, leaf in want.items():
    assert np.array_equal(got[path], leaf), path
  fresh = _flat(_setup(tiny_config(data_dir, **{'model.num_class_embeds': 2}))
                .init_state().params)
  emb = "['class_embedding']['embedding']"
  assert np.array_equal(got[emb], fresh["['unet']" + emb])  # kept its fresh init
  ind = _flat(state.params['indicator'])
  assert all(np.array_equal(v, fresh["['indicator']" + k]) for k, v in ind.items())
  # A fresh EMA starts from the copied weights.
  assert all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(_np(state.ema_params)), jax.tree_util.tree_leaves(_np(state.params))))


def test_sampling_restores_only_its_weights_and_checks_them(base, tmp_path, monkeypatch):
  """load_trained (sample.py, evaluate.py, init_from) reads the EMA or the params alone,
  against their own checksum; a checkpoint without per-part checksums is restored whole."""
  ck = Checkpointer(base, async_save=False)
  config = config_from_json(ck.read_config(2))
  full, _ = ck.restore(2, _setup(config).target, with_data=False)
  ck.close()
  calls = []
  real_restore = Checkpointer.restore
  monkeypatch.setattr(Checkpointer, 'restore', lambda *a, **k: calls.append(1) or real_restore(*a, **k))
  for use_ema, want in ((True, full.ema_params), (False, full.params)):
    got = load_trained(base, use_ema=use_ema).params
    assert _flat(got).keys() == _flat(want).keys()
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(_np(got)),
                                                   jax.tree_util.tree_leaves(_np(want))))
  assert calls == []                     # the optimizer state was never read
  assert not np.array_equal(*[jax.tree_util.tree_leaves(_np(t))[0]
                              for t in (full.ema_params, full.params)])

  def copy_with_sums(name, edit):
    work = tmp_path / name
    shutil.copytree(base, work)
    path = work / 'checkpoints' / '2' / 'checksums' / 'metadata'
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return str(work)

  tampered = copy_with_sums('tampered', lambda s: {**s, 'parts': {**s['parts'], 'ema_params': '0' * 64}})
  with pytest.raises(CheckpointError, match=r'checkpoints/2 is corrupt: its ema_params does not'):
    load_trained(tampered)
  older = copy_with_sums('older', lambda s: {k: v for k, v in s.items() if k != 'parts'})
  got = load_trained(older).params
  assert calls == [1]                    # restored whole, and the same weights
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(_np(got)),
                                                 jax.tree_util.tree_leaves(_np(full.ema_params))))


def test_init_from_refuses_a_shape_mismatch_and_a_missing_checkpoint(base, data_dir, tmp_path):
  config = tiny_config(data_dir, **{'model.block_out_channels': (24,), 'train.init_from': base})
  with pytest.raises(ConfigError, match=r'train.init_from: leaf unet/conv_in/bias has shape '
                                        r'\(16,\) in .*base.* but \(24,\) in this model'):
    _setup(config).init_state_from(base)
  missing = str(tmp_path / 'no_base')
  config = tiny_config(data_dir, **{'train.init_from': missing})
  with pytest.raises(ConfigError, match=r'train.init_from: no checkpoints in .*no_base'):
    train(config, str(tmp_path / 'run'), progress=False)
  assert not os.path.exists(missing)
  latent = sd15_lora.get_config()
  latent.model.pretrained, latent.train.init_from = '/sd', base
  with pytest.raises(ConfigError, match='train.init_from: copies a pixel UNet'):
    validate(latent)


def test_config_checks_of_the_new_keys(data_dir):
  bad = [({'train.trainable': 'unet'}, 'train.trainable'),
         ({'train.trainable': 'indicator', 'loss.w_ind': 0.0}, 'train.trainable'),
         ({'loss.group_weights': (1.0,)}, 'loss.group_weights'),
         ({'loss.group_weights': (1.0, 0.0)}, 'loss.group_weights'),
         ({'loss.group_weights': (1.0, float('nan'))}, 'loss.group_weights'),
         ({'indicator.input': 'x0'}, 'indicator.input')]
  for overrides, key in bad:
    with pytest.raises(ConfigError, match=rf'config\.{key}:'):
      validate(tiny_config(data_dir, **overrides))
  validate(tiny_config(data_dir, **{'loss.group_weights': (0.625, 2.5)}))
  # Old configs without the keys still validate.
  c = tiny_config(data_dir)
  for section, key in (('train', 'init_from'), ('train', 'trainable'),
                       ('loss', 'group_weights'), ('indicator', 'input')):
    del c[section][key]
  validate(c)


def test_group_weights_weigh_each_samples_mse():
  sched = make_schedule('linear', 1000)
  params = {'w': jnp.float32(0.7), 'indicator': jnp.zeros((8, 2))}
  model_fn = lambda p, x_t, t: p['w'] * x_t  # noqa: E731
  indicator_fn = lambda p, eps, x_t, t: eps.reshape(eps.shape[0], -1) @ p['indicator']  # noqa: E731
  x0 = jax.random.normal(jax.random.key(1), (4, 2, 2, 2))
  labels = jnp.array([0, 1, 1, 0])
  rng = jax.random.key(3)
  loss = lambda gw: ddm_loss(model_fn, indicator_fn, params, x0, labels, rng, sched,  # noqa: E731
                             1.0, 0.0, gw)[1]['loss_rec']
  # By hand: the same draws as ddm_loss.
  k_t, k_n = jax.random.split(rng)
  t = jax.random.randint(k_t, (4,), 0, 1000)
  noise = jax.random.normal(k_n, x0.shape, jnp.float32)
  x_t = add_noise(sched, x0, noise, t)
  mse = np.mean(np.asarray((0.7 * x_t - noise) ** 2, np.float64).reshape(4, -1), axis=1)
  w = np.array([1.0, 4.0])[np.asarray(labels)]
  assert float(loss((1.0, 4.0))) == pytest.approx(np.mean(w * mse), rel=1e-5)
  assert float(loss(())) == pytest.approx(np.mean(mse), rel=1e-5)
  assert float(loss(())) == pytest.approx(float(loss((1.0, 1.0))), rel=1e-6)
  assert float(loss(None)) == float(loss(()))


def test_trainable_labels():
  params = {'unet': {'a': 1, 'b': {'c': 2}}, 'indicator': {'k': 3}}
  assert trainable_labels(params, 'indicator') == {'unet': {'a': 'freeze', 'b': {'c': 'freeze'}},
                                                   'indicator': {'k': 'train'}}
  assert set(jax.tree_util.tree_leaves(trainable_labels(params, 'all'))) == {'train'}


def test_x_t_indicator_logits_depend_on_x_t_and_t(data_dir):
  ddm = build_ddm(tiny_config(data_dir, **{'indicator.input': 'x_t'}))
  assert ddm.indicator_input == 'x_t'
  params = ddm.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
  eps = jax.random.normal(jax.random.key(2), (2, 8, 8, 1))
  t = jnp.array([10, 500])
  f = lambda e, xx, tt: np.asarray(ddm.indicator_fn(params, e, xx, tt))  # noqa: E731
  ref = f(eps, x, t)
  assert np.array_equal(f(2 * eps, x, t), ref)          # eps is not read
  assert not np.allclose(f(eps, 2 * x, t), ref)
  assert not np.allclose(f(eps, x, t + 300), ref)


def test_posthoc_x_t_classifier_on_a_frozen_unet_trains_and_guides(base, data_dir, tmp_path):
  """init_from + trainable='indicator' + w_rec 0, w_ind 1 + indicator.input 'x_t': the
  separately trained noise-aware classifier. The UNet (and its EMA) stay bit-identical
  to the base's; the indicator learns; guided sampling runs with it."""
  work = str(tmp_path / 'clf')
  config = tiny_config(data_dir, **{'train.init_from': base, 'train.trainable': 'indicator',
                                    'loss.w_rec': 0.0, 'loss.w_ind': 1.0,
                                    'indicator.input': 'x_t', 'optim.lr': 1e-2,
                                    'train.num_steps': 4, 'train.checkpoint_every': 4})
  state = train(config, work, progress=False)
  base_unet = _flat(load_trained(base).params['unet'])
  for tree in (state.params['unet'], state.ema_params['unet']):
    got = _flat(tree)
    assert got.keys() == base_unet.keys()
    for path, leaf in base_unet.items():
      assert got[path].tobytes() == leaf.tobytes(), path
  fresh = _flat(_setup(config).init_state().params['indicator'])
  trained = _flat(state.params['indicator'])
  assert any(not np.array_equal(trained[k], fresh[k]) for k in fresh)
  with open(os.path.join(work, 'init_from.json'), encoding='utf-8') as f:
    info = json.load(f)
  assert info['copied'] == len(base_unet) and info['kept'] == []

  loaded = load_trained(work)
  assert loaded.ddm.indicator_input == 'x_t'
  gen = G.make_guided_generator(loaded.ddm, loaded.mesh, 'ddim', steps=3)
  guide = G.make_guide(np.array([0, 1, 0, 1], np.int32), 2.0)
  imgs = generate(gen, loaded.params, loaded.frozen, 4, jax.random.key(0), 4, guide=guide,
                  progress=False)
  assert np.asarray(imgs).shape[0] == 4 and np.all(np.isfinite(np.asarray(imgs)))
  with pytest.raises(ConfigError, match="path 'x0'"):
    G.make_indicator_guidance(loaded.ddm, path='x0')


def test_checkpoints_saved_before_indicator_input_existed_still_resume(data_dir):
  config = tiny_config(data_dir)
  saved = config_to_json(config)
  del saved['indicator']['input']
  check_compatible(saved, config, 'w')                      # the default, 'eps': same model
  with pytest.raises(ConfigError, match='indicator: input differ'):
    check_compatible(saved, tiny_config(data_dir, **{'indicator.input': 'x_t'}), 'w')


def _lora_config(data_dir, **overrides):
  import ml_collections
  c = tiny_config(data_dir, **overrides)
  c.lora = ml_collections.ConfigDict({'unet_targets': ('to_q', 'to_v', 'time_emb_proj'),
                                      'unet_rank': 2, 'unet_alpha': 4.0})
  c.train.trainable = 'lora'
  return c


def test_lora_fine_tune_of_a_pixel_unet(base, data_dir, tmp_path):
  """lora.unet_targets + train.trainable='lora' from a base: the copied UNet (and its EMA)
  stay bit-identical, only the adapters and the indicator learn; the model starts as the
  base; a later fine-tune from it copies the UNet with the adapters merged in."""
  config = _lora_config(data_dir, **{'train.init_from': base, 'optim.lr': 1e-2,
                                     'train.num_steps': 4, 'train.checkpoint_every': 4})
  validate(config)
  setup = _setup(config)
  fresh, _ = setup.init_state_from(base)
  adapters = fresh.params['unet_lora']
  # the tiny UNet has no attention Dense layers: its four resnets' time_emb_proj are adapted
  assert sorted(adapters) == sorted(f'{b}.time_emb_proj' for b in (
      'down_blocks_0.resnets_0', 'mid_block.resnets_0', 'up_blocks_0.resnets_0',
      'up_blocks_0.resnets_1'))
  assert all(not np.any(np.asarray(ab['lora_B'])) for ab in adapters.values())  # B = 0: the base
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  t = jnp.array([10, 700])
  base_t = load_trained(base)
  np.testing.assert_array_equal(setup.ddm.model_fn(fresh.params, {}, x, t),
                                base_t.ddm.model_fn(base_t.params, {}, x, t))
  work = str(tmp_path / 'lora')
  state = train(config, work, progress=False)
  base_unet = _flat(base_t.params['unet'])
  for tree in (state.params['unet'], state.ema_params['unet']):
    got = _flat(tree)
    for path, leaf in base_unet.items():
      assert got[path].tobytes() == leaf.tobytes(), path
  assert any(np.any(np.asarray(ab['lora_B'])) for ab in state.params['unet_lora'].values())
  # what a later init_from copies: the UNet with the adapters merged
  from ddm_jax.training.setup import load_base_unet
  merged, _ = load_base_unet(work)
  tuned = load_trained(work)
  plain = build_ddm(tiny_config(data_dir))
  np.testing.assert_allclose(
      plain.model_fn({'unet': merged}, {}, x, t),
      tuned.ddm.model_fn(tuned.params, {}, x, t), rtol=1e-4, atol=1e-5)
  bad = _lora_config(data_dir)
  del bad.lora['unet_targets']
  with pytest.raises(ConfigError, match=r'config\.train\.trainable:'):
    validate(bad)
  params = {'unet': {'a': 1}, 'unet_lora': {'b': 2}, 'indicator': {'k': 3}}
  assert trainable_labels(params, 'lora') == {'unet': {'a': 'freeze'}, 'unet_lora': {'b': 'train'},
                                              'indicator': {'k': 'train'}}
