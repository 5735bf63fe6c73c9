"""Functional LoRA (Hu et al. 2021) with peft's conventions.

Adapters live in their own pytree, keyed by the dotted module path of the Dense
layer they adapt ('down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q'):
`{'lora_A': [in, r], 'lora_B': [r, out]}`; A ~ U(±1/sqrt(in)) (peft's
kaiming_uniform(a=sqrt(5))), B = 0, so a fresh adapter leaves the model unchanged.
The output is `dense(x) + (alpha / r) * dropout(x) @ A @ B`. During training the
branch is added by intercepting the Dense calls (base weights stay frozen and
untouched); `merge` folds it into the kernels for inference and export.
"""
import contextlib
from typing import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp


def find_targets(params, target_modules: Sequence[str]):
  """Dotted paths of Dense layers whose own name is in `target_modules` (peft matches
  module-name suffixes the same way)."""
  flat = flax.traverse_util.flatten_dict(params)
  targets = []
  for path, value in flat.items():
    if path[-1] == 'kernel' and value.ndim == 2 and path[-2] in target_modules:
      targets.append('.'.join(path[:-1]))
  return sorted(targets)


def init_lora(rng, params, target_modules, rank):
  """-> {path: {'lora_A', 'lora_B'}} for every matching Dense kernel in `params`."""
  flat = flax.traverse_util.flatten_dict(params)
  lora = {}
  for i, path in enumerate(find_targets(params, target_modules)):
    d_in, d_out = flat[tuple(path.split('.')) + ('kernel',)].shape
    bound = 1.0 / d_in ** 0.5
    lora[path] = {
        'lora_A': jax.random.uniform(jax.random.fold_in(rng, i), (d_in, rank), jnp.float32,
                                     -bound, bound),
        'lora_B': jnp.zeros((rank, d_out), jnp.float32)}
  if not lora:
    raise ValueError(f'no Dense layer named any of {tuple(target_modules)} to adapt')
  return lora


@contextlib.contextmanager
def apply_lora(lora, scale, dropout_rate=0.0, rng=None):
  """Within this context, every Dense call whose path is in `lora` gets the LoRA branch.

  Paths are relative to the module passed to `.apply`, so use one context per model.
  """
  counter = [0]

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name != '__call__' or not isinstance(context.module, nn.Dense):
      return out
    ab = lora.get('.'.join(context.module.path))
    if ab is None:
      return out
    x = args[0]
    if dropout_rate > 0 and rng is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(rng, counter[0]), 1 - dropout_rate, x.shape)
      x = jnp.where(keep, x / (1 - dropout_rate), 0)
      counter[0] += 1
    delta = (x.astype(jnp.float32) @ ab['lora_A']) @ ab['lora_B']
    return out + (scale * delta).astype(out.dtype)

  with nn.intercept_methods(interceptor):
    yield


def merge(params, lora, scale):
  """Base params with `kernel += scale * A @ B` for every adapted layer (a new tree)."""
  flat = dict(flax.traverse_util.flatten_dict(params))
  for path, ab in lora.items():
    key = tuple(path.split('.')) + ('kernel',)
    if key not in flat:
      raise KeyError(f'LoRA adapter for {path!r} has no kernel in the base params')
    flat[key] = flat[key] + scale * (ab['lora_A'] @ ab['lora_B']).astype(flat[key].dtype)
  return flax.traverse_util.unflatten_dict(flat)
