"""The training loop end to end on the embedded digits: it learns, and it resumes exactly."""
import json
import os

import jax
import numpy as np
import pytest

from ddm_jax.training.loop import train
from tests.helpers import read_jsonl, tiny_config


def _np(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _assert_trees_equal(a, b, what):
  la, ta = jax.tree_util.tree_flatten(_np(a))
  lb, tb = jax.tree_util.tree_flatten(_np(b))
  assert ta == tb, what
  for i, (x, y) in enumerate(zip(la, lb)):
    assert x.dtype == y.dtype and x.shape == y.shape, (what, i)
    assert np.array_equal(x, y), f'{what}: leaf {i} differs by {np.abs(x - y).max()}'


def test_short_training_lowers_the_denoising_loss(data_dir, tmp_path):
  steps = 80
  config = tiny_config(data_dir, **{'train.num_steps': steps, 'train.log_every': 1,
                                    'train.checkpoint_every': steps})
  state = train(config, str(tmp_path), progress=False)
  assert int(state.step) == steps and int(state.nonfinite_count) == 0
  rows = read_jsonl(tmp_path / 'metrics.jsonl')
  assert [r['step'] for r in rows] == list(range(1, steps + 1))
  for key in ('loss', 'loss_rec', 'loss_ind', 'indicator_acc', 'ind_grad_ratio', 'grad_norm',
              'steps_per_sec'):
    assert all(np.isfinite(r[key]) for r in rows), key
  assert all(r['ind_grad_ratio'] > 0 for r in rows)   # the indicator term pulls at w_ind 0.05
  first = np.mean([r['loss_rec'] for r in rows[:10]])
  last = np.mean([r['loss_rec'] for r in rows[-10:]])
  assert last < 0.6 * first, (first, last)
  # The logged total is the weighted sum of the logged parts.
  r = rows[-1]
  assert r['loss'] == pytest.approx(0.95 * r['loss_rec'] + 0.05 * r['loss_ind'], rel=1e-5)
  assert os.listdir(tmp_path / 'checkpoints') == [str(steps)]
  with open(tmp_path / 'config.json', encoding='utf-8') as f:
    assert json.load(f)['train']['num_steps'] == steps
  # EMA moved away from the initial params but lags behind the trained ones.
  assert any(np.any(e != p) for e, p in zip(jax.tree_util.tree_leaves(_np(state.ema_params)),
                                            jax.tree_util.tree_leaves(_np(state.params))))


def test_resume_is_bit_identical(data_dir, tmp_path):
  n = 8
  config = tiny_config(data_dir, **{'train.num_steps': n, 'train.checkpoint_every': n // 2,
                                    'train.log_every': 1})
  straight = train(config, str(tmp_path / 'straight'), progress=False)

  polls = []

  def stop_at_half():
    polls.append(1)
    return len(polls) >= n // 2

  split_dir = str(tmp_path / 'split')
  half = train(config, split_dir, should_stop=stop_at_half, progress=False)
  assert int(half.step) == n // 2
  assert sorted(os.listdir(os.path.join(split_dir, 'checkpoints'))) == [str(n // 2)]
  resumed = train(config, split_dir, progress=False)  # same workdir, same num_steps
  assert int(resumed.step) == n
  assert sorted(int(s) for s in os.listdir(os.path.join(split_dir, 'checkpoints'))) == [n // 2, n]

  _assert_trees_equal(straight.params, resumed.params, 'params')
  _assert_trees_equal(straight.ema_params, resumed.ema_params, 'ema_params')
  _assert_trees_equal(straight.opt_state, resumed.opt_state, 'opt_state')
  assert int(straight.step) == int(resumed.step)
  # The same batches in the same order: every logged metric after the restart matches too.
  a = read_jsonl(tmp_path / 'straight' / 'metrics.jsonl')
  b = read_jsonl(os.path.join(split_dir, 'metrics.jsonl'))
  assert [r['step'] for r in b] == list(range(1, n + 1))
  for ra, rb in zip(a, b):
    for key in ('loss', 'loss_rec', 'loss_ind', 'grad_norm'):
      assert ra[key] == rb[key], (ra['step'], key)
  # A half-way state differs from the final one (the test would notice a no-op resume).
  assert any(np.any(x != y) for x, y in zip(jax.tree_util.tree_leaves(_np(half.params)),
                                            jax.tree_util.tree_leaves(_np(resumed.params))))

  # Running again on a finished workdir trains nothing and changes nothing.
  again = train(config, split_dir, progress=False)
  _assert_trees_equal(resumed.params, again.params, 'params after a no-op rerun')
  assert len(read_jsonl(os.path.join(split_dir, 'metrics.jsonl'))) == n


def test_ema_decay_zero_keeps_no_copy_and_resuming_across_the_change_works(data_dir, tmp_path):
  """train.ema_decay 0 keeps no EMA buffer (sampling uses the params). A run resumed with the
  EMA switched on or off restores its checkpoint (a mismatch must not read as damage) and
  starts the EMA from the restored params, or drops it."""
  n = 4
  base = {'train.num_steps': n, 'train.checkpoint_every': n // 2, 'train.log_every': 1}
  polls = []

  def stop_at_half():
    polls.append(1)
    return len(polls) % (n // 2) == 0

  off_dir = str(tmp_path / 'off_then_on')
  half = train(tiny_config(data_dir, **base, **{'train.ema_decay': 0.0}), off_dir,
               should_stop=stop_at_half, progress=False)
  assert half.ema_params is None and half.sample_params is half.params
  on = train(tiny_config(data_dir, **base, **{'train.ema_decay': 0.9}), off_dir, progress=False)
  assert int(on.step) == n and on.ema_params is not None
  assert not os.path.exists(os.path.join(off_dir, 'corrupt_checkpoints'))
  assert jax.tree_util.tree_structure(on.ema_params) == jax.tree_util.tree_structure(on.params)
  # started from the params restored at step n/2, it lags behind the params at step n
  assert any(np.any(e != p) for e, p in zip(jax.tree_util.tree_leaves(_np(on.ema_params)),
                                            jax.tree_util.tree_leaves(_np(on.params))))

  on_dir = str(tmp_path / 'on_then_off')
  polls.clear()
  half = train(tiny_config(data_dir, **base, **{'train.ema_decay': 0.9}), on_dir,
               should_stop=stop_at_half, progress=False)
  assert half.ema_params is not None
  off = train(tiny_config(data_dir, **base, **{'train.ema_decay': 0.0}), on_dir, progress=False)
  assert int(off.step) == n and off.ema_params is None
  assert not os.path.exists(os.path.join(on_dir, 'corrupt_checkpoints'))
