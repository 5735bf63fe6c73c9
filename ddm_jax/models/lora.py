"""Functional LoRA (Hu et al. 2021) with peft's conventions.

Adapters live in their own pytree, keyed by the dotted module path of the Dense or Conv
layer they adapt ('down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q'):
`{'lora_A': [in, r], 'lora_B': [r, out]}` for a Dense layer; for a convolution, as peft
adapts `nn.Conv2d`, A is a convolution of the layer's own window, stride and padding
into r channels, `[kh, kw, in, r]`, and B a 1x1 one, `[r, out]`. A ~ U(±1/sqrt(fan in))
(peft's kaiming_uniform(a=sqrt(5))), B = 0, so a fresh adapter leaves the model
unchanged. The output is `layer(x) + (alpha / r) * B(A(dropout(x)))`. During training
the branch is added by intercepting the layers' calls (base weights stay frozen and
untouched); `merge` folds it into the kernels (`kernel += scale * A @ B`, the same
product for both kinds) for inference and export.
"""
import contextlib
import math
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


def find_targets(params, target_modules: Sequence[str]):
  """Dotted paths of Dense and 2-D Conv layers (2-D and 4-D kernels) whose own name is in
  `target_modules` (peft matches module-name suffixes the same way)."""
  flat = flax.traverse_util.flatten_dict(params)
  targets = []
  for path, value in flat.items():
    if path[-1] == 'kernel' and value.ndim in (2, 4) and path[-2] in target_modules:
      targets.append('.'.join(path[:-1]))
  return sorted(targets)


def init_lora(rng, params, target_modules, rank):
  """-> {path: {'lora_A', 'lora_B'}} for every matching Dense or Conv kernel in `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  lora = {}
  for i, path in enumerate(find_targets(params, target_modules)):
    shape = flat[tuple(path.split('.')) + ('kernel',)].shape   # [..., in, out]
    bound = 1.0 / math.prod(shape[:-1]) ** 0.5
    lora[path] = {
        'lora_A': jax.random.uniform(jax.random.fold_in(rng, i), shape[:-1] + (rank,),
                                     jnp.float32, -bound, bound),
        'lora_B': jnp.zeros((rank, shape[-1]), jnp.float32)}
  if not lora:
    raise ValueError(f'no Dense or Conv layer named any of {tuple(target_modules)} to adapt')
  return lora


@contextlib.contextmanager
def apply_lora(lora, scale, dropout_rate=0.0, rng=None):
  """Within this context, every Dense call whose path is in `lora` gets the LoRA branch.

  Paths are relative to the module passed to `.apply`, so use one context per model.
  """
  counter = [0]

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv)):
      return out
    ab = lora.get('.'.join(module.path))
    if ab is None:
      return out
    x = args[0]
    if dropout_rate > 0 and rng is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, counter[0]), 1 - dropout_rate, x.shape)
      x = jnp.where(keep, x / (1 - dropout_rate), 0)
      counter[0] += 1
    x = x.astype(jnp.float32)
    if isinstance(module, nn.Conv):   # A: the layer's own window into r channels
      x = _conv_like(module, ab['lora_A'].shape[-1]).apply({'params': {'kernel': ab['lora_A']}}, x)
    else:
      x = x @ ab['lora_A']
    return out + (scale * (x @ ab['lora_B'])).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield


def _conv_like(conv, features):
  """An unbound nn.Conv with `conv`'s window, strides, padding and convolution (the
  small-input path of models/blocks.py included), into `features` channels, no bias."""
  return nn.Conv(features, conv.kernel_size, strides=conv.strides, padding=conv.padding,
                 input_dilation=conv.input_dilation, kernel_dilation=conv.kernel_dilation,
                 feature_group_count=conv.feature_group_count, use_bias=False,
                 dtype=jnp.float32, param_dtype=jnp.float32,
                 conv_general_dilated=conv.conv_general_dilated, parent=None)


def merge(params, lora, scale):
  """Base params with `kernel += scale * A @ B` for every adapted layer (a new tree)."""
  flat = dict(flax.traverse_util.flatten_dict(params))
  for path, ab in lora.items():
    key = tuple(path.split('.')) + ('kernel',)
    if key not in flat:
      raise KeyError(f'LoRA adapter for {path!r} has no kernel in the base params')
    flat[key] = flat[key] + scale * (ab['lora_A'] @ ab['lora_B']).astype(flat[key].dtype)
  return flax.traverse_util.unflatten_dict(flat)
