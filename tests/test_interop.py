"""Loading diffusers folders without PyTorch: layouts (single file, shards, variants,
legacy key names) and the errors for bad weights. Needs no torch: checkpoints are
written from our own params by tests/sd_folder.py."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ddm_jax.errors import WeightsError
from ddm_jax.interop import diffusers as interop

TEXT = 'text_encoder/model.safetensors'
VAE = 'vae/diffusion_pytorch_model.safetensors'


def edit(path, fn):
  """Rewrite a safetensors file through `fn(state_dict) -> state_dict`."""
  save_file(fn(load_file(str(path))), str(path))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_pipeline_loads_and_round_trips(tiny_sd):
  sd = interop.load_pipeline(tiny_sd)
  assert sd.scheduler_config['beta_schedule'] == 'scaled_linear'
  assert sd.unet.cross_attention_dim == sd.text_encoder.hidden_size
  ids = sd.tokenizer(['a photo of a human face', 'A CAT'])
  assert ids.shape == (2, 77) and ids.dtype == np.int32
  assert ids[0, 0] == sd.tokenizer.bos_token_id and ids[1, 3] == sd.tokenizer.eos_token_id
  # params -> PyTorch state dict -> file -> params is the identity
  state = load_file(os.path.join(tiny_sd, 'unet/diffusion_pytorch_model.safetensors'))
  exported = interop.params_to_state_dict(sd.unet_params)
  assert exported.keys() == state.keys()
  for k in state:
    np.testing.assert_array_equal(exported[k], state[k])
  assert 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight' in state
  assert 'time_embedding.linear_1.weight' in state


@pytest.mark.parametrize('half', [np.float16, ml_dtypes.bfloat16])
def test_component_folder_and_variant(pipe, half):
  # the component folder itself is accepted; a half-precision variant loads as float32
  # params (bfloat16, which numpy lacks, too)
  te = os.path.join(pipe, 'text_encoder')
  _, want = interop.load_text_encoder(te)
  state = load_file(os.path.join(te, 'model.safetensors'))
  save_file({k: v.astype(half) for k, v in state.items()}, os.path.join(te, 'model.half.safetensors'))
  _, got = interop.load_text_encoder(te, variant='half')
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-2, atol=1e-2)


def test_sharded_checkpoint(pipe):
  folder = os.path.join(pipe, 'vae')
  _, want = interop.load_vae(pipe)
  state = load_file(os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  os.remove(os.path.join(folder, 'diffusion_pytorch_model.safetensors'))
  keys = sorted(state)
  shards = {'diffusion_pytorch_model-00001-of-00002.safetensors': keys[::2],
            'diffusion_pytorch_model-00002-of-00002.safetensors': keys[1::2]}
  for name, part in shards.items():
    save_file({k: state[k] for k in part}, os.path.join(folder, name))
  index = os.path.join(folder, 'diffusion_pytorch_model.safetensors.index.json')
  with open(index, 'w') as f:
    json.dump({'metadata': {}, 'weight_map': {k: n for n, part in shards.items() for k in part}}, f)
  _, got = interop.load_vae(pipe)
  assert_trees_equal(got, want)

  os.remove(os.path.join(folder, 'diffusion_pytorch_model-00002-of-00002.safetensors'))
  with pytest.raises(WeightsError, match='00002-of-00002.safetensors.*not found'):
    interop.load_vae(pipe)


def test_legacy_names(pipe):
  """Old VAEs' query/key/value/proj_attn and transformers 4's `text_model.` prefix and
  position_ids buffer load like the current names."""
  _, want_vae = interop.load_vae(pipe)
  _, want_text = interop.load_text_encoder(pipe)
  old = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value', 'to_out.0': 'proj_attn'}

  def legacy_vae(state):
    out = {}
    for k, v in state.items():
      for new, legacy in old.items():
        k = k.replace(f'.attentions.0.{new}.', f'.attentions.0.{legacy}.')
      out[k] = v[:, :, None, None] if k.endswith('query.weight') else v  # conv-shaped, as very old ones
    assert 'encoder.mid_block.attentions.0.proj_attn.weight' in out
    return out

  edit(os.path.join(pipe, VAE), legacy_vae)
  edit(os.path.join(pipe, TEXT), lambda s: {
      **{f'text_model.{k}': v for k, v in s.items()},
      'text_model.embeddings.position_ids': np.arange(77, dtype=np.int64)[None]})
  assert_trees_equal(interop.load_vae(pipe)[1], want_vae)
  assert_trees_equal(interop.load_text_encoder(pipe)[1], want_text)


def _drop(key):
  def fn(state):
    del state[key]
    return state
  return fn


@pytest.mark.parametrize('change, message', [
    (_drop('encoder.layers.1.mlp.fc2.bias'),
     r"model\.safetensors: missing key 'encoder\.layers\.1\.mlp\.fc2\.bias'"),
    (_drop('embeddings.token_embedding.weight'), r"missing key 'embeddings\.token_embedding\.weight'"),
    (lambda s: {**s, 'encoder.layers.0.mlp.fc3.weight': np.zeros((2, 2), np.float32)},
     r"model\.safetensors: unexpected key 'encoder\.layers\.0\.mlp\.fc3\.weight'"),
    (lambda s: {**s, 'encoder.layers.0.self_attn.q_proj.weight': np.zeros((32, 31), np.float32)},
     r"model\.safetensors: 'encoder\.layers\.0\.self_attn\.q_proj\.weight' has shape \(32, 31\), "
     r"the model expects \(32, 32\)"),
])
def test_bad_text_encoder_weights(pipe, change, message):
  edit(os.path.join(pipe, TEXT), change)
  with pytest.raises(WeightsError, match=message):
    interop.load_text_encoder(pipe)


def test_bad_unet_weights(pipe):
  path = os.path.join(pipe, 'unet/diffusion_pytorch_model.safetensors')
  key = 'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight'
  edit(path, _drop(key))
  with pytest.raises(WeightsError, match=rf"diffusion_pytorch_model\.safetensors: missing key '{key}'"):
    interop.load_unet(pipe)
  edit(path, lambda s: {**s, key: np.zeros((32, 32, 1, 1), np.float32),
                        'conv_in.weight': np.zeros((32, 5, 3, 3), np.float32)})
  with pytest.raises(WeightsError, match=r"'conv_in\.weight' has shape \(32, 5, 3, 3\), "
                                         r"the model expects \(32, 4, 3, 3\)"):
    interop.load_unet(pipe)


def test_missing_files(pipe, tmp_path):
  os.remove(os.path.join(pipe, VAE))
  with pytest.raises(WeightsError, match='vae: no weights file'):
    interop.load_vae(pipe)
  open(os.path.join(pipe, 'vae', 'diffusion_pytorch_model.bin'), 'wb').close()
  with pytest.raises(WeightsError, match=r'only PyTorch \.bin/\.ckpt weights.*needs torch'):
    interop.load_vae(pipe)
  os.remove(os.path.join(pipe, 'text_encoder', 'config.json'))
  with pytest.raises(WeightsError, match=r'text_encoder/config\.json: file not found'):
    interop.load_text_encoder(pipe)
  for name in ('vocab.json', 'merges.txt'):
    os.remove(os.path.join(pipe, 'tokenizer', name))
  with pytest.raises(WeightsError, match='tokenizer: no tokenizer files'):
    interop.load_tokenizer(pipe)
  with pytest.raises(WeightsError, match=r'model_index\.json: file not found'):
    interop.load_pipeline(str(tmp_path / 'nowhere'))
  with pytest.raises(WeightsError, match=r'unet.*folder not found'):
    interop.load_unet(str(tmp_path / 'nowhere'))


def test_unsupported_config(pipe):
  cfg_path = os.path.join(pipe, 'unet', 'config.json')
  with open(cfg_path) as f:
    cfg = json.load(f)
  for key, value, pattern in [('resnet_time_scale_shift', 'scale_shift', 'resnet_time_scale_shift'),
                              ('down_block_types', ['SimpleCrossAttnDownBlock2D', 'DownBlock2D'],
                               'unsupported down block type'),
                              ('transformer_layers_per_block', [1, 2], 'per-block')]:
    with open(cfg_path, 'w') as f:
      json.dump({**cfg, key: value}, f)
    with pytest.raises(WeightsError, match=rf'unet/config\.json: .*{pattern}'):
      interop.load_unet(pipe)


def test_loading_needs_no_torch(tiny_sd):
  code = f"""
import sys
from ddm_jax.interop.diffusers import load_pipeline
sd = load_pipeline({tiny_sd!r})
sd.tokenizer('a photo')
heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]
assert not heavy, heavy
print('ok')
"""
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and 'ok' in out.stdout, out.stderr[-2000:]
