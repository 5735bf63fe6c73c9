"""Images in [-1, 1] NHWC -> uint8, PNG files and grids (PIL; no TensorFlow)."""
import math
import os

import numpy as np
from PIL import Image

from ddm_jax.files import atomic_path


def to_uint8(images):
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def _pil(img_u8):
  return Image.fromarray(img_u8[..., 0] if img_u8.shape[-1] == 1 else img_u8)


def make_grid(images, ncols=None, pad=1, upscale=1):
  """[N,H,W,C] in [-1,1] -> one uint8 grid image [H', W', C]."""
  u8 = to_uint8(images)
  n, h, w, c = u8.shape
  ncols = ncols or math.ceil(math.sqrt(n))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = u8[i]
  if upscale > 1:
    grid = np.repeat(np.repeat(grid, upscale, 0), upscale, 1)
  return grid


def save_png(path, img_u8):
  """Write atomically: a killed run leaves no half-written PNG under the final name."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with atomic_path(path) as tmp:
    _pil(img_u8).save(tmp, format='PNG')


def save_grid(path, images, ncols=None, upscale=None):
  h = np.asarray(images).shape[1]
  save_png(path, make_grid(images, ncols, upscale=upscale or max(1, 64 // h)))
