"""A persistent cache of traced programs, beside XLA's compilation cache.

XLA's cache is keyed on the lowered module, so a warm start still traces and lowers every
program to find its entry (most of a warm start, for the digits train step). Here a
program is traced once, exported (`jax.export`) and stored under a key made of everything
it depends on: jax and jaxlib, the devices, the ddm_jax sources, the kernels in force
(`kernels.current()`, whole: the knobs read while tracing), the caller's description (the
config, the function's role) and the arguments' avals and shardings. A warm start reads
it back and compiles it. Cold and warm compile the same module (the cold run compiles what
it has just serialized, read back), so XLA's cache hits as well. The compiled executable is
stored beside its entry too (`NAME.exe`, keyed also on the XLA flags and the processor), so
a warm start neither lowers the program nor looks it up in XLA's cache.

On by default, with XLA's cache: a warm digits train.py starts in a small fraction of its
cold time with it, and a stale hit needs a value read while tracing
that is in none of the key's parts: the sources, the kernels, the description (a config's
host-only keys are checked to lower to the same programs, tests/test_step_hyperparameters.py)
and the arguments.

`jit(fun, description, **jit_kw)` is `jax.jit(fun, **jit_kw)` that remembers how it was made;
`trace(jitted, *args)` gives `.out_info` and `.compile()` as `jitted.trace(*args)` would.
A description must name everything `fun` closes over that is not one of its arguments;
None: never cached. Programs are exported with their arguments and results flattened (jax
cannot serialize flax's and optax's pytree nodes); the results' structure is pickled beside.

`trace`/`compile` use the `Cache` they are given, else the one the command line installed
(`install`, cli/common.py). Bypassed (jax's own path): no cache (`--no_jax_cache`), multi-process runs (every host
would have to find the same entries; not built), jits without explicit shardings, and any
failure to export (e.g. host callbacks). A damaged or mismatched entry is traced again and
rewritten, with a one-line note. The folder is kept under the cache's `max_bytes`, least
recently used entries evicted first.
"""
import contextlib
import functools
import hashlib
import json
import os
import pickle
import platform
import sys

import jax
from jax.experimental import serialize_executable

from ddm_jax import kernels
from ddm_jax.files import write_bytes

FORMAT = b'ddm_jax trace 1\n'
EXE_FORMAT = b'ddm_jax executable 1\n'
_XLA_CACHE_HIT = '/jax/compilation_cache/cache_hits'
# Entries (and executables) beyond this many bytes are evicted, least recently used first:
# every ddm_jax source change, config and shape makes new ones and nothing else removes them.
MAX_BYTES = 4 << 30


class Cache:
  """A folder of entries, kept under `max_bytes` (least recently used evicted first)."""

  def __init__(self, folder, max_bytes=MAX_BYTES):
    self.folder, self.max_bytes = folder, max_bytes

  def trace(self, jitted, *args):
    return trace(jitted, *args, cache=self)

  def compile(self, jitted, *args):  # pylint: disable=redefined-builtin
    return trace(jitted, *args, cache=self).compile()


# The cache `trace` and `compile` use when given none: the command line's (cli/common.py
# installs it), else no cache.
_installed = None


def install(cache):
  """Make `cache` (a Cache, or None: no trace cache) the one used when none is given."""
  global _installed  # pylint: disable=global-statement
  _installed = cache


def configure(folder, max_bytes=MAX_BYTES):
  """install(Cache(folder, max_bytes)); folder None: no trace cache."""
  install(None if folder is None else Cache(folder, max_bytes))


def folder():
  return None if _installed is None else _installed.folder


class Jit:
  """`jax.jit(fun, **jit_kw)`, plus what the trace cache needs to rebuild it from an entry."""

  def __init__(self, fun, description, **jit_kw):
    self.fun, self.description, self.jit_kw = fun, description, jit_kw
    self.plain = jax.jit(fun, **jit_kw)

  def __call__(self, *args):
    return self.plain(*args)

  def __getattr__(self, name):   # lower, trace, ...: jax.jit's own
    return getattr(self.plain, name)


jit = Jit


def trace(jitted, *args, cache=None):
  """`jitted` (a `Jit` or a `jax.jit`) traced for `args` (arrays or ShapeDtypeStructs):
  `.out_info` and `.compile()`, through `cache` (default: the installed one) where it can
  be used."""
  cache = cache or _installed
  if isinstance(jitted, Jit) and _usable(jitted, cache):
    try:
      return _Cached(jitted, args, cache)
    except Exception as e:  # pylint: disable=broad-except
      _note(f'{_name(jitted)} not cached ({_why(e)})')
      jitted = jitted.plain
  return _Plain(jitted.plain.trace(*args) if isinstance(jitted, Jit) else jitted.trace(*args))


def compile(jitted, *args, cache=None):  # pylint: disable=redefined-builtin
  return trace(jitted, *args, cache=cache).compile()


def _usable(jitted, cache):
  kw = jitted.jit_kw
  return (cache is not None and cache.folder is not None and jitted.description is not None and jax.process_count() == 1
          and 'in_shardings' in kw and 'out_shardings' in kw
          and set(kw) <= {'in_shardings', 'out_shardings', 'donate_argnums'})


def _note(text):
  print(f'note: trace cache: {text}', file=sys.stderr, flush=True)


def _why(error):
  return f"{type(error).__name__}: {' '.join(str(error).split())[:200]}"   # one line


def _name(jitted):
  return getattr(jitted.fun, '__qualname__', 'program')


class _Plain:
  def __init__(self, traced):
    self.traced, self.out_info = traced, traced.out_info

  def compile(self):
    return self.traced.lower().compile()


def flat_shardings(prefix, tree):
  """A sharding per leaf of `tree`, from `prefix` (a sharding or a pytree prefix of them)."""
  out = []
  jax.tree_util.tree_map(lambda s, sub: out.extend([s] * len(jax.tree_util.tree_leaves(sub))),
                         prefix, tree)
  return out


class _Cached:
  """A program read from its entry, or traced, exported and stored there."""

  def __init__(self, jitted, args, cache):
    kw = jitted.jit_kw
    self.cache = cache
    leaves, self.in_tree = jax.tree_util.tree_flatten(args)
    in_prefix = kw['in_shardings']
    if not isinstance(in_prefix, tuple):   # one sharding for every argument, as jax.jit
      in_prefix = (in_prefix,) * len(args)
    self.in_shardings = flat_shardings(in_prefix, args)
    donate = kw.get('donate_argnums', ())
    donate = (donate,) if isinstance(donate, int) else tuple(donate)
    sizes = [len(jax.tree_util.tree_leaves(a)) for a in args]
    starts = [sum(sizes[:i]) for i in range(len(args))]
    self.donated = tuple(j for i in donate for j in range(starts[i], starts[i] + sizes[i]))
    self.avals = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                       weak_type=getattr(a, 'weak_type', False))
                  for a, s in zip(leaves, self.in_shardings)]
    self.out_prefix = kw['out_shardings']
    # kernels.current(): every knob read while tracing that is not an argument or in the
    # description (the attention kernel, the im2col thresholds), all of it, by construction
    key = repr((FORMAT, _environment(), kernels.current(), jitted.description, _name(jitted),
                str(self.in_tree),
                [(a.shape, str(a.dtype), a.weak_type, _sharding_text(a.sharding))
                 for a in self.avals],
                self.donated, str(jax.tree_util.tree_map(_sharding_text, self.out_prefix))))
    path = os.path.join(cache.folder, hashlib.sha256(key.encode()).hexdigest() + '.trace')
    self.path, self.key = path, key
    entry = _read(path, key)
    if entry is None:
      blob, out_tree = self._export(jitted)
      payload = pickle.dumps({'key': key, 'exported': bytes(blob), 'out_tree': out_tree})
      os.makedirs(cache.folder, exist_ok=True)
      _store(cache, path, FORMAT + hashlib.sha256(payload).digest() + payload)
      # what was just stored, read back: the warm run compiles this very module
      entry = jax.export.deserialize(blob), out_tree
    self.exported, self.out_tree = entry
    self.jitted, self.args = jitted, args
    self.out_shardings = _flat_out(self.out_prefix, self.out_tree)
    self.out_info = self.out_tree.unflatten([
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s, weak_type=a.weak_type)
        for a, s in zip(self.exported.out_avals, self.out_shardings)])

  def _export(self, jitted):
    """The program traced and exported, flat: (serialized, results' treedef)."""
    out_trees = []

    def flat(*leaves):
      out = jitted.fun(*jax.tree_util.tree_unflatten(self.in_tree, leaves))
      out_leaves, out_tree = jax.tree_util.tree_flatten(out)
      out_trees.append(out_tree)
      # results placed as jax.jit's out_shardings would (their structure is known only now)
      return [jax.lax.with_sharding_constraint(x, s)
              for x, s in zip(out_leaves, _flat_out(self.out_prefix, out_tree))]

    exported = jax.export.export(jax.jit(flat, in_shardings=self.in_shardings))(*self.avals)
    return exported.serialize(), out_trees[0]

  def compile(self):
    """The executable stored beside the entry (no lowering, no XLA cache lookup), else the
    program lowered and compiled, and its executable stored."""
    exe_path, exe_key = self.path[:-len('.trace')] + '.exe', repr((self.key, _machine()))
    shardings = self.in_shardings or self.out_shardings
    devices = getattr(shardings[0], '_device_assignment', None) if shardings else None
    loaded = _read_executable(exe_path, exe_key, devices)
    if loaded is not None:
      return Compiled(loaded, self.in_tree, self.out_tree)
    hits = []
    listen = lambda event, **_: hits.append(event) if event == _XLA_CACHE_HIT else None  # noqa: E731
    jax.monitoring.register_event_listener(listen)
    try:
      compiled = jax.jit(self.exported.call, in_shardings=self.in_shardings,
                         out_shardings=self.out_shardings,
                         donate_argnums=self.donated).lower(*self.avals).compile()
    except Exception as e:  # pylint: disable=broad-except
      _note(f'{_name(self.jitted)}: cached program not compiled ({_why(e)}); tracing again')
      return self.jitted.plain.lower(*self.args).compile()
    finally:
      jax.monitoring.unregister_event_listener(listen)
    if not hits:
      # Only a program compiled here is stored: jaxlib serializes an executable it loaded
      # from XLA's cache without its code (it then fails when run: "Function ... not found").
      _write_executable(self.cache, exe_path, exe_key, compiled)
    return Compiled(compiled, self.in_tree, self.out_tree)


def _read_executable(path, key, devices):
  """The compiled program stored at `path` for `key`, loaded onto `devices`; None when
  there is none or it cannot be used (damaged, another program's, refused by jaxlib)."""
  return _read_entry(path, EXE_FORMAT, key, lambda e: serialize_executable.deserialize_and_load(
      e['blob'], e['in_tree'], e['out_tree'], execution_devices=devices))


def _write_executable(cache, path, key, compiled):
  """Stores `compiled` for `_read_executable`; a program jaxlib cannot serialize (e.g. with
  constants closed over) is simply not stored."""
  try:
    blob, in_tree, out_tree = serialize_executable.serialize(compiled)
  except Exception:  # pylint: disable=broad-except
    return
  payload = pickle.dumps({'key': key, 'blob': blob, 'in_tree': in_tree, 'out_tree': out_tree})
  _store(cache, path, EXE_FORMAT + hashlib.sha256(payload).digest() + payload)


def _store(cache, path, data):
  """Writes an entry atomically, then evicts the least recently used entries (by mtime,
  which a read renews) until the folder holds at most `cache.max_bytes`, this one kept."""
  write_bytes(path, data)
  try:
    entries = [(e.stat().st_mtime, e.stat().st_size, e.path) for e in os.scandir(cache.folder)
               if e.name.endswith(('.trace', '.exe')) and e.path != path]
    total = sum(size for _, size, _ in entries) + len(data)
    for _, size, old in sorted(entries):
      if total <= cache.max_bytes:
        break
      os.remove(old)
      total -= size
  except OSError:   # another process evicting the same files: theirs to finish
    pass


@functools.lru_cache(maxsize=None)
def _machine():
  """What an executable is compiled for beyond the entry's key: the XLA flags and, on CPU,
  the processor (XLA:CPU emits code for the host's instruction set; a cache folder shared
  by other machines must not hand them this one's code)."""
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      flags = sorted({line for line in f if line.startswith(('flags', 'model name'))})
  except OSError:
    flags = []
  return (os.environ.get('XLA_FLAGS', ''), platform.machine(), platform.processor(),
          hashlib.sha256(''.join(flags).encode()).hexdigest())


def _flat_out(prefix, out_tree):
  return flat_shardings(prefix, out_tree.unflatten([0] * out_tree.num_leaves))


class Compiled:
  """A flat compiled program called with the original pytrees; other attributes (e.g.
  `memory_analysis`) are the compiled program's."""

  def __init__(self, compiled, in_tree, out_tree):
    self.compiled, self.in_tree, self.out_tree = compiled, in_tree, out_tree

  def __call__(self, *args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    if tree != self.in_tree:
      raise TypeError(f'compiled for arguments {self.in_tree}, called with {tree}')
    return self.out_tree.unflatten(self.compiled(*leaves))

  def __getattr__(self, name):
    return getattr(self.compiled, name)


def _read_entry(path, head, key, load):
  """`load(entry)` of the file at `path` (head + sha256 + pickled entry); None when there is
  none or it cannot be used (damaged, truncated, another program's), with a note."""
  again = 'tracing again' if head == FORMAT else 'compiling again'
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    return None
  except OSError as e:
    _note(f'cannot read {path} ({e.strerror}); {again}')
    return None
  with contextlib.suppress(OSError):
    os.utime(path)   # recently used: evicted last
  digest, payload = data[len(head):len(head) + 32], data[len(head) + 32:]
  try:
    if data[:len(head)] != head or hashlib.sha256(payload).digest() != digest:
      raise ValueError('damaged or truncated')
    entry = pickle.loads(payload)
    if entry['key'] != key:
      raise ValueError('another program under the same hash')
    return load(entry)
  except Exception as e:  # pylint: disable=broad-except
    _note(f'{os.path.basename(path)} unusable ({_why(e)}); {again}')
    return None


def _read(path, key):
  """(exported program, results' treedef) of the entry at `path`, or None."""
  return _read_entry(path, FORMAT, key, lambda e: (jax.export.deserialize(bytearray(e['exported'])),
                                                  e['out_tree']))


def _sharding_text(s):
  mesh = getattr(s, 'mesh', None)
  ids = getattr(mesh, 'device_ids', None)
  return (repr(s), None if ids is None else ids.tolist())


@functools.lru_cache(maxsize=None)
def _environment():
  import jaxlib  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return (jax.__version__, jaxlib.__version__, jax.default_backend(),
          sorted({d.device_kind for d in devices}), len(devices),
          jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision),
          source_hash())


@functools.lru_cache(maxsize=None)
def source_hash():
  """A hash of every ddm_jax source file: a code change makes every entry stale."""
  root = os.path.dirname(os.path.abspath(__file__))
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(root):
    dirnames.sort()
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        h.update(os.path.relpath(path, root).encode() + b'\0')
        with open(path, 'rb') as f:
          h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()


def describe(role, config):
  """A description of a program built from `config` alone (a ConfigDict or a dict, e.g.
  `config.program_config`'s), plus, for Stable Diffusion, the small files of its model
  folder."""
  d = config.to_dict() if hasattr(config, 'to_dict') else config
  pretrained = (d.get('model') or {}).get('pretrained', '')
  return (role, json.dumps(d, sort_keys=True, default=repr),
          folder_fingerprint(pretrained) if pretrained and os.path.isdir(pretrained) else None)


def folder_fingerprint(path):
  """A hash of the small files (configs, tokenizer) of a model folder: what a program may
  take from it as constants; the weights reach the programs as arguments."""
  h = hashlib.sha256()
  for dirpath, dirnames, files in os.walk(path):
    dirnames.sort()
    for name in sorted(files):
      if name.endswith(('.json', '.txt')):
        full = os.path.join(dirpath, name)
        h.update(os.path.relpath(full, path).encode() + b'\0')
        with open(full, 'rb') as f:
          h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()
