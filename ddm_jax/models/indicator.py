"""The DDM indicator: an MLP that reads the UNet's predicted noise and outputs
group logits (reference: Flatten -> 1024 -> ReLU -> 512 -> ReLU -> K)."""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class Indicator(nn.Module):
  num_groups: int = 2
  hidden: Sequence[int] = (1024, 512)

  @nn.compact
  def __call__(self, eps_pred):
    x = eps_pred.reshape(eps_pred.shape[0], -1).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      x = nn.relu(nn.Dense(width, name=f'layers_{i}')(x))
    return nn.Dense(self.num_groups, name=f'layers_{len(self.hidden)}')(x)
