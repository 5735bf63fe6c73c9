"""Shared test helpers: a tiny config and a tiny trained model, a once-per-session prepared
digits folder, `rel_err`, and subprocess runners (every subprocess is bounded by a timeout,
never uses the network)."""
import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, 'configs', 'digits.py')

_DATA_DIR = {}


@functools.lru_cache(maxsize=None)
def compile_cache_dir():
  """One persistent XLA compilation cache for this test session and its subprocesses:
  the same tiny train step is compiled by several tests and CLIs, and an XLA compile
  takes tens of seconds on a loaded 2-core machine. $DDM_TEST_COMPILE_CACHE keeps it
  across sessions; subprocesses inherit it as $JAX_COMPILATION_CACHE_DIR. Entries are
  keyed on the HLO, the flags and the jax version, so a code change is never hidden."""
  path = os.environ.get('DDM_TEST_COMPILE_CACHE') or os.environ.get('JAX_COMPILATION_CACHE_DIR')
  if path:
    return path
  run_id = os.environ.get('PYTEST_XDIST_TESTRUNUID')
  if run_id:  # pytest -n: one cache for all workers of the run, left in the temp folder
    path = os.path.join(tempfile.gettempdir(), f'ddm_test_xla_cache_{run_id}')
    os.makedirs(path, exist_ok=True)
    return path
  path = tempfile.mkdtemp(prefix='ddm_test_xla_cache_')
  atexit.register(shutil.rmtree, path, ignore_errors=True)
  return path


def _cache_env():
  return {'JAX_COMPILATION_CACHE_DIR': compile_cache_dir(),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def enable_compile_cache():
  """Every program of this process cached in compile_cache_dir() (tests/conftest.py calls
  it when the session starts; a worker script calls it itself)."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_compilation_cache_dir', compile_cache_dir())
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)



def digits_config(data_dir='', **overrides):
  """configs/digits.py at full size (its data_dir set), then `overrides`:
  {'train.num_steps': 10, ...} (dotted keys, values already typed)."""
  from configs import digits  # pylint: disable=import-outside-toplevel
  from ddm_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel
  c = digits.get_config()
  c.data.data_dir = data_dir  # set directly: apply_overrides would parse a str as a literal
  return apply_overrides(c, overrides)


def tiny_config(data_dir='', **overrides):
  """configs/digits.py shrunk so the whole UNet compiles in seconds on 2 CPU cores, then
  `overrides` as in digits_config."""
  from ddm_jax.config import apply_overrides  # pylint: disable=import-outside-toplevel
  c = digits_config(data_dir)
  c.data.resolution = 8
  c.model.sample_size = 8
  # One level (no resampling): each XLA compile of the train step is ~30% cheaper than
  # with (16, 32) (about 35 s instead of 60 s on the loaded 2-core machine); the mid block
  # still has self-attention.
  c.model.block_out_channels = (16,)
  c.model.down_block_types = ('DownBlock2D',)
  c.model.up_block_types = ('UpBlock2D',)
  c.model.mid_block_type = 'UNetMidBlock2D'
  c.model.layers_per_block = 1
  c.model.norm_num_groups = 8
  c.model.attention_head_dim = 8
  c.indicator.hidden = (32,)
  c.optim.schedule = 'constant'  # keeps num_steps out of the compiled step (shared XLA cache)
  c.train.batch_size = 8
  c.train.num_steps = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.keep_checkpoints = 5
  c.train.sample_every = 0
  c.train.num_sample_images = 8
  c.train.ema_decay = 0.9
  c.sample.steps = 4
  return apply_overrides(c, overrides)


def config_overrides(config, keys):
  """`--config.KEY=VALUE` arguments reproducing `config`'s values at `keys` (for the CLIs)."""
  out = []
  for dotted in keys:
    node = config
    for part in dotted.split('.'):
      node = node[part]
    out.append(f'--config.{dotted}={node!r}')
  return out


# Every key tiny_config changes, so train.py --config=configs/digits.py + these = tiny_config.
TINY_KEYS = ('data.data_dir', 'data.resolution', 'model.sample_size', 'model.block_out_channels',
             'model.down_block_types', 'model.up_block_types', 'model.mid_block_type', 'model.layers_per_block',
             'model.norm_num_groups', 'model.attention_head_dim', 'indicator.hidden',
             'optim.schedule', 'train.batch_size', 'train.num_steps', 'train.log_every',
             'train.checkpoint_every', 'train.keep_checkpoints', 'train.sample_every',
             'train.num_sample_images', 'train.ema_decay', 'sample.steps')


def train_argv(data_dir, workdir, *extra, config_file=DIGITS, **overrides):
  """train.py arguments: `config_file` + the `--config.*` overrides that make it
  tiny_config(data_dir, **overrides), then the raw arguments `extra`."""
  config = tiny_config(data_dir, **overrides)
  keys = tuple(TINY_KEYS) + tuple(k for k in overrides if k not in TINY_KEYS)
  return (['--config', config_file, '--workdir', str(workdir), '--no_progress']
          + config_overrides(config, keys) + list(extra))


def train_tiny(workdir, data_dir, *, full_size=False, cli=False, **overrides):
  """Trains a tiny digits model into `workdir` and returns `workdir`, for module fixtures.

  tiny_config(data_dir, **overrides), or digits_config with `full_size`; `cli` runs it
  through `python train.py` (tiny_config only) instead of training.loop.train in-process."""
  if cli:
    assert not full_size, 'train.py gets its config through train_argv, i.e. tiny_config'
    proc = run_python(['train.py'] + train_argv(data_dir, workdir, **overrides), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert 'workdir:' in proc.stdout
    return workdir
  from ddm_jax.training.loop import train  # pylint: disable=import-outside-toplevel
  config = (digits_config if full_size else tiny_config)(data_dir, **overrides)
  train(config, str(workdir), progress=False)
  return workdir


def rel_err(ours, ref, check_shape=True, floor=0.0):
  """max |ours - ref| / max(max |ref|, floor), in float64. `floor` > 0 keeps an all-zero
  `ref` finite; `check_shape` refuses a comparison that only works by broadcasting."""
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  if check_shape:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), floor))


def shared_data_dir(base=None):
  """The biased digits prepared once per test session (in-process cache)."""
  if 'dir' not in _DATA_DIR:
    from ddm_jax import data  # pylint: disable=import-outside-toplevel
    path = os.path.join(str(base) if base else tempfile.mkdtemp(prefix='ddm_test_'), 'digits_data')
    data.prepare(tiny_config().data, path)
    _DATA_DIR['dir'] = path
  return _DATA_DIR['dir']


def free_port():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


FAST_COMPILE_FLAGS = ('--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true')


def subprocess_env(num_devices=None, fast_compile=False):
  """Environment for a fresh interpreter: CPU only, `num_devices` virtual devices, the
  session's compilation cache; `fast_compile` halves XLA compile time (less LLVM
  optimisation) for subprocesses whose programs no other test shares."""
  env = dict(os.environ)
  flags = [f for f in env.get('XLA_FLAGS', '').split() if 'device_count' not in f]
  if num_devices:
    flags.append(f'--xla_force_host_platform_device_count={num_devices}')
  if fast_compile:
    flags.extend(FAST_COMPILE_FLAGS)
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['PYTHONUNBUFFERED'] = '1'
  env.update(_cache_env())
  env.pop('DDM_DATA_DIR', None)
  return env


def run_python(args, num_devices=None, timeout=300, cwd=REPO):
  """Run `python ARGS` in a fresh interpreter; returns CompletedProcess (text)."""
  return subprocess.run([sys.executable] + list(args), cwd=cwd, env=subprocess_env(num_devices),
                        capture_output=True, text=True, timeout=timeout, check=False)


def assert_one_line_error(proc, *needles):
  """Exit code != 0, exactly one `error: ...` line on stderr naming `needles`, no traceback."""
  assert proc.returncode != 0, (proc.stdout, proc.stderr)
  assert 'Traceback' not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, proc.stderr
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def read_jsonl(path):
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
