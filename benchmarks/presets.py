"""Named benchmark configurations and their parsing. Pure Python: no jax, no torch.

A preset spec on the command line is a name with optional `:key=value` overrides,
`sd15-lora-32:batch=2:steps=5`, `small:unet.layers_per_block=2`, `tiny-lora:lora.r=2`,
`sd15-lora-32:lora=None`; values are Python literals (a bare word is a string). The
orchestrator hands the spec string itself to each worker process.
"""
import ast
import dataclasses
from typing import Any, Dict, Optional, Tuple

# diffusers UNet2DConditionModel kwargs (our UNet reads the same keys).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
    up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,
    attention_head_dim=8, cross_attention_dim=768, norm_num_groups=32)

SMALL_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 256),
    layers_per_block=1,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    attention_head_dim=8, cross_attention_dim=256, norm_num_groups=32)

# For tests: compiles in seconds on 2 cores, still has every block kind of the SD UNet.
TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64),
    layers_per_block=1, down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8)

PUBLISHED_LORA = dict(r=8, alpha=32.0, targets=('to_q', 'to_v'))

# The published run's optimisation (DESIGN.md section 1), the same on both sides.
OPTIM = dict(lr=1e-5, b1=0.9, b2=0.999, weight_decay=1e-2, eps=1e-8, clip_value=1.0)
LOSS = dict(w_rec=0.95, w_ind=0.05)
SCHEDULE = dict(beta_schedule='scaled_linear', beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)


@dataclasses.dataclass(frozen=True)
class Preset:
  name: str
  kind: str                      # 'train' (one DDM train step) | 'sample' (a CFG sampling run)
  unet: Dict[str, Any]           # diffusers UNet2DConditionModel kwargs
  latent: int                    # latent side: inputs are [batch, latent, latent, in_channels]
  batch: int                     # global batch (images per step / per sampling run)
  lora: Optional[Dict[str, Any]] = None   # None: full fine-tune of UNet + indicator
  dtype: str = 'float32'         # compute dtype (params stay float32); bfloat16 -> autocast in torch
  context_len: int = 77          # text-embedding tokens (CLIP's 77)
  indicator_hidden: Tuple[int, ...] = (1024, 512)
  num_groups: int = 2
  steps: int = 10                # timed steps (train) or timed runs (sample) per process
  warmup: int = 2                # untimed steps after compilation (the first one is reported)
  sample_steps: int = 40
  guidance_scale: float = 7.5
  seed: int = 0
  accelerator: bool = False      # meant for a GPU; runs on CPU only when asked (--allow-cpu)
  note: str = ''

  @property
  def images_per_step(self):
    return self.batch

  def describe(self):
    return {'preset': self.name, 'kind': self.kind, 'batch': self.batch,
            'latent': [self.latent, self.latent, self.unet.get('in_channels', 4)],
            'lora': dict(self.lora) if self.lora else None, 'dtype': self.dtype,
            'sample_steps': self.sample_steps if self.kind == 'sample' else None}


PRESETS = {p.name: p for p in [
    Preset('small', 'train', SMALL_UNET, latent=8, batch=16, steps=10,
           note='full fine-tune of a small SD-shaped UNet + indicator'),
    Preset('sd15-lora-32', 'train', SD15_UNET, latent=4, batch=1, lora=PUBLISHED_LORA, steps=6,
           note='SD-1.5 UNet (random init), 32x32 images, the published example'),
    Preset('sd15-lora-512', 'train', SD15_UNET, latent=64, batch=8, lora=PUBLISHED_LORA,
           dtype='bfloat16', steps=10, warmup=3, accelerator=True,
           note='SD-1.5 at 512x512 (64x64 latents), bf16 compute: for an accelerator'),
    Preset('sample-small', 'sample', SMALL_UNET, latent=8, batch=16, steps=2, warmup=1,
           note='40 DDIM steps with CFG 7.5 (UNet on 2B), no VAE'),
    Preset('sample-sd15-32', 'sample', SD15_UNET, latent=4, batch=2, steps=2, warmup=1,
           note='SD-1.5 UNet, 4x4 latents, 40 DDIM steps with CFG 7.5, no VAE'),
    Preset('sample-sd15-512', 'sample', SD15_UNET, latent=64, batch=4, dtype='bfloat16', steps=3,
           warmup=1, accelerator=True,
           note='SD-1.5 UNet, 64x64 latents, bf16, 40 DDIM steps with CFG 7.5: for an accelerator'),
    # test presets (tests/test_benchmarks.py, smoke runs)
    Preset('tiny', 'train', TINY_UNET, latent=8, batch=2, context_len=5, indicator_hidden=(32, 16),
           steps=3, warmup=1),
    Preset('tiny-lora', 'train', TINY_UNET, latent=8, batch=2, context_len=5,
           indicator_hidden=(32, 16), lora=dict(r=4, alpha=8.0, targets=('to_q', 'to_v')),
           steps=3, warmup=1),
    Preset('tiny-sample', 'sample', TINY_UNET, latent=8, batch=2, context_len=5, sample_steps=4,
           steps=2, warmup=1),
]}

DEFAULT_CPU = ('small', 'sd15-lora-32', 'sample-small', 'sample-sd15-32')
DEFAULT_GPU = ('sd15-lora-512', 'small', 'sd15-lora-32', 'sample-sd15-512')

_FIELDS = {f.name: f for f in dataclasses.fields(Preset)}
_NOT_OVERRIDABLE = ('name', 'kind')


class PresetError(ValueError):
  pass


def _literal(raw):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw   # a bare word such as bfloat16


def parse_preset(spec: str) -> Preset:
  """'name' or 'name:key=value:key=value' -> Preset. Unknown names/keys and badly typed
  values raise PresetError naming them; `unet.KEY=VALUE` overrides one UNet kwarg."""
  name, *parts = spec.strip().split(':')
  if name not in PRESETS:
    raise PresetError(f'unknown preset {name!r}; known: {", ".join(PRESETS)}')
  base = PRESETS[name]
  changes, unet = {}, dict(base.unet)
  for part in parts:
    key, eq, raw = part.partition('=')
    if not eq or not key:
      raise PresetError(f'{spec!r}: override {part!r} is not key=value')
    value = _literal(raw)
    if key.startswith('unet.'):
      unet[key[5:]] = tuple(value) if isinstance(value, list) else value
      continue
    if key.startswith('lora.'):
      if changes.get('lora', base.lora) is None:
        raise PresetError(f'{spec!r}: {key} given but the preset has no LoRA')
      lora = dict(changes.get('lora', base.lora))
      lora[key[5:]] = tuple(value) if isinstance(value, list) else value
      changes['lora'] = lora
      continue
    if key not in _FIELDS or key in _NOT_OVERRIDABLE or key == 'unet':
      raise PresetError(f'{spec!r}: unknown or fixed preset key {key!r}')
    old = getattr(base, key)
    if key == 'lora' and value in (None, 'none', 'None'):
      value = None
    elif isinstance(old, bool):
      if not isinstance(value, bool):
        raise PresetError(f'{spec!r}: {key} must be True or False, got {raw!r}')
    elif isinstance(old, float) and isinstance(value, int):
      value = float(value)
    elif isinstance(old, tuple) and isinstance(value, (list, tuple)):
      value = tuple(value)
    if old is not None and value is not None and type(value) is not type(old):
      raise PresetError(f'{spec!r}: {key} expects {type(old).__name__}, got {raw!r}')
    changes[key] = value
  preset = dataclasses.replace(base, unet=unet, **changes)
  validate(preset, spec)
  return preset


def validate(p: Preset, spec=''):
  where = spec or p.name
  if p.batch < 1 or p.steps < 1 or p.warmup < 1 or p.latent < 1:
    raise PresetError(f'{where}: batch, steps, warmup and latent must be >= 1')
  if p.dtype not in ('float32', 'bfloat16'):
    raise PresetError(f'{where}: dtype must be float32 or bfloat16, got {p.dtype!r}')
  if len(p.unet['down_block_types']) != len(p.unet['block_out_channels']):
    raise PresetError(f'{where}: one down block type per block_out_channels entry')
  if p.lora is not None and not {'r', 'alpha', 'targets'} <= set(p.lora):
    raise PresetError(f'{where}: lora needs r, alpha and targets')
  return p


def parse_presets(specs) -> Tuple[Preset, ...]:
  """A list of specs (or one string of specs separated by spaces or commas)."""
  if isinstance(specs, str):
    specs = specs.replace(',', ' ').split()
  presets = tuple(parse_preset(s) for s in specs)
  if not presets:
    raise PresetError('no preset given')
  return presets
