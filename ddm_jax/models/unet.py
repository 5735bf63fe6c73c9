"""A conditional diffusion UNet whose fields mirror diffusers' `UNet2DConditionModel`.

Supported block types: DownBlock2D / AttnDownBlock2D (self-attention) /
CrossAttnDownBlock2D (spatial transformer over a context), their Up twins, and
mid blocks UNetMidBlock2DCrossAttn / UNetMidBlock2D / None. Images are NHWC.
The same module runs the small digits model and Stable Diffusion 1.x/2.x.
"""
from typing import Any, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.models.blocks import (Conv, Downsample2D, UNetMidBlock2D, Upsample2D,
                                   run_resnets_and_attentions)

_ATTN = {'DownBlock2D': None, 'AttnDownBlock2D': 'self', 'CrossAttnDownBlock2D': 'cross',
         'UpBlock2D': None, 'AttnUpBlock2D': 'self', 'CrossAttnUpBlock2D': 'cross'}
DOWN_BLOCKS = ('DownBlock2D', 'AttnDownBlock2D', 'CrossAttnDownBlock2D')
UP_BLOCKS = ('UpBlock2D', 'AttnUpBlock2D', 'CrossAttnUpBlock2D')
MID_BLOCKS = ('UNetMidBlock2DCrossAttn', 'UNetMidBlock2D', None)


def timestep_embedding(t, dim, flip_sin_to_cos=False, freq_shift=1.0, max_period=10000):
  """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM/diffusers."""
  half = dim // 2
  freqs = jnp.exp(-np.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.dim, dtype=self.dtype, name='linear_1')(x)
    return nn.Dense(self.dim, dtype=self.dtype, name='linear_2')(nn.swish(x))


def _per_block(value, n):
  return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


class _Block(nn.Module):
  """One down or up block: `layers` resnets (+ attentions) and a resampler."""
  kind: str
  out_channels: int
  layers: int
  attention_head_dim: int
  heads: int
  resample: bool
  groups: int
  eps: float
  cross: dict
  downsample_padding: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, context, skips=(), upsample_size=None):
    x, outs = run_resnets_and_attentions(self, x, temb, context, self.out_channels, self.layers,
                                         _ATTN[self.kind], self.attention_head_dim, self.heads, skips)
    if self.resample and self.kind in DOWN_BLOCKS:
      x = Downsample2D(self.out_channels, self.downsample_padding, dtype=self.dtype,
                       name='downsamplers_0')(x)
      outs.append(x)
    elif self.resample:
      x = Upsample2D(self.out_channels, dtype=self.dtype, name='upsamplers_0')(x, upsample_size)
    return x, outs


class UNet2DConditionModel(nn.Module):
  """`apply(params, sample[B,H,W,C], timesteps[B], context[B,T,D] | None, class_labels[B] | None)`."""
  sample_size: int = 32
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  layers_per_block: Union[int, Sequence[int]] = 2
  down_block_types: Sequence[str] = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',)
  up_block_types: Sequence[str] = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  mid_block_type: Optional[str] = 'UNetMidBlock2DCrossAttn'
  attention_head_dim: Union[int, Sequence[int]] = 8
  num_attention_heads: Optional[Union[int, Sequence[int]]] = None
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  num_class_embeds: Optional[int] = None
  use_linear_projection: bool = False
  only_cross_attention: Union[bool, Sequence[bool]] = False
  upcast_attention: bool = False
  transformer_layers_per_block: int = 1
  downsample_padding: int = 1
  dtype: Any = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, sample, timesteps, context=None, class_labels=None):
    n = len(self.block_out_channels)
    boc = tuple(self.block_out_channels)
    # diffusers' historical naming: `attention_head_dim` means *number of heads* for
    # cross-attention blocks unless num_attention_heads is given; for self-attention
    # (Attn*Block2D) blocks it is the per-head width.
    head_dims = _per_block(self.attention_head_dim, n)
    heads = _per_block(self.num_attention_heads or self.attention_head_dim, n)
    layers = _per_block(self.layers_per_block, n)
    only_cross = _per_block(self.only_cross_attention, n)
    cross = lambda i: dict(num_layers=self.transformer_layers_per_block,
                           use_linear_projection=self.use_linear_projection,
                           only_cross_attention=only_cross[i], upcast=self.upcast_attention)
    block_cls = nn.remat(_Block, static_argnums=(5,)) if self.remat else _Block  # 5: upsample_size

    t = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
    temb = timestep_embedding(t, boc[0], self.flip_sin_to_cos, self.freq_shift).astype(self.dtype)
    temb = TimestepEmbedding(boc[0] * 4, dtype=self.dtype, name='time_embedding')(temb)
    if self.num_class_embeds:
      if class_labels is None:
        raise ValueError('this UNet is class-conditioned (num_class_embeds > 0): pass class_labels')
      temb = temb + nn.Embed(self.num_class_embeds, boc[0] * 4, dtype=self.dtype,
                             name='class_embedding')(class_labels)

    x = sample.astype(self.dtype)
    if context is not None:
      context = context.astype(self.dtype)
    x = Conv(boc[0], (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, name='conv_in')(x)
    skips = [x]
    for i, kind in enumerate(self.down_block_types):
      x, outs = block_cls(kind, boc[i], layers[i], head_dims[i], heads[i], i < n - 1,
                          self.norm_num_groups, self.norm_eps, cross(i), self.downsample_padding,
                          dtype=self.dtype, name=f'down_blocks_{i}')(x, temb, context, (), None)
      skips.extend(outs)

    if self.mid_block_type == 'UNetMidBlock2DCrossAttn':
      # diffusers' UNetMidBlock2DCrossAttn ignores only_cross_attention: attn1 is self-attention.
      x = UNetMidBlock2D(boc[-1], 1, 'cross', heads=heads[-1], groups=self.norm_num_groups,
                         eps=self.norm_eps, cross={**cross(n - 1), 'only_cross_attention': False},
                         dtype=self.dtype,
                         name='mid_block')(x, temb, context)
    elif self.mid_block_type == 'UNetMidBlock2D':  # diffusers builds it with no attention here
      x = UNetMidBlock2D(boc[-1], 0, None, groups=self.norm_num_groups, eps=self.norm_eps,
                         dtype=self.dtype, name='mid_block')(x, temb)

    rev = boc[::-1]
    rev_heads, rev_layers, rev_cross = heads[::-1], layers[::-1], only_cross[::-1]
    for i, kind in enumerate(self.up_block_types):
      count = rev_layers[i] + 1
      block_skips, skips = skips[-count:], skips[:-count]
      c = cross(n - 1 - i)
      c['only_cross_attention'] = rev_cross[i]
      # diffusers passes attention_head_dim[i] (not reversed) to up blocks: kept for parity.
      up_size = tuple(skips[-1].shape[1:3]) if skips else None
      x, _ = block_cls(kind, rev[i], count, head_dims[i], rev_heads[i], i < n - 1,
                       self.norm_num_groups, self.norm_eps, c, dtype=self.dtype,
                       name=f'up_blocks_{i}')(x, temb, context, tuple(block_skips), up_size)

    x = nn.GroupNorm(self.norm_num_groups, epsilon=self.norm_eps, dtype=self.dtype,
                     name='conv_norm_out')(x)
    x = Conv(self.out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
             name='conv_out')(nn.swish(x))
    return x.astype(jnp.float32)


UNET_FIELDS = tuple(f for f in UNet2DConditionModel.__dataclass_fields__
                    if f not in ('parent', 'name'))


def unet_from_config(model_cfg, **overrides):
  """Build the UNet from a config mapping; unknown keys are ignored, so a diffusers
  `unet/config.json` or our `config.model` both work."""
  kwargs = {k: v for k, v in dict(model_cfg).items() if k in UNET_FIELDS}
  for k, v in list(kwargs.items()):
    if isinstance(v, list):
      kwargs[k] = tuple(v)
  if not kwargs.get('cross_attention_dim'):
    kwargs['cross_attention_dim'] = 0
  if not kwargs.get('num_class_embeds'):
    kwargs['num_class_embeds'] = None
  if isinstance(kwargs.get('dtype'), str):
    kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  kwargs.update(overrides)
  for kind in kwargs.get('down_block_types', ()):
    if kind not in DOWN_BLOCKS:
      raise ValueError(f'unsupported down block type {kind!r}; use one of {DOWN_BLOCKS}')
  for kind in kwargs.get('up_block_types', ()):
    if kind not in UP_BLOCKS:
      raise ValueError(f'unsupported up block type {kind!r}; use one of {UP_BLOCKS}')
  if kwargs.get('mid_block_type', 'UNetMidBlock2DCrossAttn') not in MID_BLOCKS:
    raise ValueError(f'unsupported mid block type {kwargs["mid_block_type"]!r}')
  return UNet2DConditionModel(**kwargs)
