"""One source example -> the model's input: float32 image in [-1, 1] and int32 label."""
import functools

import numpy as np
from PIL import Image

from ddm_jax.data import builders
from ddm_jax.data.common import get
from ddm_jax.errors import DataError


def preprocess(example, resolution, channels):
  """One example -> `{'image': float32 [R,R,C] in [-1,1], 'label': int32}` (train and eval)."""
  return {'image': to_model_image(example['image'], resolution, channels),
          'label': np.int32(example['label'])}


def to_model_image(image, resolution, channels):
  """uint8 [H,W,C] -> float32 [R,R,channels] in [-1,1]: PIL colour conversion and bilinear resize."""
  if channels not in (1, 3):
    raise DataError(f'data.channels must be 1 or 3, got {channels}')
  pil = Image.fromarray(np.ascontiguousarray(image[..., 0] if image.shape[-1] == 1 else image))
  pil = builders.resize_square(pil.convert('L' if channels == 1 else 'RGB'), resolution)
  array = np.asarray(pil, dtype=np.float32)
  array = array[..., None] if channels == 1 else array
  return array / 127.5 - 1.0


def preprocess_fn(data_cfg):
  """`preprocess` bound to `data.resolution` and `data.channels`."""
  return functools.partial(preprocess, resolution=int(get(data_cfg, 'resolution')),
                           channels=int(get(data_cfg, 'channels', 3)))
