"""The DDM indicator: an MLP that reads the UNet's predicted noise and outputs
group logits (reference: Flatten -> 1024 -> ReLU -> 512 -> ReLU -> K).

With `input='x_t'` the same MLP is a noise-aware classifier in the sense of
classifier guidance (Dhariwal & Nichol 2021): it reads the noisy input x_t,
flattened and concatenated with a sinusoidal embedding of the timestep t, instead
of the predicted noise.

Initialisation (`weight_init`, config indicator.init): 'torch' (the default) is PyTorch's
`nn.Linear` default, as the reference builds its indicator: weight and bias uniform in
+-1/sqrt(fan_in). It sets how
hard the cross-entropy term pulls on the UNet at a given alpha: Flax's default ('flax',
lecun-normal weights, zero bias) gives initial logits and a CE gradient at the predicted
noise several times the reference's, so alpha would not mean the paper's alpha."""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ddm_jax.models.unet import timestep_embedding

INPUTS = ('eps', 'x_t')
INITS = ('torch', 'flax')


def torch_linear_init(fan_in):
  """(kernel_init, bias_init) of PyTorch's nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
  for both (kaiming_uniform with a = sqrt(5) is exactly that bound for the weight)."""
  bound = fan_in ** -0.5

  def uniform(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return uniform, uniform


class Indicator(nn.Module):
  num_groups: int = 2
  hidden: Sequence[int] = (1024, 512)
  input: str = 'eps'      # 'eps': the predicted noise; 'x_t': the noisy input and t
  t_dim: int = 128        # width of the timestep embedding (input 'x_t' only)
  weight_init: str = 'torch'   # 'torch': nn.Linear's default (the reference); 'flax': Dense's

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
    widths = tuple(self.hidden) + (self.num_groups,)
    for i, width in enumerate(widths):
      x = self._dense(width, x.shape[-1], f'layers_{i}')(x)
      if i < len(widths) - 1:
        x = nn.relu(x)
    return x

  def _dense(self, width, fan_in, name):
    if self.weight_init == 'flax':
      return nn.Dense(width, name=name)
    if self.weight_init != 'torch':
      raise ValueError(f'unknown indicator init {self.weight_init!r}, expected one of {INITS}')
    kernel_init, bias_init = torch_linear_init(fan_in)
    return nn.Dense(width, kernel_init=kernel_init, bias_init=bias_init, name=name)


def indicator_from_config(config):
  """The indicator of `config` (data.num_groups, indicator.hidden/input/init)."""
  ic = config.indicator
  return Indicator(config.data.num_groups, tuple(ic.hidden), input=ic.get('input', 'eps'),
                   weight_init=ic.get('init', 'torch'))
