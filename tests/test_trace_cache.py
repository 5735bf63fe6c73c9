"""The trace cache (ddm_jax.trace_cache): a warm start reads the traced program instead of
tracing it; results are bit-identical to jax.jit's, donation and shardings kept; damaged,
truncated or mismatched entries and programs that cannot be exported fall back to tracing."""
import dataclasses
import os
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddm_jax import data as data_lib
from ddm_jax import kernels, parallel, trace_cache
from ddm_jax.ddm import build_ddm
from ddm_jax.generation.generator import make_generator
from ddm_jax.models import cpu_conv
from ddm_jax.training.setup import TrainSetup
from tests.helpers import REPO, read_jsonl, subprocess_env, tiny_config, train_argv
from tests.test_compile_cache import DAMAGES, damage_file


@pytest.fixture
def traces(tmp_path):
  folder = tmp_path / 'traces'
  trace_cache.configure(str(folder))
  yield folder
  trace_cache.configure(None)


def _entries(folder, suffix='.trace'):
  return sorted(n for n in os.listdir(folder) if n.endswith(suffix)) if os.path.isdir(folder) else []


def _equal(a, b):
  return jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def _counting_jit(calls, description='test program', salt=1.0):
  """A small jitted program with a pytree argument, donation and shardings, counting its
  traces in `calls`. A `salt` other than 1 makes a program XLA has never compiled (its
  persistent cache may be shared with earlier test sessions)."""
  mesh = parallel.make_mesh()
  repl, data = parallel.replicated(mesh), parallel.batch_sharding(mesh)

  def fun(state, x):
    calls.append(1)
    new = {'w': state['w'] + jnp.tanh(x * salt).mean(0), 'n': state['n'] + 1}
    return new, {'y': jnp.sin(x) * new['w']}

  jitted = trace_cache.jit(fun, description and (description, salt), in_shardings=(repl, data),
                           out_shardings=({'w': repl, 'n': repl}, data), donate_argnums=(0,))
  state = lambda: jax.device_put({'w': jnp.arange(3.0), 'n': jnp.int32(0)}, repl)  # noqa: E731
  x = jax.device_put(np.linspace(-1, 1, 24, dtype=np.float32).reshape(8, 3), data)
  return jitted, state, x


def test_warm_start_reads_the_program_instead_of_tracing(traces):
  calls = []
  jitted, state, x = _counting_jit(calls)
  want = jitted.plain.lower(state(), x).compile()(state(), x)
  cold = trace_cache.compile(jitted, state(), x)
  assert len(_entries(traces)) == 1 and len(calls) == 2   # plain + export
  warm = trace_cache.compile(jitted, state(), x)
  assert len(calls) == 2, 'the warm compile traced the program again'
  for exe in (cold, warm):
    s = state()
    got = exe(s, x)
    assert _equal(got, want)
    assert s['w'].is_deleted(), 'the state is no longer donated'
    assert got[1]['y'].sharding.is_equivalent_to(x.sharding, 2)
  assert trace_cache.trace(jitted, state(), x).out_info[1]['y'].shape == (8, 3)


def _fresh_program(calls, description='test program'):
  return _counting_jit(calls, description, salt=1.0 + float(np.random.default_rng().random()))


def test_warm_start_loads_the_stored_executable_without_lowering(traces, monkeypatch):
  calls = []
  jitted, state, x = _fresh_program(calls)
  want = jitted.plain(state(), x)
  trace_cache.compile(jitted, state(), x)
  assert len(_entries(traces, '.exe')) == 1
  def refuse(*args, **kwargs):
    raise AssertionError('lowered again')
  monkeypatch.setattr(jax.stages.Lowered, 'compile', refuse)
  warm = trace_cache.compile(jitted, state(), x)
  s = state()
  got = warm(s, x)
  assert _equal(got, want) and s['w'].is_deleted()
  assert got[1]['y'].sharding.is_equivalent_to(x.sharding, 2)


def test_an_executable_from_xla_cache_is_not_stored(traces, tmp_path):
  """jaxlib serializes an executable it loaded from XLA's persistent cache without its
  code; stored, it would fail when run. The tests' XLA cache is on (tests.helpers)."""
  calls = []
  jitted, state, x = _fresh_program(calls)
  want = jitted.plain(state(), x)
  trace_cache.compile(jitted, state(), x)   # compiled here: now in XLA's cache
  assert len(_entries(traces, '.exe')) == 1
  other = tmp_path / 'other'
  trace_cache.configure(str(other))
  for _ in range(2):   # the second compile finds the entry and would load a stored executable
    assert _equal(trace_cache.compile(jitted, state(), x)(state(), x), want)
  assert len(_entries(other)) == 1 and not _entries(other, '.exe')


@pytest.mark.parametrize('how', DAMAGES + ('mismatched',))
def test_a_bad_executable_is_compiled_again_and_rewritten(traces, capsys, monkeypatch, how):
  calls = []
  jitted, state, x = _fresh_program(calls)
  trace_cache.compile(jitted, state(), x)
  want = jitted.plain(state(), x)
  [name] = _entries(traces, '.exe')
  if how == 'mismatched':   # another program's executable under this one's name
    trace_cache.compile(_fresh_program(calls, 'another config')[0], state(), x)
    [a, b] = _entries(traces, '.exe')
    os.replace(traces / (b if a == name else a), traces / name)
  else:
    damage_file(traces / name, how)
  capsys.readouterr()
  assert _equal(trace_cache.compile(jitted, state(), x)(state(), x), want)
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'compiling again' in err[0], err


def test_least_recently_used_entries_are_evicted_beyond_the_size_limit(traces):
  calls = []
  programs = [_fresh_program(calls, f'program {i}') for i in range(3)]
  files = []

  def run(i):
    before = set(os.listdir(traces)) if traces.is_dir() else set()
    trace_cache.compile(programs[i][0], programs[i][1](), programs[i][2])
    files.append(set(os.listdir(traces)) - before)   # its entry and its executable

  run(0)
  run(1)
  assert [len(f) for f in files] == [2, 2]
  now = time.time()
  for names, age in zip(files, (100, 50)):
    for n in names:
      os.utime(traces / n, (now - age, now - age))
  run(0)                                   # program 0 read again: now the most recent
  total = sum(f.stat().st_size for f in traces.iterdir())
  trace_cache.configure(str(traces), max_bytes=total + 1000)   # room for two programs
  run(2)
  left = set(os.listdir(traces))
  assert left == files[0] | files[3], 'not the least recently used program evicted'
  assert sum(f.stat().st_size for f in traces.iterdir()) <= total + 1000


def test_description_and_avals_are_part_of_the_key(traces):
  calls = []
  jitted, state, x = _counting_jit(calls)
  trace_cache.compile(jitted, state(), x)
  trace_cache.compile(_counting_jit(calls, 'another config')[0], state(), x)
  trace_cache.compile(jitted, state(), x[:4])
  assert len(_entries(traces)) == 3


@pytest.mark.parametrize('how', DAMAGES + ('mismatched',))
def test_a_bad_entry_is_traced_again_and_rewritten(traces, capsys, how):
  calls = []
  jitted, state, x = _counting_jit(calls)
  want = jitted.plain(state(), x)
  trace_cache.compile(jitted, state(), x)
  [name] = _entries(traces)
  if how == 'mismatched':   # another program's entry under this one's name
    trace_cache.trace(_counting_jit(calls, 'another config')[0], state(), x)
    [a, b] = _entries(traces)
    os.replace(traces / (b if a == name else a), traces / name)
  else:
    damage_file(traces / name, how)
  capsys.readouterr()
  calls.clear()
  assert _equal(trace_cache.compile(jitted, state(), x)(state(), x), want)
  assert len(calls) == 1, 'the bad entry was not traced again'
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and 'tracing again' in err[0], err
  calls.clear()
  trace_cache.compile(jitted, state(), x)
  assert not calls, 'the entry was not rewritten'


def test_a_program_that_cannot_be_exported_runs_plainly(traces, capsys):
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)

  def fun(x):
    return jax.pure_callback(lambda v: np.asarray(v) * 2, jax.ShapeDtypeStruct(x.shape, x.dtype),
                             x) + 1

  jitted = trace_cache.jit(fun, 'callback', in_shardings=repl, out_shardings=repl)
  x = jax.device_put(jnp.arange(4.0), repl)
  out = trace_cache.compile(jitted, x)(x)
  assert np.array_equal(np.asarray(out), np.arange(4.0) * 2 + 1)
  assert 'not cached' in capsys.readouterr().err
  assert not _entries(traces)


def test_off_without_a_folder_or_a_description(tmp_path):
  calls = []
  jitted, state, x = _counting_jit(calls)
  trace_cache.configure(None)
  trace_cache.compile(jitted, state(), x)
  trace_cache.configure(str(tmp_path / 'traces'))
  try:
    trace_cache.compile(_counting_jit(calls, None)[0], state(), x)
  finally:
    trace_cache.configure(None)
  assert not _entries(tmp_path / 'traces')


@pytest.fixture(scope='module')
def tiny(data_dir):
  config = tiny_config(data_dir)
  images, labels = data_lib.load_arrays(config.data, data_dir, 'train',
                                        limit=config.train.batch_size)
  return config, {'image': images, 'label': labels}


def test_train_step_through_the_cache_is_bit_identical(tiny, traces):
  config, local = tiny
  results = []
  for _ in range(3):   # plain, cold, warm
    setup = TrainSetup(build_ddm(config), config)
    state, frozen = setup.init_state(), setup.frozen()
    batch = parallel.global_batch(setup.mesh, local)
    if results:
      step = setup.compile(batch, frozen)
    else:
      trace_cache.configure(None)
      step = setup.step_fn().lower(state, batch, frozen, setup.hyper).compile()
      trace_cache.configure(str(traces))
    for _ in range(2):
      state, metrics = step(state, batch, frozen, setup.hyper)
    results.append(jax.device_get((state, metrics)))
  assert len(_entries(traces)) == 2   # the init and the step
  assert _equal(results[1], results[0]) and _equal(results[2], results[0])


def test_sampler_through_the_cache_is_bit_identical(tiny, traces):
  config, _ = tiny
  setup = TrainSetup(build_ddm(config), config)
  params, frozen = setup.init_state().params, setup.frozen()
  images = []
  for folder in (None, str(traces), str(traces)):   # plain, cold, warm
    trace_cache.configure(folder)
    gen = make_generator(setup.ddm, setup.mesh, 'ddim', 3)
    images.append(np.asarray(gen(params, frozen, jax.random.key(1), 8)))
  assert any(n.endswith('.trace') for n in _entries(traces))
  assert np.array_equal(images[1], images[0]) and np.array_equal(images[2], images[0])


def test_train_py_warm_run_is_bit_identical_to_its_cold_run(data_dir, tmp_path):
  """train.py twice on one cache: the second run traces nothing new, notes nothing and
  writes the same metrics as the first."""
  env = subprocess_env(fast_compile=True)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  folder = tmp_path / 'cache'

  def train(name):
    argv = train_argv(data_dir, tmp_path / name, '--jax_cache_dir', str(folder),
                      **{'train.num_steps': 2, 'train.checkpoint_every': 2, 'train.log_every': 1})
    proc = subprocess.run([sys.executable, 'train.py'] + argv, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc, read_jsonl(tmp_path / name / 'metrics.jsonl')

  _, cold = train('cold')
  entries = _entries(folder / 'traces')
  assert len(entries) == 2, entries   # the init and the step
  proc, warm = train('warm')
  assert 'trace cache' not in proc.stderr
  assert _entries(folder / 'traces') == entries
  drop = lambda rows: [{k: v for k, v in r.items() if k != 'steps_per_sec' and 'time' not in k}  # noqa: E731
                       for r in rows]
  assert drop(warm) == drop(cold)


def _kernel_codes(k):
  """A number per field of `k`, from its value: what a program that reads them returns."""
  return np.array([zlib.crc32(repr(getattr(k, f.name)).encode()) % 997
                   for f in dataclasses.fields(k)], np.float32)


def test_a_changed_kernel_knob_is_another_program_warm_or_not(traces):
  """Every field of kernels.Kernels (the attention kernel, the im2col thresholds, and any
  added later) is read while tracing, so each is in the program's identity: with a warm
  cache, changing one runs a program that gives the new output, not the stored one, both
  through the trace cache and through jax's own jit cache; back at the default, the stored
  entry is read, not traced again."""
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  calls = []

  def fun(x):
    calls.append(1)
    return x + _kernel_codes(kernels.current())

  jitted = trace_cache.jit(fun, 'reads the kernels', in_shardings=repl, out_shardings=repl)
  x = jax.device_put(np.zeros(len(dataclasses.fields(kernels.Kernels)), np.float32), repl)
  default = kernels.current()
  assert np.array_equal(trace_cache.compile(jitted, x)(x), _kernel_codes(default))   # cold
  for field in dataclasses.fields(default):
    value = getattr(default, field.name)
    changed = {'attention': 'auto' if value != 'auto' else 'xla'}.get(field.name, None)
    changed = value + 1 if changed is None else changed
    with kernels.using(**{field.name: changed}):
      want = _kernel_codes(kernels.current())
      assert not np.array_equal(want, _kernel_codes(default))
      assert np.array_equal(trace_cache.compile(jitted, x)(x), want), field.name
      assert np.array_equal(jitted(x), want), field.name   # jax.jit's own cache
  n = len(calls)
  assert np.array_equal(trace_cache.compile(jitted, x)(x), _kernel_codes(default))
  assert len(calls) == n, 'the default program was traced again instead of read'


def test_the_im2col_threshold_changes_the_cached_program(traces):
  """The CPU convolution path (models/cpu_conv.py) at 8x8 under the default threshold is a
  convolution; with the threshold raised and the default's entry warm, the program read is
  a matmul (im2col), and computes the same sum."""
  from jax import lax   # pylint: disable=import-outside-toplevel
  repl = parallel.replicated(parallel.make_mesh())
  w = jax.device_put(np.linspace(-1, 1, 9 * 4 * 2, dtype=np.float32).reshape(3, 3, 4, 2), repl)
  x = jax.device_put(np.linspace(-1, 1, 2 * 8 * 8 * 4, dtype=np.float32).reshape(2, 8, 8, 4),
                     repl)
  dn = lax.conv_dimension_numbers(x.shape, w.shape, ('NHWC', 'HWIO', 'NHWC'))
  conv = lambda x, w: cpu_conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=dn)  # noqa: E731
  jitted = trace_cache.jit(conv, 'one conv', in_shardings=repl, out_shardings=repl)
  plain = trace_cache.compile(jitted, x, w)
  with kernels.using(im2col_max_pixels=64):
    im2col = trace_cache.compile(jitted, x, w)
  assert len(_entries(traces)) == 2
  if jax.default_backend() == 'cpu':
    assert 'convolution' in plain.as_text() and 'convolution' not in im2col.as_text()
  np.testing.assert_allclose(im2col(x, w), plain(x, w), rtol=1e-5, atol=1e-5)


def test_a_changed_config_field_the_sampler_reads_is_another_program(tiny, traces):
  """The sampler of the tiny model, warm in the cache; the same model with another noise
  schedule (diffusion.beta_end, read while the sampler is traced): the program run gives
  that schedule's images, those of the sampler compiled without the cache, not the stored
  program's."""
  config, _ = tiny
  setup = TrainSetup(build_ddm(config), config)
  params, frozen = setup.init_state().params, setup.frozen()
  images = {}
  for beta_end, folder in ((0.02, str(traces)), (0.04, str(traces)), (0.04, None)):
    changed = config.copy_and_resolve_references()
    changed.diffusion.beta_end = beta_end
    trace_cache.configure(folder)
    gen = make_generator(build_ddm(changed), setup.mesh, 'ddim', 3)
    images[beta_end, folder] = np.asarray(gen(params, frozen, jax.random.key(1), 8))
  trace_cache.configure(str(traces))
  assert not np.array_equal(images[0.04, str(traces)], images[0.02, str(traces)])
  assert np.array_equal(images[0.04, str(traces)], images[0.04, None])
