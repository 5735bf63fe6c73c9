"""One restore path, with or without the EMA: a checkpoint is read as it was saved (with or
without its EMA, said by its config, or by orbax's metadata for a config without
train.ema_decay) and returned as the caller's state wants it: the EMA dropped, kept, or
started from the restored params as a buffer of its own (the step donates both)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ddm_jax.training.checkpoint import Checkpointer, abstract_like
from ddm_jax.training.state import create_train_state


def _state(ema_decay):
  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}
  state = create_train_state(params, optax.adam(1e-3), ema_decay)
  if state.ema_params is not None:   # an EMA unlike the params, so a mix-up shows
    state = state.replace(ema_params=jax.tree_util.tree_map(lambda p: p + 1, params))
  return state


def _equal(a, b):
  return jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


@pytest.mark.parametrize('config', [{'train': {'ema_decay': 0.9}}, {'model': {}}],
                         ids=['config says', 'metadata says'])
def test_a_checkpoint_with_an_ema_restores_with_or_without_it(tmp_path, config):
  saved = _state(0.9)
  ck = Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, saved, config)
  ck.wait()
  got, _ = ck.restore(1, abstract_like(saved), with_data=False)
  assert _equal(got.params, saved.params) and _equal(got.ema_params, saved.ema_params)
  without, _ = ck.restore(1, abstract_like(_state(0.0)), with_data=False)
  assert without.ema_params is None and _equal(without.params, saved.params)
  assert _equal(without.opt_state, saved.opt_state)
  assert _equal(ck.restore_part(1, 'ema_params', abstract_like(saved.ema_params)),
                saved.ema_params)
  ck.close()


def test_a_checkpoint_without_an_ema_starts_one_from_its_params(tmp_path):
  saved = _state(0.0)
  ck = Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, saved, {'train': {'ema_decay': 0.0}})
  ck.wait()
  got, _ = ck.restore(1, abstract_like(_state(0.9)), with_data=False)
  assert _equal(got.params, saved.params) and _equal(got.ema_params, saved.params)
  assert all(e is not p for e, p in zip(jax.tree_util.tree_leaves(got.ema_params),
                                        jax.tree_util.tree_leaves(got.params)))
  same, _ = ck.restore(1, abstract_like(saved), with_data=False)
  assert same.ema_params is None and _equal(same.params, saved.params)
  assert ck.restore_part(1, 'ema_params', abstract_like(saved.params)) is None
  ck.close()
