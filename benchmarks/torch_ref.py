"""The PyTorch reference: the published DDM training step and a diffusers-style sampling loop.

Training step (the authors' `trainDreambooth.py` loop, one micro-batch): noise and
timesteps drawn with torch, `DDPMScheduler.add_noise`, `UNet2DConditionModel(...).sample`,
`F.mse_loss(pred.float(), noise.float())`, the indicator MLP on the predicted noise,
`F.cross_entropy`, `w_rec*MSE + w_ind*CE`, `backward()`, `clip_grad_value_` over the
UNet + indicator parameters, `AdamW.step()`, `zero_grad()`. LoRA through
`peft.get_peft_model` (r, alpha, to_q/to_v, dropout 0), as the published code does.
Eager, float32; bfloat16 presets use `torch.autocast` (what a GPU user would run).
The attention processor is diffusers' default (`AttnProcessor2_0`, i.e. SDPA in torch 2.x);
memory format is the default (contiguous NCHW, no channels-last): `describe()` reports both.

Inputs are latents and a text embedding (VAE encoding and the text encoder are
outside the step on both sides, as a cached-latent pipeline has them).
"""
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import inputs, weights
from benchmarks.presets import LOSS, OPTIM, SCHEDULE


def device_of(preset=None):
  if torch.cuda.is_available():
    return torch.device('cuda')
  return torch.device('cpu')


class Indicator(nn.Module):
  """Flatten -> Linear -> ReLU -> ... -> Linear(num_groups), as the published module."""

  def __init__(self, in_features, hidden, num_groups):
    super().__init__()
    widths = (in_features,) + tuple(hidden) + (num_groups,)
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))

  def forward(self, x):
    x = torch.flatten(x, 1)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = F.relu(x)
    return x


def _unet_kwargs(preset):
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in preset.unet.items()}


def build_unet(preset, seed, device, dtype=torch.float32):
  """diffusers UNet2DConditionModel from the preset's config with the shared numpy weights
  (built on the meta device, then the weights are assigned: no throw-away init)."""
  from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel
  with torch.device('meta'):
    unet = UNet2DConditionModel(**_unet_kwargs(preset))
  state = {k: torch.from_numpy(weights.draw('unet', k, v.shape, seed))
           for k, v in unet.state_dict().items()}
  unet.load_state_dict(state, strict=True, assign=True)
  del state
  unet = unet.to(device)
  return unet if dtype == torch.float32 else unet.to(dtype)


def build_indicator(preset, seed, device):
  c = preset.unet.get('out_channels', 4)
  chw = (c, preset.latent, preset.latent)
  ind = Indicator(c * preset.latent ** 2, preset.indicator_hidden, preset.num_groups)
  ind.load_state_dict({k: torch.from_numpy(weights.draw('indicator', k, shape, seed))
                       for k, shape in weights.indicator_layers(chw, preset.indicator_hidden,
                                                                preset.num_groups)})
  return ind.to(device)


def add_lora(unet, preset, seed, lora_b_std=0.0):
  """peft.get_peft_model as the published code does; adapters set from the shared weights."""
  from peft import LoraConfig, get_peft_model  # pylint: disable=import-outside-toplevel
  from peft.tuners.lora import LoraLayer  # pylint: disable=import-outside-toplevel
  cfg = LoraConfig(r=preset.lora['r'], lora_alpha=preset.lora['alpha'],
                   target_modules=list(preset.lora['targets']), lora_dropout=0.0, bias='none')
  model = get_peft_model(unet, cfg)
  n = 0
  with torch.no_grad():
    for name, mod in model.get_base_model().named_modules():
      if isinstance(mod, LoraLayer):
        lin_a, lin_b = mod.lora_A['default'], mod.lora_B['default']
        a, b = weights.lora_arrays(name, lin_a.in_features, lin_b.out_features, preset.lora['r'],
                                   seed, lora_b_std)
        lin_a.weight.copy_(torch.from_numpy(a))
        lin_b.weight.copy_(torch.from_numpy(b))
        n += 1
  if not n:
    raise ValueError('peft adapted no layer')
  return model


def make_scheduler():
  from diffusers import DDPMScheduler  # pylint: disable=import-outside-toplevel
  return DDPMScheduler(**SCHEDULE)


def attention_processors(unet):
  procs = getattr(unet, 'attn_processors', None)
  if procs is None:
    procs = unet.get_base_model().attn_processors
  return sorted({type(p).__name__ for p in procs.values()})


class TrainStep:
  """`step()` runs one published training step on the fixed batch and returns the loss;
  `step(noise, timesteps)` uses the given draws (the parity test)."""

  def __init__(self, preset, device=None, seed=None, lora_b_std=0.0):
    self.preset = p = preset
    self.device = device or device_of(preset)
    seed = p.seed if seed is None else seed
    unet = build_unet(p, seed, self.device)
    self.unet = add_lora(unet, p, seed, lora_b_std) if p.lora else unet
    self.indicator = build_indicator(p, seed, self.device)
    self.unet.train()
    self.indicator.train()
    self.sched = make_scheduler()
    self.autocast = p.dtype == 'bfloat16'
    params = lambda: itertools.chain(self.unet.parameters(), self.indicator.parameters())
    self.params = params
    self.opt = torch.optim.AdamW(params(), lr=OPTIM['lr'], betas=(OPTIM['b1'], OPTIM['b2']),
                                 weight_decay=OPTIM['weight_decay'], eps=OPTIM['eps'])
    batch = inputs.train_batch(p)
    self.latents = torch.from_numpy(batch['latents']).to(self.device)
    self.context = torch.from_numpy(batch['context']).to(self.device)
    self.labels = torch.from_numpy(batch['labels']).to(self.device)
    self.gen = torch.Generator(device=self.device).manual_seed(seed)

  def trainable_count(self):
    return sum(t.numel() for t in self.params() if t.requires_grad)

  def step(self, noise=None, timesteps=None):
    p = self.preset
    latents = self.latents
    if noise is None:
      noise = torch.randn(latents.shape, generator=self.gen, device=self.device)
      timesteps = torch.randint(0, self.sched.config.num_train_timesteps, (latents.shape[0],),
                                generator=self.gen, device=self.device).long()
    noisy = self.sched.add_noise(latents, noise, timesteps)
    with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
      pred = self.unet(noisy, timesteps, self.context).sample
    rec = F.mse_loss(pred.float(), noise.float(), reduction='mean')
    ind = F.cross_entropy(self.indicator(pred.float()), self.labels)
    loss = LOSS['w_rec'] * rec + LOSS['w_ind'] * ind
    loss.backward()
    torch.nn.utils.clip_grad_value_(self.params(), OPTIM['clip_value'])
    self.opt.step()
    self.opt.zero_grad()
    return loss.detach()

  def sync(self):
    if self.device.type == 'cuda':
      torch.cuda.synchronize()


class Sampler:
  """The diffusers pipeline's denoising loop (`StableDiffusionPipeline.__call__` without the
  VAE and text encoder): DDIM, classifier-free guidance on a doubled batch, under no_grad."""

  def __init__(self, preset, device=None, seed=None):
    from diffusers import DDIMScheduler  # pylint: disable=import-outside-toplevel
    self.preset = p = preset
    self.device = device or device_of(preset)
    seed = p.seed if seed is None else seed
    # bfloat16 presets: weights in bf16, as `from_pretrained(torch_dtype=torch.bfloat16)` gives.
    self.dtype = torch.bfloat16 if p.dtype == 'bfloat16' else torch.float32
    self.unet = build_unet(p, seed, self.device, self.dtype).eval()
    # set_alpha_to_one / steps_offset chosen to match ddm_jax's ddim (leading, final alpha 1)
    self.sched = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=True,
                               steps_offset=0, prediction_type='epsilon')
    ins = inputs.sample_inputs(p)
    self.x_t = torch.from_numpy(ins['x_T']).to(self.device)
    self.context = torch.from_numpy(ins['context']).to(self.device, self.dtype)  # [uncond; cond]

  @torch.no_grad()
  def run(self, x_t=None):
    p = self.preset
    x = (self.x_t if x_t is None else x_t).to(self.dtype)
    self.sched.set_timesteps(p.sample_steps, device=self.device)
    x = x * self.sched.init_noise_sigma
    for t in self.sched.timesteps:
      inp = self.sched.scale_model_input(torch.cat([x] * 2), t)
      eps = self.unet(inp, t, encoder_hidden_states=self.context).sample
      uncond, cond = eps.chunk(2)
      eps = uncond + p.guidance_scale * (cond - uncond)
      x = self.sched.step(eps, t, x).prev_sample
    return x

  def sync(self):
    if self.device.type == 'cuda':
      torch.cuda.synchronize()


def matmul_peak(device, dtype, n, reps=5):
  """Best-of-`reps` GFLOP/s of an n x n x n matmul."""
  import time  # pylint: disable=import-outside-toplevel
  a = torch.randn(n, n, device=device, dtype=dtype)
  b = torch.randn(n, n, device=device, dtype=dtype)
  best = float('inf')
  for _ in range(reps + 1):
    if device.type == 'cuda':
      torch.cuda.synchronize()
    t0 = time.perf_counter()
    c = a @ b
    if device.type == 'cuda':
      torch.cuda.synchronize()
    best = min(best, time.perf_counter() - t0)
    del c
  return 2 * n ** 3 / best / 1e9
