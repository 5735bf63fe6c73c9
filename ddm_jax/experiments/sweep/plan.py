"""What the sweep runs: the grid (`Plan`, `PRESETS`) and each cell's id, run name and config."""
import copy
import dataclasses
from typing import Tuple

from ddm_jax.errors import ConfigError


@dataclasses.dataclass
class Plan:
  ratios: Tuple[str, ...] = ('1:4', '1:1', '4:1', '9:1')
  alphas: Tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)
  seeds: Tuple[int, ...] = (0, 1, 2)
  num_steps: int = 800
  num_samples: int = 1000
  sampler: str = 'ddim'
  sample_steps: int = 25
  eta: float = 1.0                      # stochastic DDIM
  guided_ratios: Tuple[str, ...] = ('4:1', '9:1')
  guided_alphas: Tuple[float, ...] = (0.05,)
  scales: Tuple[float, ...] = (2.0, 4.0, 8.0)
  pseudo_ratios: Tuple[str, ...] = ('4:1', '9:1')
  pseudo_alpha: float = 0.05
  pseudo_scales: Tuple[float, ...] = (4.0,)
  pseudo_seeds: Tuple[int, ...] = (0, 1, 2)
  grad_clip: float = 0.0                # 0: none
  guidance_path: str = 'unet'           # 'unet' | 'x0' (ddm_jax.generation.guidance)
  eval_batch: int = 500


PRESETS = {
    'full': Plan(),
    # Sized for <= 20 minutes on 2 CPU cores.
    'quick': Plan(ratios=('4:1',), alphas=(0.0, 0.05), seeds=(0,), num_steps=300,
                  num_samples=400, sample_steps=25, guided_ratios=('4:1',),
                  guided_alphas=(0.05,), scales=(4.0,), pseudo_ratios=(),
                  pseudo_scales=(), pseudo_seeds=()),
}


def parse_ratio(text):
  """'4:1' -> (0.8, 0.2): group 0 : group 1 training shares."""
  try:
    parts = [float(v) for v in str(text).split(':')]
  except ValueError:
    raise ConfigError(f'ratio must look like 4:1, got {text!r}') from None
  if len(parts) < 2 or any(p <= 0 for p in parts):
    raise ConfigError(f'ratio must have >= 2 positive parts, got {text!r}')
  total = sum(parts)
  return tuple(p / total for p in parts)


def cell_id(kind, ratio, alpha, seed, scale=None, path='unet'):
  """The key of one evaluation in the results file (what a resumed sweep skips)."""
  base = f'{kind}/r{ratio}/a{alpha:g}/s{seed}'
  if scale is None:
    return base
  return f'{base}/S{scale:g}' + ('' if path == 'unet' else f'/{path}')


def run_name(ratio, alpha, seed, pseudo=False):
  """The workdir name of one trained model (shared by its unguided and guided cells)."""
  return f"r{ratio.replace(':', '-')}_a{alpha:g}_s{seed}" + ('_pseudo' if pseudo else '')


def cell_config(base, ratio, alpha, seed, num_steps, pseudo=False):
  """A copy of `base` for one model; `base` itself is left as it was."""
  c = copy.deepcopy(base)
  c.data.proportions = parse_ratio(ratio)
  c.loss.w_ind = float(alpha)
  c.loss.w_rec = 1.0 - float(alpha)
  c.train.seed = int(seed)
  c.train.num_steps = int(num_steps)
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, int(num_steps)))
  c.train.sample_every = 0  # the sweep evaluates afterwards; no extra sampler compile
  if pseudo:
    c.data.pseudo_labels = 'kmeans'
  return c
