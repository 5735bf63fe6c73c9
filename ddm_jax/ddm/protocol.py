"""The DDM protocol: everything training, generation and evaluation may ask of a model.

A DDM wires a denoising network, the indicator and a noise schedule. The train step
(`training/step.py`), the samplers (`generation/`) and the evaluation only call what is
declared here, so a new model kind (pixel, latent Stable Diffusion, the benchmarks'
preset models, test doubles) subclasses `DDM` and fills in the two abstract methods;
the defaults are those of a pixel-space model without conditioning.

Attributes every DDM sets: `sched` (diffusion.schedules.Schedule), `sample_shape` (one
sampler input, HWC) and `eps_shape` (the network output the indicator reads, HWC).
"""
import abc

import jax.numpy as jnp


class DDM(abc.ABC):
  latent = False        # True: samples live in a VAE latent space (Stable Diffusion)
  num_class_embeds = 0  # > 0: the network is conditioned on the group label (an upper bound)

  @abc.abstractmethod
  def init(self, rng):
    """Trainable parameters (a pytree), e.g. {'unet': ..., 'indicator': ...}."""

  def frozen(self):
    """Parameters used but never trained or checkpointed (the SD base weights)."""
    return {}

  def host_features(self, example):
    """Extra per-example features (a dict) computed in the data pipeline, on the host."""
    del example
    return {}

  def prepare_batch(self, frozen, batch, rng):
    """A data batch -> (x0, group labels, conditioning kwargs for model_fn)."""
    cond = {'class_labels': batch['label']} if self.num_class_embeds else {}
    return batch['image'], batch['label'], cond

  @abc.abstractmethod
  def model_fn(self, params, frozen, x_t, t, **cond):
    """The network output (predicted noise, or v) at x_t, t."""

  @property
  def indicator_input(self):
    """What the indicator reads: 'eps' (the predicted noise, DDM's indicator) or 'x_t'
    (the noisy input and the timestep: a noise-aware classifier, config indicator.input)."""
    return getattr(getattr(self, 'indicator', None), 'input', 'eps')

  def indicator_fn(self, params, eps_pred, x_t, t):
    """Group logits [B, K] (`self.indicator` on params['indicator']) from the predicted
    noise `eps_pred` at (x_t, t); an 'x_t' indicator reads x_t and t instead. Callers
    pass all three, so either kind plugs into training, guidance and evaluation."""
    return self.indicator.apply({'params': params['indicator']}, eps_pred, x_t, t)

  def init_indicator(self, rng):
    """Fresh params['indicator'] for `self.indicator`, on dummy inputs of this model's shapes."""
    return self.indicator.init(rng, jnp.zeros((1,) + tuple(self.eps_shape)),
                               jnp.zeros((1,) + tuple(self.sample_shape)),
                               jnp.zeros((1,), jnp.int32))['params']

  def sample_cond(self, params, frozen, batch_size, **per_sample):
    """Conditioning for a batch of samples (none here; the prompt's embedding for SD)."""
    return {}

  def decode(self, frozen, x):
    """Sampler output -> images in [-1, 1] (identity here; the VAE decoder for SD)."""
    return x

  def sampler_kwargs(self, sampler):
    """Keyword arguments for sampler `sampler` (diffusion.samplers) that this model needs:
    pixel models clip the x0 estimate to the data range, as diffusers' clip_sample does."""
    del sampler
    return {'clip_x0': 1.0}

