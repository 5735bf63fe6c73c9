"""The one place a train state is built or restored.

mesh -> optimizer -> abstract state (`eval_shape`, nothing allocated) -> replicated
shardings -> state created already sharded by `jit(out_shardings=...)`, or restored from
a checkpoint into the same shardings -> frozen weights on the devices -> the jitted step
(`compile` builds it from shapes alone, before any big array exists, if the caller can).
Training, loading a trained workdir, the benchmarks and the multi-process test worker
all go through `TrainSetup`, so they compile the same programs.
"""
import dataclasses
import os
from typing import Any

import flax
import jax
import ml_collections

from ddm_jax import parallel, trace_cache
from ddm_jax.config import is_latent, program_config
from ddm_jax.ddm import DDM, build_ddm
from ddm_jax.errors import CheckpointError, ConfigError
from ddm_jax.hostmem import release_host_memory
from ddm_jax.training.checkpoint import Checkpointer, config_from_json
from ddm_jax.training.optim import make_optimizer
from ddm_jax.training.state import create_train_state
from ddm_jax.training.step import hyperparameters, jit_train_step, make_train_step


def init_key(config):
  """The key the parameters are initialised from (apart from the per-step keys)."""
  return jax.random.fold_in(jax.random.key(config.train.seed), -1 % (2 ** 31))


class TrainSetup:
  """Shardings, optimizer and step of `ddm` under `config` on `mesh` (default: all devices).

  `target` is the abstract state with its shardings (for `Checkpointer.restore`); a
  fresh state comes from `init_state()`: params from `ddm.init`, or the `params` given
  here (a benchmark's fixed weights, drawn once instead of again under `eval_shape`)."""

  def __init__(self, ddm: DDM, config, mesh=None, params=None):
    self.ddm, self.config = ddm, config
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.repl = parallel.replicated(self.mesh)
    self.data = parallel.batch_sharding(self.mesh)
    self.tx = make_optimizer(config.optim, config.train.num_steps,
                             config.train.get('trainable', 'all'))
    # the step's last argument: seed, loss weights, lr (config.RUNTIME_KEYS), replicated
    self.hyper = parallel.put_global(hyperparameters(config), self.repl)
    self._params = params
    # The init is traced once: its abstract result here, its program in init_state (a
    # second trace of the model's init was a large part of a warm train.py start).
    # With the trace cache, a warm start reads it (and the state's shapes) from there.
    self._traced_init = None if params is not None else trace_cache.trace(
        trace_cache.jit(self._init, trace_cache.describe('train init', program_config(config)),
                        in_shardings=self.repl, out_shardings=self.repl), init_key(config))
    abstract = (self._traced_init.out_info if params is None
                else jax.eval_shape(self._state_from, params))
    self.shardings = jax.tree_util.tree_map(lambda _: self.repl, abstract)
    self.target = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.repl), abstract)

  def _state_from(self, params):
    return create_train_state(params, self.tx, self.config.train.ema_decay)

  def _init(self, rng):
    return self._state_from(self.ddm.init(rng))

  def init_state(self, params=None):
    """A fresh state: from `params`, or the params given to the constructor, else `ddm.init`."""
    params = self._params if params is None else params
    if params is not None:
      return jax.device_put(self._state_from(params), self.shardings)
    return self._traced_init.compile()(init_key(self.config))

  def init_state_from(self, base_workdir):
    """A fresh state whose params['unet'] is the trained workdir `base_workdir`'s (config
    train.init_from): its EMA weights where it kept them, else its params. Leaves the
    base lacks (e.g. the class embedding of a group-conditioned UNet tuned from an
    unconditional base) and the whole indicator keep their fresh init. Returns
    (state, info): info counts and names the copied, kept and unused leaves."""
    fresh = self.init_state().params
    if not isinstance(fresh, dict) or 'unet' not in fresh:
      raise ConfigError('config.train.init_from: this model has no params["unet"] to copy into '
                        '(pixel models only)')
    base, info = load_base_unet(base_workdir)
    new_flat = _flat(fresh['unet'])
    base_flat = _flat(base)
    copied, kept, merged = [], [], {}
    for path, leaf in new_flat.items():
      if path not in base_flat:
        kept.append(path)
        merged[path] = leaf
        continue
      b = base_flat[path]
      if tuple(b.shape) != tuple(leaf.shape):
        raise ConfigError(f'config.train.init_from: leaf unet/{path} has shape {tuple(b.shape)} '
                          f'in {base_workdir} but {tuple(leaf.shape)} in this model')
      copied.append(path)
      merged[path] = b.astype(leaf.dtype)
    info.update(copied=len(copied), kept=sorted(kept),
                unused=sorted(p for p in base_flat if p not in new_flat))
    params = dict(fresh, unet=flax.traverse_util.unflatten_dict(merged, sep='/'))
    del fresh, base, base_flat, new_flat
    return self.init_state(params), info

  def frozen(self):
    return jax.device_put(self.ddm.frozen(), self.repl)

  def step_fn(self):
    """The jitted train step(state, batch, frozen, hyper) -> (state, metrics), state
    donated; call it with `self.hyper`."""
    return jit_train_step(make_train_step(self.ddm, self.config), self.shardings, self.data,
                          self.repl, trace_cache.describe('train step',
                                                          program_config(self.config)))

  def compile(self, batch, frozen):
    """The step compiled ahead of time from shapes, called (state, batch, frozen,
    self.hyper): `batch` and `frozen` may be arrays or `jax.ShapeDtypeStruct`s, the state
    is `target`. A caller that compiles before it makes
    the state and the weights keeps XLA's own peak (large for the SD-1.5 step on CPU)
    from sitting on top of them; what the compiler
    freed is then handed back to the OS."""
    spec = lambda tree, sharding: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding,
                                       weak_type=getattr(a, 'weak_type', False)), tree)
    compiled = trace_cache.compile(self.step_fn(), self.target, spec(batch, self.data),
                                   spec(frozen, self.repl), spec(self.hyper, self.repl))
    release_host_memory()
    return compiled


def _flat(tree):
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep='/')


def load_base_unet(workdir):
  """params['unet'] of the latest checkpoint in the pixel workdir `workdir` (EMA where
  kept, else the params; a LoRA fine-tune's adapters merged in) and {'base', 'step', 'source'}; ConfigError (config.train.init_from)
  when there is no checkpoint to read."""
  where = os.path.abspath(workdir)
  if not os.path.isdir(os.path.join(where, 'checkpoints')):
    raise ConfigError(f'config.train.init_from: no checkpoints in {where} (train the base first)')
  ckpt = Checkpointer(where, async_save=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise ConfigError(f'config.train.init_from: no finished checkpoint in {ckpt.directory}')
    config = config_from_json(ckpt.read_config(step))
    if is_latent(config):
      raise ConfigError(f'config.train.init_from: {where} is a latent (Stable Diffusion) run; '
                        'only pixel UNets can be copied')
    setup = TrainSetup(build_ddm(config), config)
    params, source = _restore_sample_params(ckpt, step, setup)
  finally:
    ckpt.close()
  if not isinstance(params, dict) or 'unet' not in params:
    raise ConfigError(f'config.train.init_from: {where} holds no params["unet"]')
  unet = setup.ddm.merged_unet(params)   # a LoRA fine-tune: adapters folded in
  del params
  return unet, {'base': where, 'step': int(step), 'source': source}


def _restore_sample_params(ckpt, step, setup, use_ema=True):
  """The weights to sample with from checkpoint `step` of a run trained under
  `setup.config`: its EMA where it kept one (and `use_ema`), else its params. Only that
  part of the state is read where the checkpoint allows it (`Checkpointer.restore_part`),
  else the whole state. -> (params, 'ema_params' or 'params')."""
  keeps_ema = float(setup.config.train.get('ema_decay', 0.0)) > 0
  part = 'ema_params' if use_ema and keeps_ema else 'params'
  params = ckpt.restore_part(step, part, setup.target.params)
  if params is None:
    state, _ = ckpt.restore(step, setup.target, with_data=False)
    params = state.sample_params if use_ema else state.params
    part = 'ema_params' if use_ema and state.ema_params is not None else 'params'
  return params, part


@dataclasses.dataclass
class Trained:
  """A trained workdir's latest checkpoint, ready to sample from."""
  config: ml_collections.ConfigDict
  ddm: DDM
  params: Any     # the EMA weights where kept and asked for, else the raw ones
  frozen: Any     # on the devices, replicated
  mesh: Any
  step: int


def load_trained(workdir, use_ema=True):
  """The latest finished checkpoint in `workdir`, with the config it was trained with."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(f'no checkpoints in {workdir} (train first with train.py)')
  ckpt = Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f'no finished checkpoint in {ckpt.directory}')
  config = config_from_json(ckpt.read_config(step))
  setup = TrainSetup(build_ddm(config), config)
  try:
    params, _ = _restore_sample_params(ckpt, step, setup, use_ema)
  finally:
    ckpt.close()
  return Trained(config, setup.ddm, params, setup.frozen(), setup.mesh, step)
