"""Pixel-space DDM: a UNet from the config, the indicator and the config's schedule."""
import jax
import jax.numpy as jnp

from ddm_jax.ddm.protocol import DDM
from ddm_jax.diffusion.schedules import schedule_from_config
from ddm_jax.models.indicator import Indicator
from ddm_jax.models.unet import unet_from_config


class PixelDDM(DDM):
  def __init__(self, config):
    self.config = config
    self.unet = unet_from_config(config.model)
    self.num_class_embeds = self.unet.num_class_embeds or 0
    self.indicator = Indicator(config.data.num_groups, tuple(config.indicator.hidden),
                               input=config.indicator.get('input', 'eps'))
    self.sched = schedule_from_config(config.diffusion)
    r, ch = config.data.resolution, config.model.out_channels
    self.sample_shape = (r, r, config.model.in_channels)
    self.eps_shape = (r, r, ch)

  def init(self, rng):
    """Trainable parameters: {'unet': ..., 'indicator': ...}."""
    k_u, k_i = jax.random.split(rng)
    x = jnp.zeros((1,) + self.sample_shape)
    t = jnp.zeros((1,), jnp.int32)
    cls = jnp.zeros((1,), jnp.int32) if self.num_class_embeds else None
    ctx = (jnp.zeros((1, 1, self.unet.cross_attention_dim))
           if self.unet.cross_attention_dim else None)
    return {'unet': self.unet.init(k_u, x, t, ctx, cls)['params'],
            'indicator': self.init_indicator(k_i)}

  def model_fn(self, params, frozen, x_t, t, class_labels=None, context=None):
    return self.unet.apply({'params': params['unet']}, x_t, t, context, class_labels)
