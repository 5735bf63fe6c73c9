"""Export a trained latent DDM for PyTorch users: peft LoRA adapters and the indicator.

    python export.py --workdir=runs/sd --output=exported

writes

    OUT/unet_lora/adapter_model.safetensors, adapter_config.json          (peft format)
    OUT/text_encoder_lora/adapter_model.safetensors, adapter_config.json  (when trained)
    OUT/pytorch_lora_weights.safetensors     (the same adapters in diffusers' single-file
                                              format, for `pipe.load_lora_weights(OUT)`)
    OUT/indicator.safetensors + indicator.json
    OUT/export.json                          (what was exported, from which checkpoint)

peft format: keys `base_model.model.<torch module path>.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r] (our A is [in, r], B [r, out]: transposed), and an
`adapter_config.json` with r, lora_alpha, target_modules, lora_dropout, peft_type LORA.
Load with `PeftModel.from_pretrained(unet, OUT/'unet_lora')` (then `merge_and_unload()`
for a plain model), or `unet.load_lora_adapter(OUT/'unet_lora', prefix=None)`.

The indicator is written with the reference implementation's names (`fc1`, `fc2`, ...,
torch `nn.Linear` layout, ReLU between layers) for an input that is the UNet's predicted
noise in PyTorch's NCHW layout flattened by `nn.Flatten` (ours flattens NHWC: the first
layer's input rows are permuted accordingly).
"""
import json
import os
from typing import Dict, Sequence

import jax
import numpy as np
from safetensors.numpy import save_file

from ddm_jax.errors import ConfigError
from ddm_jax.files import write_json
from ddm_jax.interop.diffusers import path_to_torch_key

PEFT_PREFIX = 'base_model.model.'


def module_path(flax_path: str) -> str:
  """'down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q' ->
  'down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q' (the torch module)."""
  key = path_to_torch_key(tuple(flax_path.split('.')) + ('kernel',))
  return key[:-len('.weight')]


def lora_state_dict(lora, prefix: str = PEFT_PREFIX) -> Dict[str, np.ndarray]:
  """{flax path: {'lora_A': [in, r] or [kh, kw, in, r], 'lora_B': [r, out]}} -> peft
  tensors (float32): [r, in] and [out, r], or for a convolution torch's Conv2d layout,
  [r, in, kh, kw] and the 1x1 [out, r, 1, 1]."""
  out = {}
  for path, ab in sorted(lora.items()):
    name = prefix + module_path(path)
    a, b = np.asarray(ab['lora_A'], np.float32), np.asarray(ab['lora_B'], np.float32)
    a, b = (a.transpose(3, 2, 0, 1), b.T[:, :, None, None]) if a.ndim == 4 else (a.T, b.T)
    out[f'{name}.lora_A.weight'] = np.ascontiguousarray(a)
    out[f'{name}.lora_B.weight'] = np.ascontiguousarray(b)
  return out


def _number(x):
  x = float(x)
  return int(x) if x.is_integer() else x


def adapter_config(rank, alpha, target_modules: Sequence[str], dropout=0.0, base_model=None):
  """peft's LoraConfig fields for a plain LoRA (no DoRA, rsLoRA, bias or patterns)."""
  return {
      'peft_type': 'LORA', 'task_type': None, 'r': int(rank), 'lora_alpha': _number(alpha),
      'target_modules': sorted(target_modules), 'lora_dropout': float(dropout), 'bias': 'none',
      'fan_in_fan_out': False, 'init_lora_weights': True, 'use_rslora': False, 'use_dora': False,
      'modules_to_save': None, 'layers_to_transform': None, 'layers_pattern': None,
      'rank_pattern': {}, 'alpha_pattern': {}, 'inference_mode': True,
      'base_model_name_or_path': base_model,
  }


def _check_rank(lora, rank, where):
  for path, ab in lora.items():
    if ab['lora_A'].shape[-1] != rank or ab['lora_B'].shape[0] != rank:
      raise ConfigError(f'{where}: adapter {path!r} has rank {ab["lora_A"].shape[-1]}, '
                       f'the config says {rank}')


def write_peft_adapter(folder, lora, rank, alpha, target_modules, dropout=0.0, base_model=None):
  """OUT/adapter_model.safetensors + adapter_config.json (what `PeftModel.save_pretrained`
  writes)."""
  _check_rank(lora, rank, folder)
  os.makedirs(folder, exist_ok=True)
  save_file(lora_state_dict(lora), os.path.join(folder, 'adapter_model.safetensors'),
            metadata={'format': 'pt'})
  write_json(os.path.join(folder, 'adapter_config.json'),
              adapter_config(rank, alpha, target_modules, dropout, base_model))


def write_diffusers_lora(path, adapters):
  """diffusers' single-file LoRA (what `StableDiffusionPipeline.save_lora_weights` writes):
  keys `unet.<module>.lora_A.weight` / `text_encoder.<module>...`, and the adapter
  configs (rank, alpha, targets) in the safetensors metadata so that the loader uses
  alpha / r. `adapters`: {'unet' | 'text_encoder': (lora, rank, alpha, targets, dropout)}."""
  tensors, meta = {}, {}
  for component, (lora, rank, alpha, targets, dropout) in adapters.items():
    tensors.update(lora_state_dict(lora, prefix=component + '.'))
    for k, v in adapter_config(rank, alpha, targets, dropout).items():
      meta[f'{component}.{k}'] = v
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  save_file(tensors, path, metadata={'format': 'pt',
                                     'lora_adapter_metadata': json.dumps(meta, sort_keys=True)})


def indicator_state_dict(params, eps_shape) -> Dict[str, np.ndarray]:
  """Our Indicator params ({'layers_i': {'kernel', 'bias'}}) -> the reference's
  `fc{i+1}.weight` [out, in] / `.bias`, first layer reading NCHW-flattened input."""
  h, w, c = eps_shape
  n = len(params)
  out = {}
  for i in range(n):
    layer = params[f'layers_{i}']
    kernel = np.asarray(layer['kernel'], np.float32)
    if i == 0:
      if kernel.shape[0] != h * w * c:
        raise ConfigError(f'indicator input has {kernel.shape[0]} features, eps shape {eps_shape} '
                         f'gives {h * w * c}')
      kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(c * h * w, -1)
    out[f'fc{i + 1}.weight'] = np.ascontiguousarray(kernel.T)
    out[f'fc{i + 1}.bias'] = np.asarray(layer['bias'], np.float32)
  return out


def indicator_description(params, eps_shape):
  h, w, c = eps_shape
  n = len(params)
  layers = []
  for i in range(n):
    k = params[f'layers_{i}']['kernel']
    layers.append({'name': f'fc{i + 1}', 'type': 'Linear', 'in_features': int(k.shape[0]),
                   'out_features': int(k.shape[1]), 'activation': 'relu' if i < n - 1 else None})
  return {
      'format': 'ddm_jax indicator (torch nn.Linear layout)',
      'input': "the UNet's predicted noise [B, C, H, W] (NCHW), flattened by nn.Flatten",
      'input_shape_chw': [int(c), int(h), int(w)],
      'num_groups': int(params[f'layers_{n - 1}']['kernel'].shape[1]),
      'layers': layers,
      'forward': 'x = flatten(eps); x = relu(fc1(x)); ...; logits = fc_last(x)',
      'reference': 'chun61205/DebiasingDiffusionModel src/ddm/models/indicator.py '
                   '(Indicator(size): fc1, fc2, fc3)',
  }


def write_indicator(folder, params, eps_shape):
  os.makedirs(folder, exist_ok=True)
  save_file(indicator_state_dict(params, eps_shape), os.path.join(folder, 'indicator.safetensors'),
            metadata={'format': 'pt'})
  write_json(os.path.join(folder, 'indicator.json'), indicator_description(params, eps_shape))


def export_latent_ddm(ddm, params, out, extra=None):
  """Write every export of a LatentDDM's trained `params` into folder `out`; returns the
  list of written files (relative)."""
  params = _to_numpy(params)
  lc = ddm.config.lora
  base = ddm.config.model.get('pretrained') or None
  written, adapters = [], {}
  unet = (params['unet_lora'], lc.unet_rank, lc.unet_alpha, tuple(lc.unet_targets), lc.dropout)
  write_peft_adapter(os.path.join(out, 'unet_lora'), *unet, base_model=base)
  adapters['unet'] = unet
  written += ['unet_lora/adapter_model.safetensors', 'unet_lora/adapter_config.json']
  if 'text_lora' in params:
    text = (params['text_lora'], lc.text_rank, lc.text_alpha, tuple(lc.text_targets), lc.dropout)
    write_peft_adapter(os.path.join(out, 'text_encoder_lora'), *text, base_model=base)
    adapters['text_encoder'] = text
    written += ['text_encoder_lora/adapter_model.safetensors',
                'text_encoder_lora/adapter_config.json']
  write_diffusers_lora(os.path.join(out, 'pytorch_lora_weights.safetensors'), adapters)
  written.append('pytorch_lora_weights.safetensors')
  write_indicator(out, params['indicator'], ddm.eps_shape)
  written += ['indicator.safetensors', 'indicator.json']
  write_json(os.path.join(out, 'export.json'), {
      'pretrained': base, 'files': written, 'prompt': ddm.prompt,
      'unet_lora': {'r': lc.unet_rank, 'lora_alpha': _number(lc.unet_alpha),
                    'target_modules': list(lc.unet_targets)},
      'text_encoder_lora': ({'r': lc.text_rank, 'lora_alpha': _number(lc.text_alpha),
                             'target_modules': list(lc.text_targets)}
                            if 'text_lora' in params else None),
      **(extra or {})})
  return written


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))
