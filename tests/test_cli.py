"""train.py / sample.py: a tiny end-to-end run, and one clear error line for each bad input.

The success path and the scripts' wiring run as real subprocesses; most error cases call
the same entry points (`ddm_jax.cli.train.main` / `ddm_jax.cli.sample.main`) in-process, which is
what train.py / sample.py run, to keep the suite fast.
"""
import json
import os
import signal

import numpy as np
from PIL import Image
import pytest

from ddm_jax.cli.sample import main as sample_main
from ddm_jax.cli.train import main as train_main
from tests.helpers import (REPO, assert_one_line_error, read_jsonl, run_python, tiny_config,
                           train_argv, train_tiny)

TRAIN_STEPS = 4


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
  """train_main installs a SIGTERM handler; put pytest's back afterwards."""
  old = signal.getsignal(signal.SIGTERM)
  yield
  signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope='module')
def trained(data_dir, tmp_path_factory):
  """A workdir trained by `python train.py` for TRAIN_STEPS steps."""
  return train_tiny(tmp_path_factory.mktemp('cli_run'), data_dir, cli=True,
                    **{'train.num_steps': TRAIN_STEPS})


def _checkpoints(workdir):
  path = os.path.join(workdir, 'checkpoints')
  return sorted(os.listdir(path)) if os.path.isdir(path) else []


# ----------------------------------------------------------------------------- success paths


def test_train_cli_writes_checkpoint_metrics_and_config(trained):
  assert _checkpoints(trained) == [str(TRAIN_STEPS)]
  rows = read_jsonl(trained / 'metrics.jsonl')
  assert [r['step'] for r in rows] == [2, 4]  # log_every = 2
  assert all(np.isfinite(r['loss']) for r in rows)
  with open(trained / 'config.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert saved['train']['num_steps'] == TRAIN_STEPS
  assert tuple(saved['model']['block_out_channels']) == tiny_config().model.block_out_channels
  assert os.listdir(trained / 'tensorboard')


def test_sample_cli_ddim_writes_pngs_npz_and_grid(trained, tmp_path):
  out = tmp_path / 'ddim'
  proc = run_python(['sample.py', '--workdir', str(trained), '--num_samples=5', '--sampler=ddim',
                     '--steps=3', '--output', str(out)], timeout=300)
  assert proc.returncode == 0, proc.stderr[-5000:]
  pngs = sorted(p for p in os.listdir(out) if p.endswith('.png') and p != 'grid.png')
  assert pngs == [f'{i:05d}.png' for i in range(5)]
  with np.load(out / 'samples.npz') as f:
    images, step, seed = f['images'], int(f['step']), int(f['seed'])
  assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 1)
  assert step == TRAIN_STEPS and seed == 0
  for i, name in enumerate(pngs):
    np.testing.assert_array_equal(np.asarray(Image.open(out / name)), images[i, ..., 0])
  grid = Image.open(out / 'grid.png')
  assert grid.size[0] > 8 and grid.size[1] > 8
  meta = json.loads((out / 'sampling.json').read_text())
  assert meta['sampler'] == 'ddim' and meta['steps'] == 3 and meta['checkpoint_step'] == TRAIN_STEPS
  assert not [p for p in os.listdir(out) if 'tmp' in p]


@pytest.mark.parametrize('sampler', ['ddpm', 'dpm++2m'])
def test_sample_cli_other_samplers(trained, tmp_path, sampler, capsys):
  def run(name, seed):
    out = tmp_path / name
    assert sample_main(['--workdir', str(trained), '--num_samples=5', f'--sampler={sampler}',
                            '--steps=3', f'--seed={seed}', '--output', str(out)]) == 0
    with np.load(out / 'samples.npz') as f:
      return f['images']
  a = run('a', 0)
  assert a.shape == (5, 8, 8, 1) and a.dtype == np.uint8
  assert len([p for p in os.listdir(tmp_path / 'a') if p.endswith('.png')]) == 6  # 5 + grid
  np.testing.assert_array_equal(run('b', 0), a)  # a seed fixes every image
  assert np.any(run('c', 1) != a)
  assert 'wrote 5 PNGs' in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad inputs


def _train_error(capsys, argv, *needles):
  code = train_main(argv)
  err = capsys.readouterr().err
  assert code != 0
  assert 'Traceback' not in err
  lines = [line for line in err.splitlines() if line.startswith('error: ')]
  assert len(lines) == 1, err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


def test_unknown_config_key_script(data_dir, tmp_path):
  """Through the real script: exit status, one line on stderr, nothing written."""
  workdir = tmp_path / 'wd'
  proc = run_python(['train.py'] + train_argv(data_dir, workdir, '--config.train.no_such_key=3'),
                    timeout=120)
  assert_one_line_error(proc, 'train.no_such_key')
  assert not workdir.exists()


@pytest.mark.parametrize('override,needle', [
    ('--config.nosuch.section=1', 'nosuch.section'),
    ('--config.train.num_steps=0', 'train.num_steps'),
    ('--config.train.num_steps=-5', 'train.num_steps'),
    ('--config.train.batch_size=0', 'train.batch_size'),
    ('--config.train.batch_size=-8', 'train.batch_size'),
    ('--config.train.num_steps=ten', 'train.num_steps'),
])
def test_bad_config_values(data_dir, tmp_path, capsys, override, needle):
  workdir = tmp_path / 'wd'
  _train_error(capsys, train_argv(data_dir, workdir, override), needle)
  assert _checkpoints(workdir) == []


def test_missing_config_file(tmp_path, capsys):
  _train_error(capsys, ['--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path / 'wd')],
               'nope.py')


def test_batch_that_does_not_divide_across_8_devices(data_dir, tmp_path):
  workdir = tmp_path / 'wd'
  proc = run_python(['train.py'] + train_argv(data_dir, workdir, '--config.train.batch_size=12'),
                    num_devices=8, timeout=120)
  assert_one_line_error(proc, 'train.batch_size', '12', '8 devices')
  assert _checkpoints(workdir) == []


def test_group_label_outside_num_groups(tmp_path, capsys):
  """Three digit groups but data.num_groups = 2: the data layer finds label 2."""
  data_dir, workdir = tmp_path / 'data', tmp_path / 'wd'
  _train_error(capsys, train_argv(str(data_dir), workdir, '--config.data.groups=((0,),(1,),(2,))',
                                  '--config.data.proportions=(0.4,0.3,0.3)'),
               'group label 2', 'outside [0, 2)', 'data.num_groups')
  assert _checkpoints(workdir) == []


def test_class_filter_that_selects_nothing(data_dir, tmp_path, capsys):
  workdir = tmp_path / 'wd'
  _train_error(capsys, train_argv(data_dir, workdir, '--config.data.class_filter=(7,)'),
               'data.class_filter')
  assert _checkpoints(workdir) == []


def test_empty_data_set(tmp_path, capsys):
  """A reference folder without images (config file written for the test)."""
  images, labels = tmp_path / 'images', tmp_path / 'labels.txt'
  images.mkdir()
  labels.write_text('')
  config_file = tmp_path / 'empty_config.py'
  config_file.write_text(
      'import sys\n'
      f'sys.path.insert(0, {REPO!r})\n'
      'from configs import digits\n\n\n'
      'def get_config():\n'
      '  c = digits.get_config()\n'
      "  c.data.name = 'reference_folder'\n"
      f'  c.data.image_dir = {str(images)!r}\n'
      f'  c.data.labels_file = {str(labels)!r}\n'
      '  return c\n')
  workdir = tmp_path / 'wd'
  _train_error(capsys, train_argv(str(tmp_path / 'data'), workdir, config_file=str(config_file)),
               str(images), 'no images')
  assert _checkpoints(workdir) == []


@pytest.mark.usefixtures('no_network')
@pytest.mark.parametrize('exists', [True, False])
def test_unprepared_tfds_data_set_fails_fast(tmp_path, capsys, exists):
  data_dir = tmp_path / 'empty_data'
  if exists:
    data_dir.mkdir()
  workdir = tmp_path / 'wd'
  line = _train_error(capsys, train_argv(str(data_dir), workdir, "--config.data.name='mnist'"),
                      'mnist', str(data_dir))
  assert ('not prepared' in line) if exists else ('does not exist' in line)
  assert _checkpoints(workdir) == []


def test_different_model_on_a_trained_workdir(trained, data_dir, capsys):
  before = (_checkpoints(trained), (trained / 'metrics.jsonl').read_text())
  _train_error(capsys, train_argv(data_dir, trained, '--config.model.block_out_channels=(32,)',
                                  f'--config.train.num_steps={2 * TRAIN_STEPS}'),
               'different model', 'config.model', 'block_out_channels')
  assert (_checkpoints(trained), (trained / 'metrics.jsonl').read_text()) == before


def test_sample_without_checkpoints(tmp_path, capsys):
  assert sample_main(['--workdir', str(tmp_path), '--num_samples=2']) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'no checkpoints' in err and str(tmp_path) in err
  assert len(err.strip().splitlines()) == 1
  (tmp_path / 'checkpoints').mkdir()  # a folder with no finished checkpoint
  assert sample_main(['--workdir', str(tmp_path), '--num_samples=2']) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'checkpoint' in err and 'Traceback' not in err


@pytest.mark.parametrize('args,needle', [(['--num_samples=0'], '--num_samples'),
                                         (['--sampler=euler'], '--sampler'),
                                         (['--steps=0'], '--steps'),
                                         (['--steps=5000'], '--steps')])
def test_bad_sample_arguments(trained, tmp_path, capsys, args, needle):
  out = tmp_path / 'out'
  assert sample_main(['--workdir', str(trained), '--output', str(out)] + args) != 0
  err = capsys.readouterr().err
  assert err.startswith('error: ') and needle in err and len(err.strip().splitlines()) == 1
  assert not out.exists()
