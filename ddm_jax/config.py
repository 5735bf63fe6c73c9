"""Config loading and validation: every impossible value is a ConfigError naming its key."""
import ast
import hashlib
import importlib.util
import math
import numbers
import os
import sys

import ml_collections

from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.diffusion.schedules import PREDICTION_TYPES, SCHEDULES
from ddm_jax.errors import ConfigError
from ddm_jax.models.unet import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS


def shipped_configs_dir():
  """The folder of the configs that ship with the package: `ddm_jax/configs` in an
  installed wheel (setup.cfg maps the checkout's top-level `configs/` there), the
  checkout's `configs/` otherwise."""
  here = os.path.dirname(os.path.abspath(__file__))
  for folder in (os.path.join(here, 'configs'), os.path.join(os.path.dirname(here), 'configs')):
    if os.path.isfile(os.path.join(folder, '__init__.py')):
      return folder
  return None


def shipped_configs():
  """The names `--config` accepts besides a path: digits, digits_base, ..."""
  folder = shipped_configs_dir()
  return sorted(n[:-3] for n in os.listdir(folder) if n.endswith('.py') and not n.startswith('_')
                ) if folder else []


def config_path(name_or_path):
  """`--config`'s value as a file: an existing path, else the shipped config so named
  (`digits` or `digits.py`)."""
  path = os.path.expanduser(os.fspath(name_or_path))
  if os.path.isfile(path):
    return path
  stem = path[:-3] if path.endswith('.py') else path
  if stem in shipped_configs():
    return os.path.join(shipped_configs_dir(), stem + '.py')
  if os.path.isdir(path):
    raise ConfigError(f'{path} is a folder; --config takes a config file (.py) or the name of a '
                      f'shipped config ({", ".join(shipped_configs())})')
  raise ConfigError(f'config file not found: {path} (or name a shipped config: '
                    f'{", ".join(shipped_configs())})')


def _package_of(folder):
  """A package for a config folder holding `__init__.py`, so its configs can import each
  other relatively (`from . import digits`) whether loaded by path or installed."""
  name = '_ddm_configs_' + hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:12]
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, '__init__.py'), submodule_search_locations=[folder])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return name


def load_config_file(path):
  """The ConfigDict of a config file's `get_config()`; `path` may name a shipped config."""
  path = config_path(path)
  if not path.endswith('.py'):
    hint = (' (a saved config.json records a run; train from the config file it came from)'
            if path.endswith('.json') else '')
    raise ConfigError(f'{path} is not a config file: --config takes a Python file defining '
                      f'get_config() (ml_collections){hint}')
  try:
    folder = os.path.dirname(os.path.abspath(path))
    package = (_package_of(folder) if os.path.isfile(os.path.join(folder, '__init__.py'))
               else None)
    stem = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(
        f'{package}.{stem}' if package else '_ddm_config', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:
    raise ConfigError(f'cannot load config {path}: {type(e).__name__}: {e}') from e
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(config).__name__}, not an '
                      'ml_collections.ConfigDict')
  return config


def apply_overrides(config, overrides):
  """`overrides`: {'train.num_steps': '10', ...} from the command line; values are
  parsed as Python literals and must match the existing key's type."""
  for dotted, raw in overrides.items():
    node, *path = config, *dotted.split('.')
    for part in path[:-1]:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f'unknown config key: {dotted}')
      node = node[part]
    key = path[-1]
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise ConfigError(f'unknown config key: {dotted}')
    old = node[key]
    try:
      value = ast.literal_eval(raw) if isinstance(raw, str) else raw
    except (ValueError, SyntaxError):
      value = raw  # a bare string such as cosine
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if isinstance(old, tuple) and isinstance(value, (list, tuple, int, float)):
      value = _tuples(value) if isinstance(value, (list, tuple)) else (value,)
    if old is not None and type(value) is not type(old):
      raise ConfigError(f'config.{dotted}: expected {type(old).__name__}, got {raw!r}')
    if isinstance(old, tuple):
      value = _match_elements(dotted, old, value, raw)
    with node.unlocked() if hasattr(node, 'unlocked') else _null():
      node[key] = value
  return config


def _tuples(value):
  """Lists (from the command line) -> tuples, recursively, as our configs use."""
  return tuple(_tuples(v) if isinstance(v, (list, tuple)) else v for v in value)


def _match_elements(dotted, old, value, raw):
  """A tuple override keeps the element type of the default, e.g. ints for block_out_channels."""
  kinds = {type(v) for v in old}
  if len(kinds) != 1 or not old:
    return value
  kind = kinds.pop()
  if kind is float:
    value = tuple(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
  if any(type(v) is not kind for v in value):
    raise ConfigError(f'config.{dotted}: expected a tuple of {kind.__name__}, got {raw!r}')
  return value


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _require(cond, key, msg):
  if not cond:
    raise ConfigError(f'config.{key}: {msg}')


# Keys every run reads, with the type each must have (int also accepted where float is asked).
_TYPES = {
    'train.num_steps': int, 'train.batch_size': int, 'train.seed': int, 'train.ema_decay': float,
    'train.log_every': int, 'train.checkpoint_every': int, 'train.keep_checkpoints': int,
    'train.sample_every': int, 'train.num_sample_images': int,
    'optim.lr': float, 'optim.schedule': str, 'optim.warmup_steps': int, 'optim.b1': float,
    'optim.b2': float, 'optim.weight_decay': float, 'optim.eps': float, 'optim.clip': str,
    'optim.clip_value': float, 'optim.grad_accum': int,
    'loss.w_rec': float, 'loss.w_ind': float,
    'data.name': str, 'data.resolution': int, 'data.channels': int, 'data.num_groups': int,
    'data.shuffle_seed': int,
    'diffusion.schedule': str, 'diffusion.beta_start': float, 'diffusion.beta_end': float,
    'diffusion.num_train_timesteps': int, 'diffusion.prediction_type': str,
    'sample.sampler': str, 'sample.steps': int, 'sample.eta': float,
}
# Checked only when present (pixel UNet, LoRA, optional switches).
_OPTIONAL_TYPES = {
    'model.sample_size': int, 'model.in_channels': int, 'model.out_channels': int,
    'model.layers_per_block': int, 'model.norm_num_groups': int, 'model.cross_attention_dim': int,
    'model.num_class_embeds': int, 'model.dtype': str, 'model.remat': bool,
    'lora.unet_rank': int, 'lora.unet_alpha': float, 'lora.text_rank': int,
    'lora.text_alpha': float, 'lora.dropout': float, 'lora.train_text_encoder': bool,
    'model.flip_sin_to_cos': bool, 'model.freq_shift': int, 'train.skip_nonfinite': bool,
    'data.skip_bad': bool, 'latent_factor': int,
    'train.init_from': str, 'train.trainable': str, 'indicator.input': str,
    'indicator.init': str,
}
TRAINABLE = ('all', 'indicator', 'lora')   # train.trainable: what the optimizer updates
INDICATOR_INPUTS = ('eps', 'x_t')    # indicator.input: predicted noise, or (x_t, t)
INDICATOR_INITS = ('torch', 'flax')  # indicator.init: nn.Linear's default (the reference), Dense's
CLIPS = ('reference', 'value', 'norm', 'none')   # optim.clip
_SECTIONS = ('train', 'optim', 'loss', 'model', 'data', 'diffusion', 'sample')
_DTYPES = ('float32', 'bfloat16', 'float16')


def _lookup(config, dotted):
  node = config
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      raise KeyError(dotted)
    node = node[part]
  return node


def _positive_int(value):
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def _check_type(key, value, kind):
  if kind is bool:
    ok = isinstance(value, bool)
  elif kind is str:
    ok = isinstance(value, str)
  elif kind is int:
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
  else:
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool)
          and math.isfinite(value))
  name = {int: 'an integer', float: 'a finite number', str: 'a string', bool: 'True or False'}
  _require(ok, key, f'must be {name[kind]}, got {value!r}')


def check_types(config):
  """Every key a run reads exists and has the right type (a config file can set anything)."""
  for section in _SECTIONS:
    if section == 'diffusion' and is_latent(config):
      continue  # the schedule comes from the diffusers folder's scheduler_config.json
    _require(isinstance(config.get(section), ml_collections.ConfigDict), section,
             'missing or not a section (start from configs/digits.py)')
  for key, kind in _TYPES.items():
    if key.startswith('diffusion.') and is_latent(config):
      continue
    try:
      value = _lookup(config, key)
    except KeyError:
      raise ConfigError(f'config.{key}: missing (start from configs/digits.py)') from None
    _check_type(key, value, kind)
  for key, kind in _OPTIONAL_TYPES.items():
    try:
      value = _lookup(config, key)
    except KeyError:
      continue
    _check_type(key, value, kind)


def is_latent(config):
  """A Stable Diffusion (latent) run: the model comes from a local diffusers folder."""
  return bool(config.model.get('pretrained'))


def _check_train(t):
  _require(t.num_steps > 0, 'train.num_steps', f'must be positive, got {t.num_steps}')
  _require(t.batch_size > 0, 'train.batch_size', f'must be positive, got {t.batch_size}')
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    _require(t[key] > 0, f'train.{key}', f'must be positive, got {t[key]}')
  _require(t.sample_every >= 0, 'train.sample_every', 'must be >= 0 (0 disables)')
  _require(0.0 <= t.ema_decay < 1.0, 'train.ema_decay', f'must be in [0, 1), got {t.ema_decay}')
  _require(t.sample_every == 0 or t.num_sample_images > 0, 'train.num_sample_images',
           f'must be positive, got {t.num_sample_images}')


def _check_loss(l, num_groups):
  _require(l.w_rec >= 0, 'loss.w_rec', f'must be >= 0, got {l.w_rec}')
  _require(l.w_ind >= 0, 'loss.w_ind', f'must be >= 0, got {l.w_ind}')
  _require(l.w_rec + l.w_ind > 0, 'loss.w_rec', 'w_rec and w_ind cannot both be 0')
  gw = l.get('group_weights', ())
  _require(isinstance(gw, tuple) and all(
      isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
      for w in gw), 'loss.group_weights', f'must be a tuple of positive numbers, got {gw!r}')
  _require(len(gw) in (0, num_groups), 'loss.group_weights',
           f'needs one weight per group (data.num_groups = {num_groups}) or none, got {len(gw)}')


def _check_optim(o):
  _require(o.lr > 0, 'optim.lr', f'must be positive, got {o.lr}')
  _require(o.schedule in ('constant', 'warmup', 'cosine'), 'optim.schedule',
           f'must be constant, warmup or cosine, got {o.schedule!r}')
  _require(o.clip in CLIPS, 'optim.clip', f'must be one of {CLIPS}, got {o.clip!r}')
  _require(o.grad_accum >= 1, 'optim.grad_accum', f'must be >= 1, got {o.grad_accum}')
  _require(o.warmup_steps >= 0, 'optim.warmup_steps', f'must be >= 0, got {o.warmup_steps}')
  for key in ('b1', 'b2'):
    _require(0.0 <= o[key] < 1.0, f'optim.{key}', f'must be in [0, 1), got {o[key]}')
  _require(o.eps >= 0, 'optim.eps', f'must be >= 0, got {o.eps}')
  _require(o.weight_decay >= 0, 'optim.weight_decay', f'must be >= 0, got {o.weight_decay}')
  _require(o.clip == 'none' or o.clip_value > 0, 'optim.clip_value',
           f'must be positive, got {o.clip_value}')


def _check_data(d):
  _require(d.channels in (1, 3), 'data.channels', f'must be 1 or 3, got {d.channels}')
  _require(d.num_groups >= 2, 'data.num_groups', f'must be >= 2, got {d.num_groups}')
  _require(d.resolution > 0, 'data.resolution', f'must be positive, got {d.resolution}')


def _check_sampling(config):
  """diffusion (a pixel run's; a latent run's comes with its model) and sample."""
  s = config.sample
  if not is_latent(config):
    df = config.diffusion
    _require(df.num_train_timesteps > 0, 'diffusion.num_train_timesteps',
             f'must be positive, got {df.num_train_timesteps}')
    if df.schedule in ('linear', 'scaled_linear'):
      _require(0.0 < df.beta_start <= df.beta_end < 1.0, 'diffusion.beta_start',
               f'need 0 < beta_start <= beta_end < 1, got {df.beta_start}, {df.beta_end}')
    _require(df.schedule in SCHEDULES, 'diffusion.schedule',
             f'must be one of {SCHEDULES}, got {df.schedule!r}')
    _require(df.prediction_type in PREDICTION_TYPES, 'diffusion.prediction_type',
             f'must be one of {PREDICTION_TYPES}')
    _require(1 <= s.steps <= df.num_train_timesteps, 'sample.steps',
             f'must be in [1, {df.num_train_timesteps}], got {s.steps}')
  else:
    _require(s.steps >= 1, 'sample.steps', f'must be positive, got {s.steps}')
  _require(s.eta >= 0, 'sample.eta', f'must be >= 0, got {s.eta}')
  _require(s.sampler in SAMPLERS, 'sample.sampler',
           f'must be one of {sorted(SAMPLERS)}, got {s.sampler!r}')


def _check_lora(lc):
  for key in ('unet_rank', 'text_rank'):
    if key in lc:
      _require(lc[key] >= 1, f'lora.{key}', f'must be >= 1, got {lc[key]}')
  if 'dropout' in lc:
    _require(0.0 <= lc.dropout < 1.0, 'lora.dropout', f'must be in [0, 1), got {lc.dropout}')


def _check_indicator(ind):
  hidden = ind.get('hidden')
  _require(isinstance(hidden, tuple) and all(_positive_int(h) for h in hidden),
           'indicator.hidden', f'must be a tuple of positive integers, got {hidden!r}')
  _require(ind.get('input', 'eps') in INDICATOR_INPUTS, 'indicator.input',
           f"must be one of {INDICATOR_INPUTS}, got {ind.get('input')!r}")
  _require(ind.get('init', 'torch') in INDICATOR_INITS, 'indicator.init',
           f"must be one of {INDICATOR_INITS}, got {ind.get('init')!r}")


def _check_what_trains(config):
  """train.trainable and train.init_from against the kind of run."""
  trainable = config.train.get('trainable', 'all')
  _require(trainable in TRAINABLE, 'train.trainable',
           f'must be one of {TRAINABLE}, got {trainable!r}')
  _require(trainable != 'indicator' or config.loss.w_ind > 0, 'train.trainable',
           "'indicator' trains only the indicator, which needs loss.w_ind > 0")
  _require(trainable != 'lora' or (not is_latent(config) and 'lora' in config
                                   and tuple(config.lora.get('unet_targets', ()))),
           'train.trainable', "'lora' trains a pixel UNet's LoRA adapters: it needs "
           'lora.unet_targets (Stable Diffusion runs always train LoRA)')
  _require(not (config.train.get('init_from', '') and is_latent(config)), 'train.init_from',
           'copies a pixel UNet from a trained workdir; latent (Stable Diffusion) runs '
           'start from model.pretrained')


def _check_latent(config):
  """The VAE's factor: only a latent run has one, and the images must divide by it."""
  _require(config.get('latent_factor', 1) >= 1, 'latent_factor',
           f'must be >= 1, got {config.get("latent_factor")}')
  if config.get('latent_factor', 1) > 1:
    _require(is_latent(config), 'model.pretrained', 'set it to a local diffusers folder')
  if is_latent(config):  # the UNet comes from the diffusers folder
    _require(config.data.resolution % config.latent_factor == 0, 'data.resolution',
             f'{config.data.resolution} is not divisible by the VAE factor '
             f'{config.latent_factor}')


def _check_pixel_unet(m, d):
  """A pixel run's UNet, built from config.model, against the data it is trained on."""
  for key in ('block_out_channels', 'down_block_types', 'up_block_types'):
    _require(isinstance(m.get(key), tuple) and len(m[key]) > 0, f'model.{key}',
             f'must be a non-empty tuple, got {m.get(key)!r}')
  _require(all(_positive_int(c) for c in m.block_out_channels), 'model.block_out_channels',
           f'must be positive integers, got {m.block_out_channels}')
  for key, known in (('down_block_types', DOWN_BLOCKS), ('up_block_types', UP_BLOCKS)):
    _require(all(b in known for b in m[key]), f'model.{key}',
             f'{m[key]!r}: each must be one of {known}')
  _require(m.get('mid_block_type', 'UNetMidBlock2D') in MID_BLOCKS, 'model.mid_block_type',
           f'must be one of {MID_BLOCKS}, got {m.get("mid_block_type")!r}')
  heads = m.get('attention_head_dim', 8)
  _require(_positive_int(heads) or (isinstance(heads, tuple) and heads
                                    and all(_positive_int(h) for h in heads)),
           'model.attention_head_dim', f'must be a positive integer, got {heads!r}')
  for key in ('cross_attention_dim', 'num_class_embeds'):
    _require(m.get(key, 0) >= 0, f'model.{key}', f'must be >= 0, got {m.get(key)}')
  _require(len(m.down_block_types) == len(m.block_out_channels) == len(m.up_block_types),
           'model.block_out_channels', 'needs one entry per down and up block type')
  for key in ('layers_per_block', 'norm_num_groups'):
    _require(m[key] >= 1, f'model.{key}', f'must be >= 1, got {m[key]}')
  factor = 2 ** (len(m.block_out_channels) - 1)
  _require(d.resolution % factor == 0, 'data.resolution',
           f'{d.resolution} is not divisible by the UNet downsampling factor {factor}')
  _require(m.in_channels == m.out_channels == d.channels, 'model.in_channels',
           f'model in/out channels ({m.in_channels}, {m.out_channels}) must equal data.channels {d.channels}')
  for c in m.block_out_channels:
    _require(c % m.norm_num_groups == 0, 'model.norm_num_groups',
             f'{m.norm_num_groups} does not divide block channels {tuple(m.block_out_channels)}')


def validate(config):
  """Checks types and values a run cannot start with, section by section. Returns the config."""
  check_types(config)
  _check_train(config.train)
  _check_loss(config.loss, config.data.num_groups)
  _check_optim(config.optim)
  _check_data(config.data)
  _check_sampling(config)
  if config.model.get('dtype') is not None:
    _require(config.model.dtype in _DTYPES, 'model.dtype',
             f'must be one of {_DTYPES}, got {config.model.dtype!r}')
  if 'lora' in config:
    _check_lora(config.lora)
  if 'indicator' in config:
    _check_indicator(config.indicator)
  _check_what_trains(config)
  _check_latent(config)
  if not is_latent(config):
    _check_pixel_unet(config.model, config.data)
  return config


# Keys no compiled program reads as a constant: the train step takes these as arguments
# (training.step.hyperparameters), and the rest only steer the host side (which data, how
# often to log or save, where to start from). A sweep over them compiles each program once;
# tests/test_step_hyperparameters.py checks that changing any of them leaves the lowered
# train step, its init and the sampler unchanged.
RUNTIME_KEYS = ('train.seed', 'loss.w_rec', 'loss.w_ind', 'loss.group_weights', 'optim.lr')
# optim.lr is an argument under these schedules; optax's cosine schedule needs a concrete
# peak (it tests `peak == 0` in Python), so there it stays a constant of the program.
RUNTIME_LR_SCHEDULES = ('constant', 'warmup')
HOST_KEYS = ('data.class_filter', 'data.data_dir', 'data.group_ratio', 'data.groups',
             'data.image_key', 'data.label_key', 'data.name', 'data.proportions',
             'data.pseudo_labels', 'data.pseudo_pca_dims', 'data.shuffle_seed', 'data.split',
             'train.checkpoint_every', 'train.init_from', 'train.keep_checkpoints',
             'train.log_every', 'train.num_sample_images', 'train.sample_every',
             'train.skip_nonfinite')


def program_config(config):
  """`config` without RUNTIME_KEYS and HOST_KEYS, as a plain dict: what the compiled
  programs depend on (the trace cache's description of them). Whether loss.group_weights
  is set stays: it switches the loss to a per-sample weighted mean; under the cosine
  schedule optim.lr and train.num_steps (its peak and its length) stay."""
  d = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  d = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
  weighted = bool(len(d.get('loss', {}).get('group_weights', ()) or ()))
  runtime_lr = d.get('optim', {}).get('schedule') in RUNTIME_LR_SCHEDULES
  if runtime_lr:   # the cosine schedule's length is train.num_steps; the others read none
    d.get('train', {}).pop('num_steps', None)
  for dotted in RUNTIME_KEYS + HOST_KEYS:
    section, key = dotted.split('.')
    if dotted != 'optim.lr' or runtime_lr:
      d.get(section, {}).pop(key, None)
  if 'loss' in d:
    d['loss']['weighted'] = weighted
  return d
