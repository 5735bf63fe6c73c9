"""Building blocks shared by the UNet and the VAE (Flax linen, NHWC).

Submodule names mirror diffusers' PyTorch attribute paths with `.N` written as
`_N` (`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`),
so converting a diffusers state dict is a mechanical renaming (interop/diffusers.py).
"""
import contextlib
import functools
import os
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def group_norm(num_groups, eps, name, dtype):
  return nn.GroupNorm(num_groups=num_groups, epsilon=eps, dtype=dtype, name=name)


# On CPU, 3x3 convolutions on at most this many pixels (4x4) run as im2col + matmul.
IM2COL_MAX_PIXELS = 16
# ... and up to 8x8 where a gradient is taken inside a loop (guided sampling's scan): there
# XLA:CPU lays out an input-gradient convolution's kernel as 01oi, which its fast (YNNPACK)
# convolution does not take, and guided sampling at 8x8 ran 4x slower (benchmarks/guided.py).
# Not everywhere: a train step at 8x8 is 15-25 % slower as im2col.
IM2COL_MAX_PIXELS_LOOP_GRAD = 64


@contextlib.contextmanager
def im2col_up_to(pixels):
  """Trace the convolutions inside the block with im2col up to `pixels` pixels (the threshold
  is read at trace time)."""
  global IM2COL_MAX_PIXELS  # pylint: disable=global-statement
  saved, IM2COL_MAX_PIXELS = IM2COL_MAX_PIXELS, max(IM2COL_MAX_PIXELS, pixels)
  try:
    yield
  finally:
    IM2COL_MAX_PIXELS = saved


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`, except on CPU for a 1x1 convolution, or an NHWC input of at
  most 4x4 pixels or spatially smaller than its kernel (the low levels of a UNet on small
  latents): that is computed as one matmul over the kernel taps that touch the input
  (im2col; a 1x1 convolution is a plain matmul), the same sum.

  Why (BENCHMARKS.md): XLA's ConvOperandSwapper swaps the operands of a convolution whose
  kernel is larger than its input, and the swapped convolution has no fast CPU kernel
  (0.1-1 GFLOP/s; half of the `small` train step); and at 4x4 and below the input-gradient
  convolution reverses and transposes the whole kernel every step (a 1x1 convolution's
  at any size). The matmul reads the HWIO kernel as a [taps*C, O] matrix, without a copy
  when every tap touches the input; taps that only ever see padding are dropped, so a 1x1
  input reads only the kernel's centre. Other backends and other convolutions go to
  `lax.conv_general_dilated` as before."""
  spatial = lhs.shape[1:-1]
  plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                               ('NHWC', 'HWIO', 'NHWC')))
  pointwise = rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1) and padding in (
      'VALID', 'SAME', ((0, 0), (0, 0)), [(0, 0), (0, 0)])
  small = (pointwise or any(s < k for s, k in zip(spatial, rhs.shape[:2]))
           or spatial[0] * spatial[1] <= IM2COL_MAX_PIXELS) if plain else False
  if not (small and jax.default_backend() == 'cpu'):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(spatial, rhs.shape[:2], window_strides, padding)
  (plh, phh), (plw, phw) = padding
  (sh, sw), (h, w), (kh, kw, _, _) = window_strides, spatial, rhs.shape
  oh, ow = (h + plh + phh - kh) // sh + 1, (w + plw + phw - kw) // sw + 1
  touches = lambda tap, stride, pad, size, n: any(0 <= tap + stride * q - pad < size
                                                  for q in range(n))
  taps = tuple((i, j) for i in range(kh) for j in range(kw)
               if touches(i, sh, plh, h, oh) and touches(j, sw, plw, w, ow))
  geometry = ((sh, sw), ((plh, phh), (plw, phw)), (oh, ow), taps)
  if pointwise:   # the patches are the input and the kernel a reshape: nothing is copied
    return _im2col_dot(lhs, rhs, geometry, precision, None)
  return _im2col(lhs, rhs, geometry, precision)


_IM2COL_DIMS = (((3,), (0,)), ((), ()))


def _tied(x, tie):
  """`x + tie[0] * 0`: the data dependence that makes XLA compute a copy of `x` when `tie`
  exists. Without it XLA computes every kernel copy of the network at the program's start
  (they need only the weights) or hoists them out of a sampler's loop, and merges the
  backward pass's copies with the forward pass's (XLA:CPU drops optimization barriers
  before CSE). Float x * 0 is not folded away; a non-finite tie[0] makes the result
  non-finite, as it would make the result anyway."""
  return x if tie is None else x + (tie.reshape(-1)[0] * 0).astype(x.dtype)


def _im2col_dot(x, rhs, geometry, precision, tie):
  """The patches of `x` at the kernel taps, [B, oh, ow, taps*C], times those taps of the
  kernel, [taps*C, O] ((i, j, c) order on both sides)."""
  (sh, sw), pads, (oh, ow), taps = geometry
  kh, kw, c, o = rhs.shape
  xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  patches = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (oh - 1) + 1,
                                          j + sw * (ow - 1) + 1, c), (1, sh, sw, 1))
             for i, j in taps]
  x = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
  if len(taps) == kh * kw:
    k = rhs.reshape(kh * kw * c, o)        # no copy
  else:                                    # a copy (XLA has no views): tied to the input
    k = _tied(jnp.concatenate([rhs[i, j] for i, j in taps], axis=0) if len(taps) > 1
              else rhs[taps[0]], tie)
  return lax.dot_general(x, k, _IM2COL_DIMS, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col(x, rhs, geometry, precision):
  """_im2col_dot whose backward pass builds the patches (taps x the input) and the
  kernel's taps again from the input and the kernel instead of saving the forward pass's:
  saved, every such copy in the network is live at once (the SD-1.5 LoRA step at 4x4
  latents: 194 MB of its 220 MB of XLA temporaries were kernel copies, frozen ones too)."""
  return _im2col_dot(x, rhs, geometry, precision, x)


def _im2col_fwd(x, rhs, geometry, precision):
  return _im2col(x, rhs, geometry, precision), (x, rhs)


def _im2col_bwd(geometry, precision, residuals, g):
  x, rhs = residuals
  _, vjp = jax.vjp(lambda x, rhs: _im2col_dot(_tied(x, g), rhs, geometry, precision, g), x, rhs)
  return vjp(g)


_im2col.defvjp(_im2col_fwd, _im2col_bwd)


def Conv(*args, **kwargs):  # pylint: disable=invalid-name
  """nn.Conv (same params, same names) with the small-input path above."""
  return nn.Conv(*args, conv_general_dilated=conv_general_dilated, **kwargs)


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


# The attention kernel: 'xla' (the default), 'cudnn' (cuDNN flash attention; GPU, bf16/fp16
# only) or 'auto' (cuDNN where jax accepts the shapes and dtypes, else XLA). Read from
# $DDM_JAX_ATTENTION at import; the GPU benchmark (benchmarks/gpu.sh) compares them.
ATTENTION = os.environ.get('DDM_JAX_ATTENTION', 'xla')


def _dot_product_attention(q, k, v, scale):
  if (ATTENTION in ('cudnn', 'auto') and jax.default_backend() == 'gpu'
      and q.dtype in (jnp.bfloat16, jnp.float16)):
    try:
      return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation='cudnn')
    except (NotImplementedError, ValueError):   # shapes/dtypes cuDNN does not take
      if ATTENTION == 'cudnn':
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
