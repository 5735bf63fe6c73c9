"""Load a local diffusers Stable Diffusion folder into our Flax modules, without PyTorch.

A pipeline folder holds `model_index.json` and the components `unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`. Each model folder has a `config.json`
and safetensors weights: `diffusion_pytorch_model.safetensors` (diffusers),
`model.safetensors` (transformers), or shards listed in `*.safetensors.index.json`.

Conversion is a renaming: `down_blocks.0.resnets.1.conv1.weight` becomes
`down_blocks_0/resnets_1/conv1/kernel`; a Linear weight is transposed, a Conv2d weight
goes OIHW -> HWIO, a norm weight becomes `scale`, an Embedding weight `embedding`.
Every tensor is checked against the module's param tree, built with `jax.eval_shape`
(no real-size initialisation): a missing key, an unexpected key or a shape mismatch
raises WeightsError naming the file and the key.

Memory: tensors are read one at a time with plain reads (not through a memory map:
the mapped file's pages would count in the process's memory until it is closed, a
second copy of a 3.4 GB UNet), converted, copied into a jax array and the numpy array
dropped before the next read, so the peak is one full copy of the weights plus one
tensor.
"""
import json
import os
import re
from collections import defaultdict
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util

from ddm_jax.diffusion.schedules import PREDICTION_TYPES, SCHEDULES
from ddm_jax.errors import WeightsError
from ddm_jax.hostmem import release_host_memory
from ddm_jax.models.text_encoder import CLIPTextModel, text_encoder_from_config
from ddm_jax.models.tokenizer import CLIPTokenizer
from ddm_jax.models.unet import UNet2DConditionModel, unet_from_config
from ddm_jax.models.vae import AutoencoderKL, vae_from_config

_WEIGHT_STEMS = ('diffusion_pytorch_model', 'model')
# Attribute names that are lists in PyTorch (`name.N`); used to print flax paths back
# as diffusers keys (`linear_1` is a name, `resnets_1` an index).
_LISTS = ('down_blocks', 'up_blocks', 'resnets', 'attentions', 'downsamplers', 'upsamplers',
          'transformer_blocks', 'layers', 'to_out', 'net')

# diffusers UNet config options that change the computation in ways our UNet does not
# implement; each must be absent or at this value. (Options that add parameters
# would also surface as unexpected keys, but some only change arithmetic.)
_UNET_FIXED = {
    'act_fn': 'silu', 'center_input_sample': False, 'class_embed_type': None,
    'addition_embed_type': None, 'time_embedding_type': 'positional',
    'resnet_time_scale_shift': 'default', 'resnet_skip_time_act': False,
    'resnet_out_scale_factor': 1.0, 'mid_block_scale_factor': 1, 'encoder_hid_dim': None,
    'time_cond_proj_dim': None, 'time_embedding_dim': None, 'time_embedding_act_fn': None,
    'timestep_post_act': None, 'conv_in_kernel': 3, 'conv_out_kernel': 3,
    'dual_cross_attention': False, 'attention_type': 'default', 'class_embeddings_concat': False,
    'cross_attention_norm': None, 'reverse_transformer_layers_per_block': None,
    'projection_class_embeddings_input_dim': None,
}
_VAE_FIXED = {'act_fn': 'silu', 'shift_factor': None, 'latents_mean': None, 'latents_std': None}


class StableDiffusion(NamedTuple):
  """Everything `load_pipeline` reads; params are plain pytrees for `apply({'params': p}, ...)`."""
  unet: UNet2DConditionModel
  unet_params: Any
  vae: AutoencoderKL
  vae_params: Any
  text_encoder: CLIPTextModel
  text_encoder_params: Any
  tokenizer: CLIPTokenizer
  scheduler_config: Dict[str, Any]
  model_index: Dict[str, Any]


# ----------------------------------------------------------------------------- files

def _read_json(path):
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise WeightsError(f'{path}: file not found') from e
  except (OSError, ValueError) as e:
    raise WeightsError(f'{path}: cannot read JSON ({e})') from e
  if not isinstance(data, dict):
    raise WeightsError(f'{path}: expected a JSON object, got {type(data).__name__}')
  return data


def component_dir(path: str, name: str) -> str:
  """`path/name` for a pipeline folder, or `path` itself when it is the component folder."""
  sub = os.path.join(path, name)
  if os.path.isdir(sub):
    return sub
  if os.path.isfile(os.path.join(path, 'config.json')) or os.path.isfile(
      os.path.join(path, 'tokenizer_config.json')) or os.path.isfile(
      os.path.join(path, 'scheduler_config.json')):
    return path
  raise WeightsError(f'{sub}: folder not found (expected a diffusers pipeline or {name} folder)')


def weight_files(folder: str, variant: Optional[str] = None) -> Tuple[Dict[str, str], str]:
  """Map each tensor name to the safetensors file holding it; also returns a label for messages."""
  suffix = f'.{variant}.safetensors' if variant else '.safetensors'
  for stem in _WEIGHT_STEMS:
    single = os.path.join(folder, stem + suffix)
    index = single + '.index.json'
    if os.path.isfile(single):
      return {k: single for k in read_header(single)[0]}, single
    if os.path.isfile(index):
      weight_map = _read_json(index).get('weight_map')
      if not isinstance(weight_map, dict):
        raise WeightsError(f'{index}: no "weight_map" object')
      files = {k: os.path.join(folder, v) for k, v in weight_map.items()}
      for shard in sorted(set(files.values())):
        if not os.path.isfile(shard):
          raise WeightsError(f'{shard}: shard listed in {index} not found')
      return files, index
  if any(n.endswith('.bin') or n.endswith('.ckpt') for n in os.listdir(folder)):
    raise WeightsError(f'{folder}: only PyTorch .bin/.ckpt weights found; loading them needs torch. '
                       f'Convert them to safetensors (e.g. save_pretrained(safe_serialization=True))')
  raise WeightsError(f'{folder}: no weights file ({_WEIGHT_STEMS[0]}{suffix}, '
                     f'{_WEIGHT_STEMS[1]}{suffix} or a sharded index)')


# ------------------------------------------------------------------------ renaming

def torch_key_to_path(key: str) -> Tuple[str, ...]:
  """`a.0.b.weight` -> ('a_0', 'b', 'weight'); the leaf is resolved against the model later."""
  parts = []
  for part in key.split('.'):
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return tuple(parts)


def path_to_torch_key(path: Tuple[str, ...]) -> str:
  """Inverse of the renaming, for messages: ('a_0', 'b', 'kernel') -> 'a.0.b.weight'."""
  out = []
  for part in path[:-1]:
    m = re.fullmatch(r'(.+)_(\d+)', part)
    out.append(f'{m[1]}.{m[2]}' if m and m[1] in _LISTS else part)
  out.append('bias' if path[-1] == 'bias' else 'weight')
  return '.'.join(out)


def _torch_shape(leaf, shape):
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel':
    return tuple(shape[::-1])
  return tuple(shape)


def _resolve(path, expected):
  """The flax param path of a renamed torch key (`weight` -> kernel/scale/embedding)."""
  if path[-1] == 'weight':
    for leaf in ('kernel', 'scale', 'embedding'):
      if path[:-1] + (leaf,) in expected:
        return path[:-1] + (leaf,)
  elif path in expected:
    return path
  return None


def convert(tensors, expected, where: str, rename: Callable[[str], Optional[str]] = lambda k: k,
            dtype=jnp.float32):
  """Build the params pytree from `tensors`: an iterable of (key, file, load) where `load()`
  returns the numpy tensor. `expected` is the flat {path: ShapeDtypeStruct} of the module.
  Each numpy array is released as soon as its jax copy exists."""
  params = {}
  source = {}
  for key, file, load in tensors:
    new_key = rename(key)
    if new_key is None:  # a buffer we do not need (e.g. CLIP position_ids)
      continue
    path = _resolve(torch_key_to_path(new_key), expected)
    if path is None:
      raise WeightsError(f'{file}: unexpected key {key!r} (the model built from config.json '
                         f'has no such parameter)')
    if path in params:
      raise WeightsError(f'{file}: key {key!r} duplicates {source[path]!r}')
    want = tuple(expected[path].shape)
    array = load()
    if path[-1] == 'kernel' and array.ndim == 4 and len(want) == 2 and array.shape[2:] == (1, 1):
      array = array[:, :, 0, 0]  # a 1x1 conv stored where we use a Linear (old VAE attention)
    if path[-1] == 'kernel':
      array = array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
    if array.shape != want:
      raise WeightsError(f'{file}: {key!r} has shape {_torch_shape(path[-1], array.shape)}, '
                         f'the model expects {_torch_shape(path[-1], want)}')
    params[path] = jnp.asarray(np.ascontiguousarray(array, dtype=dtype))
    del array
    source[path] = key
  missing = [p for p in expected if p not in params]
  if missing:
    more = f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''
    raise WeightsError(f'{where}: missing key {path_to_torch_key(missing[0])!r}{more}')
  release_host_memory()   # the numpy tensors' freed blocks
  return traverse_util.unflatten_dict(params)


_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
           'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
           'BOOL': np.bool_}


def read_header(file):
  """A safetensors file's ({key: (dtype, shape, start, end)}, data offset), checked against
  the file's size, so that a truncated or foreign file fails here, naming the file."""
  try:
    size = os.path.getsize(file)
    with open(file, 'rb') as f:
      n = int.from_bytes(f.read(8), 'little')
      if not 2 <= n <= size - 8:
        raise ValueError(f'header length {n} does not fit a file of {size} bytes')
      raw = json.loads(f.read(n))
    if not isinstance(raw, dict):
      raise ValueError('the header is not a JSON object')
    header = {}
    for key, info in raw.items():
      if key == '__metadata__':
        continue
      start, end = info['data_offsets']
      dtype = np.dtype(_DTYPES[info['dtype']])
      shape = tuple(int(d) for d in info['shape'])
      if not 0 <= start <= end <= size - 8 - n or end - start != int(
          np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError(f'{key!r}: data offsets {start}..{end} do not fit its shape or the file')
      header[key] = (dtype, shape, 8 + n + start)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise WeightsError(f'{file}: cannot read safetensors header ({type(e).__name__}: {e})') from e
  return header, 8 + n


def _tensors(files):
  """Yields (key, file, load) reading each file once, one tensor at a time."""
  by_file = defaultdict(list)
  for key, file in files.items():
    by_file[file].append(key)
  for file, keys in by_file.items():
    header, _ = read_header(file)
    with open(file, 'rb') as f:
      for key in keys:
        if key not in header:
          raise WeightsError(f'{file}: key {key!r} listed in the index is not in the file')
        yield key, file, (lambda k=key: _read_tensor(f, file, k, *header[k]))


def _read_tensor(f, file, key, dtype, shape, offset):
  array = np.empty(shape, dtype)
  f.seek(offset)
  if f.readinto(memoryview(array.reshape(-1).view(np.uint8))) != array.nbytes:
    raise WeightsError(f'{file}: {key!r} is cut short (the file changed while it was read)')
  return array


def expected_params(module, *args, **kwargs):
  """The module's flat {path: ShapeDtypeStruct} param tree, without allocating weights."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  return traverse_util.flatten_dict(shapes['params'])


# ---------------------------------------------------------------------- components

def _check_fixed(cfg, fixed, where):
  for key, value in fixed.items():
    if key in cfg and cfg[key] != value and not (value is None and cfg[key] in ('', [], None)):
      raise WeightsError(f'{where}: unsupported option {key}={cfg[key]!r} (we implement {value!r})')


def _unet_config(cfg, where):
  _check_fixed(cfg, _UNET_FIXED, where)
  cfg = dict(cfg)
  for key in ('transformer_layers_per_block', 'cross_attention_dim'):
    value = cfg.get(key)
    if isinstance(value, (list, tuple)):
      if len(set(value)) != 1 or isinstance(value[0], (list, tuple)):
        raise WeightsError(f'{where}: per-block {key}={value!r} is not supported')
      cfg[key] = value[0]
  mid_only = cfg.get('mid_block_only_cross_attention')
  if mid_only:
    raise WeightsError(f'{where}: unsupported option mid_block_only_cross_attention={mid_only!r}')
  return cfg


def _load(path, name, build, dummy_inputs, rename=lambda k: k, variant=None, param_dtype=jnp.float32,
          config_fn=lambda cfg, where: cfg, **overrides):
  folder = component_dir(path, name)
  cfg_path = os.path.join(folder, 'config.json')
  # A config.json of the wrong shape (a string for a list, impossible group counts) fails
  # inside the model; name the file instead of surfacing a raw traceback.
  try:
    module = build(config_fn(_read_json(cfg_path), cfg_path), **overrides)
    expected = expected_params(module, *dummy_inputs(module))
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    raise WeightsError(f'{cfg_path}: invalid model configuration ({type(e).__name__}: '
                       f'{str(e).splitlines()[0] if str(e) else e!r})') from e
  files, label = weight_files(folder, variant)
  return module, convert(_tensors(files), expected, label, rename, param_dtype)


def _unet_inputs(m):
  s = 2 ** (len(m.block_out_channels) - 1)
  context = jnp.zeros((1, 1, m.cross_attention_dim)) if m.cross_attention_dim else None
  labels = jnp.zeros((1,), jnp.int32) if m.num_class_embeds else None
  return jnp.zeros((1, s, s, m.in_channels)), jnp.zeros((1,)), context, labels


def _vae_inputs(m):
  s = 2 ** (len(m.block_out_channels) - 1)
  return (jnp.zeros((1, s, s, m.in_channels)),)


def _vae_rename(key):
  # Old diffusers VAEs name the attention block query/key/value/proj_attn (diffusers
  # renames them on load as well).
  return re.sub(r'\.(query|key|value|proj_attn)\.(weight|bias)$',
                lambda m: {'query': '.to_q', 'key': '.to_k', 'value': '.to_v',
                           'proj_attn': '.to_out.0'}[m[1]] + '.' + m[2], key)


def _text_rename(key):
  # transformers < 5 saved a `text_model.` prefix and the position_ids buffer.
  key = key[len('text_model.'):] if key.startswith('text_model.') else key
  return None if key == 'embeddings.position_ids' else key


def load_unet(path: str, *, variant: Optional[str] = None, param_dtype=jnp.float32, **overrides):
  """-> (UNet2DConditionModel, params). `path` is a pipeline folder or its `unet/`;
  `variant` picks e.g. `diffusion_pytorch_model.fp16.safetensors`; `overrides` set module
  fields (dtype=jnp.bfloat16 for compute, remat=True); params are `param_dtype`."""
  return _load(path, 'unet', unet_from_config, _unet_inputs, variant=variant,
               param_dtype=param_dtype, config_fn=_unet_config, **overrides)


def load_vae(path: str, *, variant: Optional[str] = None, param_dtype=jnp.float32, **overrides):
  """-> (AutoencoderKL, params); arguments as for `load_unet`."""
  return _load(path, 'vae', vae_from_config, _vae_inputs, _vae_rename, variant, param_dtype,
               config_fn=lambda cfg, where: (_check_fixed(cfg, _VAE_FIXED, where), cfg)[1],
               **overrides)


def load_text_encoder(path: str, *, variant: Optional[str] = None, param_dtype=jnp.float32,
                      **overrides):
  """-> (CLIPTextModel, params); arguments as for `load_unet`."""
  return _load(path, 'text_encoder', text_encoder_from_config,
               lambda m: (jnp.zeros((1, 1), jnp.int32),), _text_rename, variant, param_dtype,
               **overrides)


def load_tokenizer(path: str) -> CLIPTokenizer:
  return CLIPTokenizer.from_pretrained(component_dir(path, 'tokenizer'))


def read_scheduler_config(path: str) -> Dict[str, Any]:
  """The `scheduler/scheduler_config.json` mapping (with its `_class_name`)."""
  where = os.path.join(component_dir(path, 'scheduler'), 'scheduler_config.json')
  cfg = _read_json(where)
  for key, default, allowed in (('beta_schedule', 'scaled_linear', SCHEDULES),
                                ('prediction_type', 'epsilon', PREDICTION_TYPES)):
    if cfg.get(key, default) not in allowed:
      raise WeightsError(f'{where}: {key} {cfg[key]!r} is not supported; use one of {allowed}')
  return cfg


def load_pipeline(path: str, *, variant: Optional[str] = None, param_dtype=jnp.float32,
                  dtype=jnp.float32) -> StableDiffusion:
  """Every component of a local diffusers Stable Diffusion folder; `dtype` is the
  modules' compute dtype, `param_dtype` the params'."""
  index = _read_json(os.path.join(path, 'model_index.json'))
  for name in ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler'):
    if name not in index:
      raise WeightsError(f'{os.path.join(path, "model_index.json")}: no {name!r} component')
  kw = dict(variant=variant, param_dtype=param_dtype, dtype=dtype)
  unet, unet_params = load_unet(path, **kw)
  vae, vae_params = load_vae(path, **kw)
  text_encoder, text_params = load_text_encoder(path, **kw)
  return StableDiffusion(unet, unet_params, vae, vae_params, text_encoder, text_params,
                         load_tokenizer(path), read_scheduler_config(path), index)


# -------------------------------------------------------------------------- export

def params_to_state_dict(params) -> Dict[str, np.ndarray]:
  """Inverse of `convert`: a params pytree -> {diffusers/transformers key: numpy array}
  in PyTorch layout (text-encoder keys without the `text_model.` prefix, as
  transformers 5 writes them)."""
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    array = np.asarray(value)
    if path[-1] == 'kernel':
      array = array.transpose(3, 2, 0, 1) if array.ndim == 4 else array.T
    out[path_to_torch_key(path)] = np.ascontiguousarray(array)
  return out
