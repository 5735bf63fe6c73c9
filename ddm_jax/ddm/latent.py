"""Latent DDM: Stable Diffusion 1.x/2.x parts (loaded by `ddm_jax.ddm.build`), LoRA-tuned.

images -> VAE latents (x scaling factor) -> noise at a random t -> UNet(+LoRA) with the
prompt's text embedding (text encoder +LoRA when trained) -> w_rec*MSE + w_ind*CE.
The base weights are `frozen` (never in the optimizer, never checkpointed); the
trainable tree is {'unet_lora', 'text_lora' (optional), 'indicator'}.
"""
import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax.ddm.protocol import DDM
from ddm_jax.diffusion.samplers import scheduler_kwargs
from ddm_jax.diffusion.schedules import schedule_from_scheduler_config
from ddm_jax.models import lora as lora_lib
from ddm_jax.models.indicator import indicator_from_config
from ddm_jax.models.vae import sample_latent


class LatentDDM(DDM):
  latent = True

  def __init__(self, config, sd):
    """`sd`: the loaded parts (`interop.diffusers.load_pipeline`'s StableDiffusion)."""
    self.config = config
    m, lc = config.model, config.lora
    self.unet = sd.unet.clone(remat=bool(m.get('remat', False)))
    self.vae, self.text_encoder, self.tokenizer = sd.vae, sd.text_encoder, sd.tokenizer
    self.scheduler_config = sd.scheduler_config
    self.sched = schedule_from_scheduler_config(sd.scheduler_config)
    self._frozen = {'unet': sd.unet_params, 'vae': sd.vae_params, 'text': sd.text_encoder_params}
    factor = 2 ** (len(self.vae.block_out_channels) - 1)
    r = config.data.resolution // factor
    self.sample_shape = (r, r, self.unet.in_channels)
    self.eps_shape = (r, r, self.unet.out_channels)
    self.indicator = indicator_from_config(config)
    self.unet_scale = lc.unet_alpha / lc.unet_rank
    self.text_scale = lc.text_alpha / lc.text_rank
    self.prompt = config.data.get('prompt', 'A human face')
    self._reported = set()

  # ---------------------------------------------------------------- parameters
  def init(self, rng):
    k_u, k_t, k_i = jax.random.split(rng, 3)
    lc = self.config.lora
    params = {'unet_lora': lora_lib.init_lora(k_u, self._frozen['unet'], tuple(lc.unet_targets),
                                              lc.unet_rank),
              'indicator': self.init_indicator(k_i)}
    if lc.train_text_encoder:
      params['text_lora'] = lora_lib.init_lora(k_t, self._frozen['text'], tuple(lc.text_targets),
                                                lc.text_rank)
    return params

  def frozen(self):
    return self._frozen

  # ---------------------------------------------------------------- data
  def tokenize(self, prompts):
    return self.tokenizer(list(prompts)).astype(np.int32)

  def host_features(self, example):
    """Runs in the data pipeline: the example's prompt (or the config's) as token ids."""
    prompt = example.get('prompt') or self.prompt
    return {'input_ids': self.tokenize([prompt])[0]}

  def prepare_batch(self, frozen, batch, rng):
    mean, logvar = self.vae.apply({'params': frozen['vae']}, batch['image'], method='encode')
    z = jax.lax.stop_gradient(sample_latent(mean, logvar, rng) * self.vae.scaling_factor)
    return z, batch['label'], {'input_ids': batch['input_ids'],
                               'dropout_rng': jax.random.fold_in(rng, 1)}

  # ---------------------------------------------------------------- model
  def _lora(self, params, key, scale, rng):
    if key not in params:
      return contextlib.nullcontext()
    rate = self.config.lora.dropout if rng is not None else 0.0
    return lora_lib.apply_lora(params[key], scale, rate, rng)

  def encode_text(self, params, frozen, input_ids, rng=None):
    with self._lora(params, 'text_lora', self.text_scale, rng):
      return self.text_encoder.apply({'params': frozen['text']}, input_ids).last_hidden_state

  def model_fn(self, params, frozen, x_t, t, input_ids=None, context=None, dropout_rng=None,
               class_labels=None):
    if context is None:
      context = self.encode_text(params, frozen, input_ids, dropout_rng)
    with self._lora(params, 'unet_lora', self.unet_scale, dropout_rng):
      return self.unet.apply({'params': frozen['unet']}, x_t, t, context)

  def sample_cond(self, params, frozen, batch_size, **per_sample):
    """The training prompt's embedding for every sample (`generation.prompts.CFGModel`
    adds per-sample prompts and classifier-free guidance)."""
    del per_sample
    ids = jnp.asarray(self.tokenize([self.prompt]))
    ctx = self.encode_text(params, frozen, ids)
    return {'context': jnp.broadcast_to(ctx, (batch_size,) + ctx.shape[1:])}

  def decode(self, frozen, z):
    return self.vae.apply({'params': frozen['vae']}, z / self.vae.scaling_factor, method='decode')

  def sampler_kwargs(self, sampler):
    """The folder's scheduler_config.json for `sampler` (steps_offset, spacing, final
    alpha, clip_sample), as `<Scheduler>.from_config`; options we do not implement are
    reported once each on stderr."""
    kw, notes = scheduler_kwargs(sampler, self.scheduler_config, self.sched)
    for note in notes:
      if note not in self._reported:
        self._reported.add(note)
        print(f'note: scheduler_config.json has {note}', file=sys.stderr)
    return kw

  def merged_params(self, params, frozen=None):
    """Base weights (`frozen`'s, default the loaded ones) with the LoRA folded in, for
    inference and export: only the adapted kernels are new arrays."""
    frozen = self._frozen if frozen is None else frozen
    out = {'unet': lora_lib.merge(frozen['unet'], params['unet_lora'], self.unet_scale),
           'text': frozen['text']}
    if 'text_lora' in params:
      out['text'] = lora_lib.merge(frozen['text'], params['text_lora'], self.text_scale)
    return out
