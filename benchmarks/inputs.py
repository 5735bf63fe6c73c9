"""The fixed inputs both frameworks get (numpy, NCHW as PyTorch takes them; JAX transposes)."""
import numpy as np


def train_batch(p):
  """{'latents' [B,C,H,W], 'context' [B,T,D], 'labels' [B] int64}: one fixed batch
  (data loading is outside the step on both sides)."""
  rng = np.random.default_rng(p.seed + 1)
  b, r, c = p.batch, p.latent, p.unet.get('in_channels', 4)
  return {'latents': rng.standard_normal((b, c, r, r), dtype=np.float32),
          'context': rng.standard_normal((b, p.context_len, p.unet['cross_attention_dim']),
                                         dtype=np.float32),
          'labels': rng.integers(0, p.num_groups, b).astype(np.int64)}


def sample_inputs(p):
  """{'x_T' [B,C,H,W], 'context' [2B,T,D] = [uncond; cond] as the pipeline concatenates}."""
  rng = np.random.default_rng(p.seed + 2)
  b, r, c = p.batch, p.latent, p.unet.get('in_channels', 4)
  return {'x_T': rng.standard_normal((b, c, r, r), dtype=np.float32),
          'context': rng.standard_normal((2 * b, p.context_len, p.unet['cross_attention_dim']),
                                         dtype=np.float32)}


def nhwc(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 2, 3, 1))


def nchw(a):
  return np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2))
