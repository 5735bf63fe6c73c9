"""The paper's setting end to end, through the command lines a user types, on the tiny
Stable Diffusion folder: prepare the digits in the reference format -> train.py
(configs/sd15_digits.py: LoRA, accumulation 4) -> SIGKILL and resume -> evaluate.py ->
sample.py with indicator guidance, prompts and CFG -> export.py -> the export loaded
into diffusers + peft gives our outputs (the only step that needs torch)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, read_jsonl, rel_err, subprocess_env
from tests.sd_helpers import RESOLUTION, tiny_folder

STEPS, EVERY = 160, 8   # micro-batches (40 updates at accumulation 4); checkpoint interval
TIMEOUT = 600


def _cli(env, *args):
  proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, f'{args[0]}: {proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
  return proc


def _committed(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """Prepared digits and a trained workdir: the first train.py is SIGKILLed after its
  first checkpoint, the same command then resumes and finishes."""
  root = tmp_path_factory.mktemp('sd_e2e')
  env = subprocess_env(fast_compile=True)  # programs no other test compiles
  digits, workdir = str(root / 'digits'), str(root / 'work')
  proc = _cli(env, '-m', 'ddm_jax.cli.prepare_sd_digits', '--out', digits, '--pair', '0,1',
              '--ratio', '4:1', f'--resolution={RESOLUTION}')
  overrides = proc.stdout.split('SD15_DIR ', 1)[1].split()  # the data keys it prints
  train = ['train.py', '--config=configs/sd15_digits.py', f'--workdir={workdir}', '--no_progress',
           f'--config.model.pretrained={tiny_folder(root)}', *overrides,
           f'--config.data.resolution={RESOLUTION}', f'--config.data.data_dir={root / "data"}',
           '--config.indicator.hidden=(16,)', f'--config.train.num_steps={STEPS}',
           f'--config.train.checkpoint_every={EVERY}', '--config.train.log_every=4',
           '--config.optim.lr=1e-3']
  with open(root / 'first.log', 'wb') as log:
    first = subprocess.Popen([sys.executable, *train], cwd=REPO, env=env, stdout=log, stderr=log)
    deadline = time.time() + TIMEOUT
    while not _committed(workdir) and first.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    first.kill()
    first.wait()
  killed_at = _committed(workdir)
  resumed = _cli(env, *train)
  return {'root': root, 'env': env, 'digits': digits, 'workdir': workdir,
          'first_rc': first.returncode, 'killed_at': killed_at, 'resumed': resumed.stdout,
          'first_log': (root / 'first.log').read_text()}


def test_train_with_accumulation_is_killed_and_resumes(run):
  assert run['first_rc'] == -signal.SIGKILL, run['first_log'][-3000:]
  assert run['killed_at'] and run['killed_at'][-1] < STEPS
  assert f'resumed from {run["workdir"]}/checkpoints/' in run['resumed']
  assert _committed(run['workdir'])[-1] == STEPS
  with open(os.path.join(run['workdir'], 'config.json')) as f:
    config = json.load(f)
  assert config['optim']['grad_accum'] == 4 and config['lora']['unet_rank'] == 8
  assert config['data']['heldout_dir'] == os.path.join(run['digits'], 'heldout')
  rows = read_jsonl(os.path.join(run['workdir'], 'metrics.jsonl'))
  assert rows[-1]['step'] == STEPS and all(np.isfinite(r['loss']) for r in rows)


def test_evaluate_writes_the_report(run, tmp_path):
  out = tmp_path / 'eval'
  _cli(run['env'], 'evaluate.py', f'--workdir={run["workdir"]}', f'--out_dir={out}',
       '--num_samples=16', '--steps=2', '--batch_size=16', '--evaluator_steps=100',
       f'--cache_dir={tmp_path / "cache"}', '--no_progress')
  report = json.loads((out / 'report.json').read_text())
  f, q, ind = report['fairness'], report['quality'], report['indicator']
  assert report['checkpoint_step'] == STEPS and report['sampling']['sampler'] == 'pndm'
  assert report['data']['splits']['heldout'] == 'test'
  assert report['data']['evaluator']['heldout_accuracy'] >= 0.95
  assert report['data']['evaluator']['n_heldout'] == 72  # the balanced held-out folder
  np.testing.assert_allclose(report['data']['train_proportions'], [0.8, 0.2], atol=0.01)
  assert f['n'] == 16 and 0 <= f['fd'] <= 1 and 'fd_paper' in f and 'kl' in f
  assert 'spd' not in f  # SPD is defined for group-conditioned UNets only
  assert np.isfinite(q['fcd']) and 0 <= q['precision'] <= 1 and np.isfinite(q['noise_floor_fcd'])
  assert 0 <= ind['entropy_mean'] <= ind['max_entropy'] and ind['n'] > 0
  assert (out / 'report.md').exists() and (out / 'samples_by_group.png').exists()


def test_sample_with_indicator_guidance_prompts_and_cfg(run, tmp_path):
  out = tmp_path / 'guided'
  _cli(run['env'], 'sample.py', f'--workdir={run["workdir"]}', f'--output={out}',
       '--guidance=indicator', '--target=0.5,0.5', '--guidance_scale=2',
       '--prompt=a handwritten digit', '--cfg_scale=7.5', '--steps=2', '--num_samples=4',
       '--batch_size=4')
  info = json.loads((out / 'sampling.json').read_text())
  assert info['guidance'] == 'indicator' and info['cfg_scale'] == 7.5
  assert info['prompts'] == ['a handwritten digit'] and info['sampler'] == 'pndm'
  data = np.load(out / 'samples.npz')
  assert data['images'].shape == (4, RESOLUTION, RESOLUTION, 3) and data['images'].std() > 0
  assert data['guide_labels'].shape == (4,) and set(data['guide_labels']) <= {0, 1}


def test_export_loads_into_diffusers_and_peft(run):
  out = run['root'] / 'export'
  _cli(run['env'], 'export.py', f'--workdir={run["workdir"]}', f'--output={out}')
  for name in ('unet_lora/adapter_model.safetensors', 'text_encoder_lora/adapter_config.json',
               'pytorch_lora_weights.safetensors', 'indicator.safetensors'):
    assert (out / name).exists(), name
  torch = pytest.importorskip('torch', reason='the diffusers comparison needs torch==2.13.0')
  diffusers = pytest.importorskip('diffusers')
  pytest.importorskip('peft')
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.setup import load_trained  # pylint: disable=import-outside-toplevel
  from tests import test_export as E  # its model wrappers  # pylint: disable=import-outside-toplevel
  trained = load_trained(run['workdir'])
  ours = E.Ours(trained.ddm, trained.params)
  ids, x, t = E.inputs(trained.ddm, seed=4)
  ctx = np.asarray(ours.text(trained.params, ours.frozen, jnp.asarray(ids)))
  want = np.asarray(ours.unet(trained.params, ours.frozen, x, t, ctx))
  assert rel_err(ctx, np.asarray(ours.text({}, ours.frozen, jnp.asarray(ids)))) > 1e-4  # trained
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(
      trained.config.model.pretrained, safety_checker=None, requires_safety_checker=False)
  pipe.load_lora_weights(str(out))
  with torch.no_grad():
    got_ctx = pipe.text_encoder(torch.from_numpy(ids).long()).last_hidden_state.numpy()
  assert rel_err(ctx, got_ctx) <= 1e-4
  assert rel_err(want, E._torch_unet_out(pipe.unet, x, t, ctx)) <= 1e-4  # pylint: disable=protected-access
