"""Data parallelism with `jax.jit` over a 1-D device mesh (axis 'data').

The global batch is sharded on 'data', the train state replicated; XLA inserts
the gradient all-reduce. Multi-host: every process feeds its own slice of the
global batch and `make_array_from_process_local_data` stitches them together.
"""
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ddm_jax.errors import ConfigError


def maybe_initialize_distributed(enabled):
  """`jax.distributed.initialize()` reads the coordinator from the environment
  (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) or the TPU/SLURM runtime."""
  if enabled and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh():
  # Auto axes: shardings are given at the jit boundary and XLA propagates them
  # (jax.make_mesh defaults to Explicit axes, which put shardings into the types).
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


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


def to_host(tree):
  """Fully replicated (or addressable) arrays -> numpy, on every process."""
  return jax.tree_util.tree_map(lambda a: np.asarray(jax.device_get(a)), tree)
