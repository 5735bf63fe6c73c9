"""Export to PyTorch: the peft adapters load into diffusers/transformers models with
peft (and diffusers' `load_lora_weights`) and give our outputs; the indicator loads into
a torch MLP of the reference architecture and gives our logits."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason='export tests need torch==2.13.0 (extra "torch")')
diffusers = pytest.importorskip('diffusers', reason='export tests need diffusers')
transformers = pytest.importorskip('transformers', reason='export tests need transformers')
peft = pytest.importorskip('peft', reason='export tests need peft')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

from ddm_jax.interop import export  # noqa: E402
from tests.helpers import rel_err  # noqa: E402
from tests.sd_helpers import REPO, tiny_ddm, write_workdir  # noqa: E402

TOL = 1e-4


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """A tiny SD DDM with random LoRA (UNet attention and resnet convolutions, text encoder)
  and indicator, checkpointed in a workdir and exported with the CLI."""
  root = tmp_path_factory.mktemp('export')
  config, ddm, params = tiny_ddm(root, seed=3, **{'indicator.hidden': '(1024, 512)',
                                                  'lora.unet_targets': "('to_q', 'to_v', 'conv1')"})
  workdir = write_workdir(root / 'work', config, params, step=7)
  out = root / 'exported'
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'export.py'), f'--workdir={workdir}',
                         f'--output={out}'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return ddm, params, out


class Ours:
  """Our UNet/text encoder with the LoRA applied unmerged (as in training)."""

  def __init__(self, ddm, params):
    self.ddm, self.params, self.frozen = ddm, params, ddm.frozen()
    self.text = jax.jit(lambda p, f, ids: ddm.encode_text(p, f, ids))
    self.unet = jax.jit(lambda p, f, x, t, c: ddm.model_fn(p, f, x, t, context=c))


def inputs(ddm, seed=0):
  rng = np.random.default_rng(seed)
  ids = ddm.tokenize(['a photo of a human face', 'the cat digit one'])
  x = rng.standard_normal((2,) + ddm.sample_shape).astype(np.float32)
  return ids, x, np.array([5, 801], np.int32)


def test_files_and_configs(trained):
  ddm, params, out = trained
  names = sorted(os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs)
  assert names == sorted([
      'export.json', 'indicator.json', 'indicator.safetensors', 'pytorch_lora_weights.safetensors',
      'text_encoder_lora/adapter_config.json', 'text_encoder_lora/adapter_model.safetensors',
      'unet_lora/adapter_config.json', 'unet_lora/adapter_model.safetensors'])
  cfg = json.loads((out / 'unet_lora' / 'adapter_config.json').read_text())
  assert (cfg['peft_type'], cfg['r'], cfg['lora_alpha'], cfg['target_modules'], cfg['lora_dropout']) \
      == ('LORA', 8, 32, ['conv1', 'to_q', 'to_v'], 0.0)
  cfg = json.loads((out / 'text_encoder_lora' / 'adapter_config.json').read_text())
  assert (cfg['r'], cfg['lora_alpha'], cfg['target_modules']) == (8, 32, ['q_proj', 'v_proj'])
  state = load_file(str(out / 'unet_lora' / 'adapter_model.safetensors'))
  key = 'base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q'
  a = params['unet_lora']['down_blocks_0.attentions_0.transformer_blocks_0.attn1.to_q']
  np.testing.assert_array_equal(state[key + '.lora_A.weight'], np.asarray(a['lora_A']).T)
  np.testing.assert_array_equal(state[key + '.lora_B.weight'], np.asarray(a['lora_B']).T)
  key = 'base_model.model.down_blocks.0.resnets.0.conv1'   # torch's Conv2d layout
  a = params['unet_lora']['down_blocks_0.resnets_0.conv1']
  np.testing.assert_array_equal(state[key + '.lora_A.weight'],
                                np.asarray(a['lora_A']).transpose(3, 2, 0, 1))
  np.testing.assert_array_equal(state[key + '.lora_B.weight'],
                                np.asarray(a['lora_B']).T[:, :, None, None])
  assert len(state) == 2 * len(params['unet_lora'])
  meta = json.loads((out / 'export.json').read_text())
  assert meta['checkpoint_step'] == 7 and meta['ema'] is True


def _unet_torch(ddm):
  unet = diffusers.UNet2DConditionModel.from_pretrained(
      os.path.join(ddm.config.model.pretrained, 'unet'))
  return unet.eval()


def _text_torch(ddm):
  return transformers.CLIPTextModel.from_pretrained(
      os.path.join(ddm.config.model.pretrained, 'text_encoder')).eval()


def _torch_unet_out(unet, x, t, ctx):
  with torch.no_grad():
    out = unet(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(t).long(),
               encoder_hidden_states=torch.from_numpy(np.array(ctx))).sample
  return out.numpy().transpose(0, 2, 3, 1)


def test_peft_adapters_match(trained, record_property):
  ddm, params, out = trained
  ours = Ours(ddm, params)
  ids, x, t = inputs(ddm)
  ctx = np.asarray(ours.text(params, ours.frozen, jnp.asarray(ids)))
  want_unet = np.asarray(ours.unet(params, ours.frozen, x, t, ctx))
  base_ctx = np.asarray(ours.text({}, ours.frozen, jnp.asarray(ids)))
  assert rel_err(ctx, base_ctx) > 1e-3  # the adapters do something

  text = peft.PeftModel.from_pretrained(_text_torch(ddm), str(out / 'text_encoder_lora')).eval()
  with torch.no_grad():
    got_ctx = text(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  unet = peft.PeftModel.from_pretrained(_unet_torch(ddm), str(out / 'unet_lora')).eval()
  got_unet = _torch_unet_out(unet, x, t, ctx)
  errs = {'text_encoder': rel_err(ctx, got_ctx), 'unet': rel_err(want_unet, got_unet)}
  # merged into plain torch modules: the same
  merged = _torch_unet_out(unet.merge_and_unload(), x, t, ctx)
  errs['unet_merged'] = rel_err(want_unet, merged)
  for k, v in errs.items():
    record_property(f'export_peft_{k}_rel_err', v)
  print('peft export: max rel err', {k: f'{v:.2e}' for k, v in errs.items()})
  assert max(errs.values()) <= TOL
  assert rel_err(_torch_unet_out(_unet_torch(ddm), x, t, ctx), want_unet) > 1e-3


def test_diffusers_load_lora_weights(trained, record_property):
  ddm, params, out = trained
  ours = Ours(ddm, params)
  ids, x, t = inputs(ddm, seed=1)
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      ddm.config.model.pretrained, safety_checker=None, requires_safety_checker=False)
  pipe.load_lora_weights(str(out))
  with torch.no_grad():
    got_ctx = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  ctx = np.asarray(ours.text(params, ours.frozen, jnp.asarray(ids)))
  want = np.asarray(ours.unet(params, ours.frozen, x, t, ctx))
  errs = {'text_encoder': rel_err(ctx, got_ctx),
          'unet': rel_err(want, _torch_unet_out(pipe.unet, x, t, ctx))}
  for k, v in errs.items():
    record_property(f'export_diffusers_{k}_rel_err', v)
  print('diffusers load_lora_weights: max rel err', {k: f'{v:.2e}' for k, v in errs.items()})
  assert max(errs.values()) <= TOL


class ReferenceIndicator(torch.nn.Module):
  """The reference's Indicator (Flatten -> fc1 -> ReLU -> fc2 -> ReLU -> fc3)."""

  def __init__(self, in_features, groups=2):
    super().__init__()
    self.flatten = torch.nn.Flatten()
    self.fc1 = torch.nn.Linear(in_features, 1024)
    self.fc2 = torch.nn.Linear(1024, 512)
    self.fc3 = torch.nn.Linear(512, groups)
    self.activation = torch.nn.ReLU()

  def forward(self, x):
    x = self.activation(self.fc1(self.flatten(x)))
    return self.fc3(self.activation(self.fc2(x)))


def test_indicator_loads_into_reference_mlp(trained, record_property):
  ddm, params, out = trained
  desc = json.loads((out / 'indicator.json').read_text())
  c, h, w = desc['input_shape_chw']
  assert (c, h, w) == (4, 8, 8) and [l['name'] for l in desc['layers']] == ['fc1', 'fc2', 'fc3']
  model = ReferenceIndicator(c * h * w, desc['num_groups'])
  state = {k: torch.from_numpy(v) for k, v in load_file(str(out / 'indicator.safetensors')).items()}
  model.load_state_dict(state, strict=True)
  eps = np.random.default_rng(2).standard_normal((3, h, w, c)).astype(np.float32)
  want = np.asarray(ddm.indicator_fn(params, jnp.asarray(eps), None, None))
  with torch.no_grad():
    got = model(torch.from_numpy(eps.transpose(0, 3, 1, 2))).numpy()
  err = rel_err(want, got)
  record_property('export_indicator_rel_err', err)
  assert err <= TOL


def test_export_refuses_missing_workdir(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'export.py'),
                         f'--workdir={tmp_path / "nope"}', f'--output={tmp_path / "o"}'],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.startswith('error: no checkpoints')
