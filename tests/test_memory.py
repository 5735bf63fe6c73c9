"""What keeps memory down, checked as behaviour (the figures are in BENCHMARKS.md):
sampling's merged weights share every leaf but the adapted kernels with the base they
came from, and the safetensors reader reads every dtype without leaving the file mapped."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import save_file

from ddm_jax.ddm import load_latent_ddm
from ddm_jax.errors import WeightsError
from ddm_jax.generation.prompts import inference_params
from ddm_jax.interop import diffusers
from ddm_jax.hostmem import release_host_memory
from tests.sd_helpers import perturbed, sd_config, tiny_folder


@pytest.fixture(scope='module')
def ddm(tmp_path_factory):
  return load_latent_ddm(sd_config(tiny_folder(tmp_path_factory.mktemp('memory')), **{
      'lora.train_text_encoder': 'True'}))


def test_merged_weights_share_the_base_they_came_from(ddm):
  """inference_params folds the LoRA into the `frozen` it is given (on a mesh: the
  replicated copy), not into the model's own loaded base: only the adapted kernels are
  new arrays, so sampling holds one copy of the base."""
  params = perturbed(ddm.init(jax.random.key(0)), 1)
  frozen = jax.tree_util.tree_map(jnp.copy, ddm.frozen())   # as if placed on a mesh
  _, merged = inference_params(ddm, params, frozen)
  adapted = {('unet',) + tuple(p.split('.')) + ('kernel',) for p in params['unet_lora']}
  adapted |= {('text',) + tuple(p.split('.')) + ('kernel',) for p in params['text_lora']}
  before, after = flatten_dict(frozen), flatten_dict(merged)
  assert before.keys() == after.keys()
  same = lambda a, b: a.unsafe_buffer_pointer() == b.unsafe_buffer_pointer()
  for path, leaf in after.items():
    if path in adapted:
      assert not same(leaf, before[path]) and not np.allclose(leaf, before[path]), path
    else:
      assert same(leaf, before[path]), path


def _write_safetensors(path, tensors):
  """The format written by hand (safetensors' numpy writer has no bfloat16)."""
  names = {np.dtype(np.float32): 'F32', np.dtype(np.float16): 'F16', np.dtype(np.int64): 'I64',
           np.dtype(ml_dtypes.bfloat16): 'BF16'}
  header, blobs, offset = {}, [], 0
  for key, value in tensors.items():
    raw = np.ascontiguousarray(value).tobytes()
    header[key] = {'dtype': names[np.asarray(value).dtype], 'shape': list(np.shape(value)),
                   'data_offsets': [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(len(text).to_bytes(8, 'little') + text + b''.join(blobs))


def _mapped(path):
  with open('/proc/self/maps', encoding='ascii', errors='replace') as f:
    return any(os.path.realpath(path) in line for line in f)


def test_safetensors_reader_reads_every_dtype_and_unmaps(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {'f32': rng.standard_normal((3, 4)).astype(np.float32),
             'f16': rng.standard_normal((5,)).astype(np.float16),
             'bf16': rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
             'i64': np.arange(6, dtype=np.int64).reshape(2, 3), 'scalar': np.float32(2.5),
             'empty': np.zeros((0, 3), np.float32)}
  path = str(tmp_path / 'w.safetensors')
  _write_safetensors(path, tensors)
  loaded = {}
  for key, _, load in diffusers._tensors({k: path for k in tensors}):  # pylint: disable=protected-access
    loaded[key] = load()
    assert not _mapped(path), 'the file is memory-mapped while it is read'
  for key, want in tensors.items():
    assert loaded[key].dtype == np.asarray(want).dtype and loaded[key].shape == np.shape(want), key
    np.testing.assert_array_equal(loaded[key], want)
  release_host_memory()   # harmless wherever it runs


def test_safetensors_reader_refuses_a_file_cut_inside_a_tensor(tmp_path):
  path = str(tmp_path / 'w.safetensors')
  save_file({'a': np.ones((64, 64), np.float32)}, path)
  os.truncate(path, os.path.getsize(path) - 100)
  with pytest.raises(WeightsError, match='cannot read safetensors header'):
    diffusers.read_header(path)
