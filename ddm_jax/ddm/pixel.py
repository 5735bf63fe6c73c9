"""Pixel-space DDM: a UNet from the config, the indicator and the config's schedule; with
`lora.unet_targets`, LoRA adapters on those Dense layers of the UNet (the paper's way of
fine-tuning, here for a pixel UNet tuned from a base with train.init_from)."""
import contextlib

import jax
import jax.numpy as jnp

from ddm_jax.ddm.protocol import DDM
from ddm_jax.diffusion.schedules import schedule_from_config
from ddm_jax.models import lora as lora_lib
from ddm_jax.models.indicator import indicator_from_config
from ddm_jax.models.unet import unet_from_config


class PixelDDM(DDM):
  def __init__(self, config):
    self.config = config
    self.unet = unet_from_config(config.model)
    self.num_class_embeds = self.unet.num_class_embeds or 0
    self.indicator = indicator_from_config(config)
    self.sched = schedule_from_config(config.diffusion)
    r, ch = config.data.resolution, config.model.out_channels
    self.sample_shape = (r, r, config.model.in_channels)
    self.eps_shape = (r, r, ch)
    lc = config.get('lora')
    self.lora_targets = tuple(lc.get('unet_targets', ())) if lc is not None else ()
    if self.lora_targets:
      self.lora_rank = int(lc.get('unet_rank', 8))
      self.lora_scale = float(lc.get('unet_alpha', 32.0)) / self.lora_rank

  def init(self, rng):
    """Parameters: {'unet': ..., 'indicator': ...}, and 'unet_lora' (the adapters, B = 0, so
    the model starts as its UNet) with lora.unet_targets."""
    k_u, k_i = jax.random.split(rng)
    x = jnp.zeros((1,) + self.sample_shape)
    t = jnp.zeros((1,), jnp.int32)
    cls = jnp.zeros((1,), jnp.int32) if self.num_class_embeds else None
    ctx = (jnp.zeros((1, 1, self.unet.cross_attention_dim))
           if self.unet.cross_attention_dim else None)
    params = {'unet': self.unet.init(k_u, x, t, ctx, cls)['params'],
              'indicator': self.init_indicator(k_i)}
    if self.lora_targets:
      params['unet_lora'] = lora_lib.init_lora(jax.random.fold_in(k_u, 1), params['unet'],
                                               self.lora_targets, self.lora_rank)
    return params

  def model_fn(self, params, frozen, x_t, t, class_labels=None, context=None):
    with (lora_lib.apply_lora(params['unet_lora'], self.lora_scale) if 'unet_lora' in params
          else contextlib.nullcontext()):
      return self.unet.apply({'params': params['unet']}, x_t, t, context, class_labels)

  def merged_unet(self, params):
    """params['unet'] with the LoRA adapters folded in (the UNet a later fine-tune copies)."""
    if 'unet_lora' not in params:
      return params['unet']
    return lora_lib.merge(params['unet'], params['unet_lora'], self.lora_scale)
