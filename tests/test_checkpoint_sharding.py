"""Checkpoints of a state sharded over 4 devices (a fresh interpreter with 4 virtual CPU
devices, as tests/test_parallel.py does): each piece is checksummed on its own, a restore
under the same or another sharding checks every piece, and a piece changed on disk is
caught, in the whole state and in a part restored alone."""
import textwrap

import pytest

from tests.helpers import run_python

WORKER = textwrap.dedent('''
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from ddm_jax.errors import CheckpointError
    from ddm_jax.training.checkpoint import Checkpointer

    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    rows, cols, repl = (NamedSharding(mesh, P('data')), NamedSharding(mesh, P(None, 'data')),
                        NamedSharding(mesh, P()))
    rng = np.random.default_rng(0)
    draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    state = {'params': {'w': jax.device_put(draw(8, 8), rows), 'b': jax.device_put(draw(5), repl)},
             'ema_params': {'w': jax.device_put(draw(8, 8), rows),
                            'b': jax.device_put(draw(5), repl)},
             'opt': {'v': jax.device_put(draw(4, 8), cols),
                     'step': jax.device_put(np.int32(7), repl)}}
    want = jax.device_get(state)
    abstract = lambda s: jax.tree_util.tree_map(  # noqa: E731
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), state, s)
    same = jax.tree_util.tree_map(lambda a: a.sharding, state)
    workdir = sys.argv[1]
    ck = Checkpointer(workdir, async_save=False)
    ck.save(1, state, {'model': {}})
    ck.wait()
    sums = json.load(open(os.path.join(ck.directory, '1', 'checksums', 'metadata')))
    pieces = lambda e: sorted(k for k in e if k not in ('dtype', 'shape'))  # noqa: E731
    assert pieces(sums['shards']['params']["['w']"]) == ['0:2,0:8', '2:4,0:8', '4:6,0:8',
                                                          '6:8,0:8'], sums
    assert pieces(sums['shards']['opt']["['v']"]) == ['0:4,0:2', '0:4,2:4', '0:4,4:6', '0:4,6:8']
    assert pieces(sums['shards']['params']["['b']"]) == ['0:5']

    def equal(got):
      return jax.tree_util.tree_all(jax.tree_util.tree_map(
          lambda a, b: np.array_equal(np.asarray(a), b), got, want))

    # the same sharding, all replicated, and rows and columns swapped: every piece checked
    swapped = {'params': {'w': cols, 'b': repl}, 'ema_params': {'w': cols, 'b': repl},
               'opt': {'v': rows, 'step': repl}}
    for shardings in (same, jax.tree_util.tree_map(lambda _: repl, same), swapped):
      got, _ = ck.restore(1, abstract(shardings), with_data=False)
      assert equal(got)
      assert all(a.sharding == s for a, s in zip(jax.tree_util.tree_leaves(got),
                                                 jax.tree_util.tree_leaves(shardings)))
    part = ck.restore_part(1, 'ema_params', abstract(same)['ema_params'])
    assert np.array_equal(np.asarray(part['w']), want['ema_params']['w'])

    # one device's piece of params.w changed on disk, as valid orbax files
    state_dir = os.path.join(ck.directory, '1', 'state')
    saved = ocp.StandardCheckpointer().restore(state_dir)
    saved['params']['w'] = np.asarray(saved['params']['w']).copy()
    saved['params']['w'][2:4] += 1
    with ocp.StandardCheckpointer() as writer:
      writer.save(state_dir, saved, force=True)
    for shardings in (same, swapped):
      try:
        ck.restore(1, abstract(shardings), with_data=False)
        raise SystemExit('a changed piece was restored')
      except CheckpointError as e:
        assert 'is corrupt: its state does not match' in str(e), e
    try:
      ck.restore_part(1, 'params', abstract(same)['params'])
      raise SystemExit('a changed piece of params was restored')
    except CheckpointError as e:
      assert 'is corrupt: its params does not match' in str(e), e
    # the EMA, not changed, still restores alone
    assert np.array_equal(np.asarray(ck.restore_part(1, 'ema_params', abstract(same)[
        'ema_params'])['w']), want['ema_params']['w'])
    ck.close()
    print('OK')
''')


@pytest.mark.subprocess
def test_sharded_state_saves_restores_verifies_and_a_tampered_shard_is_caught(tmp_path):
  proc = run_python(['-c', WORKER, str(tmp_path)], num_devices=4, timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith('OK'), (
      proc.stdout[-2000:] + proc.stderr[-4000:])
