"""The embedded digits in the reference format (prepare_sd_digits), the reference folder's
held-out split, and the evaluation's real-data side on it: the held-out split, a plugged-in
evaluator held to the accuracy floor. No model is trained here."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from ddm_jax import data
from ddm_jax.cli.prepare_sd_digits import config_overrides, main as prepare_main
from ddm_jax.config import apply_overrides, load_config_file
from ddm_jax.data import builders
from ddm_jax.data.reference_digits import write_reference_digits
from ddm_jax.errors import ConfigError, DataError
from ddm_jax.evaluation import context as C
from tests.helpers import REPO, assert_one_line_error, run_python

pytestmark = pytest.mark.usefixtures('no_network')

RES = 16


@pytest.fixture(scope='module')
def digits_folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('refdigits') / 'sd_digits')
  summary = write_reference_digits(out, ((7,), (8,)), (3, 1), seed=2, resolution=RES)
  return out, summary


def sd_digits_config(out, data_dir, heldout=True):
  """configs/sd15_digits.py pointed at `out` through the overrides prepare_sd_digits prints."""
  c = load_config_file(os.path.join(REPO, 'configs', 'sd15_digits.py'))
  args = dict(a[len('--config.'):].split('=', 1) for a in config_overrides(out, 'x'))
  if not heldout:
    args['data.heldout_dir'] = ''
  c = apply_overrides(c, {**args, 'data.resolution': str(RES)})
  c.data.data_dir = data_dir
  return c


def test_same_images_as_biased_digits_in_the_reference_layout(digits_folder):
  out, summary = digits_folder
  images, digits = builders.load_sklearn_digits()
  splits = builders.digits_splits(digits, ((7,), (8,)), (0.75, 0.25), 2)
  for split, folder in (('train', 'train'), ('test', 'heldout')):
    rows = splits[split]
    assert summary['sklearn_rows'][folder] == rows.tolist()
    names = sorted(os.listdir(os.path.join(out, folder, 'images')))
    assert names == [f'{i:05d}.png' for i in range(len(rows))]
    with open(os.path.join(out, folder, 'labels.json')) as f:
      labels = json.load(f)
    assert labels == (digits[rows] == 8).astype(int).tolist()
    with open(os.path.join(out, folder, 'prompts.txt')) as f:
      assert f.read().splitlines() == ['a handwritten digit'] * len(rows)
    with Image.open(os.path.join(out, folder, 'images', names[3])) as im:
      got = np.asarray(im)
    want = np.asarray(builders.resize_square(Image.fromarray(images[rows[3], ..., 0]), RES))
    assert got.shape == (RES, RES, 3) and all(np.array_equal(got[..., c], want) for c in range(3))
  assert abs(np.subtract(*summary['group_counts']['heldout'])) <= 1  # held out: balanced


def test_heldout_dir_is_the_test_split(digits_folder, tmp_path):
  out, summary = digits_folder
  cfg = sd_digits_config(out, str(tmp_path / 'data_dir')).data
  x, y = data.load_arrays(cfg, cfg.data_dir, 'test')
  assert x.shape == (sum(summary['group_counts']['heldout']), RES, RES, 3)
  np.testing.assert_array_equal(np.bincount(y), summary['group_counts']['heldout'])
  np.testing.assert_array_equal(data.group_counts(cfg, cfg.data_dir, 'train'),
                                summary['group_counts']['train'])
  assert data.make_source(cfg, cfg.data_dir, 'test')[0]['prompt'] == 'a handwritten digit'
  # the held-out folder is part of the fingerprint: with and without are two prepared copies
  plain = sd_digits_config(out, cfg.data_dir, heldout=False).data
  assert data.make_builder(plain, cfg.data_dir).builder_config.name != \
      data.make_builder(cfg, cfg.data_dir).builder_config.name


def test_bad_heldout_dir(digits_folder, tmp_path):
  out, _ = digits_folder
  cfg = sd_digits_config(out, str(tmp_path / 'data_dir')).data
  cfg.heldout_dir = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='data.heldout_dir .*nowhere does not exist'):
    data.prepare(cfg, cfg.data_dir)
  (tmp_path / 'empty').mkdir()
  cfg.heldout_dir = str(tmp_path / 'empty')
  with pytest.raises(DataError, match=r'must hold images/, labels\.'):
    data.prepare(cfg, cfg.data_dir)


def test_prepare_cli(tmp_path, capsys):
  out = tmp_path / 'seven_eight'
  assert prepare_main(['--out', str(out), '--pair', '7,8', '--ratio', '9:1',
                       '--resolution', '12']) == 0
  printed = capsys.readouterr().out
  assert 'train [106, 12]' in printed  # 9:1 of the 60 % pools and f'--config.data.heldout_dir={out}/heldout' in printed
  with open(out / 'reference_digits.json') as f:
    assert json.load(f)['resolution'] == 12
  assert prepare_main(['--out', str(out), '--pair', '7,8']) == 0  # its own output: replaced
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep me')
  for args, needle in [(['--pair', '3'], '--pair'), (['--ratio', '1:x'], '--ratio'),
                       (['--ratio', '1:0:1'], '--ratio'), (['--resolution', '4'], 'resolution'),
                       (['--out', str(tmp_path / 'mine')], 'not a reference-digits folder')]:
    assert prepare_main(['--out', str(tmp_path / 'x'), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and needle in err and len(err.splitlines()) == 1, err
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep me'


def test_prepare_module_runs_as_a_command(tmp_path):
  proc = run_python(['-m', 'ddm_jax.cli.prepare_sd_digits', '--out', str(tmp_path / 'd'),
                     '--pair', '1,2'], timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert_one_line_error(run_python(['-m', 'ddm_jax.cli.prepare_sd_digits', '--pair', '1,x'],
                                   timeout=300), '--pair')


# ------------------------------------------------------------------ evaluation's real side


def test_evaluation_needs_heldout_images(digits_folder, tmp_path):
  out, _ = digits_folder
  config = sd_digits_config(out, str(tmp_path / 'data_dir'), heldout=False)
  settings = C.EvalSettings(num_samples=16, evaluator='tests.eval_plugins:centroid')
  with pytest.raises(DataError, match='needs held-out images: pass --heldout_dir'):
    C.EvalContext(config, settings)
  # --heldout_dir supplies them to a run trained without
  ctx = C.EvalContext(config, C.EvalSettings(num_samples=16, heldout_dir=os.path.join(out, 'heldout'),
                                             evaluator='tests.eval_plugins:centroid'))
  assert ctx.splits == {'evaluator': 'train', 'heldout': 'test', 'reference': ['train', 'test']}
  info = ctx.evaluator_info
  assert info['kind'] == 'tests.eval_plugins:centroid' and info['heldout_accuracy'] >= 0.95
  assert ctx.ref_feats.shape == (ctx.ref_labels.size, (RES // 2) ** 2 * 3)


def test_plugged_evaluator_is_held_to_the_floor(digits_folder, tmp_path):
  out, _ = digits_folder
  config = sd_digits_config(out, str(tmp_path / 'data_dir'))
  with pytest.raises(DataError, match='below the floor'):
    C.EvalContext(config, C.EvalSettings(num_samples=16, evaluator='tests.eval_plugins:constant'))
  for spec, needle in [('tests.eval_plugins:nothing', 'has no nothing'),
                       ('tests.nowhere:f', 'cannot import tests.nowhere'),
                       ('tests.eval_plugins:not_an_evaluator', 'no logits_and_features')]:
    with pytest.raises(ConfigError, match=needle):
      C.EvalContext(config, C.EvalSettings(num_samples=16, evaluator=spec))
  with pytest.raises(ConfigError, match="'cnn' or 'module:factory'"):
    C.EvalSettings(evaluator='resnet').validate()


@pytest.mark.parametrize('name', ['sd15_lora.py', 'sd15_digits.py'])
def test_sd_configs_claim_the_reference_step(name):
  """The configs that claim the published run use its step: clip by value 1.0 on the
  running accumulated gradient after every micro-step, accumulation 4, nn.Linear's init."""
  c = load_config_file(os.path.join(REPO, 'configs', name))
  assert (c.optim.clip, c.optim.clip_value, c.optim.grad_accum) == ('reference', 1.0, 4)
  assert c.indicator.init == 'torch' and (c.loss.w_rec, c.loss.w_ind) == (0.95, 0.05)
  assert (c.optim.lr, c.optim.schedule, c.train.batch_size) == (1e-5, 'constant', 1)
