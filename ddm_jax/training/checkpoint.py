"""Checkpoints with orbax: train state, the config and each process's data-iterator position.

Orbax writes each step into a temporary folder and renames it on commit, so a
run killed mid-write never leaves a checkpoint that `latest_step` would pick up.
Each checkpoint also carries sha256 checksums of its state, data position and
config (item `checksums`), computed from the values in memory when it is saved:
a restore that reads back anything else (a truncated or edited file) is refused,
and `restore_latest` moves that checkpoint aside and falls back to the previous one.

The state is checksummed piece by piece: one sha256 per distinct shard of each array, in a
table that names each piece by its bounds, so a sharded state is checked correctly and a
restore under another sharding cuts the same pieces from what it holds. `save` only copies
the pieces to the host (the next step may donate the buffers); a thread hashes them and
orbax writes the table before it commits. Every read of array data, the whole state or one
part of it (`restore_part`), goes through `Checkpointer._read`, which checks it.
"""
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from ddm_jax.errors import CheckpointError, ConfigError

# Parts of the config that must match to continue training from a checkpoint.
COMPATIBLE_SECTIONS = ('model', 'indicator', 'diffusion', 'lora')
# Fields of the train state a checkpoint also checksums alone, so that sampling (or a
# fine-tune's init) can restore one of them without the optimizer state.
SAMPLED_PARTS = ('params', 'ema_params')


class _IteratorState:
  """Snapshot of a grain iterator's state, taken when `save` is called (so an
  async save cannot see a later position). grain's handler writes one
  `process_<i>-of-<n>.json` per process."""

  def __init__(self, state=None):
    self.state = state

  def get_state(self):
    return json.dumps(self.state).encode()

  def set_state(self, raw):
    self.state = json.loads(raw.decode())

  def start_prefetch(self):
    pass


class _ChecksumsHandler(ocp.JsonCheckpointHandler):
  """Writes the checksums item when its future (the hashing thread's) is done: orbax
  awaits it, in its background, before it commits the checkpoint."""

  async def _save_fn(self, x, directory):
    await super()._save_fn(await asyncio.wrap_future(x), directory)


@ocp.args.register_with_handler(_ChecksumsHandler, for_save=True)
@dataclasses.dataclass
class _ChecksumsSave(ocp.args.CheckpointArgs):
  item: concurrent.futures.Future


@ocp.args.register_with_handler(_ChecksumsHandler, for_restore=True)
@dataclasses.dataclass
class _ChecksumsRestore(ocp.args.CheckpointArgs):   # orbax wants one; read as a file instead
  item: None = None


# Hashes checkpoints' pieces off the training loop's thread (hashlib releases the GIL).
_HASHING = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='ddm_jax checksums')


def config_to_json(config):
  return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


def config_from_json(obj):
  """A saved config (JSON, lists) back to the ConfigDict with tuples our configs use."""
  def tuples(o):
    if isinstance(o, dict):
      return {k: tuples(v) for k, v in o.items()}
    if isinstance(o, list):
      return tuple(tuples(v) for v in o)
    return o
  return ml_collections.ConfigDict(tuples(obj))


def _one_line(error, limit=400):
  """The error on one line; a long one keeps its head and its tail (where the OS reason is).
  Tensorstore appends a dump of its spec after the reason ("... File too large
  [os_error_code='27'] [tensorstore_spec='{...}']"): dropped, or the tail would be that."""
  text = re.sub(r" ?\[tensorstore_spec='[^']*'\]", '', ' '.join(str(error).split()))
  text = text or type(error).__name__
  return text if len(text) <= limit else f'{text[:limit // 2]} ... {text[-limit // 2:]}'


def _pieces(leaf, copy=True):
  """{index: host copy} of the distinct pieces of `leaf` this process holds: one per shard
  index of a jax.Array (a replicated array has one, the whole), the whole of anything else.
  An index is the text of its slice bounds, e.g. '0:4,0:8'."""
  if not isinstance(leaf, jax.Array):
    array = np.asarray(leaf)
    return {_index_text((slice(None),) * array.ndim, array.shape): array}
  out = {}
  for shard in sorted(leaf.addressable_shards, key=lambda s: s.replica_id):
    out.setdefault(_index_text(shard.index, leaf.shape), shard)
  # copied (saving): the caller's buffers may be donated to the next step before they are hashed
  return {k: np.array(jax.device_get(v.data), copy=copy) for k, v in out.items()}


def _index_text(index, shape):
  return ','.join(f'{sl.start or 0}:{n if sl.stop is None else sl.stop}'
                  for sl, n in zip(index, shape))


def _bounds(text):
  return [tuple(map(int, b.split(':'))) for b in text.split(',')] if text else []


def _covers(bounds, shape):
  """True when the pieces at `bounds` (a list of index texts' bounds) tile `shape`."""
  return sum(int(np.prod([hi - lo for lo, hi in b])) for b in bounds) == int(np.prod(shape))


def _piece_digest(array):
  return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def _leaf_name(path):
  """(field of the train state or None, the path below it): how the table names a leaf."""
  head = getattr(path[0], 'name', getattr(path[0], 'key', None)) if path else None
  return head, jax.tree_util.keystr(path[1:] if head is not None else path)


def host_pieces(state):
  """[(field, path, dtype, shape, {index: host copy})] of every leaf: what `shard_digests`
  hashes. Taken at once (the only part of a save on the caller's thread); a state sharded
  over several processes is refused: each would hold only its own pieces, and the checksums
  are written by one (not built)."""
  out = []
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    pieces = _pieces(leaf)
    shape = tuple(np.shape(leaf))
    if not _covers([_bounds(k) for k in pieces], shape):
      raise CheckpointError(f'cannot checksum {jax.tree_util.keystr(path)}: it is sharded over '
                            'several processes (per-process checksums are not built)')
    field, below = _leaf_name(path)
    out.append((field, below, np.dtype(leaf.dtype).str, shape, pieces))
  return out


def shard_digests(pieces, parts=()):
  """The checksums of a state from `host_pieces`: {'shards': {field: {path: {'dtype', 'shape',
  index: sha256 of that piece}}}, 'state': digest of that table, 'parts': {field: digest of
  its part of the table}} for the fields in `parts`. Per piece, so a sharded state is
  checked piece by piece; the table says which, so a restore under another sharding can
  cut the same pieces out of its own."""
  table = {}
  for field, below, dtype, shape, by_index in pieces:
    entry = {'dtype': dtype, 'shape': list(shape)}
    entry.update({k: _piece_digest(v) for k, v in by_index.items()})
    table.setdefault(str(field), {})[below] = entry
  return {'shards': table, 'state': json_digest(table),
          'parts': {p: json_digest({p: table[p]}) for p in parts if p in table}}


def _pieces_match(tree, table):
  """Whether every leaf of `tree` (a state, or {part: part of one}) matches `table`
  (shard_digests'), each saved piece cut from what this process holds of the leaf."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    field, below = _leaf_name(path)
    entry = table.get(str(field), {}).get(below)
    if entry is None or (entry['dtype'], tuple(entry['shape'])) != (np.dtype(leaf.dtype).str,
                                                                    tuple(np.shape(leaf))):
      return False
    held = [(_bounds(k), v) for k, v in _pieces(leaf, copy=False).items()]
    for index, digest in entry.items():
      cut = None if index in ('dtype', 'shape') else _cut(_bounds(index), held, leaf)
      if cut is not None and _piece_digest(cut) != digest:
        return False
      # cut None: another process holds this piece and checks it (host_pieces refuses a
      # state sharded over processes at save, so this is a replicated one)
      assert cut is not None or index in ('dtype', 'shape') or jax.process_count() > 1
  return True


def _cut(want, held, leaf):
  """The piece at bounds `want`, cut from a held piece that contains it, else from the
  whole array (restored under another sharding; held whole only where this process holds
  all of it); None when this process holds no such piece."""
  for have, array in held:
    if all(hl <= lo and hi <= hh for (lo, hi), (hl, hh) in zip(want, have)):
      return array[tuple(slice(lo - hl, hi - hl) for (lo, hi), (hl, _) in zip(want, have))]
  if getattr(leaf, 'is_fully_addressable', True):
    held.append(([(0, n) for n in np.shape(leaf)], np.asarray(jax.device_get(leaf))))
    return _cut(want, held[-1:], leaf)
  return None


def state_digest(state):
  """The checksum written before per-piece ones (a checkpoint of an earlier ddm_jax):
  sha256 over every leaf's path, dtype, shape and bytes, of a state held whole by this
  process (replicated or fully addressable: asserted)."""
  whole = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    pieces = _pieces(leaf)
    if len(pieces) != 1:
      raise CheckpointError('a checkpoint with whole-state checksums restored sharded: '
                            'restore it replicated')
    array = np.ascontiguousarray(next(iter(pieces.values())))
    whole.update(f'{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}\n'.encode())
    whole.update(array.reshape(-1).view(np.uint8))
  return whole.hexdigest()


def json_digest(obj):
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


class Checkpointer:
  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, 'corrupt_checkpoints'))
    self._step = None  # step of the last save started (named when a write fails)
    self._pending = None  # that step, until its completion is checked
    self._async = async_save
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True))
    except OSError as e:
      raise CheckpointError(f'cannot create checkpoint directory {self.directory}: {e}') from e

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def check_writable(self):
    """CheckpointError at once if the folder refuses a new file (read-only, no space, ...):
    orbax would only time out minutes later in its background thread."""
    try:
      fd, probe = tempfile.mkstemp(prefix='.write_probe_', dir=self.directory)
      os.close(fd)
      os.remove(probe)
    except OSError as e:
      raise CheckpointError(f'checkpoint directory {self.directory} is not writable: '
                            f'{_one_line(e)}') from e

  def save(self, step, state, config, iterator_state=None, force=False):
    """Starts writing checkpoint `step` (orbax, in the background unless async_save=False).
    On this thread: the state's pieces copied to the host (as orbax does too); their
    checksums are computed on another thread and written, by orbax, before it commits."""
    self.wait()  # a failed earlier (async) write stops the run here, naming its step
    self.check_writable()
    config_json = config_to_json(config)
    pieces = host_pieces(state)
    extra = {'config': json_digest(config_json)}
    args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(config_json)}
    if iterator_state is not None:
      import grain  # pylint: disable=import-outside-toplevel  # slow; sample.py never needs it
      args['data'] = grain.checkpoint.CheckpointSave(_IteratorState(iterator_state))
      extra['data'] = json_digest(iterator_state)
    digests = concurrent.futures.Future()
    args['checksums'] = _ChecksumsSave(digests)

    def hash_pieces():
      try:
        digests.set_result({**shard_digests(pieces, SAMPLED_PARTS), **extra})
      except BaseException as e:  # pylint: disable=broad-except  # orbax re-raises it
        digests.set_exception(e)

    if not self._async:   # orbax's save waits for the digests before it returns
      hash_pieces()
    self._step = int(step)
    try:
      with self._writing():  # also a previous async save's failure, re-raised by orbax here
        saved = self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    finally:   # started only now (orbax's own blocking part has the cores to itself), always
      if self._async:
        _HASHING.submit(hash_pieces)
    self._pending = int(step)
    return saved

  @contextlib.contextmanager
  def _writing(self):
    """Around every orbax call that can raise a failed write (disk full, read-only, ...):
    save()'s blocking part, and each call that re-raises a background write's error later
    (save(), wait_until_finished(), check_for_errors(), close()). Which one surfaces it
    depends on timing, so all give the same CheckpointError, naming the step."""
    try:
      yield
    except Exception as e:
      what = 'checkpoints' if self._step is None else f'checkpoint {self._step}'
      raise CheckpointError(f'writing {what} to {self.directory} failed: {_one_line(e)}') from e

  def wait(self):
    """Blocks until the last save is written; CheckpointError if it failed."""
    step, self._pending = self._pending, None
    with self._writing():
      self.manager.wait_until_finished()
      self.manager.check_for_errors()
    if step is not None and jax.process_index() == 0 and not os.path.isdir(
        os.path.join(self.directory, str(step))):
      raise CheckpointError(f'writing checkpoint {step} to {self.directory} failed '
                            '(not committed; see the log above)')

  def check(self):
    """Non-blocking: raises CheckpointError if a finished background write failed."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def read_config(self, step=None):
    step = self.latest_step() if step is None else step
    return self._read_json(step, 'config')

  def _read_json(self, step, item, missing_ok=False):
    """A JSON item (config, checksums) of checkpoint `step`; None if `missing_ok` and absent."""
    path = os.path.join(self.directory, str(step), item, 'metadata')
    if missing_ok and not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        saved = json.load(f)
      if not isinstance(saved, dict):
        raise ValueError(f'expected a JSON object, got {type(saved).__name__}')
      return saved
    except (OSError, ValueError) as e:
      raise CheckpointError(f'checkpoint {os.path.join(self.directory, str(step))} is damaged: '
                            f'cannot read its {item} ({path}): {_one_line(e)}') from e

  def restore_part(self, step, part, abstract):
    """Field `part` (one of SAMPLED_PARTS) of checkpoint `step`'s train state alone, into
    `abstract`'s shapes and shardings, checked against that part's own checksum; None when
    the checkpoint has no such checksum (written before parts had one, or without the
    part): the caller restores the whole state. A sampler needs only its weights: reading
    the optimizer state too, and orbax's metadata of every leaf, was most of a warm
    sample.py's start."""
    sums = self._read_json(step, 'checksums', missing_ok=True) or {}
    if (sums.get('parts') or {}).get(part) is None:
      return None
    return self._read(step, {part: abstract}, sums, part)[part]

  def restore(self, step, abstract_state, with_data=True):
    """-> (state, iterator_state or None), checked against the checkpoint's checksums. The
    EMA as `abstract_state` wants it: dropped, or started from the params, where the
    checkpoint differs (train.ema_decay changed)."""
    where = os.path.join(self.directory, str(step))
    saved_config = self.read_config(step)
    sums = (self._read_json(step, 'checksums') if os.path.isdir(os.path.join(where, 'checksums'))
            else None)   # None: written before checksums existed
    # the EMA as the checkpoint holds it (a mismatch would read as damage), then as wanted
    saved = _with_ema(abstract_state, _keeps_ema(abstract_state, where, saved_config))
    it_state = None
    if with_data:
      import grain  # pylint: disable=import-outside-toplevel
      try:
        it_state = self.manager.restore(int(step), args=ocp.args.Composite(
            data=grain.checkpoint.CheckpointRestore(_IteratorState())))['data'].state
      except Exception as e:
        raise CheckpointError(f'checkpoint {where} is damaged, restoring it failed: '
                              f'{_one_line(e, 240)}') from e
    state = self._read(step, saved, sums, 'state')
    checks = [('config', saved_config)] + ([('data', it_state)] if with_data else [])
    for item, value in checks:
      if sums is not None and item in sums and sums[item] != json_digest(value):
        raise CheckpointError(f'checkpoint {where} is corrupt: its {item} does not match the '
                              'checksum written with it (truncated or modified files)')
    return _with_ema(state, getattr(abstract_state, 'ema_params', None) is not None), it_state

  def _read(self, step, item, sums, what):
    """The pytree `item` (the whole train state, or {part: abstract}) of checkpoint `step`,
    into its shapes and shardings, checked against `sums` (the checkpoint's checksums;
    None: written before checksums, restored unverified with a warning). The one reader
    of array data: restore and restore_part both come here."""
    where = os.path.join(self.directory, str(step))
    part = what != 'state'
    try:
      with ocp.PyTreeCheckpointer() as reader:
        out = reader.restore(epath.Path(where) / 'state', args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=part))
    except Exception as e:
      what_failed = f'restoring its {what} failed' if part else 'restoring it failed'
      raise CheckpointError(f'checkpoint {where} is damaged, {what_failed}: '
                            f'{_one_line(e, 240)}') from e
    if sums is None:
      print(f'warning: checkpoint {where} has no checksums; restored unverified', file=sys.stderr)
      return out
    if 'shards' in sums:
      table = sums['shards'] if isinstance(sums['shards'], dict) else {}
      digest = sums.get('parts', {}).get(what) if part else sums.get('state')
      intact = (digest == json_digest({what: table.get(what)} if part else table)
                and _pieces_match(out, table))
    else:  # whole-state checksums (an earlier ddm_jax)
      intact = (sums['parts'][what] if part else sums.get('state')) == state_digest(
          out[what] if part else out)
    if not intact:
      raise CheckpointError(f'checkpoint {where} is corrupt: its {what} does not match the '
                            'checksum written with it (truncated or modified files)')
    return out

  def restore_latest(self, abstract_state, check_config=None, with_data=True):
    """-> (step, state, iterator_state) of the newest intact checkpoint; (None, None, None)
    when there is none. `check_config(saved_config)` may refuse a checkpoint (ConfigError).

    A checkpoint that cannot be restored or fails its checksums is moved to
    `corrupt_checkpoints/` (with a warning naming it) and the next older one is tried.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        saved = self.read_config(step)
        if check_config is not None:
          check_config(saved)
        state, it_state = self.restore(step, abstract_state, with_data)
      except CheckpointError as e:
        damaged.append(step)
        moved = self._quarantine(step)
        print(f'warning: {e}; moved it to {moved} and trying the previous checkpoint',
              file=sys.stderr, flush=True)
        continue
      if damaged:
        print(f'warning: resuming from checkpoint {step} instead of damaged '
              f'{", ".join(map(str, damaged))}', file=sys.stderr, flush=True)
      return step, state, it_state
    if damaged:
      raise CheckpointError(
          f'every checkpoint in {self.directory} is damaged (steps {damaged}, moved to '
          f'{self.corrupt_directory}); nothing to resume from: run again to start from step 0')
    return None, None, None

  def _quarantine(self, step):
    """Moves checkpoint `step` out of the manager's folder; returns where it went."""
    target = os.path.join(self.corrupt_directory, str(step))
    if jax.process_index() == 0:
      os.makedirs(self.corrupt_directory, exist_ok=True)
      n = 1
      while os.path.exists(target):
        target, n = os.path.join(self.corrupt_directory, f'{step}.{n}'), n + 1
      try:
        os.replace(os.path.join(self.directory, str(step)), target)
      except OSError as e:
        raise CheckpointError(f'checkpoint {step} in {self.directory} is damaged and cannot be '
                              f'moved aside ({_one_line(e)}); remove it by hand') from e
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'quarantined checkpoint {step}')
    self.manager.reload()
    return target

  def close(self):
    """wait(), then shuts orbax's manager down (it waits again, and may re-raise the failure
    wait() already reported: that one is not raised a second time)."""
    try:
      self.wait()
    except CheckpointError:
      with contextlib.suppress(Exception):
        self.manager.close()
      raise
    with self._writing():
      self.manager.close()


# Keys added to those sections after checkpoints were written: a saved config without
# one holds its default.
SECTION_DEFAULTS = {'indicator': {'input': 'eps'}}


def check_compatible(saved, config, workdir):
  """Refuse to continue a run whose model differs from the checkpoint's."""
  new = config_to_json(config)
  for section in COMPATIBLE_SECTIONS:
    defaults = SECTION_DEFAULTS.get(section, {})
    fill = lambda d: None if d is None else {**defaults, **d}  # noqa: E731
    old_s, new_s = fill(saved.get(section)), fill(new.get(section))
    if old_s != new_s:
      diff = sorted(k for k in set(old_s or {}) | set(new_s or {})
                    if (old_s or {}).get(k) != (new_s or {}).get(k))
      raise ConfigError(
          f'{workdir} holds checkpoints of a different model (config.{section}: '
          f'{", ".join(diff) or section} differ); use a new --workdir or the saved config')


def _keeps_ema(abstract_state, where, saved_config):
  """Whether checkpoint `where` holds an EMA (a train state keeps one only while
  train.ema_decay > 0); False for a state without that field. The config saved with the
  state says which (every save writes the state its config made); orbax's metadata of every
  leaf is read only for a config without train.ema_decay."""
  if not hasattr(abstract_state, 'ema_params'):
    return False
  decay = (saved_config.get('train') or {}).get('ema_decay')
  if decay is not None:
    return float(decay) > 0
  try:
    saved = ocp.StandardCheckpointHandler().metadata(epath.Path(where) / 'state')
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointError(f'checkpoint {where} is damaged, reading its metadata failed: '
                          f'{_one_line(e, 240)}') from e
  return 'ema_params' in saved and saved['ema_params'] is not None


def _with_ema(state, keep):
  """`state` (abstract or restored) with an EMA where `keep`: its own, or one started from
  its params (a copy: the step donates both); without one otherwise. Used both ways by
  restore: to read the EMA as the checkpoint holds it, then to return it as wanted."""
  if not hasattr(state, 'ema_params') or (state.ema_params is not None) == keep:
    return state
  start = lambda p: p if isinstance(p, jax.ShapeDtypeStruct) else p.copy()  # noqa: E731
  return state.replace(ema_params=jax.tree_util.tree_map(start, state.params) if keep else None)


def abstract_like(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
