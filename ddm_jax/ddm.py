"""Pixel-space DDM: the UNet, the indicator and the schedule wired for training and sampling.

The training step and the samplers only use the methods below, so the latent
(Stable Diffusion) variant subclasses this and overrides `prepare_batch`/`model_fn`.
"""
import jax
import jax.numpy as jnp

from ddm_jax.diffusion.schedules import schedule_from_config
from ddm_jax.models.indicator import Indicator
from ddm_jax.models.unet import unet_from_config


class DDM:
  def __init__(self, config):
    self.config = config
    self.unet = unet_from_config(config.model)
    self.indicator = Indicator(config.data.num_groups, tuple(config.indicator.hidden))
    self.sched = schedule_from_config(config.diffusion)
    r, ch = config.data.resolution, config.model.out_channels
    self.sample_shape = (r, r, config.model.in_channels)
    self.eps_shape = (r, r, ch)

  def init(self, rng):
    """Trainable parameters: {'unet': ..., 'indicator': ...}."""
    k_u, k_i = jax.random.split(rng)
    x = jnp.zeros((1,) + self.sample_shape)
    t = jnp.zeros((1,), jnp.int32)
    cls = jnp.zeros((1,), jnp.int32) if self.unet.num_class_embeds else None
    ctx = (jnp.zeros((1, 1, self.unet.cross_attention_dim))
           if self.unet.cross_attention_dim else None)
    return {'unet': self.unet.init(k_u, x, t, ctx, cls)['params'],
            'indicator': self.indicator.init(k_i, jnp.zeros((1,) + self.eps_shape))['params']}

  def frozen(self):
    """Parameters that are used but never trained (the SD base weights); none here."""
    return {}

  def prepare_batch(self, frozen, batch, rng):
    """-> (x0, group labels, conditioning kwargs for model_fn)."""
    cond = {'class_labels': batch['label']} if self.unet.num_class_embeds else {}
    return batch['image'], batch['label'], cond

  def model_fn(self, params, frozen, x_t, t, class_labels=None, context=None):
    return self.unet.apply({'params': params['unet']}, x_t, t, context, class_labels)

  def sample_cond(self, params, frozen, batch_size):
    """Conditioning every sample gets by default (none here; the prompt for SD)."""
    return {}

  def decode(self, frozen, x):
    """Sampler output -> images in [-1, 1] (identity here; the VAE decoder for SD)."""
    return x

  def indicator_fn(self, params, eps_pred):
    return self.indicator.apply({'params': params['indicator']}, eps_pred)
