"""Stable Diffusion's KL autoencoder, mirroring diffusers' `AutoencoderKL` (NHWC).

Param names follow diffusers' attribute paths (`encoder/down_blocks_0/resnets_1/conv1/kernel`),
so interop/diffusers.py converts a `vae/` checkpoint by renaming. The encoder and
decoder blocks are the UNet's own blocks run without a time embedding: a
`DownEncoderBlock2D` is a `DownBlock2D` whose downsampler uses padding 0, an
`UpDecoderBlock2D` an `UpBlock2D` without skip connections.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.models.blocks import UNetMidBlock2D
from ddm_jax.models.unet import _Block

EPS = 1e-6  # diffusers hard-codes the VAE's norm eps
_BLOCK_KIND = {'DownEncoderBlock2D': 'DownBlock2D', 'UpDecoderBlock2D': 'UpBlock2D'}


def _check_block_types(types):
  for kind in types:
    if kind not in _BLOCK_KIND:
      raise ValueError(f'unsupported VAE block type {kind!r}; use one of {tuple(_BLOCK_KIND)}')


def _conv(features, kernel, dtype, name):
  pad = ((kernel // 2,) * 2,) * 2
  return nn.Conv(features, (kernel, kernel), padding=pad, dtype=dtype, name=name)


def _mid_block(channels, groups, add_attention, dtype):
  # diffusers sets attention_head_dim = channels: a single head.
  return UNetMidBlock2D(channels, 1, 'self' if add_attention else None, attention_head_dim=channels,
                        groups=groups, eps=EPS, use_time_emb=False, dtype=dtype, name='mid_block')


class Encoder(nn.Module):
  """Image [B,H,W,C] -> moments [B,H/f,W/f,2*latent] (before quant_conv)."""
  out_channels: int
  down_block_types: Sequence[str]
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    boc = self.block_out_channels
    x = _conv(boc[0], 3, self.dtype, 'conv_in')(x.astype(self.dtype))
    for i, kind in enumerate(self.down_block_types):
      x, _ = _Block(_BLOCK_KIND[kind], boc[i], self.layers_per_block, boc[i], 1, i < len(boc) - 1,
                    self.norm_num_groups, EPS, None, downsample_padding=0, dtype=self.dtype,
                    name=f'down_blocks_{i}')(x, None, None)
    x = _mid_block(boc[-1], self.norm_num_groups, self.mid_block_add_attention, self.dtype)(x)
    x = nn.swish(nn.GroupNorm(self.norm_num_groups, epsilon=EPS, dtype=self.dtype,
                              name='conv_norm_out')(x))
    return _conv(2 * self.out_channels, 3, self.dtype, 'conv_out')(x)


class Decoder(nn.Module):
  """Latent [B,h,w,latent] (after post_quant_conv) -> image [B,h*f,w*f,C]."""
  out_channels: int
  up_block_types: Sequence[str]
  block_out_channels: Sequence[int]
  layers_per_block: int
  norm_num_groups: int
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    rev = tuple(self.block_out_channels)[::-1]
    x = _conv(rev[0], 3, self.dtype, 'conv_in')(z.astype(self.dtype))
    x = _mid_block(rev[0], self.norm_num_groups, self.mid_block_add_attention, self.dtype)(x)
    for i, kind in enumerate(self.up_block_types):
      x, _ = _Block(_BLOCK_KIND[kind], rev[i], self.layers_per_block + 1, rev[i], 1, i < len(rev) - 1,
                    self.norm_num_groups, EPS, None, dtype=self.dtype, name=f'up_blocks_{i}')(x, None, None)
    x = nn.swish(nn.GroupNorm(self.norm_num_groups, epsilon=EPS, dtype=self.dtype,
                              name='conv_norm_out')(x))
    return _conv(self.out_channels, 3, self.dtype, 'conv_out')(x)


class AutoencoderKL(nn.Module):
  """`apply({'params': p}, x, method='encode') -> (mean, logvar)`;
  `apply({'params': p}, z, method='decode') -> image`. Images NHWC in [-1, 1];
  latents are *unscaled* (multiply by `scaling_factor` for the diffusion model)."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: Sequence[str] = ('DownEncoderBlock2D',) * 4
  up_block_types: Sequence[str] = ('UpDecoderBlock2D',) * 4
  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  sample_size: int = 512
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  dtype: Any = jnp.float32

  def setup(self):
    _check_block_types(self.down_block_types)
    _check_block_types(self.up_block_types)
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, norm_num_groups=self.norm_num_groups,
                  mid_block_add_attention=self.mid_block_add_attention, dtype=self.dtype)
    self.encoder = Encoder(self.latent_channels, tuple(self.down_block_types), **common)
    self.decoder = Decoder(self.out_channels, tuple(self.up_block_types), **common)
    if self.use_quant_conv:
      self.quant_conv = nn.Conv(2 * self.latent_channels, (1, 1), dtype=self.dtype)
    if self.use_post_quant_conv:
      self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), dtype=self.dtype)

  def encode(self, x):
    """The diagonal Gaussian posterior: (mean, logvar), logvar clipped to [-30, 20]."""
    h = self.encoder(x)
    if self.use_quant_conv:
      h = self.quant_conv(h)
    mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x, rng=None):
    """Reconstruction: the posterior mean (or a sample when `rng` is given), decoded."""
    mean, logvar = self.encode(x)
    return self.decode(mean if rng is None else sample_latent(mean, logvar, rng))

  @staticmethod
  def sample_latent(mean, logvar, rng):
    return sample_latent(mean, logvar, rng)


def sample_latent(mean, logvar, rng):
  """A draw from N(mean, exp(logvar)) (diffusers' `latent_dist.sample()`)."""
  return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)


VAE_FIELDS = tuple(f for f in AutoencoderKL.__dataclass_fields__ if f not in ('parent', 'name'))


def vae_from_config(cfg, **overrides):
  """Build the VAE from a diffusers `vae/config.json` mapping (unknown keys ignored)."""
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(cfg).items() if k in VAE_FIELDS}
  kwargs.update(overrides)
  _check_block_types(kwargs.get('down_block_types', ()))
  _check_block_types(kwargs.get('up_block_types', ()))
  return AutoencoderKL(**kwargs)
