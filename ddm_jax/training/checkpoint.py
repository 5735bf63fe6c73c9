"""Checkpoints with orbax: train state, the config and each process's data-iterator position.

Orbax writes each step into a temporary folder and renames it on commit, so a
run killed mid-write never leaves a checkpoint that `latest_step` would pick up.
"""
import json
import os

import grain
import jax
import orbax.checkpoint as ocp

from ddm_jax.errors import CheckpointError, ConfigError

# Parts of the config that must match to continue training from a checkpoint.
COMPATIBLE_SECTIONS = ('model', 'indicator', 'diffusion', 'lora')


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


def config_to_json(config):
  return json.loads(json.dumps(config.to_dict() if hasattr(config, 'to_dict') else config))


class Checkpointer:
  def __init__(self, workdir, keep=3, async_save=True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    try:
      self.manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save))
    except OSError as e:
      raise CheckpointError(f'cannot create checkpoint directory {self.directory}: {e}') from e

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, config, iterator_state=None, force=False):
    args = {'state': ocp.args.StandardSave(state),
            'config': ocp.args.JsonSave(config_to_json(config))}
    if iterator_state is not None:
      args['data'] = grain.checkpoint.CheckpointSave(_IteratorState(iterator_state))
    try:
      return self.manager.save(int(step), args=ocp.args.Composite(**args), force=force)
    except Exception as e:  # disk full, read-only, ... : stop with the reason, keep older ones
      raise CheckpointError(f'writing checkpoint {step} to {self.directory} failed: {e}') from e

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f'writing a checkpoint to {self.directory} failed: {e}') from e

  def read_config(self, step=None):
    step = self.latest_step() if step is None else step
    path = os.path.join(self.directory, str(step), 'config', 'metadata')
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, ValueError) as e:
      raise CheckpointError(f'cannot read the config of checkpoint {step} ({path}): {e}') from e

  def restore(self, step, abstract_state, with_data=True):
    """-> (state, iterator_state or None)."""
    args = {'state': ocp.args.StandardRestore(abstract_state)}
    if with_data:
      args['data'] = grain.checkpoint.CheckpointRestore(_IteratorState())
    try:
      out = self.manager.restore(int(step), args=ocp.args.Composite(**args))
    except Exception as e:
      raise CheckpointError(f'cannot restore checkpoint {step} from {self.directory}: {e}') from e
    return out['state'], (out['data'].state if with_data else None)

  def close(self):
    self.manager.close()


def check_compatible(saved, config, workdir):
  """Refuse to continue a run whose model differs from the checkpoint's."""
  new = config_to_json(config)
  for section in COMPATIBLE_SECTIONS:
    if saved.get(section) != new.get(section):
      diff = sorted(k for k in set(saved.get(section) or {}) | set(new.get(section) or {})
                    if (saved.get(section) or {}).get(k) != (new.get(section) or {}).get(k))
      raise ConfigError(
          f'{workdir} holds checkpoints of a different model (config.{section}: '
          f'{", ".join(diff) or section} differ); use a new --workdir or the saved config')


def abstract_like(tree):
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
