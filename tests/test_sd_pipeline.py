"""Stable Diffusion sampling against diffusers: each scheduler (DDPM, DDIM, PNDM,
DPM-Solver++(2M)) built from the same scheduler_config.json, and the whole tiny
text-to-image pipeline (text encoder -> UNet with classifier-free guidance -> PNDM ->
VAE decode) against StableDiffusionPipeline with the same initial latents; then
sample.py on a tiny SD workdir."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from ddm_jax.diffusion import samplers
from ddm_jax.diffusion.schedules import schedule_from_scheduler_config
from ddm_jax.generation.generator import make_generator
from ddm_jax.generation.prompts import CFGModel, inference_params, prompt_batch, split_prompts
from ddm_jax.parallel import make_mesh
from tests.helpers import rel_err
from tests.sd_folder import SD_SCHEDULER
from tests.sd_helpers import REPO, RESOLUTION, tiny_ddm, write_workdir

TOL = 1e-4


# ------------------------------------------------------------------ host-side pieces

def test_split_prompts_and_batch(tmp_path_factory):
  assert split_prompts(['a face; the cat', 'digit one', ' ; ']) == [
      'a face', 'the cat', 'digit one']
  assert split_prompts(None) == [] and split_prompts('x') == ['x']

  class Tok:  # prompt_batch only needs ddm.tokenize
    tokenize = staticmethod(lambda ps: np.array([[len(p), 0] for p in ps], np.int32))
  cond = prompt_batch(Tok, ['a', 'bcd'], 3, negative_prompt='zz', cfg_scale=7.5)
  np.testing.assert_array_equal(cond['input_ids'][:, 0], [1, 1, 1, 3, 3, 3])
  np.testing.assert_array_equal(cond['negative_ids'][:, 0], [2] * 6)
  np.testing.assert_array_equal(cond['cfg_scale'], [7.5] * 6)
  cond = prompt_batch(Tok, ['a', 'bcd'], 1, negative_prompt=['x', ''], cfg_scale=2)
  np.testing.assert_array_equal(cond['negative_ids'][:, 0], [1, 0])
  assert set(prompt_batch(Tok, ['a'], 2, cfg_scale=1.0)) == {'input_ids'}  # no guidance at <= 1
  with pytest.raises(Exception, match='negative prompts for 2 prompts'):
    prompt_batch(Tok, ['a', 'b'], 1, negative_prompt=['x'])


# ------------------------------------------------------------------ schedulers

torch = pytest.importorskip('torch', reason='diffusers parity needs torch==2.13.0 (extra "torch")')
diffusers = pytest.importorskip('diffusers', reason='diffusers parity needs diffusers')

W = np.array([0.9, -0.5, 0.3, 1.1], np.float32)  # per-channel weights of the analytic "model"


def model_jax(x, t):  # NHWC, t [B]
  c = jnp.cos(t.astype(jnp.float32) / 300.0)[:, None, None, None]
  return 0.8 * jnp.tanh(x * W) + 0.3 * x * c


def model_torch(x, t):  # NCHW, t scalar
  w = torch.from_numpy(W).view(1, 4, 1, 1)
  return 0.8 * torch.tanh(x * w) + 0.3 * x * torch.cos(t.float() / 300.0)


CLASSES = {'ddim': 'DDIMScheduler', 'ddpm': 'DDPMScheduler', 'pndm': 'PNDMScheduler',
           'dpm++2m': 'DPMSolverMultistepScheduler'}
DEFAULTS = {k: v for k, v in SD_SCHEDULER.items()
            if k.startswith('beta') or k == 'num_train_timesteps'}
SD = SD_SCHEDULER
V = {'prediction_type': 'v_prediction'}
CASES = [
    # (sampler, scheduler config, steps, eta)
    ('pndm', SD, 7, 0.0),
    ('pndm', SD, 1, 0.0),
    ('pndm', {**SD, 'timestep_spacing': 'linspace', **V}, 6, 0.0),
    ('pndm', {**SD, 'timestep_spacing': 'trailing', 'set_alpha_to_one': True}, 5, 0.0),
    ('ddim', SD, 7, 0.0),
    ('ddim', SD, 5, 1.0),
    ('ddim', {**SD, 'timestep_spacing': 'trailing', **V}, 6, 0.0),
    ('ddim', DEFAULTS, 6, 0.5),  # DDIMScheduler defaults: clip_sample, set_alpha_to_one
    ('ddpm', SD, 7, 0.0),
    ('ddpm', {**SD, 'timestep_spacing': 'linspace', **V}, 6, 0.0),
    ('ddpm', DEFAULTS, 5, 0.0),  # DDPMScheduler defaults: clip_sample, steps_offset 0
    ('dpm++2m', SD, 7, 0.0),
    ('dpm++2m', {**SD, 'timestep_spacing': 'leading'}, 6, 0.0),
    ('dpm++2m', {**SD, 'timestep_spacing': 'trailing', **V}, 5, 0.0),
]


@pytest.mark.parametrize('name, cfg, steps, eta', CASES,
                         ids=[f'{c[0]}-{i}' for i, c in enumerate(CASES)])
def test_scheduler_matches_diffusers(name, cfg, steps, eta, monkeypatch, record_property):
  ref = getattr(diffusers, CLASSES[name]).from_config(cfg)
  ref.set_timesteps(steps)
  sched = schedule_from_scheduler_config(cfg)
  kw, notes = samplers.scheduler_kwargs(name, cfg, sched)
  assert not notes
  np.testing.assert_array_equal(samplers.model_timesteps(name, 1000, steps, **kw), ref.timesteps.numpy())

  key = jax.random.key(11)
  x = np.random.default_rng(steps).standard_normal((2, 4, 4, 4)).astype(np.float32)
  if name == 'ddim':
    kw['eta'] = eta
  ours = jax.jit(lambda x: samplers.SAMPLERS[name](
      samplers.make_denoiser(model_jax, sched), sched, x, key, steps=steps, **kw))(x)

  # the sampler's noise for step i is N(0, I) from fold_in(key, i): hand diffusers the same
  noise = lambda i: torch.from_numpy(np.asarray(
      jax.random.normal(jax.random.fold_in(key, i), x.shape)).transpose(0, 3, 1, 2).copy())
  current = {}
  monkeypatch.setattr('diffusers.schedulers.scheduling_ddpm.randn_tensor',
                      lambda *a, **k: noise(current['i']))
  sample = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()) * ref.init_noise_sigma
  for i, t in enumerate(ref.timesteps):
    current['i'] = i
    out = model_torch(ref.scale_model_input(sample, t), t)
    extra = {}
    if name == 'ddim':
      extra = {'eta': eta, **({'variance_noise': noise(i)} if eta > 0 else {})}
    sample = ref.step(out, t, sample, **extra).prev_sample
  err = rel_err(np.asarray(ours), sample.numpy().transpose(0, 2, 3, 1))
  record_property(f'scheduler_{name}_rel_err', err)
  print(f'{name} {cfg.get("timestep_spacing", "default")} {cfg.get("prediction_type", "epsilon")} '
        f'steps={steps} eta={eta}: max rel err {err:.2e}')
  assert err <= TOL, err


def test_scheduler_notes_for_unimplemented_options():
  sched = schedule_from_scheduler_config(SD_SCHEDULER)
  _, notes = samplers.scheduler_kwargs('pndm', {**SD_SCHEDULER, 'skip_prk_steps': False}, sched)
  assert notes and 'skip_prk_steps' in notes[0]
  _, notes = samplers.scheduler_kwargs('dpm++2m', {**SD_SCHEDULER, 'use_karras_sigmas': True}, sched)
  assert notes and 'use_karras_sigmas' in notes[0]


# ------------------------------------------------------------------ the whole pipeline

@pytest.fixture(scope='module')
def sd(tmp_path_factory):
  root = tmp_path_factory.mktemp('sdpipe')
  config, ddm, params = tiny_ddm(root, seed=1, **{'indicator.hidden': '(16,)'})
  return root, config, ddm, params


def test_text_to_image_matches_stable_diffusion_pipeline(sd, record_property):
  _, _, ddm, params = sd
  params = {'indicator': params['indicator']}  # the base model (diffusers has no LoRA here)
  prompts, negative = ['a photo of a human face', 'the cat'], ['digit zero', '']
  steps, scale = 4, 7.5
  gen = make_generator(CFGModel(ddm), make_mesh(), 'pndm', steps, **ddm.sampler_kwargs('pndm'))
  _, notes = samplers.scheduler_kwargs('pndm', ddm.scheduler_config, ddm.sched)
  assert not notes
  cond = prompt_batch(ddm, prompts, 1, negative_prompt=negative, cfg_scale=scale)
  latents = np.random.default_rng(0).standard_normal((2,) + ddm.sample_shape).astype(np.float32)
  ours = np.asarray(gen(params, ddm.frozen(), jax.random.key(0), 2, cond=cond, latents=latents))

  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      ddm.config.model.pretrained, safety_checker=None, requires_safety_checker=False)
  assert type(pipe.scheduler).__name__ == 'PNDMScheduler'
  pipe.set_progress_bar_config(disable=True)
  ref = pipe(prompt=prompts, negative_prompt=negative, num_inference_steps=steps,
             guidance_scale=scale, latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy()),
             height=RESOLUTION, width=RESOLUTION, output_type='np').images
  ours01 = np.clip(ours / 2 + 0.5, 0, 1)  # diffusers' postprocess of the decoded image
  assert 0.2 < np.mean((ours01 > 0) & (ours01 < 1))  # most pixels are not clipped
  err = rel_err(ours01, ref)
  record_property('sd_pipeline_pndm_cfg_rel_err', err)
  print(f'text-to-image vs StableDiffusionPipeline: max rel err {err:.2e}')
  assert err <= TOL


def test_sample_cli_on_sd_workdir(sd, tmp_path):
  root, config, ddm, params = sd
  workdir = write_workdir(root / 'work', config, params, step=3)
  out = tmp_path / 'gen'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={workdir}', f'--output={out}',
       '--num_samples=2', '--prompt=a photo of a human face', '--prompt=the cat; digit one',
       '--negative_prompt=zero', '--steps=2', '--batch_size=4', '--seed=5'],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = json.loads((out / 'sampling.json').read_text())
  assert info['sampler'] == 'pndm' and info['steps'] == 2 and info['cfg_scale'] == 7.5
  assert info['prompts'] == ['a photo of a human face', 'the cat', 'digit one']
  assert info['num_per_prompt'] == 2 and info['num_samples'] == 6 and info['lora_merged']
  data = np.load(out / 'samples.npz')
  assert data['images'].shape == (6, RESOLUTION, RESOLUTION, 3)
  np.testing.assert_array_equal(data['prompt_index'], [0, 0, 1, 1, 2, 2])
  assert len([f for f in os.listdir(out) if f.endswith('.png') and f != 'grid.png']) == 6
  assert data['images'].std() > 0

  bad = subprocess.run([sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={workdir}',
                        '--sampler=nope'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and 'sampler' in bad.stderr


def test_cfg_model_is_pluggable_with_indicator_guidance(sd):
  """The indicator-guidance hook (ddm_jax.generation.guidance) drives the CFG model unchanged."""
  guidance = pytest.importorskip('ddm_jax.generation.guidance')
  _, _, ddm, params = sd
  model = CFGModel(ddm)
  params, frozen = inference_params(ddm, params, ddm.frozen())
  hook = guidance.make_indicator_guidance(model)
  cond = model.sample_cond(params, frozen, 2, **{k: jnp.asarray(v) for k, v in prompt_batch(
      ddm, ['a face'], 2, cfg_scale=7.5).items()})
  guide = guidance.make_guide([0, 1], 1.0)
  guide = {k: jnp.asarray(v) for k, v in guide.items()}
  denoise = hook(params, frozen, None, {**cond, 'guide': guide})
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2,) + ddm.sample_shape), jnp.float32)
  x0, eps = jax.eval_shape(denoise, x, 500)  # traces the guided, batch-doubled UNet
  assert x0.shape == eps.shape == x.shape
