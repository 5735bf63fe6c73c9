"""The DDM indicator: an MLP that reads the UNet's predicted noise and outputs
group logits (reference: Flatten -> 1024 -> ReLU -> 512 -> ReLU -> K).

With `input='x_t'` the same MLP is a noise-aware classifier in the sense of
classifier guidance (Dhariwal & Nichol 2021): it reads the noisy input x_t,
flattened and concatenated with a sinusoidal embedding of the timestep t, instead
of the predicted noise."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from ddm_jax.models.unet import timestep_embedding

INPUTS = ('eps', 'x_t')


class Indicator(nn.Module):
  num_groups: int = 2
  hidden: Sequence[int] = (1024, 512)
  input: str = 'eps'      # 'eps': the predicted noise; 'x_t': the noisy input and t
  t_dim: int = 128        # width of the timestep embedding (input 'x_t' only)

  @nn.compact
  def __call__(self, eps_pred, x_t=None, t=None):
    if self.input == 'x_t':
      if x_t is None or t is None:
        raise ValueError("an indicator with input 'x_t' needs x_t and t")
      x = x_t.reshape(x_t.shape[0], -1).astype(jnp.float32)
      t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
      x = jnp.concatenate([x, timestep_embedding(t, self.t_dim, flip_sin_to_cos=True,
                                                 freq_shift=0)], axis=-1)
    elif self.input == 'eps':
      x = eps_pred.reshape(eps_pred.shape[0], -1).astype(jnp.float32)
    else:
      raise ValueError(f'unknown indicator input {self.input!r}, expected one of {INPUTS}')
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'layers_{i}')(x))
    return nn.Dense(self.num_groups, name=f'layers_{len(self.hidden)}')(x)
