"""The whole DDM update against a PyTorch transcription of the official training loop
(`examples/trainDreambooth.py` of the authors' DebiasingDiffusionModel repository).

The torch side is diffusers' UNet and VAE and transformers' CLIP text encoder read from
the same tiny folder, peft LoRA (r 8, alpha 32) on the UNet's to_q/to_v and the text
encoder's q_proj/v_proj, the reference's indicator (fc1-fc3 on the NCHW-flattened
predicted noise), `latent_dist` sampled and scaled by 0.18215, loss
w_rec MSE + w_ind CE, `(loss / k).backward()`, `clip_grad_value_` on the running
accumulated `.grad` after every micro-step, AdamW every k-th micro-step. Both sides start
from the same weights (LoRA matrices and indicator included) and get the same draws
(VAE noise, diffusion noise, timesteps): ours are recomputed here from the step's
`fold_in(key(seed), step)` and handed to torch.

Compared: the loss of every micro-step, and every trainable tensor after 3 updates,
max |jax - torch| / max |torch| per tensor <= 1e-4. AdamW's normalised step
m / (sqrt(v) + eps) is ill-conditioned where the accumulated gradient is near eps: there
float32 noise in the gradient moves an element's step by up to lr. Elements whose
gradient (torch's, handed to AdamW) was non-zero but below 10 eps, or below 1e-5 of its
tensor's largest element, at some update are held to 2 lr per update instead; they are
counted in the output. Twice: at the published settings, where the
value clip never bites (asserted), and with a loss 100x larger and lr 1e-3, where it bites
on most micro-steps (asserted). The same for the pixel regime's full fine-tune (UNet +
indicator, no LoRA, no accumulation)."""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='needs torch==2.13.0 (extra "torch")')
diffusers = pytest.importorskip('diffusers')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.torch_ref import Indicator as ReferenceIndicator  # noqa: E402
from ddm_jax.config import apply_overrides  # noqa: E402
from ddm_jax.ddm import PixelDDM, load_latent_ddm  # noqa: E402
from ddm_jax.interop.diffusers import params_to_state_dict  # noqa: E402
from ddm_jax.interop.export import PEFT_PREFIX, indicator_state_dict, lora_state_dict  # noqa: E402
from ddm_jax.training.optim import make_optimizer  # noqa: E402
from ddm_jax.training.state import create_train_state  # noqa: E402
from ddm_jax.training.step import hyperparameters, make_train_step  # noqa: E402
from tests.helpers import rel_err, tiny_config  # noqa: E402
from tests.sd_helpers import sd_config, tiny_folder  # noqa: E402

TOL = 1e-4          # the float32 floor of this comparison is about 5e-5
# Below 10 x AdamW's eps, or 1e-5 of the tensor's largest gradient element (float32
# rounding of sums of terms that large), AdamW's normalised step is noise-sensitive.
SMALL_GRAD, SMALL_REL = 1e-7, 1e-5
UPDATES = 3
# (name, lr, loss scale): the published lr, where the value clip of 1.0 never bites, and
# a loss 100x larger (w_rec 95, w_ind 5: the same alpha) at lr 1e-3, where it does
SETTINGS = [('clip_idle', 1e-5, 1.0), ('clip_bites', 1e-3, 100.0)]


def nchw(a):
  return torch.from_numpy(np.array(np.asarray(a).transpose(0, 3, 1, 2)))


def draws(hyper, step, latent_shape, vae_shape=None):
  """The step's randomness at micro-step `step`, as training/step.py and objective.py draw
  it: (VAE noise or None, timesteps, diffusion noise), NHWC."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(hyper['key'])), step)
  k_batch, k_loss = jax.random.split(rng)
  k_t, k_n = jax.random.split(k_loss)
  vae_noise = None if vae_shape is None else np.asarray(jax.random.normal(k_batch, vae_shape))
  t = np.asarray(jax.random.randint(k_t, (latent_shape[0],), 0, 1000))
  return vae_noise, t, np.asarray(jax.random.normal(k_n, latent_shape, jnp.float32))


def reference_indicator(sizes, state=None):
  """The reference's indicator (benchmarks/torch_ref.Indicator: Flatten -> Linear -> ReLU
  ... -> Linear) of layer widths `sizes`, with `state` (fc1.weight, ...) loaded."""
  ind = ReferenceIndicator(sizes[0], sizes[1:-1], sizes[-1])
  if state is not None:
    with torch.no_grad():
      for i, layer in enumerate(ind.layers):
        layer.weight.copy_(torch.from_numpy(state[f'fc{i + 1}.weight']))
        layer.bias.copy_(torch.from_numpy(state[f'fc{i + 1}.bias']))
  return ind


def indicator_state(ind):
  """`ind`'s weights under the reference's names (fc1.weight, ...)."""
  return {f'fc{i + 1}.{k}': v.detach().numpy() for i, layer in enumerate(ind.layers)
          for k, v in (('weight', layer.weight), ('bias', layer.bias))}


class ReferenceLoop:
  """The official loop's update, one micro-batch per call of `step(mse, ce)`.
  `named`: {state-dict name: parameter} of everything the reference hands to AdamW."""

  def __init__(self, named, config, w_rec, w_ind, lr):
    self.named = {k: p for k, p in named.items() if p.requires_grad}
    self.params = list(self.named.values())
    o = config.optim
    self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(o.b1, o.b2), eps=o.eps,
                                 weight_decay=o.weight_decay)
    self.k, self.clip, self.w_rec, self.w_ind, self.lr = (o.grad_accum, o.clip_value, w_rec,
                                                          w_ind, lr)
    self.micro_step, self.bites = 0, []
    self.small = {k: np.zeros(p.shape, bool) for k, p in self.named.items()}

  def step(self, mse, ce):
    loss = self.w_rec * mse + self.w_ind * ce
    (loss / self.k).backward()
    grads = [p.grad for p in self.params if p.grad is not None]
    self.bites.append(int(sum((g.abs() > self.clip).sum() for g in grads)))
    torch.nn.utils.clip_grad_value_(self.params, self.clip)
    self.micro_step += 1
    if self.micro_step % self.k == 0:
      for k, p in self.named.items():
        g = p.grad.abs()
        self.small[k] |= ((g > 0) & (g < max(SMALL_GRAD, SMALL_REL * float(g.max())))).numpy()
      self.opt.step()
      self.opt.zero_grad()
    return float(loss.detach())


def named_indicator(indicator):
  return {f'indicator.fc{i + 1}.{k}': v for i, layer in enumerate(indicator.layers)
          for k, v in (('weight', layer.weight), ('bias', layer.bias))}


def peft_name(key):
  """peft's saved name -> its parameter's name (the adapter's name inserted)."""
  return key.replace('.lora_A.', '.lora_A.default.').replace('.lora_B.', '.lora_B.default.')


def run_jax(ddm, config, params, batches, w_rec, w_ind, lr):
  config = apply_overrides(config, {'loss.w_rec': str(w_rec), 'loss.w_ind': str(w_ind)})
  tx = make_optimizer(config.optim, config.train.num_steps, config.train.trainable)
  state = create_train_state(params, tx, config.train.ema_decay)
  hyper = hyperparameters(config)
  hyper['lr'] = np.float32(lr)
  step = jax.jit(make_train_step(ddm, config))
  losses = []
  for batch in batches:
    state, metrics = step(state, batch, ddm.frozen(), hyper)
    losses.append(float(metrics['loss']))
  return jax.device_get(state.params), losses, hyper


def compare(ours, theirs, loop, what, rename=lambda k: k):
  """Every tensor of `theirs` (torch's state dict) against ours: relative error over the
  well-conditioned elements, absolute error within 2 lr per update over the others."""
  assert ours.keys() == theirs.keys(), what
  errs, ill = {}, 0
  for k in ours:
    a, b = np.asarray(ours[k], np.float64), np.asarray(theirs[k], np.float64)
    assert a.shape == b.shape, (what, k)
    small = loop.small[rename(k)]
    diff = np.abs(a - b)
    errs[k] = diff[~small].max(initial=0.0) / np.abs(b).max()
    ill += int(small.sum())
    assert diff[small].max(initial=0.0) <= 2 * loop.lr * UPDATES, (what, k)
  worst = max(errs, key=errs.get)
  print(f'{what}: {len(errs)} tensors, worst {worst} rel err {errs[worst]:.1e} '
        f'({ill} of {sum(v.size for v in ours.values())} elements with a near-zero gradient)')
  assert errs[worst] <= TOL, (what, worst, errs[worst])


def check_run(name, bites, jax_losses, torch_losses):
  err = max(abs(a - b) / abs(b) for a, b in zip(jax_losses, torch_losses))
  print(f'{name}: losses {np.round(torch_losses, 4).tolist()}, rel err {err:.1e}, '
        f'clipped elements per micro-step {bites}')
  assert err <= TOL
  if name == 'clip_bites':
    assert sum(b > 0 for b in bites) >= len(bites) // 2, bites
  else:
    assert not any(bites), bites


# ------------------------------------------------------------------ Stable Diffusion + LoRA

@pytest.fixture(scope='module')
def sd(tmp_path_factory):
  folder = tiny_folder(tmp_path_factory.mktemp('ref_sd'))
  config = sd_config(folder, **{'train.num_steps': 4 * UPDATES})
  assert (config.optim.clip, config.optim.grad_accum, config.train.batch_size) == ('reference', 4, 1)
  assert config.indicator.init == 'torch'
  ddm = load_latent_ddm(config)
  rng = np.random.default_rng(0)
  n = config.optim.grad_accum * UPDATES
  ids = ddm.tokenize([ddm.prompt])
  r = config.data.resolution
  batches = [{'image': jnp.asarray(rng.uniform(-1, 1, (1, r, r, 3)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 2, (1,)), jnp.int32),
              'input_ids': jnp.asarray(ids)} for _ in range(n)]
  return folder, config, ddm, ddm.init(jax.random.key(0)), batches


def torch_sd(folder, config, params, eps_shape):
  """The reference's models on `folder`, with our initial LoRA and indicator weights."""
  lc = config.lora
  unet = diffusers.UNet2DConditionModel.from_pretrained(f'{folder}/unet')
  vae = diffusers.AutoencoderKL.from_pretrained(f'{folder}/vae')
  text = transformers.CLIPTextModel.from_pretrained(f'{folder}/text_encoder')
  vae.requires_grad_(False)
  unet.requires_grad_(False)
  text.requires_grad_(False)
  unet = peft.get_peft_model(unet, peft.LoraConfig(
      r=lc.unet_rank, lora_alpha=lc.unet_alpha, target_modules=list(lc.unet_targets),
      lora_dropout=0.0, bias='none'))
  text = peft.get_peft_model(text, peft.LoraConfig(
      r=lc.text_rank, lora_alpha=lc.text_alpha, target_modules=list(lc.text_targets),
      lora_dropout=0.0, bias='none'))
  for model, lora in ((unet, params['unet_lora']), (text, params['text_lora'])):
    state = {k: torch.from_numpy(v) for k, v in lora_state_dict(lora).items()}
    result = peft.set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
  ind_state = indicator_state_dict(params['indicator'], eps_shape)
  sizes = [ind_state['fc1.weight'].shape[1]] + [ind_state[f'fc{i + 1}.bias'].shape[0]
                                                for i in range(len(ind_state) // 2)]
  return unet, vae, text, reference_indicator(sizes, ind_state)


@pytest.mark.parametrize('name, lr, scale', SETTINGS)
def test_sd_lora_update_matches_the_official_loop(sd, name, lr, scale):
  folder, config, ddm, params, batches = sd
  w_rec, w_ind = 0.95 * scale, 0.05 * scale
  final, jax_losses, hyper = run_jax(ddm, config, params, batches, w_rec, w_ind, lr)

  unet, vae, text, indicator = torch_sd(folder, config, jax.device_get(params), ddm.eps_shape)
  noise_sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085,
                                        beta_end=0.012, beta_schedule='scaled_linear')
  loop = ReferenceLoop({**dict(unet.named_parameters()), **dict(text.named_parameters()),
                        **named_indicator(indicator)}, config, w_rec, w_ind, lr)
  torch_losses = []
  for s, batch in enumerate(batches):
    x = nchw(batch['image'])
    dist = vae.encode(x).latent_dist
    vae_noise, t, noise = draws(hyper, s, dist.mean.permute(0, 2, 3, 1).shape,
                                dist.mean.permute(0, 2, 3, 1).shape)
    latents = (dist.mean + dist.std * nchw(vae_noise)) * 0.18215   # latent_dist.sample()
    timesteps = torch.from_numpy(t).long()
    noisy = noise_sched.add_noise(latents, nchw(noise), timesteps)
    hidden = text(torch.tensor(np.asarray(batch['input_ids'])).long())[0]
    pred = unet(noisy, timesteps, hidden).sample
    mse = torch.nn.functional.mse_loss(pred.float(), nchw(noise).float(), reduction='mean')
    ce = torch.nn.functional.cross_entropy(indicator(pred),
                                           torch.tensor(np.asarray(batch['label'])).long())
    torch_losses.append(loop.step(mse, ce))
  check_run(name, loop.bites, jax_losses, torch_losses)

  for model, key in ((unet, 'unet_lora'), (text, 'text_lora')):
    theirs = {k: v.detach().numpy() for k, v in peft.get_peft_model_state_dict(model).items()}
    ours = lora_state_dict(final[key])
    assert all(k.startswith(PEFT_PREFIX) for k in ours)
    compare(ours, theirs, loop, f'{name} {key}', peft_name)
  compare(indicator_state_dict(final['indicator'], ddm.eps_shape), indicator_state(indicator), loop,
          f'{name} indicator', lambda k: 'indicator.' + k)


# ------------------------------------------------------------------ pixel full fine-tune

PIXEL_BATCH = 4


@pytest.fixture(scope='module')
def pixel():
  config = tiny_config(**{'optim.clip': 'reference', 'optim.lr': 3e-4, 'train.ema_decay': 0.0,
                          'train.num_steps': UPDATES, 'train.batch_size': PIXEL_BATCH})
  assert config.optim.grad_accum == 1 and config.indicator.init == 'torch'
  ddm = PixelDDM(config)
  rng = np.random.default_rng(1)
  r = config.data.resolution
  batches = [{'image': jnp.asarray(rng.uniform(-1, 1, (PIXEL_BATCH, r, r, 1)), jnp.float32),
              'label': jnp.asarray(rng.integers(0, 2, (PIXEL_BATCH,)), jnp.int32)}
             for _ in range(UPDATES)]
  return config, ddm, ddm.init(jax.random.key(0)), batches


def torch_unet(model_cfg):
  m = model_cfg
  return diffusers.UNet2DConditionModel(
      sample_size=m.sample_size, in_channels=m.in_channels, out_channels=m.out_channels,
      block_out_channels=tuple(m.block_out_channels), layers_per_block=m.layers_per_block,
      down_block_types=tuple(m.down_block_types), up_block_types=tuple(m.up_block_types),
      mid_block_type=m.mid_block_type, attention_head_dim=m.attention_head_dim,
      norm_num_groups=m.norm_num_groups, flip_sin_to_cos=m.flip_sin_to_cos,
      freq_shift=m.freq_shift, cross_attention_dim=8)   # no cross-attention block reads it


@pytest.mark.parametrize('name, lr, scale', SETTINGS)
def test_pixel_full_finetune_update_matches_the_official_loop(pixel, name, lr, scale):
  config, ddm, params, batches = pixel
  w_rec, w_ind = 0.95 * scale, 0.05 * scale
  final, jax_losses, hyper = run_jax(ddm, config, params, batches, w_rec, w_ind, lr)

  params = jax.device_get(params)
  unet = torch_unet(config.model)
  unet.load_state_dict({k: torch.from_numpy(np.asarray(v))
                        for k, v in params_to_state_dict(params['unet']).items()})
  ind_state = indicator_state_dict(params['indicator'], ddm.eps_shape)
  indicator = reference_indicator([ind_state['fc1.weight'].shape[1], *config.indicator.hidden,
                                   config.data.num_groups], ind_state)
  d = config.diffusion
  noise_sched = diffusers.DDPMScheduler(num_train_timesteps=d.num_train_timesteps,
                                        beta_start=d.beta_start, beta_end=d.beta_end,
                                        beta_schedule=d.schedule)
  loop = ReferenceLoop({**dict(unet.named_parameters()), **named_indicator(indicator)}, config,
                       w_rec, w_ind, lr)
  context = torch.zeros(PIXEL_BATCH, 1, 8)
  torch_losses = []
  for s, batch in enumerate(batches):
    _, t, noise = draws(hyper, s, batch['image'].shape)
    timesteps = torch.from_numpy(t).long()
    noisy = noise_sched.add_noise(nchw(batch['image']), nchw(noise), timesteps)
    pred = unet(noisy, timesteps, context).sample
    mse = torch.nn.functional.mse_loss(pred, nchw(noise), reduction='mean')
    ce = torch.nn.functional.cross_entropy(indicator(pred),
                                           torch.tensor(np.asarray(batch['label'])).long())
    torch_losses.append(loop.step(mse, ce))
  check_run(name, loop.bites, jax_losses, torch_losses)

  theirs = {k: v.detach().numpy() for k, v in unet.state_dict().items()}
  compare(params_to_state_dict(final['unet']), theirs, loop, f'{name} pixel unet')
  compare(indicator_state_dict(final['indicator'], ddm.eps_shape), indicator_state(indicator), loop,
          f'{name} pixel indicator', lambda k: 'indicator.' + k)


# ------------------------------------------------------------------ the indicator's init

@pytest.mark.parametrize('model', ['sd', 'pixel'])
def test_indicator_init_is_torch_linear_default(model, request):
  """The indicator each config builds (the SD LoRA run's (1024, 512) MLP on 8x8x4 latents,
  the pixel regime's): every layer's weight and bias ~ U(+-1/sqrt(fan_in)), with the bound
  and moments of torch's own nn.Linear draw of the same layer. Flax's lecun-normal,
  zero-bias default has a sqrt(3) larger weight std and zero biases."""
  ddm = request.getfixturevalue(model)[-3]
  params = jax.device_get(ddm.init_indicator(jax.random.key(3)))
  sizes = [int(np.prod(ddm.eps_shape)), *ddm.config.indicator.hidden, ddm.config.data.num_groups]
  ref = reference_indicator(sizes)
  for i, fan_in in enumerate(sizes[:-1]):
    bound = fan_in ** -0.5
    ours, theirs = params[f'layers_{i}'], ref.layers[i]
    for mine, torch_ in ((ours['kernel'], theirs.weight), (ours['bias'], theirs.bias)):
      mine, torch_ = np.asarray(mine), torch_.detach().numpy()
      assert mine.shape == torch_.T.shape
      assert np.abs(mine).max() <= bound and np.abs(torch_).max() <= bound
      if mine.size >= 1000:   # the bound is reached; moments of a uniform: std bound / sqrt(3)
        assert np.abs(mine).max() > 0.99 * bound
        assert mine.std() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert torch_.std() == pytest.approx(bound / 3 ** 0.5, rel=0.05)
        assert abs(mine.mean()) < 0.05 * bound
      else:
        assert np.abs(mine).max() > 0.2 * bound    # not Flax's zero bias
