"""The command lines' persistent compilation cache (ddm_jax.cli.common.parse): on by default
in the user cache folder, overridable, off with a flag, a cache the caller set is left
alone, and damaged entries never break a run."""
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, subprocess_env, train_argv

# A fresh interpreter that parses its arguments the way every command line does, then
# compiles one small program and prints the cache folder in use.
# The trace cache follows it, in its `traces` subfolder.
PROBE = ('import argparse, os, sys, jax, jax.numpy as jnp\n'
         'from ddm_jax import trace_cache\n'
         'from ddm_jax.cli.common import parse\n'
         'parse(argparse.ArgumentParser(), sys.argv[1:])\n'
         'jax.jit(lambda x: jnp.tanh(x) * 2 + 1)(jnp.ones(3)).block_until_ready()\n'
         'used = jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache '
         'else None\n'
         'assert trace_cache.folder() == (used and os.path.join(used, "traces")), '
         'trace_cache.folder()\n'
         'print("max:", jax.config.jax_compilation_cache_max_size)\n'
         'print("cache:", used)\n')


def _env(tmp_path, **extra):
  env = subprocess_env(fast_compile=True)
  for key in ('JAX_COMPILATION_CACHE_DIR', 'DDM_JAX_CACHE_DIR'):
    env.pop(key, None)
  env['XDG_CACHE_HOME'] = str(tmp_path / 'xdg')
  env.update(extra)
  return env


def _probe(tmp_path, *args, max_size=False, **env):
  """The cache folder the probe used (and, with `max_size`, JAX's size limit on it)."""
  proc = subprocess.run([sys.executable, '-c', PROBE, *args], cwd=REPO, env=_env(tmp_path, **env),
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  folder = proc.stdout.split('cache:')[-1].strip()
  return (folder, int(proc.stdout.split('max:')[-1].split()[0])) if max_size else folder


def _entries(folder):
  return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_cache_on_by_default_in_the_user_cache_folder(tmp_path):
  default = tmp_path / 'xdg' / 'ddm_jax' / 'jax_cache'
  # XLA's cache unbounded (JAX's eviction breaks on entries written without it)
  assert _probe(tmp_path, max_size=True) == (str(default), -1)
  assert _entries(default)


@pytest.mark.parametrize('how', ['flag', 'env'])
def test_cache_folder_can_be_chosen(tmp_path, how):
  folder = tmp_path / 'mine'
  args, env = (['--jax_cache_dir', str(folder)], {}) if how == 'flag' else (
      [], {'DDM_JAX_CACHE_DIR': str(folder)})
  assert _probe(tmp_path, *args, **env) == str(folder)
  assert _entries(folder)
  assert not _entries(tmp_path / 'xdg' / 'ddm_jax' / 'jax_cache')


@pytest.mark.parametrize('how', ['flag', 'env'])
def test_cache_can_be_switched_off(tmp_path, how):
  args, env = (['--no_jax_cache'], {}) if how == 'flag' else ([], {'DDM_JAX_CACHE_DIR': 'off'})
  assert _probe(tmp_path, *args, **env) == 'None'
  assert not _entries(tmp_path / 'xdg' / 'ddm_jax' / 'jax_cache')


def test_a_cache_the_caller_set_is_left_alone(tmp_path):
  theirs = tmp_path / 'theirs'
  assert _probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(theirs)) == str(theirs)
  assert _entries(theirs)
  assert not _entries(tmp_path / 'xdg' / 'ddm_jax' / 'jax_cache')


DAMAGES = ('truncated', 'random', 'flipped')


def damage_file(path, how):
  """`path` cut to half, overwritten with random bytes of its length, or with 64 bytes
  flipped in the middle."""
  size = os.path.getsize(path)
  if how == 'truncated':
    os.truncate(path, size // 2)
  elif how == 'random':
    with open(path, 'wb') as f:
      f.write(os.urandom(size))
  else:
    with open(path, 'r+b') as f:
      f.seek(size // 2)
      chunk = f.read(64)
      f.seek(size // 2)
      f.write(bytes(b ^ 0xFF for b in chunk))


def _damage(folder):
  """Every file in the cache folder (XLA's entries and the trace cache's, in `traces/`)
  damaged, the three ways in turn. Returns how many."""
  names = sorted(os.path.join(d, n) for d, _, files in os.walk(folder) for n in files)
  for i, path in enumerate(names):
    damage_file(path, DAMAGES[i % 3])
  return len(names)


def test_damaged_entries_never_break_a_small_program(tmp_path):
  folder = tmp_path / 'cache'
  _probe(tmp_path, '--jax_cache_dir', str(folder))
  assert _damage(folder) > 0
  assert _probe(tmp_path, '--jax_cache_dir', str(folder)) == str(folder)


def test_damaged_cache_never_breaks_train_py(data_dir, tmp_path):
  """train.py fills a cache, every entry is damaged, train.py runs again from scratch in a
  new workdir: it compiles again and succeeds."""
  folder = tmp_path / 'cache'

  def train(workdir):
    argv = train_argv(data_dir, workdir, '--jax_cache_dir', str(folder),
                      **{'train.num_steps': 2, 'train.checkpoint_every': 2,
                         'train.sample_every': 0})
    proc = subprocess.run([sys.executable, 'train.py'] + argv, cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert os.path.isdir(workdir / 'checkpoints' / '2'), _entries(workdir / 'checkpoints')
    return proc

  train(tmp_path / 'first')
  traces = _entries(folder / 'traces')
  assert len([n for n in traces if n.endswith('.trace')]) == 2   # the init and the step
  assert len([n for n in traces if n.endswith('.exe')]) == 2     # and their executables
  assert _damage(folder) > 0
  proc = train(tmp_path / 'second')
  assert 'persistent compilation cache' in proc.stderr   # JAX warned, read nothing, compiled
  assert proc.stderr.count('note: trace cache:') == 4   # one line per damaged file
