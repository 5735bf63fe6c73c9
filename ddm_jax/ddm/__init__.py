"""DDM models: the protocol (`DDM`), its pixel and latent (Stable Diffusion) kinds, and
`build_ddm(config)`, the one place that decides which a config asks for."""
import jax.numpy as jnp

from ddm_jax.config import is_latent
from ddm_jax.ddm.latent import LatentDDM
from ddm_jax.ddm.pixel import PixelDDM
from ddm_jax.ddm.protocol import DDM
from ddm_jax.interop.diffusers import load_pipeline


def load_latent_ddm(config):
  """A LatentDDM on the diffusers folder `config.model.pretrained` (read with numpy)."""
  dtype = jnp.dtype(config.model.get('dtype', 'float32'))
  return LatentDDM(config, load_pipeline(config.model.pretrained, dtype=dtype))


def build_ddm(config):
  """Stable Diffusion + LoRA when `model.pretrained` names a folder, else pixel space."""
  return load_latent_ddm(config) if is_latent(config) else PixelDDM(config)


__all__ = ['DDM', 'PixelDDM', 'LatentDDM', 'build_ddm', 'load_latent_ddm']
