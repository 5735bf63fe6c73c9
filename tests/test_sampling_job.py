"""Sampling jobs (generation/job.py, sample.py): image i depends on (seed, i) and the model
only — not on batch size, device count or host count; a killed job restarted with the same
arguments writes byte-identical output; the manifest says what was run; another job cannot
overwrite a folder; evaluate.py scores a finished folder."""
import glob
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ddm_jax.cli.evaluate import main as evaluate_main
from ddm_jax.cli.sample import main as sample_main
from ddm_jax.errors import ConfigError
from ddm_jax.generation.job import read_samples, run_job
from ddm_jax.generation.plan import plan_generator, plan_samples
from ddm_jax.training.setup import load_trained
from tests.helpers import REPO, subprocess_env, train_tiny

N = 22


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  return str(train_tiny(tmp_path_factory.mktemp('job') / 'work', data_dir))


def _job(trained, out, batch_size=8, shard_size=5, host=(0, 1), **plan_kw):
  t = load_trained(trained)
  plan = plan_samples(t.ddm, t.config, N, seed=7, batch_size=batch_size, steps=4, **plan_kw)
  return run_job(plan_generator(t.ddm, t.mesh, plan), plan, t.params, t.frozen, str(out),
                 {'checkpoint_step': t.step}, shard_size, *host, progress=False)


def _digests(out):
  """sha256 of every image and data file (the manifest and per-shard timings vary)."""
  files = sorted(glob.glob(os.path.join(out, '*.png')) + glob.glob(os.path.join(out, '*.npz'))
                 + glob.glob(os.path.join(out, 'shards', '*.npz')))
  return {os.path.relpath(f, out): hashlib.sha256(open(f, 'rb').read()).hexdigest()
          for f in files}


def test_images_do_not_depend_on_batch_size_or_host_count(trained, tmp_path):
  assert _job(trained, tmp_path / 'b8', batch_size=8)
  assert _job(trained, tmp_path / 'b3', batch_size=3)
  assert not _job(trained, tmp_path / 'hosts', host=(1, 2))  # host 1 of 2: shards 1, 3
  assert _job(trained, tmp_path / 'hosts', host=(0, 2))      # host 0 finishes the job
  ref, _, manifest = read_samples(str(tmp_path / 'b8'))
  for other in ('b3', 'hosts'):
    np.testing.assert_allclose(read_samples(str(tmp_path / other))[0], ref, atol=2 / 127.5)
  assert ref.shape == (N, 8, 8, 1) and ref.std() > 0
  assert manifest['complete'] and manifest['num_shards'] == 5 and manifest['shards_done'] == 5
  assert manifest['seed'] == 7 and manifest['steps'] == 4 and manifest['checkpoint_step'] == 8
  assert manifest['images_per_sec'] > 0 and manifest['hosts'] == [0]
  assert json.load(open(tmp_path / 'hosts' / 'sampling.json'))['hosts'] == [0, 1]
  assert len(glob.glob(str(tmp_path / 'b8' / '0*.png'))) == N


def test_images_do_not_depend_on_device_count(trained, tmp_path):
  args = [os.path.join(REPO, 'sample.py'), f'--workdir={trained}', f'--num_samples={N}',
          '--steps=4', '--seed=7', '--batch_size=8', '--shard_size=5']
  for devices in (1, 4):
    proc = subprocess.run([sys.executable] + args + [f'--output={tmp_path / str(devices)}'],
                          cwd=REPO,
                          env=subprocess_env(devices), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
  one, four = (read_samples(str(tmp_path / d))[0] for d in ('1', '4'))
  np.testing.assert_allclose(four, one, atol=2 / 127.5)


def test_killed_job_resumes_to_identical_bytes(trained, tmp_path):
  args = [sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={trained}',
          '--num_samples=40', '--steps=4', '--seed=7', '--batch_size=4', '--shard_size=4']
  ref = subprocess.run(args + [f'--output={tmp_path / "ref"}'], cwd=REPO, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  out = tmp_path / 'killed'
  proc = subprocess.Popen(args + [f'--output={out}'], cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  t0 = time.time()
  while not os.path.exists(out / 'shards' / 'shard_00002.npz') and proc.poll() is None:
    assert time.time() - t0 < 600
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = len(glob.glob(str(out / 'shards' / '*.npz')))
  again = subprocess.run(args + [f'--output={out}'], cwd=REPO, env=subprocess_env(),
                         capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _digests(str(out)) == _digests(str(tmp_path / 'ref'))
  print(f'killed after {done} of 10 shards; resumed to identical bytes')


def test_resume_removes_what_a_kill_left_half_written(trained, tmp_path):
  """A SIGKILL inside an atomic write leaves `name.tmp<pid>.ext`; a resumed host deletes its
  own shards' leftovers and leaves another host's unfinished shards alone."""
  out = tmp_path / 'job'
  os.makedirs(out / 'shards')
  mine, theirs = out / '00005.tmp999.png', out / '00000.tmp999.png'   # shards 1 and 0
  shard = out / 'shards' / 'shard_00003.tmp999.npz'                   # host 1's shard 3
  for p in (mine, theirs, shard):
    p.write_bytes(b'')
  assert not _job(trained, out, host=(1, 2))
  assert not mine.exists() and not shard.exists() and theirs.exists()
  assert _job(trained, out, host=(0, 2))
  assert not theirs.exists() and not glob.glob(str(out / '**' / '*.tmp*'), recursive=True)


def test_a_folder_holds_one_job(trained, tmp_path):
  assert _job(trained, tmp_path / 'a')
  with pytest.raises(ConfigError, match='another sampling job'):
    t = load_trained(trained)
    plan = plan_samples(t.ddm, t.config, N, seed=8, batch_size=8, steps=4)
    run_job(plan_generator(t.ddm, t.mesh, plan), plan, t.params, t.frozen, str(tmp_path / 'a'),
            {'checkpoint_step': t.step}, 5, progress=False)
  assert sample_main([f'--workdir={trained}', f'--output={tmp_path / "a"}', '--seed=9']) == 2


def test_evaluate_reads_a_sample_folder(trained, tmp_path, capsys):
  out = tmp_path / 'gen'
  assert sample_main([f'--workdir={trained}', f'--output={out}', '--num_samples=24',
                      '--steps=4', '--shard_size=10']) == 0
  assert evaluate_main([f'--workdir={trained}', f'--samples={out}', '--accuracy_floor=0',
                        '--evaluator_steps=20', f'--cache_dir={tmp_path / "cache"}',
                        f'--out_dir={tmp_path / "eval"}', '--no_progress']) == 0
  rep = json.load(open(tmp_path / 'eval' / 'report.json'))
  assert rep['num_samples'] == 24 and rep['sampling']['samples'] == str(out)
  # fairness counts the samples the ten-digit check keeps (a tiny model draws junk)
  f = rep['fairness']
  assert rep['sampling']['steps'] == 4 and f['n'] == round(24 * (1 - f['off_target']))
  # an unfinished folder is refused with one line
  os.remove(out / 'shards' / 'shard_00001.npz')
  manifest = json.load(open(out / 'sampling.json'))
  json.dump({**manifest, 'complete': False}, open(out / 'sampling.json', 'w'))
  assert evaluate_main([f'--workdir={trained}', f'--samples={out}', '--accuracy_floor=0',
                        f'--cache_dir={tmp_path / "cache"}']) == 2
  assert 'not finished' in capsys.readouterr().err


def test_evaluate_split_over_hosts(trained, tmp_path):
  """Each host samples its shards into <out_dir>/samples; the last to finish reports."""
  common = [f'--workdir={trained}', '--num_samples=24', '--steps=4', '--accuracy_floor=0',
            '--evaluator_steps=20', f'--cache_dir={tmp_path / "cache"}',
            f'--out_dir={tmp_path / "ev"}', '--no_progress', '--num_hosts=2']
  assert evaluate_main(common + ['--host_index=1']) == 0  # no shard of its own is missing
  assert not os.path.exists(tmp_path / 'ev' / 'report.json')
  assert evaluate_main(common + ['--host_index=0']) == 0
  rep = json.load(open(tmp_path / 'ev' / 'report.json'))
  assert rep['num_samples'] == 24 and rep['sampling']['samples'] == str(tmp_path / 'ev' / 'samples')
