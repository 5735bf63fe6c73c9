"""Many hosts through the real command lines: `train.py` as 2 localhost processes with 2 CPU
devices each equals 1 process with 4 (losses, sample grids), survives a SIGKILL of one
process (restart both: it resumes exactly) and a SIGTERM on one host (both stop at the
same step); `sample.py` split over 2 hosts that never talk equals a 1-host job."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO, free_port, read_jsonl, subprocess_env, train_argv

STEPS = 24
OVERRIDES = {'train.num_steps': STEPS, 'train.checkpoint_every': 4, 'train.log_every': 2,
             'train.sample_every': 12, 'train.num_sample_images': 8, 'train.batch_size': 8}
TIMEOUT = 900


def _train(data_dir, workdir, num_devices, process_id=None, port=None, steps=STEPS):
  argv = train_argv(data_dir, workdir, **{**OVERRIDES, 'train.num_steps': steps})
  if process_id is not None:
    argv += [f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={process_id}']
  return subprocess.Popen([sys.executable, os.path.join(REPO, 'train.py')] + argv, cwd=REPO,
                          env=subprocess_env(num_devices, fast_compile=True),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_hosts(data_dir, workdir, steps=STEPS):
  port = free_port()
  return [_train(data_dir, workdir, 2, i, port, steps) for i in range(2)]


def _finish(procs, timeout=TIMEOUT):
  outs = []
  for p in procs:
    try:
      outs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
      p.kill()
      outs.append(p.communicate()[0] + '\n<timed out>')
  assert [p.returncode for p in procs] == [0] * len(procs), '\n'.join(o[-3000:] for o in outs)
  return outs


def _losses(workdir):
  rows = {r['step']: r for r in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}  # last wins
  return {s: rows[s]['loss'] for s in sorted(rows)}


def _wait_for(path, procs, timeout=TIMEOUT):
  t0 = time.time()
  while not os.path.exists(path):
    assert all(p.poll() is None for p in procs), 'a process ended before ' + path
    assert time.time() - t0 < timeout, f'no {path} after {timeout} s'
    time.sleep(0.2)


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """One process with 4 devices, and 2 processes with 2 each, trained side by side."""
  base = tmp_path_factory.mktemp('multihost')
  one, two = base / 'one', base / 'two'
  procs = [_train(data_dir, one, 4)] + _two_hosts(data_dir, two)
  _finish(procs)
  return base, data_dir


def test_two_processes_train_like_one(runs):
  base, _ = runs
  one, two = _losses(base / 'one'), _losses(base / 'two')
  assert sorted(one) == sorted(two) == list(range(2, STEPS + 1, 2))
  np.testing.assert_allclose([two[s] for s in two], [one[s] for s in one], rtol=0, atol=1e-4)
  # metrics, TensorBoard and grids are written once, by process 0
  for name in ('step_0000012.png', 'step_0000024.png'):
    assert os.path.exists(base / 'two' / 'samples' / name)
  assert len(os.listdir(base / 'two' / 'tensorboard')) == 1


def test_two_hosts_sample_like_one(runs):
  base, _ = runs
  common = ['--num_samples=20', '--steps=5', '--batch_size=8', '--shard_size=6', '--seed=3']
  def sample(workdir, out, num_devices, *extra):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={workdir}',
         f'--output={out}'] + common + list(extra), cwd=REPO, env=subprocess_env(num_devices),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  _finish([sample(base / 'one', base / 's_one', 4)]
          + [sample(base / 'two', base / 's_two', 2, '--num_hosts=2', f'--host_index={i}')
             for i in range(2)])
  a, b = np.load(base / 's_one' / 'samples.npz'), np.load(base / 's_two' / 'samples.npz')
  assert a['images'].shape == b['images'].shape == (20, 8, 8, 1)
  diff = np.abs(a['images'].astype(np.float64) - b['images']) / 127.5
  assert diff.max() <= 1e-2 * 2 + 1 / 127.5, diff.max()  # uint8 rounding on top of 1e-2
  assert len(os.listdir(base / 's_two' / 'shards')) == 2 * 4  # 4 shards: .npz + .json each


def test_sigkill_one_process_then_restart_both_resumes_exactly(runs):
  base, data_dir = runs
  work = base / 'killed'
  procs = _two_hosts(data_dir, work)
  _wait_for(str(work / 'checkpoints' / '8'), procs)
  procs[1].send_signal(signal.SIGKILL)
  procs[1].wait()
  time.sleep(2)
  procs[0].kill()  # its peer is gone: a real launcher restarts the whole job
  procs[0].wait()
  _finish(_two_hosts(data_dir, work))
  killed, ref = _losses(work), _losses(base / 'two')
  assert sorted(killed) == sorted(ref)
  np.testing.assert_allclose([killed[s] for s in ref], [ref[s] for s in ref], rtol=1e-6,
                             atol=1e-7)


def test_sigterm_on_one_host_stops_both_at_one_step(runs):
  base, data_dir = runs
  work = base / 'term'
  procs = _two_hosts(data_dir, work, steps=400)
  _wait_for(str(work / 'checkpoints' / '4'), procs)
  procs[1].send_signal(signal.SIGTERM)
  outs = _finish(procs)
  assert 'stop requested' in outs[0]
  steps = sorted(int(d) for d in os.listdir(work / 'checkpoints') if d.isdigit())
  assert 4 <= steps[-1] < 400 and steps[-1] % 2 == 0, steps  # agreed at a logging step
  shutil.rmtree(work)
