"""The CLIP text transformer of Stable Diffusion, mirroring transformers' `CLIPTextModel`.

Param names follow the PyTorch attribute paths without the `text_model.` prefix
(`encoder/layers_3/self_attn/q_proj/kernel`); interop/diffusers.py strips that
prefix, which older checkpoints carry and transformers 5 no longer writes.
"""
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    'quick_gelu': lambda x: x * jax.nn.sigmoid(1.702 * x),  # SD 1.x (OpenAI CLIP)
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),     # SD 2.x (OpenCLIP)
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


class CLIPTextOutput(NamedTuple):
  last_hidden_state: jax.Array   # [B, T, D], after final_layer_norm
  pooler_output: jax.Array       # [B, D], at the EOS token
  # the embeddings and every layer's output (L+1 entries, no final norm), when asked:
  # SD 2 "clip skip" takes hidden_states[-2] and applies final_layer_norm itself.
  hidden_states: Optional[Tuple[jax.Array, ...]] = None


class CLIPAttention(nn.Module):
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    b, t, d = x.shape
    head_dim = d // self.num_heads
    proj = lambda name: nn.Dense(d, dtype=self.dtype, name=name)
    split = lambda a: a.reshape(b, t, self.num_heads, head_dim)
    out = jax.nn.dot_product_attention(split(proj('q_proj')(x)), split(proj('k_proj')(x)),
                                       split(proj('v_proj')(x)), mask=mask, scale=head_dim ** -0.5)
    return proj('out_proj')(out.reshape(b, t, d))


class CLIPMLP(nn.Module):
  hidden_size: int
  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ACTIVATIONS[self.hidden_act](nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x))
    return nn.Dense(self.hidden_size, dtype=self.dtype, name='fc2')(x)


class CLIPEncoderLayer(nn.Module):
  """Pre-LayerNorm transformer layer."""
  hidden_size: int
  intermediate_size: int
  num_heads: int
  hidden_act: str
  eps: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    ln = lambda name: nn.LayerNorm(epsilon=self.eps, dtype=self.dtype, name=name)
    x = x + CLIPAttention(self.num_heads, self.dtype, name='self_attn')(ln('layer_norm1')(x), mask)
    mlp = CLIPMLP(self.hidden_size, self.intermediate_size, self.hidden_act, self.dtype, name='mlp')
    return x + mlp(ln('layer_norm2')(x))


class CLIPTextEmbeddings(nn.Module):
  vocab_size: int
  max_position_embeddings: int
  hidden_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids):
    emb = lambda n, name: nn.Embed(n, self.hidden_size, dtype=self.dtype, name=name)
    positions = jnp.arange(input_ids.shape[-1])[None]
    return (emb(self.vocab_size, 'token_embedding')(input_ids)
            + emb(self.max_position_embeddings, 'position_embedding')(positions))


class CLIPEncoder(nn.Module):
  """The layer stack; returns every intermediate state (the embeddings first)."""
  num_hidden_layers: int
  layer: dict  # CLIPEncoderLayer kwargs
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask):
    states = [x]
    for i in range(self.num_hidden_layers):
      x = CLIPEncoderLayer(**self.layer, dtype=self.dtype, name=f'layers_{i}')(x, mask)
      states.append(x)
    return states


class CLIPTextModel(nn.Module):
  """`apply({'params': p}, input_ids[B,T], attention_mask=None, output_hidden_states=False)`
  -> CLIPTextOutput. Attention is causal; `attention_mask` (1 = keep) additionally hides
  padding keys (SD pipelines pass none)."""
  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, attention_mask=None, output_hidden_states=False):
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f'unsupported hidden_act {self.hidden_act!r}; use one of {tuple(ACTIVATIONS)}')
    b, t = input_ids.shape
    if t > self.max_position_embeddings:
      raise ValueError(f'sequence length {t} exceeds max_position_embeddings {self.max_position_embeddings}')
    x = CLIPTextEmbeddings(self.vocab_size, self.max_position_embeddings, self.hidden_size, self.dtype,
                           name='embeddings')(input_ids)
    mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
    if attention_mask is not None:
      mask = mask & (jnp.asarray(attention_mask)[:, None, None, :] > 0)
    layer = dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                 num_heads=self.num_attention_heads, hidden_act=self.hidden_act, eps=self.layer_norm_eps)
    states = CLIPEncoder(self.num_hidden_layers, layer, self.dtype, name='encoder')(x, mask)
    last = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name='final_layer_norm')(states[-1])
    if self.eos_token_id in (None, 2):  # legacy configs: EOS is the largest id (as transformers does)
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    f32 = lambda a: a.astype(jnp.float32)
    return CLIPTextOutput(f32(last), f32(last[jnp.arange(b), eos]),
                          tuple(map(f32, states)) if output_hidden_states else None)


TEXT_ENCODER_FIELDS = tuple(f for f in CLIPTextModel.__dataclass_fields__ if f not in ('parent', 'name'))


def text_encoder_from_config(cfg, **overrides):
  """Build from a transformers `text_encoder/config.json` mapping (unknown keys ignored)."""
  kwargs = {k: v for k, v in dict(cfg).items() if k in TEXT_ENCODER_FIELDS}
  if isinstance(kwargs.get('eos_token_id'), (list, tuple)):
    kwargs['eos_token_id'] = kwargs['eos_token_id'][0]
  kwargs.update(overrides)
  if kwargs.get('hidden_act', 'quick_gelu') not in ACTIVATIONS:
    raise ValueError(f'unsupported hidden_act {kwargs["hidden_act"]!r}; use one of {tuple(ACTIVATIONS)}')
  return CLIPTextModel(**kwargs)
