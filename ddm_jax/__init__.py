"""ddm_jax: the Debiasing Diffusion Model (arXiv 2503.12536) in JAX/Flax."""

__version__ = '0.1.0'
