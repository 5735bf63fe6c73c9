"""Parity of our Flax UNet / VAE / CLIP text encoder / tokenizer with diffusers and
transformers: tiny random PyTorch models are saved with `save_pretrained`, loaded with
ddm_jax.interop.diffusers, and run on the same inputs (NCHW <-> NHWC)."""
import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='parity tests need torch==2.13.0 (extra "torch")')
diffusers = pytest.importorskip('diffusers', reason='parity tests need diffusers')
transformers = pytest.importorskip('transformers', reason='parity tests need transformers')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from ddm_jax.interop import diffusers as interop  # noqa: E402
from ddm_jax.models.tokenizer import CLIPTokenizer  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.sd_folder import SD_SCHEDULER, write_clip_vocab  # noqa: E402

TOL = 1e-4


def nhwc(t):
  return jnp.asarray(t.permute(0, 2, 3, 1).numpy())


def nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def randomize(model, seed):
  """Perturb every parameter so that zero/one default inits (norms, biases, zero-init
  convs) cannot hide a wrong mapping."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.dim() >= 2 and not p.abs().max():
        p.copy_(torch.randn(p.shape, generator=gen) * p[0].numel() ** -0.5)
      else:
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


UNETS = {
    'sd1': dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=2, norm_num_groups=8,
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
        attention_head_dim=4, cross_attention_dim=24),
    'sd2': dict(
        sample_size=8, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
        attention_head_dim=(2, 4, 8), cross_attention_dim=40, use_linear_projection=True,
        upcast_attention=True),
    # class labels, cross-attention-only attn1 (the mid block keeps self-attention),
    # two transformer layers, and the other sinusoid convention
    'class': dict(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
        up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'), attention_head_dim=4,
        cross_attention_dim=16, num_class_embeds=3, only_cross_attention=True,
        transformer_layers_per_block=2, flip_sin_to_cos=False, freq_shift=1),
    'digits': dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
        layers_per_block=2, norm_num_groups=8, down_block_types=('DownBlock2D', 'AttnDownBlock2D'),
        up_block_types=('AttnUpBlock2D', 'UpBlock2D'), mid_block_type='UNetMidBlock2D',
        attention_head_dim=8, cross_attention_dim=8, num_class_embeds=10),  # no context used
}


@pytest.mark.parametrize('name', list(UNETS))
def test_unet_parity(name, tmp_path, record_property):
  cfg = UNETS[name]
  torch.manual_seed(0)
  ref = randomize(diffusers.UNet2DConditionModel(**cfg), 1)
  ref.save_pretrained(tmp_path / 'unet')
  module, params = interop.load_unet(str(tmp_path))

  b, s = 2, cfg['sample_size']
  sample = torch.randn(b, cfg.get('in_channels', 4), s, s)
  t = torch.tensor([3.0, 731.0])
  cross = any('CrossAttn' in kind for kind in cfg['down_block_types'])
  ctx = torch.randn(b, 5, cfg['cross_attention_dim']) if cross else None
  labels = torch.tensor([1, 2]) if cfg.get('num_class_embeds') else None
  with torch.no_grad():
    want = ref(sample, t, encoder_hidden_states=ctx, class_labels=labels).sample.numpy()
  got = jax.jit(module.apply)({'params': params}, nhwc(sample), jnp.asarray(t.numpy()),
                              None if ctx is None else jnp.asarray(ctx.numpy()),
                              None if labels is None else jnp.asarray(labels.numpy()))
  err = rel_err(nchw(got), want)
  record_property(f'unet_{name}_rel_err', err)
  print(f'unet {name}: max rel err {err:.2e}')
  assert err <= TOL


def test_vae_parity(tmp_path, record_property):
  torch.manual_seed(0)
  ref = randomize(diffusers.AutoencoderKL(
      block_out_channels=(16, 32, 32), layers_per_block=2, latent_channels=4, norm_num_groups=8,
      down_block_types=('DownEncoderBlock2D',) * 3, up_block_types=('UpDecoderBlock2D',) * 3,
      sample_size=32), 2)
  ref.save_pretrained(tmp_path / 'vae')
  module, params = interop.load_vae(str(tmp_path))
  assert module.scaling_factor == pytest.approx(0.18215)

  x = torch.rand(2, 3, 32, 32) * 2 - 1
  z = torch.randn(2, 4, 8, 8)
  with torch.no_grad():
    dist = ref.encode(x).latent_dist
    want_mean, want_logvar = dist.mean.numpy(), dist.logvar.numpy()
    want_img = ref.decode(z).sample.numpy()
  variables = {'params': params}
  mean, logvar = jax.jit(lambda v, x: module.apply(v, x, method='encode'))(variables, nhwc(x))
  img = jax.jit(lambda v, z: module.apply(v, z, method='decode'))(variables, nhwc(z))
  errs = {'mean': rel_err(nchw(mean), want_mean), 'logvar': rel_err(nchw(logvar), want_logvar),
          'decode': rel_err(nchw(img), want_img)}
  for k, v in errs.items():
    record_property(f'vae_{k}_rel_err', v)
  print('vae: max rel err', {k: f'{v:.2e}' for k, v in errs.items()})
  assert max(errs.values()) <= TOL

  # a posterior sample is mean + std * N(0, 1)
  draw = module.sample_latent(mean, logvar, jax.random.key(0))
  noise = (draw - mean) / jnp.exp(0.5 * logvar)
  assert draw.shape == mean.shape and 0.5 < float(noise.std()) < 1.5


@pytest.fixture(scope='module')
def vocab_dir(tmp_path_factory):
  folder = tmp_path_factory.mktemp('tok')
  write_clip_vocab(str(folder))
  return folder


PROMPTS = ['a photo of a human face', 'A  Photo\tof the CAT!!', "the cat's digit: zero, one; 42",
           'unknown wörds ñ 日本 🙂', '<|startoftext|>a cat<|endoftext|> face',
           ' '.join(['photo of a cat'] * 30), '']


@pytest.mark.parametrize('pad', ['<|endoftext|>', '!'])  # SD 1.x / SD 2.x pad tokens
def test_tokenizer_parity(tmp_path, pad):
  write_clip_vocab(str(tmp_path), pad_token=pad)
  ref = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
  want = ref(PROMPTS, padding='max_length', max_length=ref.model_max_length, truncation=True).input_ids
  ours = CLIPTokenizer.from_pretrained(str(tmp_path))
  np.testing.assert_array_equal(ours(PROMPTS), np.asarray(want, np.int32))
  assert ours(PROMPTS).dtype == np.int32 and ours.model_max_length == 77
  # transformers 5 saves only tokenizer.json: that layout must read the same
  ref.save_pretrained(str(tmp_path / 'saved'))
  np.testing.assert_array_equal(CLIPTokenizer.from_pretrained(str(tmp_path / 'saved'))(PROMPTS),
                                np.asarray(want, np.int32))


def tiny_clip(vocab_size, act, seed, legacy_eos=False):
  torch.manual_seed(seed)
  cfg = transformers.CLIPTextConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
      num_attention_heads=4, max_position_embeddings=77, hidden_act=act,
      bos_token_id=vocab_size - 2, pad_token_id=vocab_size - 1,
      # SD 1.x configs still say eos_token_id=2: pool at the largest id instead
      eos_token_id=2 if legacy_eos else vocab_size - 1)
  return randomize(transformers.CLIPTextModel(cfg), seed)


@pytest.mark.parametrize('act, legacy_eos', [('quick_gelu', True), ('gelu', False)])
def test_text_encoder_parity(act, legacy_eos, tmp_path, vocab_dir, record_property):
  tok = CLIPTokenizer.from_pretrained(str(vocab_dir))
  ref = tiny_clip(tok.vocab_size, act, 3, legacy_eos)
  ref.save_pretrained(tmp_path / 'text_encoder')
  module, params = interop.load_text_encoder(str(tmp_path))
  assert module.eos_token_id == (2 if legacy_eos else tok.eos_token_id)
  ids = tok(PROMPTS[:4])
  mask = (np.arange(ids.shape[1]) <= np.argmax(ids == tok.eos_token_id, axis=1)[:, None]).astype(np.int32)
  run = jax.jit(module.apply, static_argnames='output_hidden_states')
  for attention_mask in (None, mask):
    with torch.no_grad():
      want = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True,
                 attention_mask=None if attention_mask is None else torch.tensor(attention_mask))
    got = run({'params': params}, jnp.asarray(ids), attention_mask, output_hidden_states=True)
    errs = {'last': rel_err(got.last_hidden_state, want.last_hidden_state.numpy()),
            'pooled': rel_err(got.pooler_output, want.pooler_output.numpy())}
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    errs['penultimate'] = rel_err(got.hidden_states[-2], want.hidden_states[-2].numpy())
    masked = 'masked' if attention_mask is not None else 'causal'
    for k, v in errs.items():
      record_property(f'clip_{act}_{masked}_{k}_rel_err', v)
    print(f'clip {act} {masked}: max rel err', {k: f'{v:.2e}' for k, v in errs.items()})
    assert max(errs.values()) <= TOL


def test_pipeline_folder_from_diffusers(tmp_path, vocab_dir):
  """A StableDiffusionPipeline written by diffusers/transformers themselves loads whole."""
  tok = transformers.CLIPTokenizer.from_pretrained(str(vocab_dir))
  text = tiny_clip(len(tok), 'quick_gelu', 4)
  torch.manual_seed(0)
  # the UNet's context width must match the text encoder's
  unet = randomize(diffusers.UNet2DConditionModel(
      **{**UNETS['class'], 'num_class_embeds': None, 'cross_attention_dim': 32}), 5)
  vae = randomize(diffusers.AutoencoderKL(block_out_channels=(16, 32), norm_num_groups=8,
                                          down_block_types=('DownEncoderBlock2D',) * 2,
                                          up_block_types=('UpDecoderBlock2D',) * 2), 6)
  scheduler = diffusers.PNDMScheduler.from_config(SD_SCHEDULER)
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
      safety_checker=None, feature_extractor=None, requires_safety_checker=False)
  pipe.save_pretrained(tmp_path)

  sd = interop.load_pipeline(str(tmp_path))
  assert sd.scheduler_config['_class_name'] == 'PNDMScheduler'
  prompts = ['a photo of a human face', 'A CAT']
  want_ids = tok(prompts, padding='max_length', max_length=77, truncation=True).input_ids
  np.testing.assert_array_equal(sd.tokenizer(prompts), want_ids)
  # the forward passes are covered above: here every tensor must land where torch has it
  for model, params in ((unet, sd.unet_params), (vae, sd.vae_params), (text, sd.text_encoder_params)):
    state = {k: v.numpy() for k, v in model.state_dict().items() if not k.endswith('position_ids')}
    ours = interop.params_to_state_dict(params)
    assert ours.keys() == state.keys()
    for k in state:
      np.testing.assert_array_equal(ours[k], state[k], err_msg=k)
