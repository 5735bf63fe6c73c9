"""Faults during training, each provoked for real: SIGKILL at random moments (also in the
middle of a checkpoint write), SIGTERM, NaN/Inf losses, damaged checkpoints, a checkpoint
folder that refuses writes. What a run may lose is the steps since its last checkpoint.

The end-to-end tests run `train.py` in subprocesses on one tiny config (`N` steps, a
checkpoint every `EVERY`); they share jax's persistent compilation cache, so only the
first run of the module compiles. The uninterrupted reference run is a module fixture.
"""
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ddm_jax.errors import CheckpointError
from ddm_jax.training.checkpoint import Checkpointer, _one_line, abstract_like
from tests.helpers import REPO, read_jsonl, subprocess_env, train_argv

N, EVERY = 30, 3          # steps of every run here, checkpoint interval of the reference
RUN_TIMEOUT = 600         # seconds; generous bound for one train.py on a loaded 2-core machine


# ----------------------------------------------------------------------------- harness

@pytest.fixture(scope='module')
def env(tmp_path_factory):
  """Subprocess environment: CPU, and one persistent compilation cache for the module."""
  e = subprocess_env()
  e['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path_factory.mktemp('jax_cache'))
  e['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  e['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  return e


def argv(data_dir, workdir, **extra):
  """train.py arguments for tiny_config with N steps (and `extra` dotted overrides)."""
  settings = {'train.num_steps': N, 'train.checkpoint_every': EVERY,
              'train.keep_checkpoints': 3, 'train.log_every': 1, **extra}
  return ['train.py'] + train_argv(data_dir, workdir, **settings)


class Run:
  """One train.py subprocess; stdout/stderr go to files next to the workdir. With `pipe`
  they go through pipes that this process copies to the files, so that a limit set on the
  child by `preexec_fn` (RLIMIT_FSIZE) does not cut its own stderr short."""

  def __init__(self, args, env, log_prefix, preexec_fn=None, script=None, pipe=False):
    self.out_path, self.err_path = f'{log_prefix}.out', f'{log_prefix}.err'
    self._out, self._err = open(self.out_path, 'wb'), open(self.err_path, 'wb')
    cmd = [sys.executable] + (['-c', script] + args[1:] if script else args)
    to = (subprocess.PIPE, subprocess.PIPE) if pipe else (self._out, self._err)
    self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=to[0], stderr=to[1],
                                 preexec_fn=preexec_fn, bufsize=0)
    self._copiers = [threading.Thread(target=shutil.copyfileobj, args=(src, dst), daemon=True)
                     for src, dst in [(self.proc.stdout, self._out), (self.proc.stderr, self._err)]
                     if src is not None]
    for t in self._copiers:
      t.start()

  def alive(self):
    return self.proc.poll() is None

  def wait(self, timeout=RUN_TIMEOUT):
    try:
      rc = self.proc.wait(timeout=timeout)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
        self.proc.wait()
      for t in self._copiers:
        t.join(timeout=60)
      self._out.close()
      self._err.close()
    with open(self.out_path) as f:
      self.stdout = f.read()
    with open(self.err_path) as f:
      self.stderr = f.read()
    return rc

  def describe(self):
    return f'stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-5000:]}'


def run(args, env, log_prefix, **kw):
  r = Run(args, env, log_prefix, **kw)
  r.wait()
  return r


def ckpt_dir(workdir):
  return os.path.join(workdir, 'checkpoints')


def committed(workdir):
  d = ckpt_dir(workdir)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_entries(workdir):
  """{name: inode} of orbax's unfinished write folders."""
  d = ckpt_dir(workdir)
  if not os.path.isdir(d):
    return {}
  out = {}
  for n in os.listdir(d):
    if 'orbax-checkpoint-tmp' in n:
      try:
        out[n] = os.stat(os.path.join(d, n)).st_ino
      except FileNotFoundError:
        pass
  return out


def metric_rows(workdir):
  try:
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      return sum(1 for line in f if line.strip())
  except FileNotFoundError:
    return 0


def resumed_step(stdout):
  lines = [l for l in stdout.splitlines() if l.startswith('resumed from ')]
  return int(lines[-1].rstrip('/').rsplit('/', 1)[1]) if lines else None


def load_state(workdir, step):
  """The saved train state as {path: numpy array}, read by orbax without our code."""
  tree = ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir(workdir), str(step), 'state'))
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bit_identical(a, b):
  assert a.keys() == b.keys()
  differ = [k for k in a if a[k].dtype != b[k].dtype or a[k].tobytes() != b[k].tobytes()]
  assert not differ, f'{len(differ)} of {len(a)} leaves differ, e.g. {differ[:3]}'


def file_hashes(path):
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      p = os.path.join(root, name)
      with open(p, 'rb') as f:
        out[os.path.relpath(p, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


def largest_file(path):
  files = [os.path.join(r, n) for r, _, ns in os.walk(path) for n in ns]
  return max(files, key=os.path.getsize)


@pytest.fixture(scope='module')
def reference(data_dir, env, tmp_path_factory):
  """An uninterrupted run of N steps: (workdir, final state)."""
  base = tmp_path_factory.mktemp('reference')
  workdir = str(base / 'run')
  r = run(argv(data_dir, workdir), env, str(base / 'log'))
  assert r.proc.returncode == 0, r.describe()
  assert committed(workdir) == [N - 2 * EVERY, N - EVERY, N]
  assert [row['step'] for row in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))] == \
      list(range(1, N + 1))
  return workdir, load_state(workdir, N)


# ----------------------------------------------------------------------------- SIGKILL

# Each restart must get somewhere, or every run would die in the same first checkpoint
# write: 'commit' and 'write' wait for one new committed checkpoint of the run first.
KILL_MODES = ('write', 'commit', 'startup', 'random', 'write', 'commit', 'write')


def _kill_at_random_moment(r, mode, workdir, rng, startup_s):
  """SIGKILL `r` at a random moment of kind `mode`:
    startup: before its first training step (imports, compile, restore), uniform in the
             startup time the previous run took, or at its first logged step if sooner;
    random:  after 1..2*EVERY steps of this run plus up to 0.3 s (in a step, a log write, or
             an async checkpoint write);
    commit:  up to 0.5 s after this run committed a checkpoint (orbax finalizing, deleting
             the oldest checkpoint, the next steps);
    write:   after one commit, while orbax writes the next checkpoint (its tmp folder exists).
  Returns a record of the kill."""
  launched, rows0, tmp0, ckpts0 = time.monotonic(), metric_rows(workdir), tmp_entries(workdir), \
      committed(workdir)
  deadline = launched + RUN_TIMEOUT
  metrics = os.path.join(workdir, 'metrics.jsonl')
  size0 = os.path.getsize(metrics) if os.path.exists(metrics) else 0
  first_step = []  # seconds from launch to this run's first logged step

  def wait_for(cond, seconds=None):
    end = deadline if seconds is None else time.monotonic() + seconds
    while r.alive() and time.monotonic() < end and not cond():
      if not first_step and os.path.exists(metrics) and os.path.getsize(metrics) > size0:
        first_step.append(time.monotonic() - launched)
      time.sleep(0.002)

  new_commit = lambda: bool(set(committed(workdir)) - set(ckpts0))
  if mode == 'startup':   # at the latest when this run logs its first step: a warm start
    # can be much shorter than the previous run's, which then trained to the end unkilled
    wait_for(lambda: bool(first_step), rng.uniform(0.1, startup_s))
  elif mode == 'random':
    wait_for(lambda: metric_rows(workdir) >= rows0 + rng.randint(1, 2 * EVERY))
    wait_for(lambda: False, rng.uniform(0.0, 0.3))
  elif mode == 'commit':
    wait_for(new_commit)
    wait_for(lambda: False, rng.uniform(0.0, 0.5))
  else:
    wait_for(new_commit)
    done = set(committed(workdir))
    tmp1 = set(tmp_entries(workdir).items())
    wait_for(lambda: any(int(n.split('.')[0]) not in done
                         for n, _ in set(tmp_entries(workdir).items()) - tmp1))
    wait_for(lambda: False, rng.uniform(0.0, 0.1) if rng.random() < 0.7 else 0.0)
  if not r.alive():
    r.wait()
    return {'mode': mode, 'killed': False, 'rc': r.proc.returncode}
  os.kill(r.proc.pid, signal.SIGKILL)
  r.wait(timeout=120)
  # An orbax tmp folder this run created and never renamed: the kill hit a checkpoint write.
  interrupted = sorted(n for n, _ in set(tmp_entries(workdir).items()) - set(tmp0.items()))
  return {'mode': mode, 'killed': True, 'rc': r.proc.returncode,
          'after_s': round(time.monotonic() - launched, 2),
          'first_step_s': round(first_step[0], 2) if first_step else None,
          'steps_logged': metric_rows(workdir) - rows0, 'committed': committed(workdir),
          'interrupted_write': interrupted}


def test_sigkill_at_random_moments_resumes_bit_identical(data_dir, env, reference, tmp_path):
  seed = int(os.environ.get('DDM_KILL_SEED', time.time_ns() % 2**31))
  rng = random.Random(seed)
  workdir = str(tmp_path / 'run')
  args = argv(data_dir, workdir)
  kills, startup_s = [], 10.0
  for i, mode in enumerate(KILL_MODES):
    before = committed(workdir)
    r = Run(args, env, str(tmp_path / f'run{i}'))
    record = _kill_at_random_moment(r, mode, workdir, rng, startup_s)
    if record.get('first_step_s'):
      startup_s = record['first_step_s']  # the next startup kill lands before training
    record['resumed'] = resumed_step(r.stdout)
    kills.append(record)
    context = f'seed {seed}, kills so far {kills}\n{r.describe()}'
    # Never a partial checkpoint: a restart resumes from the newest committed checkpoint,
    # which restores and matches its checksums (else a `damaged` warning would show).
    assert 'damaged' not in r.stderr and 'corrupt' not in r.stderr, context
    if record['resumed'] is not None:
      assert before and record['resumed'] == before[-1], context
    if not record['killed']:
      assert r.proc.returncode == 0, context
      break
    assert r.proc.returncode == -signal.SIGKILL, context

  before = committed(workdir)
  final = run(args, env, str(tmp_path / 'final'))
  context = f'seed {seed}, kills {kills}\n{final.describe()}'
  assert final.proc.returncode == 0, context
  assert 'damaged' not in final.stderr, context
  assert resumed_step(final.stdout) == (before[-1] if before else None), context
  assert sum(k['killed'] for k in kills) >= 5, context
  assert any(k['killed'] and k['interrupted_write'] for k in kills), context
  assert_bit_identical(load_state(workdir, N), reference[1])
  print(f'seed {seed}: {kills}')


# ----------------------------------------------------------------------------- SIGTERM

def test_sigterm_checkpoints_the_current_step_and_exits_0(data_dir, env, reference, tmp_path):
  workdir = str(tmp_path / 'run')
  args = argv(data_dir, workdir, **{'train.checkpoint_every': 7})
  r = Run(args, env, str(tmp_path / 'first'))
  deadline = time.monotonic() + RUN_TIMEOUT
  while r.alive() and metric_rows(workdir) < 2 and time.monotonic() < deadline:
    time.sleep(0.005)
  assert r.alive(), 'the run ended before it could be preempted'
  sent = time.monotonic()
  r.proc.send_signal(signal.SIGTERM)
  rc = r.wait(timeout=120)  # bounded: finish the step, write one checkpoint, exit
  elapsed = time.monotonic() - sent
  assert rc == 0, r.describe()
  stopped = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[-1]['step']
  assert stopped < N, r.describe()
  assert f'stop requested: checkpointing step {stopped}' in r.stdout, r.describe()
  assert committed(workdir)[-1] == stopped, (committed(workdir), stopped)

  again = run(args, env, str(tmp_path / 'second'))
  assert again.proc.returncode == 0, again.describe()
  assert resumed_step(again.stdout) == stopped, again.describe()
  assert_bit_identical(load_state(workdir, N), reference[1])
  print(f'SIGTERM at step {stopped}: exited 0 after {elapsed:.1f} s')


# ----------------------------------------------------------------------------- NaN / Inf

# train.py with the batch of chosen steps poisoned (NaN or Inf in one pixel): the same
# compiled step as every other run here, only the data differs.
POISON = '''
import os, sys
import numpy as np
from ddm_jax import parallel
plan = dict(item.split(':') for item in os.environ['DDM_TEST_POISON'].split(','))
calls = [0]
real_global_batch = parallel.global_batch
def poisoned(mesh, batch):
  calls[0] += 1
  value = plan.get(str(calls[0]))
  if value is not None:
    batch = dict(batch)
    batch['image'] = np.array(batch['image'])
    batch['image'][0, 0, 0, 0] = float(value)
  return real_global_batch(mesh, batch)
parallel.global_batch = poisoned
from ddm_jax.cli.train import main
sys.exit(main(sys.argv[1:]))
'''


def _finite(state):
  return all(np.all(np.isfinite(v)) for v in state.values() if v.dtype.kind == 'f')


def test_nonfinite_loss_stops_naming_the_step_without_a_bad_checkpoint(data_dir, env, tmp_path):
  workdir = str(tmp_path / 'run')
  # Checked every 5 steps (no per-step host sync); step 8 checkpoints before step 10 logs,
  # so the save itself must refuse.
  args = argv(data_dir, workdir, **{'train.log_every': 5, 'train.checkpoint_every': 4})
  r = run(args, {**env, 'DDM_TEST_POISON': '6:nan'}, str(tmp_path / 'log'), script=POISON)
  assert r.proc.returncode == 2, r.describe()
  errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr, r.describe()
  assert 'non-finite loss or gradient at step 6' in errors[0], errors[0]
  assert 'skip_nonfinite' in errors[0]
  assert committed(workdir) == [4]  # 8 was refused
  state = load_state(workdir, 4)
  assert _finite(state) and int(state["['nonfinite_count']"]) == 0
  rows = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [row['step'] for row in rows] == [5]


def test_skip_nonfinite_skips_and_counts(data_dir, env, tmp_path):
  workdir = str(tmp_path / 'run')
  args = argv(data_dir, workdir, **{'train.log_every': 5, 'train.skip_nonfinite': True})
  r = run(args, {**env, 'DDM_TEST_POISON': '6:nan,11:inf'}, str(tmp_path / 'log'),
          script=POISON)
  assert r.proc.returncode == 0, r.describe()
  rows = {row['step']: row for row in read_jsonl(os.path.join(workdir, 'metrics.jsonl'))}
  assert [rows[s]['nonfinite_count'] for s in (5, 10, 15, 30)] == [0, 1, 2, 2]
  for s in committed(workdir):
    assert _finite(load_state(workdir, s)), s
  final = load_state(workdir, N)
  assert int(final["['step']"]) == N
  assert int(final["['nonfinite_count']"]) == 2 and int(final["['first_nonfinite_step']"]) == 5


# ----------------------------------------------------------------------------- damaged checkpoints

def _flip_bytes(path):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 3, len(data), max(len(data) // 7, 1)):
    data[i] ^= 0x5A
  with open(path, 'wb') as f:
    f.write(bytes(data))


def _change_saved_values(state_dir):
  """Rewrite a saved state with one array changed, as valid orbax files: it reads cleanly
  and only the checksums can tell. (Bytes flipped in the compressed array file may instead
  fail to decode, depending on where the arrays landed in it.)"""
  leaves, treedef = jax.tree_util.tree_flatten(ocp.StandardCheckpointer().restore(state_dir))
  largest = max(range(len(leaves)), key=lambda i: np.size(leaves[i]))
  leaves[largest] = leaves[largest] + 1
  with ocp.StandardCheckpointer() as writer:
    writer.save(state_dir, jax.tree_util.tree_unflatten(treedef, leaves), force=True)


def test_tampered_latest_checkpoint_falls_back_to_previous(reference, data_dir, env, tmp_path):
  """End to end: silently changed values in the newest checkpoint's array data (no file
  format error) are caught by the checksums; the run resumes from the
  previous checkpoint and still ends bit-identical to the reference."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  _change_saved_values(os.path.join(ckpt_dir(workdir), str(N), 'state'))
  r = run(argv(data_dir, workdir), env, str(tmp_path / 'log'))
  assert r.proc.returncode == 0, r.describe()
  warning = [l for l in r.stderr.splitlines() if l.startswith('warning: checkpoint')]
  assert len(warning) == 1, r.describe()
  assert f'checkpoints/{N} is corrupt' in warning[0] and 'checksum' in warning[0], warning[0]
  assert f'corrupt_checkpoints/{N}' in warning[0], warning[0]
  assert resumed_step(r.stdout) == N - EVERY, r.describe()
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', str(N)))
  assert_bit_identical(load_state(workdir, N), reference[1])


def _small_state(seed):
  rng = np.random.default_rng(seed)
  return {'w': jnp.asarray(rng.normal(size=(64, 300)), jnp.float32),
          'b': jnp.asarray(rng.normal(size=(300,)), jnp.float32),
          'step': jnp.asarray(seed, jnp.int32)}


def _write_checkpoints(workdir, steps=(1, 2, 3)):
  ck = Checkpointer(workdir, keep=5)
  for s in steps:
    ck.save(s, _small_state(s), {'model': {'width': 300}}, {'position': s * 10})
  ck.wait()
  ck.close()


def _write(path, text):
  with open(path, 'w') as f:
    f.write(text)


def _edit_json(path, fn):
  with open(path) as f:
    obj = json.load(f)
  with open(path, 'w') as f:
    json.dump(fn(obj), f)


DAMAGE = {
    'truncated array file': lambda d: os.truncate(
        largest_file(os.path.join(d, 'state')),
        os.path.getsize(largest_file(os.path.join(d, 'state'))) // 2),
    'changed array bytes': lambda d: _flip_bytes(largest_file(os.path.join(d, 'state'))),
    'deleted array file': lambda d: os.remove(largest_file(os.path.join(d, 'state'))),
    'empty files': lambda d: [os.truncate(os.path.join(r, n), 0)
                              for r, _, ns in os.walk(d) for n in ns],
    'garbage config': lambda d: _write(os.path.join(d, 'config', 'metadata'), '{"mo'),
    'edited config': lambda d: _edit_json(os.path.join(d, 'config', 'metadata'),
                                          lambda c: {'model': {'width': 301}}),
    'edited data position': lambda d: _edit_json(
        os.path.join(d, 'data', 'process_0-of-1.json'), lambda s: {'position': 31}),
    'edited checksums': lambda d: _edit_json(os.path.join(d, 'checksums', 'metadata'),
                                             lambda s: {**s, 'state': '0' * 64}),
    'checksums not an object': lambda d: _write(os.path.join(d, 'checksums', 'metadata'), '7'),
    'config not an object': lambda d: _write(os.path.join(d, 'config', 'metadata'), '[1]'),
}


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_checkpoint_is_moved_aside(tmp_path, capsys, damage):
  workdir = str(tmp_path)
  _write_checkpoints(workdir)
  DAMAGE[damage](os.path.join(ckpt_dir(workdir), '3'))
  ck = Checkpointer(workdir)
  step, state, position = ck.restore_latest(abstract_like(_small_state(0)))
  ck.close()
  assert step == 2 and position == {'position': 20}
  for k, v in _small_state(2).items():
    np.testing.assert_array_equal(np.asarray(state[k]), np.asarray(v))
  err = capsys.readouterr().err
  assert f'warning: checkpoint {ckpt_dir(workdir)}/3 is ' in err, err
  assert 'resuming from checkpoint 2 instead of damaged 3' in err, err
  assert committed(workdir) == [1, 2]
  assert os.path.isdir(os.path.join(workdir, 'corrupt_checkpoints', '3'))


def test_all_checkpoints_damaged_is_an_error(tmp_path, capsys):
  workdir = str(tmp_path)
  _write_checkpoints(workdir, steps=(1, 2))
  for s in (1, 2):
    _change_saved_values(os.path.join(ckpt_dir(workdir), str(s), 'state'))
  ck = Checkpointer(workdir)
  # Restoring one step (what sample.py does) names it and the reason.
  with pytest.raises(CheckpointError, match=r'checkpoints/2 is corrupt: its state does not match'):
    ck.restore(2, abstract_like(_small_state(0)), with_data=False)
  with pytest.raises(CheckpointError, match=r'every checkpoint in .* is damaged \(steps \[2, 1\]'):
    ck.restore_latest(abstract_like(_small_state(0)))
  ck.close()
  assert committed(workdir) == []
  # The next run starts over from step 0 instead of failing again.
  assert Checkpointer(workdir).restore_latest(abstract_like(_small_state(0))) == (None, None, None)


# ----------------------------------------------------------------------------- disk trouble

def _rewind(workdir, step):
  """Drop the checkpoints after `step` (the run then has to write them again)."""
  for s in committed(workdir):
    if s > step:
      shutil.rmtree(os.path.join(ckpt_dir(workdir), str(s)))


def test_failed_checkpoint_write_stops_and_keeps_older_ones(reference, data_dir, env, tmp_path):
  """The OS refuses the write in the middle of checkpoint N-EVERY (RLIMIT_FSIZE: any file
  over 64 KiB fails with EFBIG, as a full disk fails with ENOSPC)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  _rewind(workdir, N - 2 * EVERY)
  before = file_hashes(ckpt_dir(workdir))

  def limit_file_size():
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

  # pipe: the limit is for the checkpoint files; orbax's logs of the failure alone can fill
  # 64 KiB of stderr, and a stderr file under the same limit then refuses our error line.
  r = run(argv(data_dir, workdir), env, str(tmp_path / 'log'), preexec_fn=limit_file_size,
          pipe=True)
  assert r.proc.returncode == 2, r.describe()
  # orbax's background threads log their own tracebacks meanwhile, and may interleave
  # with our line, so look for it anywhere in a line.
  errors = [l[l.index('error: '):] for l in r.stderr.splitlines() if 'error: writing' in l]
  assert len(errors) == 1, r.describe()
  assert f'writing checkpoint {N - EVERY} to {ckpt_dir(workdir)} failed' in errors[0], errors[0]
  assert 'File too large' in errors[0], errors[0]
  # It stopped at the failure (at the latest when the next checkpoint is due): nothing
  # after the failed checkpoint was committed, the one before is untouched.
  assert committed(workdir) == [N - 2 * EVERY]
  after = file_hashes(ckpt_dir(workdir))
  assert {k: v for k, v in after.items() if k.startswith(f'{N - 2 * EVERY}/')} == before


def test_a_write_error_keeps_its_os_reason_when_tensorstore_appends_its_spec():
  """Tensorstore ends some errors with a long dump of its spec, after the OS reason; the
  one-line error must keep the reason (seen when EFBIG hit an array's .zarray)."""
  spec = '{\\"driver\\":\\"zarr\\",' + ','.join(f'\\"k{i}\\":{i}' for i in range(200)) + '}'
  raw = ('OUT_OF_RANGE: Error opening "zarr" driver: Error writing "params.w/.zarray" in OCDBT '
         f'database at local file "/x/{"d" * 300}/": Failed to write 252660 bytes to file 9: '
         f"File too large [os_error_code='27'] [tensorstore_spec='{spec}']")
  line = _one_line(ValueError(raw))
  assert line.endswith("File too large [os_error_code='27']"), line
  assert 'tensorstore_spec' not in line and len(line) <= 405


def _make_read_only(path):
  """chmod for ordinary users; root ignores modes, so use the immutable attribute."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    return lambda: os.chmod(path, 0o755)
  if shutil.which('chattr') and subprocess.run(['chattr', '+i', path],
                                                capture_output=True).returncode == 0:
    return lambda: subprocess.run(['chattr', '-i', path], check=True)
  pytest.skip('running as root without chattr +i: cannot make a folder read-only')


def test_read_only_checkpoint_folder_fails_at_start(reference, data_dir, env, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference[0], workdir)
  _rewind(workdir, N - EVERY)
  before = file_hashes(ckpt_dir(workdir))
  undo = _make_read_only(ckpt_dir(workdir))
  try:
    r = run(argv(data_dir, workdir), env, str(tmp_path / 'log'))
  finally:
    undo()
  assert r.proc.returncode == 2, r.describe()
  errors = [l for l in r.stderr.splitlines() if l.startswith('error: ')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr, r.describe()
  # the CLI checks its output folders before any work; the Checkpointer's own check is
  # the second line of defence for library callers
  assert ckpt_dir(workdir) in errors[0] and ('not writable' in errors[0]
                                             or 'not permitted' in errors[0]), errors[0]
  assert file_hashes(ckpt_dir(workdir)) == before
  assert read_jsonl(os.path.join(workdir, 'metrics.jsonl'))[-1]['step'] == N  # nothing trained
