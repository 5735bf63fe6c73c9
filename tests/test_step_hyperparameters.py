"""The train step takes the seed, the loss weights and the learning rate as arguments
(training.step.hyperparameters), and the host-only keys stay out of every program: runs
that differ only in config.RUNTIME_KEYS and config.HOST_KEYS share the compiled train
step, its init and the sampler (a sweep compiles them once), and the values still act."""
import copy

import jax
import numpy as np

from ddm_jax import data as data_lib
from ddm_jax import parallel, trace_cache
from ddm_jax.config import HOST_KEYS, RUNTIME_KEYS, program_config
from ddm_jax.ddm import build_ddm
from ddm_jax.generation.generator import make_generator
from ddm_jax.training.setup import TrainSetup, init_key
from tests.helpers import tiny_config

# A value other than tiny_config's for every key of RUNTIME_KEYS and HOST_KEYS (a
# reweighted base, so that only the weights' values change, not whether there are any).
CHANGED = {
    'train.seed': 7, 'loss.w_rec': 0.9, 'loss.w_ind': 0.1, 'loss.group_weights': (0.5, 2.0),
    'optim.lr': 3e-3, 'data.class_filter': (0, 1, 2), 'data.data_dir': '/elsewhere',
    'data.group_ratio': (1.0, 3.0), 'data.groups': ((7,), (8,)), 'data.image_key': 'img',
    'data.label_key': 'lab', 'data.name': 'another', 'data.proportions': (0.9, 0.1),
    'data.pseudo_labels': 'kmeans', 'data.pseudo_pca_dims': 4, 'data.shuffle_seed': 5,
    'data.split': 'balanced', 'train.checkpoint_every': 3, 'train.init_from': '/base',
    'train.keep_checkpoints': 1, 'train.log_every': 1, 'train.num_sample_images': 4,
    'train.sample_every': 2, 'train.skip_nonfinite': True,
    'train.num_steps': 99,    # read by the cosine schedule only: out under 'constant'
}


def _configs(data_dir):
  base = tiny_config(data_dir, **{'loss.group_weights': (1.0, 1.0)})
  other = copy.deepcopy(base)
  for dotted, value in CHANGED.items():
    section, key = dotted.split('.')
    setattr(other[section], key, value)
  return base, other


def test_the_lists_name_every_changed_key_and_the_program_config_ignores_them(data_dir):
  assert set(CHANGED) == set(RUNTIME_KEYS + HOST_KEYS) | {'train.num_steps'}
  base, other = _configs(data_dir)
  assert program_config(base) == program_config(other)
  assert program_config(base) != program_config(tiny_config(data_dir))   # weighted or not
  cosine = lambda c: program_config(tiny_config(data_dir, **{'optim.schedule': 'cosine', **c}))  # noqa: E731
  assert cosine({'train.num_steps': 8}) != cosine({'train.num_steps': 99})
  assert cosine({'optim.lr': 1e-3}) != cosine({'optim.lr': 3e-3})   # a constant there


def _step_text(setup):
  """The train step of `setup` lowered for a batch of 8 tiny images, as text."""
  batch = {'image': jax.ShapeDtypeStruct((8, 8, 8, 1), np.float32, sharding=setup.data),
           'label': jax.ShapeDtypeStruct((8,), np.int32, sharding=setup.data)}
  return setup.step_fn().lower(setup.target, batch, setup.frozen(), setup.hyper).as_text()


def test_runs_differing_in_those_keys_lower_to_the_same_programs(data_dir):
  """The lowered init and step are the same text for both configs (a key that reached a
  program as a constant would show in it), and the hyperparameters differ."""
  texts, hypers = [], []
  for config in _configs(data_dir):
    setup = TrainSetup(build_ddm(config), config)
    texts.append((_step_text(setup),
                  jax.jit(setup._init).lower(init_key(config)).as_text()))  # pylint: disable=protected-access
    hypers.append(jax.device_get(setup.hyper))
  assert texts[0] == texts[1]
  for name in ('key', 'w_rec', 'w_ind', 'lr', 'group_weights'):
    assert not np.array_equal(hypers[0][name], hypers[1][name]), name


def test_under_the_cosine_schedule_the_lr_is_a_constant_of_the_step(data_dir):
  texts = []
  for lr in (1e-3, 3e-3):
    config = tiny_config(data_dir, **{'optim.schedule': 'cosine', 'optim.lr': lr})
    texts.append(_step_text(TrainSetup(build_ddm(config), config)))
  assert texts[0] != texts[1]


def test_one_cached_sampler_and_step_serve_both_runs_and_the_values_act(data_dir, tmp_path):
  base, other = _configs(data_dir)
  trace_cache.configure(str(tmp_path / 'traces'))
  try:
    images, metrics, entries = [], [], []
    local = params = None
    for config in (base, other):
      setup = TrainSetup(build_ddm(config), config)
      if local is None:
        x, y = data_lib.load_arrays(config.data, data_dir, 'train', limit=8)
        local = {'image': x, 'label': y}
      batch = parallel.global_batch(setup.mesh, local)
      state, frozen = setup.init_state(), setup.frozen()
      step = setup.compile(batch, frozen)
      state, m = step(state, batch, frozen, setup.hyper)
      metrics.append((jax.device_get(m), jax.device_get(setup.hyper)))
      params = state.params if params is None else params   # the first run's, for both
      gen = make_generator(setup.ddm, setup.mesh, 'ddim', 2)
      images.append(np.asarray(gen(params, frozen, jax.random.key(3), 4)))
      entries.append(sorted(p.name for p in (tmp_path / 'traces').glob('*.trace')))
  finally:
    trace_cache.configure(None)
  assert entries[0] == entries[1] and len(entries[0]) == 3   # init, step, sampler: once
  assert np.array_equal(images[0], images[1])                  # same weights, same sampler
  for m, h in metrics:   # each run's loss is its own weights' sum of its own terms
    np.testing.assert_allclose(m['loss'], h['w_rec'] * m['loss_rec'] + h['w_ind'] * m['loss_ind'],
                               rtol=1e-6)
  assert metrics[0][0]['loss_rec'] != metrics[1][0]['loss_rec']   # another seed's noise
