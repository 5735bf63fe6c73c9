"""Data parallelism with `jax.jit` over a 1-D device mesh (axis 'data'), on one or many hosts.

The global batch is sharded on 'data', the train state replicated; XLA inserts
the gradient all-reduce. Multi-host: every process feeds its own slice of the
global batch and `make_array_from_process_local_data` stitches them together.

CPU collectives (gloo) give up when a peer arrives ~30 s late, and one host may compile
much slower than another: every program that communicates is compiled ahead of time and
the processes then meet at a coordination-service barrier with a long timeout
(`compile_and_meet`) before its first run.
"""
import itertools
import os

import jax
from jax.experimental import multihost_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddm_jax import trace_cache
from ddm_jax.errors import ConfigError

BARRIER_TIMEOUT_S = 3600
_meetings = itertools.count()


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Join a multi-process run (a no-op once joined). Unset values come from
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID, else from the TPU or SLURM
  runtime (`jax.distributed.initialize`'s cluster detection)."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  try:
    if num_processes is None and env.get('JAX_NUM_PROCESSES'):
      num_processes = int(env['JAX_NUM_PROCESSES'])
    if process_id is None and env.get('JAX_PROCESS_ID'):
      process_id = int(env['JAX_PROCESS_ID'])
  except ValueError as e:
    raise ConfigError(f'JAX_NUM_PROCESSES / JAX_PROCESS_ID must be integers: {e}') from None
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=600, heartbeat_timeout_seconds=120)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'cannot join the multi-process run: {e} (set --coordinator_address, '
                      '--num_processes and --process_id, or JAX_COORDINATOR_ADDRESS, '
                      'JAX_NUM_PROCESSES and JAX_PROCESS_ID)') from None


def maybe_initialize_distributed(enabled):
  if enabled:
    initialize_distributed()


def make_mesh(devices=None):
  """All devices of all processes (or `devices`, e.g. `jax.local_devices()` for a job in
  which every host works on its own)."""
  # Auto axes: shardings are given at the jit boundary and XLA propagates them
  # (jax.make_mesh defaults to Explicit axes, which put shardings into the types).
  if devices is None:
    return jax.make_mesh((jax.device_count(),), ('data',),
                         axis_types=(jax.sharding.AxisType.Auto,))
  return Mesh(np.asarray(devices), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def spans_processes(mesh):
  return len({d.process_index for d in mesh.devices.flat}) > 1


def meet(name, timeout_s=BARRIER_TIMEOUT_S):
  """Every process waits here until all have arrived (no-op for one process)."""
  if jax.process_count() > 1:
    # jax has no public barrier on its coordination service; orbax (a dependency already)
    # wraps it. Imported here: a one-process command need not import orbax for this.
    from orbax.checkpoint import multihost  # pylint: disable=import-outside-toplevel
    multihost.get_barrier_sync_fn()(key=f'ddm_jax {next(_meetings)} {name}',
                                    timeout_ms=int(timeout_s * 1000))


def compile_and_meet(jitted, *args, name, mesh=None):
  """`jitted` (a `jax.jit` or a `trace_cache.Jit`) compiled ahead of time for `args`, through
  the trace cache where it can be; when it communicates across processes (`mesh` spans
  them; default: any multi-process run), the processes meet before it runs."""
  exe = trace_cache.compile(jitted, *args)
  if spans_processes(mesh) if mesh is not None else jax.process_count() > 1:
    meet(f'compiled {name}')
  return exe


def fetch(array):
  """A (possibly multi-host) array -> numpy on this host; an array spread over several
  processes' devices is gathered from all of them (a collective every process calls)."""
  if getattr(array, 'is_fully_addressable', True):
    return np.asarray(jax.device_get(array))
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def any_process(flag):
  """True on every process when `flag` is True on any (a collective every process calls)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  return NamedSharding(mesh, P('data'))


def check_batch_divides(global_batch):
  n, p = jax.device_count(), jax.process_count()
  if global_batch % n:
    raise ConfigError(f'config.train.batch_size={global_batch} does not divide across {n} devices')
  if global_batch % p:
    raise ConfigError(f'config.train.batch_size={global_batch} does not divide across {p} processes')
  return global_batch // p


def global_batch(mesh, local_batch):
  """Per-process numpy batch dict -> globally sharded jax arrays."""
  sharding = batch_sharding(mesh)
  return jax.tree_util.tree_map(
      lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), local_batch)


def put_global(tree, sharding):
  """Host arrays that every process holds in full -> global arrays with `sharding`
  (`device_put` refuses a sharding that spans other processes' devices)."""
  def put(a):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])
  return jax.tree_util.tree_map(put, tree)


def to_host(tree):
  """Fully replicated (or addressable) arrays -> numpy, on every process."""
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)
