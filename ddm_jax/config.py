"""Config loading and validation: every impossible value is a ConfigError naming its key."""
import importlib.util
import os

import ml_collections

from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.diffusion.schedules import PREDICTION_TYPES, SCHEDULES
from ddm_jax.errors import ConfigError


def load_config_file(path):
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('_ddm_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    return module.get_config()
  except Exception as e:
    raise ConfigError(f'cannot load config {path}: {type(e).__name__}: {e}') from e


def apply_overrides(config, overrides):
  """`overrides`: {'train.num_steps': '10', ...} from the command line; values are
  parsed as Python literals and must match the existing key's type."""
  import ast
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
      value = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    if old is not None and type(value) is not type(old):
      raise ConfigError(f'config.{dotted}: expected {type(old).__name__}, got {raw!r}')
    with node.unlocked() if hasattr(node, 'unlocked') else _null():
      node[key] = value
  return config


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


def _require(cond, key, msg):
  if not cond:
    raise ConfigError(f'config.{key}: {msg}')


def validate(config):
  """Checks values a run cannot start with. Returns the config."""
  t, o, l, m, d = config.train, config.optim, config.loss, config.model, config.data
  _require(t.num_steps > 0, 'train.num_steps', f'must be positive, got {t.num_steps}')
  _require(t.batch_size > 0, 'train.batch_size', f'must be positive, got {t.batch_size}')
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    _require(t[key] > 0, f'train.{key}', f'must be positive, got {t[key]}')
  _require(t.sample_every >= 0, 'train.sample_every', 'must be >= 0 (0 disables)')
  _require(0.0 <= t.ema_decay < 1.0, 'train.ema_decay', f'must be in [0, 1), got {t.ema_decay}')
  _require(l.w_rec >= 0, 'loss.w_rec', f'must be >= 0, got {l.w_rec}')
  _require(l.w_ind >= 0, 'loss.w_ind', f'must be >= 0, got {l.w_ind}')
  _require(l.w_rec + l.w_ind > 0, 'loss.w_rec', 'w_rec and w_ind cannot both be 0')
  _require(o.lr > 0, 'optim.lr', f'must be positive, got {o.lr}')
  _require(o.schedule in ('constant', 'warmup', 'cosine'), 'optim.schedule',
           f'must be constant, warmup or cosine, got {o.schedule!r}')
  _require(o.clip in ('value', 'norm', 'none'), 'optim.clip',
           f'must be value, norm or none, got {o.clip!r}')
  _require(o.grad_accum >= 1, 'optim.grad_accum', f'must be >= 1, got {o.grad_accum}')
  _require(d.num_groups >= 2, 'data.num_groups', f'must be >= 2, got {d.num_groups}')
  _require(d.resolution > 0, 'data.resolution', f'must be positive, got {d.resolution}')
  _require(config.diffusion.schedule in SCHEDULES, 'diffusion.schedule',
           f'must be one of {SCHEDULES}, got {config.diffusion.schedule!r}')
  _require(config.diffusion.prediction_type in PREDICTION_TYPES, 'diffusion.prediction_type',
           f'must be one of {PREDICTION_TYPES}')
  _require(config.sample.sampler in SAMPLERS, 'sample.sampler',
           f'must be one of {sorted(SAMPLERS)}, got {config.sample.sampler!r}')
  if config.get('latent_factor', 1) > 1:  # latent DDM: the UNet comes from the diffusers folder
    _require(bool(m.get('pretrained')), 'model.pretrained', 'set it to a local diffusers folder')
    _require(d.resolution % config.latent_factor == 0, 'data.resolution',
             f'{d.resolution} is not divisible by the VAE factor {config.latent_factor}')
    return config
  _require(len(m.down_block_types) == len(m.block_out_channels) == len(m.up_block_types),
           'model.block_out_channels', 'needs one entry per down and up block type')
  factor = 2 ** (len(m.block_out_channels) - 1)
  _require(d.resolution % factor == 0, 'data.resolution',
           f'{d.resolution} is not divisible by the UNet downsampling factor {factor}')
  _require(m.in_channels == m.out_channels == d.channels, 'model.in_channels',
           f'model in/out channels ({m.in_channels}, {m.out_channels}) must equal data.channels {d.channels}')
  for c in m.block_out_channels:
    _require(c % m.norm_num_groups == 0, 'model.norm_num_groups',
             f'{m.norm_num_groups} does not divide block channels {tuple(m.block_out_channels)}')
  return config
