"""Building blocks shared by the UNet and the VAE (Flax linen, NHWC).

Submodule names mirror diffusers' PyTorch attribute paths with `.N` written as
`_N` (`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`),
so converting a diffusers state dict is a mechanical renaming (interop/diffusers.py).
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax import kernels
from ddm_jax.models.cpu_conv import conv_general_dilated


def group_norm(num_groups, eps, name, dtype):
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


# nn.Conv (same params, same names) whose convolution takes XLA:CPU's slow cases another
# way (models/cpu_conv.py); on other backends it is lax's. Every conv below is this one.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv. `padding=0` is the VAE's variant: pad right/bottom by one."""
  out_channels: int
  padding: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
      pad = 'VALID'
    else:
      pad = ((self.padding, self.padding),) * 2
    return Conv(self.out_channels, (3, 3), strides=(2, 2), padding=pad,
                dtype=self.dtype, name='conv')(x)


def nearest_resize(x, size):
  """torch's F.interpolate(mode='nearest'): source index floor(i * in / out)."""
  (h, w), (oh, ow) = x.shape[1:3], size
  if (oh, ow) == (2 * h, 2 * w):
    b, c = x.shape[0], x.shape[3]
    return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, oh, ow, c)
  rows = (np.arange(oh) * h) // oh
  cols = (np.arange(ow) * w) // ow
  return x[:, rows][:, :, cols]


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (2x, or to `size` as diffusers does when the
  input is not divisible by the downsampling factor) then a 3x3 conv."""
  out_channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, size=None):
    x = nearest_resize(x, size or (2 * x.shape[1], 2 * x.shape[2]))
    return Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                name='conv')(x)


class ResnetBlock2D(nn.Module):
  """GroupNorm-SiLU-conv twice, with an optional time-embedding projection."""
  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dropout: float = 0.0
  use_time_emb: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, deterministic=True):
    h = nn.swish(group_norm(self.groups, self.eps, 'norm1', self.dtype)(x))
    h = Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
             name='conv1')(h)
    if self.use_time_emb and temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(nn.swish(temb))
      h = h + t[:, None, None, :]
    h = nn.swish(group_norm(self.groups, self.eps, 'norm2', self.dtype)(h))
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
             name='conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = Conv(self.out_channels, (1, 1), dtype=self.dtype, name='conv_shortcut')(x)
    return x + h


def attention(q, k, v, heads, upcast=False):
  """Multi-head scaled dot-product attention on [B, T, heads*dim] projections."""
  b, tq, inner = q.shape
  dim = inner // heads
  split = lambda a: a.reshape(a.shape[0], a.shape[1], heads, dim)
  q, k, v = split(q), split(k), split(v)
  out_dtype = v.dtype
  if upcast:  # SD 2.x's upcast_attention: softmax(QK^T) in float32
    q, k, v = q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32)
  out = _dot_product_attention(q, k, v, dim ** -0.5)
  return out.astype(out_dtype).reshape(b, tq, inner)


def _dot_product_attention(q, k, v, scale):
  """XLA's attention, or cuDNN's as `kernels.current().attention` says."""
  kernel = kernels.current().attention
  if (kernel in ('cudnn', 'auto') and jax.default_backend() == 'gpu'
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    try:
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
    except (NotImplementedError, ValueError):   # shapes/dtypes cuDNN does not take
      if kernel == 'cudnn':
        raise
  return jax.nn.dot_product_attention(q, k, v, scale=scale)


class Attention(nn.Module):
  """diffusers `Attention`: optional GroupNorm in front (the VAE/UNet2DModel
  "attention block") and a residual; otherwise q/k/v/out projections."""
  heads: int
  dim_head: int
  query_dim: int
  bias: bool = False
  group_norm_groups: Optional[int] = None
  eps: float = 1e-5
  residual: bool = False
  upcast: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    inner = self.heads * self.dim_head
    spatial = x.ndim == 4
    residual = x
    if spatial:
      b, h, w, c = x.shape
      x = x.reshape(b, h * w, c)
    if self.group_norm_groups:
      x = group_norm(self.group_norm_groups, self.eps, 'group_norm', self.dtype)(x)
    context = x if context is None else context
    dense = lambda n, name: nn.Dense(n, use_bias=self.bias, dtype=self.dtype, name=name)
    out = attention(dense(inner, 'to_q')(x), dense(inner, 'to_k')(context),
                    dense(inner, 'to_v')(context), self.heads, self.upcast)
    out = nn.Dense(self.query_dim, dtype=self.dtype, name='to_out_0')(out)
    if spatial:
      out = out.reshape(b, h, w, self.query_dim)
    return out + residual if self.residual else out


class GEGLU(nn.Module):
  dim_out: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h, gate = jnp.split(nn.Dense(self.dim_out * 2, dtype=self.dtype, name='proj')(x), 2, axis=-1)
    return h * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  dim: int
  mult: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = GEGLU(self.dim * self.mult, dtype=self.dtype, name='net_0')(x)
    return nn.Dense(self.dim, dtype=self.dtype, name='net_2')(x)


class BasicTransformerBlock(nn.Module):
  dim: int
  heads: int
  dim_head: int
  only_cross_attention: bool = False
  upcast: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)
    attn = lambda name: Attention(self.heads, self.dim_head, self.dim, upcast=self.upcast,
                                  dtype=self.dtype, name=name)
    x = attn('attn1')(ln('norm1')(x), context if self.only_cross_attention else None) + x
    x = attn('attn2')(ln('norm2')(x), context) + x
    return FeedForward(self.dim, dtype=self.dtype, name='ff')(ln('norm3')(x)) + x


class Transformer2DModel(nn.Module):
  """Spatial transformer: GroupNorm, proj_in (1x1 conv or linear), blocks, proj_out."""
  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  use_linear_projection: bool = False
  only_cross_attention: bool = False
  upcast: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    residual = x
    x = group_norm(self.groups, 1e-6, 'norm', self.dtype)(x)
    if self.use_linear_projection:
      x = nn.Dense(inner, dtype=self.dtype, name='proj_in')(x.reshape(b, h * w, c))
    else:
      x = Conv(inner, (1, 1), dtype=self.dtype, name='proj_in')(x).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      x = BasicTransformerBlock(inner, self.heads, self.dim_head, self.only_cross_attention,
                                self.upcast, dtype=self.dtype, name=f'transformer_blocks_{i}')(x, context)
    if self.use_linear_projection:
      x = nn.Dense(c, dtype=self.dtype, name='proj_out')(x).reshape(b, h, w, c)
    else:
      x = Conv(c, (1, 1), dtype=self.dtype, name='proj_out')(x.reshape(b, h, w, inner))
    return x + residual


class UNetMidBlock2D(nn.Module):
  """resnet, [attention, resnet] * num_layers. Self-attention (`attn_type='self'`,
  as in the VAE), cross-attention transformer (`'cross'`, SD's mid block) or none."""
  channels: int
  num_layers: int = 1
  attn_type: Optional[str] = 'self'
  attention_head_dim: int = 1
  heads: int = 1
  groups: int = 32
  eps: float = 1e-5
  use_time_emb: bool = True
  cross: dict = None      # Transformer2DModel kwargs for attn_type == 'cross'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None, context=None):
    res = lambda i: ResnetBlock2D(self.channels, self.groups, self.eps, use_time_emb=self.use_time_emb,
                                  dtype=self.dtype, name=f'resnets_{i}')
    x = res(0)(x, temb)
    for i in range(self.num_layers):
      if self.attn_type == 'self':
        x = Attention(self.channels // self.attention_head_dim, self.attention_head_dim, self.channels,
                      bias=True, group_norm_groups=self.groups, eps=self.eps, residual=True,
                      dtype=self.dtype, name=f'attentions_{i}')(x)
      elif self.attn_type == 'cross':
        x = Transformer2DModel(self.heads, self.channels // self.heads, groups=self.groups,
                               dtype=self.dtype, name=f'attentions_{i}', **(self.cross or {}))(x, context)
      x = res(i + 1)(x, temb)
    return x


def run_resnets_and_attentions(mod, x, temb, context, out_channels, num_layers, attn_type,
                               attention_head_dim, heads, skips: Sequence = ()):
  """The body shared by every down/up block; `skips` (up blocks) are concatenated
  on channels before each resnet. Returns (x, per-layer outputs)."""
  outs = []
  skips = list(skips)
  for i in range(num_layers):
    if skips:
      x = jnp.concatenate([x, skips.pop()], axis=-1)
    x = ResnetBlock2D(out_channels, mod.groups, mod.eps, dtype=mod.dtype, name=f'resnets_{i}')(x, temb)
    if attn_type == 'self':
      x = Attention(out_channels // attention_head_dim, attention_head_dim, out_channels, bias=True,
                    group_norm_groups=mod.groups, eps=mod.eps, residual=True, dtype=mod.dtype,
                    name=f'attentions_{i}')(x)
    elif attn_type == 'cross':
      x = Transformer2DModel(heads, out_channels // heads, groups=mod.groups, dtype=mod.dtype,
                             name=f'attentions_{i}', **mod.cross)(x, context)
    outs.append(x)
  return x, outs
