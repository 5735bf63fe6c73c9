"""Tiny Stable Diffusion folders in diffusers layout, written without PyTorch, for tests
that need a pipeline to load (interop, LoRA, samplers, CLIs)."""
import json
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import save_file

from ddm_jax.files import write_json
from ddm_jax.interop.diffusers import expected_params, params_to_state_dict
from ddm_jax.models.text_encoder import text_encoder_from_config
from ddm_jax.models.unet import unet_from_config
from ddm_jax.models.vae import vae_from_config

WORDS = ('a', 'photo', 'of', 'human', 'face', 'the', 'cat', 'digit', 'zero', 'one')

TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=[32, 64],
                 layers_per_block=1, down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
                 up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D'], attention_head_dim=4,
                 cross_attention_dim=32, norm_num_groups=8)
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[16, 32], layers_per_block=1,
                down_block_types=['DownEncoderBlock2D'] * 2, up_block_types=['UpDecoderBlock2D'] * 2,
                latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=0.18215)
TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=77, hidden_act='quick_gelu', layer_norm_eps=1e-5)
SD_SCHEDULER = dict(_class_name='PNDMScheduler', beta_start=0.00085, beta_end=0.012,
                    beta_schedule='scaled_linear', num_train_timesteps=1000, set_alpha_to_one=False,
                    skip_prk_steps=True, steps_offset=1, clip_sample=False, prediction_type='epsilon')


def _bytes_to_unicode():
  """GPT-2/CLIP's reversible byte -> printable character table."""
  bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(
      range(ord('®'), ord('ÿ') + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return [chr(c) for _, c in sorted(zip(bs, cs))]


def write_clip_vocab(folder: str, words: Sequence[str] = WORDS, pad_token: str = '<|endoftext|>',
                     model_max_length: int = 77) -> int:
  """A CLIP-layout BPE vocabulary (bytes, bytes + `</w>`, merges that spell `words`,
  then the two special tokens) with merges.txt and tokenizer_config.json.
  Returns the vocabulary size."""
  chars = _bytes_to_unicode()
  vocab = chars + [c + '</w>' for c in chars]
  merges = []
  for word in words:
    symbols = list(word[:-1]) + [word[-1] + '</w>']
    while len(symbols) > 1:
      merge = (symbols[0], symbols[1])
      if merge not in merges:
        merges.append(merge)
        vocab.append(''.join(merge))
      symbols = [''.join(merge)] + symbols[2:]
  vocab += ['<|startoftext|>', '<|endoftext|>']
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'vocab.json'), 'w', encoding='utf-8') as f:
    json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
  with open(os.path.join(folder, 'merges.txt'), 'w', encoding='utf-8') as f:
    f.write('#version: 0.2\n' + ''.join(f'{a} {b}\n' for a, b in merges))
  write_json(os.path.join(folder, 'tokenizer_config.json'), dict(
      model_max_length=model_max_length, bos_token='<|startoftext|>', eos_token='<|endoftext|>',
      unk_token='<|endoftext|>', pad_token=pad_token, tokenizer_class='CLIPTokenizer'))
  return len(vocab)


def random_params(module, seed, *inputs):
  """Random params of the module's shapes, drawn with numpy: `module.init` compiles one
  RNG kernel per parameter, which costs tens of seconds on a small CPU. Kernels and
  embeddings ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2):
  nothing is zero, so a wrong mapping cannot hide behind a zero init."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in expected_params(module, *inputs).items():
    shape = leaf.shape
    if path[-1] in ('kernel', 'embedding'):
      fan_in = int(np.prod(shape[:-1])) if path[-1] == 'kernel' else shape[-1]
      value = rng.normal(0, fan_in ** -0.5, shape)
    else:
      value = (path[-1] == 'scale') + 0.1 * rng.normal(size=shape)
    out[path] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(out)


def write_model(folder: str, config: dict, params, weights_name: str):
  """config.json + one safetensors file of `params` in PyTorch layout."""
  os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(folder, 'config.json'), config)
  save_file(params_to_state_dict(params), os.path.join(folder, weights_name))


def write_tiny_pipeline(folder: str, seed: int = 0, unet=None, vae=None, text=None) -> str:
  """A random tiny StableDiffusionPipeline folder; config overrides merge into TINY_*."""
  unet_cfg = {**TINY_UNET, **(unet or {})}
  vae_cfg = {**TINY_VAE, **(vae or {})}
  vocab_size = write_clip_vocab(os.path.join(folder, 'tokenizer'))
  text_cfg = {**TINY_TEXT, 'vocab_size': vocab_size, 'eos_token_id': vocab_size - 1,
              'bos_token_id': vocab_size - 2, **(text or {})}
  u = unet_from_config(unet_cfg)
  s = unet_cfg['sample_size']
  u_params = random_params(u, seed, jnp.zeros((1, s, s, unet_cfg['in_channels'])), jnp.zeros((1,)),
                           jnp.zeros((1, 1, unet_cfg['cross_attention_dim'])))
  v = vae_from_config(vae_cfg)
  v_params = random_params(v, seed + 1, jnp.zeros((1, 8, 8, vae_cfg['in_channels'])))
  t = text_encoder_from_config(text_cfg)
  t_params = random_params(t, seed + 2, jnp.zeros((1, 4), jnp.int32))
  write_model(os.path.join(folder, 'unet'), {'_class_name': 'UNet2DConditionModel', **unet_cfg},
              u_params, 'diffusion_pytorch_model.safetensors')
  write_model(os.path.join(folder, 'vae'), {'_class_name': 'AutoencoderKL', **vae_cfg},
              v_params, 'diffusion_pytorch_model.safetensors')
  write_model(os.path.join(folder, 'text_encoder'),
              {'architectures': ['CLIPTextModel'], 'model_type': 'clip_text_model', **text_cfg},
              t_params, 'model.safetensors')
  os.makedirs(os.path.join(folder, 'scheduler'), exist_ok=True)
  write_json(os.path.join(folder, 'scheduler', 'scheduler_config.json'), SD_SCHEDULER)
  write_json(os.path.join(folder, 'model_index.json'), {
      '_class_name': 'StableDiffusionPipeline', 'unet': ['diffusers', 'UNet2DConditionModel'],
      'vae': ['diffusers', 'AutoencoderKL'], 'text_encoder': ['transformers', 'CLIPTextModel'],
      'tokenizer': ['transformers', 'CLIPTokenizer'], 'scheduler': ['diffusers', 'PNDMScheduler'],
      'safety_checker': [None, None], 'feature_extractor': [None, None]})
  return folder
