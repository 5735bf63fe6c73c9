"""The same random weights on both sides, drawn with numpy (never `module.init`).

Every tensor is defined by its *PyTorch* name and shape: `draw(scope, key, shape, seed)`
seeds a generator with (seed, crc32(scope/key)), so a PyTorch process and a JAX process
produce bit-identical weights without sharing a file, in any order. The JAX side maps
its flax paths to the PyTorch keys (`interop.diffusers.path_to_torch_key`) and
transposes (Linear: .T, Conv2d: OIHW -> HWIO), the inverse of `params_to_state_dict`.

Values: weights of rank >= 2 ~ N(0, 1/fan_in); norm scales 1 + N(0, 0.1^2); biases
N(0, 0.02^2): nothing is exactly 0 or 1, so a wrong mapping cannot hide behind a default.
LoRA: A ~ N(0, 1/fan_in), B = 0 (the adapter starts inert, as in peft) unless
`lora_b_std` > 0 (the parity test makes B non-zero so the adapter path is exercised).
"""
import zlib

import numpy as np


def draw(scope, key, shape, seed, kind=None):
  """One float32 tensor in PyTorch layout. `kind`: 'weight' (rank >= 2), 'scale' or 'bias'."""
  rng = np.random.default_rng([seed, zlib.crc32(f'{scope}/{key}'.encode())])
  shape = tuple(int(s) for s in shape)
  if kind is None:
    kind = 'weight' if len(shape) >= 2 else ('scale' if key.endswith('weight') else 'bias')
  z = rng.standard_normal(shape, dtype=np.float32)
  if kind == 'weight':
    return z * np.float32(np.prod(shape[1:]) ** -0.5)
  if kind == 'scale':
    return 1 + np.float32(0.1) * z
  return np.float32(0.02) * z


def torch_to_flax(array, leaf):
  """A PyTorch-layout tensor -> the flax leaf's layout."""
  if leaf == 'kernel':
    return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array.T
  return array


def flax_to_torch_shape(leaf, shape):
  if leaf == 'kernel' and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == 'kernel':
    return tuple(shape[::-1])
  return tuple(shape)


# ------------------------------------------------------------------ LoRA (peft names)

def lora_arrays(module_name, d_in, d_out, rank, seed, lora_b_std=0.0):
  """(A [r, in], B [out, r]) in peft's layout for the adapted Linear `module_name`."""
  a = draw('lora', f'{module_name}.lora_A.weight', (rank, d_in), seed)
  if lora_b_std:
    b = lora_b_std * draw('lora', f'{module_name}.lora_B.weight', (d_out, rank), seed)
  else:
    b = np.zeros((d_out, rank), np.float32)
  return a, b


# ------------------------------------------------------------------ the indicator

def indicator_layers(in_shape_chw, hidden, num_groups):
  """[(torch key, torch shape)] of the reference indicator MLP."""
  c, h, w = in_shape_chw
  widths = (c * h * w,) + tuple(hidden) + (num_groups,)
  out = []
  for i in range(len(widths) - 1):
    out += [(f'layers.{i}.weight', (widths[i + 1], widths[i])), (f'layers.{i}.bias', (widths[i + 1],))]
  return out


def indicator_first_kernel_to_flax(weight, in_shape_chw):
  """PyTorch flattens the predicted noise as (C, H, W), we flatten NHWC as (H, W, C):
  reorder the first Linear's input axis so both compute the same function."""
  c, h, w = in_shape_chw
  out = weight.shape[0]
  return weight.reshape(out, c, h, w).transpose(2, 3, 1, 0).reshape(h * w * c, out)
