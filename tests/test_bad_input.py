"""Bad input never costs a run or runs code: every case below ends in one `error: ...` line
naming the file or key and exit 2 (or, for images with data.skip_bad, in a listed skip).

Most CLI cases call `train_main` in-process (they fail before any model is built); one
subprocess shows the real exit code. Label/prompt reader properties live in test_data.py;
the diffusers cases that test_interop.py covers are not repeated here.
"""
import contextlib
import io
import json
import os
import pickle
import shutil
import signal
import textwrap
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st
from PIL import Image
from safetensors.numpy import load_file, save_file

from ddm_jax import data
from ddm_jax.cli.train import main as train_main
from ddm_jax.config import apply_overrides, load_config_file, validate
from ddm_jax.data import builders
from ddm_jax.data import skipped_images
from ddm_jax.errors import ConfigError, DataError, WeightsError
from ddm_jax.interop import diffusers as interop
from ddm_jax import parallel
from tests.helpers import REPO, assert_one_line_error, run_python

DIGITS = os.path.join(REPO, 'configs', 'digits.py')
SD = os.path.join(REPO, 'configs', 'sd15_lora.py')


def cli_error(argv, *needles):
  """train_main(argv) in-process: exit 2 and exactly one `error:` line naming `needles`."""
  err, out = io.StringIO(), io.StringIO()
  handler = signal.getsignal(signal.SIGTERM)  # train_main installs its own; keep pytest's
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      code = train_main(list(argv))
  finally:
    signal.signal(signal.SIGTERM, handler)
  assert code == 2, (code, out.getvalue(), err.getvalue())
  errors = [line for line in err.getvalue().splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, err.getvalue()
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0], err.getvalue()


# ----------------------------------------------------------------------------- configs

# Should a case pass validation by mistake, the run stops at the data instead of training.
NO_DATA = ['--config.data.name=""']

def write_config(path, body):
  with open(path, 'w') as f:
    f.write(textwrap.dedent(body))
  return str(path)


@pytest.mark.parametrize('overrides, needles', [
    (['--config.train.num_stepz=3'], ['unknown config key: train.num_stepz']),
    (['--config.trian.num_steps=3'], ['unknown config key: trian.num_steps']),
    (['--config.train.num_steps.x=3'], ['unknown config key: train.num_steps.x']),
    (['--config.train.num_steps=ten'], ['config.train.num_steps: expected int']),
    (['--config.train.batch_size=8.5'], ['config.train.batch_size: expected int']),
    (['--config.train.skip_nonfinite=1'], ['config.train.skip_nonfinite: expected bool']),
    (['--config.optim.lr=1e999'], ['config.optim.lr: must be a finite number']),
    (['--config.model.block_out_channels=(16,"a")'],
     ['config.model.block_out_channels: expected a tuple of int']),
    (['--config.model.down_block_types=("DownBlock2D","Nope")', ],
     ['config.model.down_block_types', 'Nope']),
    (['--config.loss.w_ind=-0.1'], ['config.loss.w_ind: must be >= 0, got -0.1']),
    (['--config.loss.w_rec=0', '--config.loss.w_ind=0'], ['w_rec and w_ind cannot both be 0']),
    (['--config.data.resolution=9'],
     ['config.data.resolution: 9 is not divisible by the UNet downsampling factor 2']),
    (['--config.data.resolution=10', '--config.model.block_out_channels=(32,64,64)',
      '--config.model.down_block_types=("DownBlock2D","DownBlock2D","DownBlock2D")',
      '--config.model.up_block_types=("UpBlock2D","UpBlock2D","UpBlock2D")'],
     ['downsampling factor 4']),
    (['--config.train.ema_decay=1.0'], ['config.train.ema_decay: must be in [0, 1)']),
    (['--config.train.batch_size=0'], ['config.train.batch_size: must be positive']),
    (['--config.sample.steps=5000'], ['config.sample.steps: must be in [1, 1000]']),
    (['--config.optim.schedule=cosinus'], ['config.optim.schedule', 'cosinus']),
    (['--config.model.norm_num_groups=7'], ['config.model.norm_num_groups: 7 does not divide']),
    (['--config.indicator.hidden=(16,0)'], ['config.indicator.hidden']),
    (['--config.train.num_steps'], ['--config.train.num_steps needs a value']),
])
def test_bad_config_overrides(tmp_path, overrides, needles):
  cli_error([f'--config={DIGITS}', f'--workdir={tmp_path}', *NO_DATA] + overrides, *needles)
  assert not os.path.exists(tmp_path / 'checkpoints')  # refused before anything was written


def test_bad_config_files(tmp_path):
  base = [f'--workdir={tmp_path / "w"}', *NO_DATA]
  cli_error([f'--config={tmp_path / "nope.py"}'] + base, 'config file not found', 'nope.py')
  syntax = write_config(tmp_path / 'syntax.py', 'def get_config(:\n')
  cli_error([f'--config={syntax}'] + base, 'cannot load config', 'syntax.py', 'SyntaxError')
  no_fn = write_config(tmp_path / 'no_fn.py', 'x = 1\n')
  cli_error([f'--config={no_fn}'] + base, 'cannot load config', 'no_fn.py', 'get_config')
  # A config file can put any value anywhere (here by replacing whole sections).
  wrong_type = write_config(tmp_path / 'wrong_type.py', '''
      import ml_collections
      from configs import digits
      def get_config():
        c = digits.get_config()
        c.train = ml_collections.ConfigDict({**c.train.to_dict(), 'num_steps': '10'})
        return c
      ''')
  cli_error([f'--config={wrong_type}'] + base, "config.train.num_steps: must be an integer, got '10'")
  missing = write_config(tmp_path / 'missing.py', '''
      import ml_collections
      from configs import digits
      def get_config():
        c = digits.get_config()
        c.optim = ml_collections.ConfigDict({k: v for k, v in c.optim.to_dict().items() if k != 'lr'})
        return c
      ''')
  cli_error([f'--config={missing}'] + base, 'config.optim.lr: missing')
  no_section = write_config(tmp_path / 'no_section.py', '''
      from configs import digits
      def get_config():
        c = digits.get_config()
        del c['loss']
        return c
      ''')
  cli_error([f'--config={no_section}'] + base, 'config.loss: missing or not a section')


def test_batch_not_divisible_by_devices_subprocess(tmp_path):
  """A real `train.py` process: exit code 2, one line, before any data or compile work."""
  proc = run_python(['train.py', '--config=configs/digits.py', f'--workdir={tmp_path}',
                     '--config.train.batch_size=8'], num_devices=3, timeout=300)
  assert proc.returncode == 2
  assert_one_line_error(proc, 'config.train.batch_size=8 does not divide across 3 devices')


# ----------------------------------------------------------------------------- config properties

def _leaf_keys(config, prefix=''):
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _leaf_keys(value, f'{prefix}{key}.')
    else:
      out.append(prefix + key)
  return out


_CONFIGS = {'digits': DIGITS, 'sd15_lora': SD}
_KEYS = {name: _leaf_keys(load_config_file(path)) for name, path in _CONFIGS.items()}

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_values = st.one_of(_scalars, st.tuples(_scalars), st.tuples(_scalars, _scalars),
                    st.lists(st.integers(-64, 64), max_size=4))


def _fresh(name):
  config = load_config_file(_CONFIGS[name])
  if name == 'sd15_lora':
    config.model.pretrained = '/nonexistent/sd'
  return config


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(_CONFIGS)).flatmap(lambda name: st.tuples(
    st.just(name), st.one_of(st.sampled_from(_KEYS[name]),
                             st.sampled_from(['train.num_stepz', 'optim.lr.x', 'nope', 'model.']))
)), st.one_of(_values.map(repr), st.text(max_size=12)))
def test_any_override_is_accepted_or_a_config_error(case, raw):
  """--config.KEY=RAW for any key (also unknown ones) and any text: either a valid config
  or a ConfigError naming the key -- never another exception."""
  name, key = case
  try:
    validate(apply_overrides(_fresh(name), {key: raw}))
  except ConfigError as e:
    message = str(e)
    assert '\n' not in message
    assert message.startswith('config.') or message.startswith('unknown config key'), message


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(_CONFIGS)).flatmap(lambda name: st.tuples(
    st.just(name), st.sampled_from(_KEYS[name]))), _values)
def test_any_value_in_a_config_file_is_accepted_or_a_config_error(case, value):
  """A config file is Python: it can put any value of any type at any key. validate()
  either accepts it or raises ConfigError naming a key -- never TypeError & co."""
  name, key = case
  config = _fresh(name)
  *sections, leaf = key.split('.')
  node = config
  for part in sections:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  try:
    validate(config)
  except ConfigError as e:
    assert str(e).startswith('config.'), str(e)


_weight = st.floats(allow_nan=True, allow_infinity=True, width=32)


@settings(max_examples=200, deadline=None)
@given(_weight, _weight)
def test_loss_weights_valid_iff_finite_non_negative_not_both_zero(w_rec, w_ind):
  config = _fresh('digits')
  config.loss.w_rec, config.loss.w_ind = w_rec, w_ind
  valid = all(np.isfinite([w_rec, w_ind])) and w_rec >= 0 and w_ind >= 0 and w_rec + w_ind > 0
  if valid:
    validate(config)
  else:
    with pytest.raises(ConfigError, match=r'config\.loss\.w_(rec|ind)'):
      validate(config)


@settings(max_examples=200, deadline=None)
@given(st.integers(-8, 200), st.integers(1, 5))
def test_resolution_valid_iff_divisible_by_the_unet_downsampling(resolution, blocks):
  config = _fresh('digits')
  config.data.resolution = resolution
  config.model.block_out_channels = (16,) * blocks
  config.model.down_block_types = ('DownBlock2D',) * blocks
  config.model.up_block_types = ('UpBlock2D',) * blocks
  if resolution > 0 and resolution % 2 ** (blocks - 1) == 0:
    validate(config)
  else:
    with pytest.raises(ConfigError, match=r'config\.data\.resolution'):
      validate(config)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 512), st.integers(1, 64), st.integers(1, 8))
def test_batch_valid_iff_divisible_by_devices_and_processes(batch, devices, processes):
  assume(devices % processes == 0)
  with mock.patch.object(jax, 'device_count', lambda: devices), \
      mock.patch.object(jax, 'process_count', lambda: processes):
    if batch % devices == 0:
      assert parallel.check_batch_divides(batch) == batch // processes
    else:
      with pytest.raises(ConfigError, match=rf'batch_size={batch} does not divide across {devices} devices'):
        parallel.check_batch_divides(batch)


# ----------------------------------------------------------------------------- images, labels, prompts

def _rgb(seed=0, size=(12, 12)):
  return np.random.default_rng(seed).integers(0, 256, size + (3,), dtype=np.uint8)


def _write(path, content):
  with open(path, 'wb' if isinstance(content, bytes) else 'w') as f:
    f.write(content)
  return str(path)


def _png_bytes(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def _encoded(array, fmt):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt)
  return buf.getvalue()


def _bomb_bmp():
  """A valid 16x16 BMP whose header claims 40000x40000 pixels (PIL: DecompressionBombError)."""
  raw = bytearray(_encoded(_rgb(2, (16, 16)), 'BMP'))
  raw[18:26] = (40000).to_bytes(4, 'little') * 2
  return bytes(raw)


@pytest.fixture
def folder(tmp_path):
  """Five good images, labels and prompts in the reference format."""
  images = tmp_path / 'images'
  images.mkdir()
  for i in range(5):
    Image.fromarray(_rgb(i)).save(images / f'{i}.png')
  labels = _write(tmp_path / 'labels.json', json.dumps([0, 1, 0, 1, 1]))
  prompts = _write(tmp_path / 'prompts.txt', ''.join(f'a face {i}\n' for i in range(5)))
  return {'image_dir': str(images), 'labels_file': labels, 'prompts_file': prompts,
          'data_dir': str(tmp_path / 'data_dir'), 'root': tmp_path}


def _sd_argv(folder, workdir, **extra):
  args = {'data.image_dir': folder['image_dir'], 'data.labels_file': folder['labels_file'],
          'data.prompts_file': folder['prompts_file'], 'data.data_dir': folder['data_dir'],
          'data.resolution': 8, 'model.pretrained': str(folder['root'] / 'no_such_sd'), **extra}
  return [f'--config={SD}', f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in args.items()]


def _truncated_png():
  raw = _png_bytes(_rgb(7, (64, 64)))
  return raw[:len(raw) // 2]


BAD_FOLDERS = {
    # what to do to the folder -> words the one error line must hold
    'label count': (lambda f: _write(f['labels_file'], json.dumps([0, 1, 0, 1])),
                    ['count mismatch: 5 images in', '4 labels in', 'labels.json']),
    'label outside [0, K)': (lambda f: _write(f['labels_file'], json.dumps([0, 1, 2, 1, 0])),
                             ['labels.json', 'label 2 is 2, outside [0, 2)']),
    'negative label': (lambda f: _write(f['labels_file'], json.dumps([0, -1, 0, 1, 0])),
                       ['labels.json', 'outside [0, 2)']),
    'non-integer label': (lambda f: _write(f['labels_file'], json.dumps([0, 1, 0.5, 1, 0])),
                          ['labels.json', 'label 2 (0.5) is not an integer']),
    'text label': (lambda f: _write(f['labels_file'], json.dumps([0, 1, 'male', 1, 0])),
                   ['labels.json', "label 2 ('male') is not an integer"]),
    'empty labels': (lambda f: _write(f['labels_file'], ''), ['labels.json is empty']),
    'prompt count': (lambda f: _write(f['prompts_file'], 'a\nb\nc\nd\ne\nf\n'),
                     ['6 prompts in', 'prompts.txt']),
    'empty prompt line': (lambda f: _write(f['prompts_file'], 'a\nb\n\nd\ne\n'),
                          ['prompts.txt: line 3 is empty']),
    'empty prompts file': (lambda f: _write(f['prompts_file'], ''), ['prompts.txt is empty']),
    'zero-byte image': (lambda f: _write(os.path.join(f['image_dir'], '2.png'), b''),
                        ['cannot read image', '2.png: not an image file (0 bytes)', 'skip_bad']),
    'not an image': (lambda f: _write(os.path.join(f['image_dir'], '2.png'), 'hello'),
                     ['cannot read image', '2.png: not an image file']),
    'truncated image': (lambda f: _write(os.path.join(f['image_dir'], '3.png'), _truncated_png()),
                        ['cannot read image', '3.png', 'truncated']),
    'decompression bomb': (lambda f: _write(os.path.join(f['image_dir'], '4.png'), _bomb_bmp()),
                           ['cannot read image', '4.png', 'decompression bomb']),
    'float image': (lambda f: Image.fromarray(np.zeros((8, 8), np.float32)).save(
        os.path.join(f['image_dir'], '3.tiff')), ['3.tiff', 'floating-point image']),
    'no images': (lambda f: [os.remove(os.path.join(f['image_dir'], n))
                             for n in os.listdir(f['image_dir'])], ['holds no images']),
}


@pytest.mark.parametrize('case', sorted(BAD_FOLDERS))
def test_bad_reference_data_is_one_line_error(folder, tmp_path, case):
  damage, needles = BAD_FOLDERS[case]
  if case == 'float image':
    _write(folder['labels_file'], json.dumps([0, 1, 0, 1, 1, 0]))
    _write(folder['prompts_file'], 'p\n' * 6)
  damage(folder)
  cli_error(_sd_argv(folder, tmp_path / 'w'), *needles)


def test_malicious_label_pickle_never_runs(folder, tmp_path):
  marker = tmp_path / 'pwned'

  class Exploit:
    def __reduce__(self):
      return (os.system, (f'touch {marker}',))

  labels = _write(tmp_path / 'labels.pkl', pickle.dumps([0, 1, Exploit(), 1, 0]))
  cli_error(_sd_argv({**folder, 'labels_file': labels}, tmp_path / 'w'),
            'labels.pkl', 'refused or unreadable pickle', 'posix.system is not allowed')
  assert not marker.exists()


def test_skip_bad_skips_lists_and_keeps_labels_aligned(folder, capsys):
  _write(os.path.join(folder['image_dir'], '1.png'), b'')
  _write(os.path.join(folder['image_dir'], '3.png'), _truncated_png())
  cfg = ml_collections.ConfigDict({
      'name': 'reference_folder', 'image_dir': folder['image_dir'],
      'labels_file': folder['labels_file'], 'prompts_file': folder['prompts_file'],
      'resolution': 8, 'channels': 3, 'num_groups': 2, 'skip_bad': True})
  source = data.make_source(cfg, folder['data_dir'], 'train')
  assert len(source) == 3
  names = [ex['filename'].decode() for ex in data.prepare(cfg, folder['data_dir'])
           .as_data_source('train')]
  assert names == ['0.png', '2.png', '4.png']
  # label and prompt stay with their image
  assert [source[i]['label'] for i in range(3)] == [0, 0, 1]
  assert [source[i]['prompt'] for i in range(3)] == ['a face 0', 'a face 2', 'a face 4']
  err = capsys.readouterr().err
  warnings = [line for line in err.splitlines() if 'skip_bad left out' in line]
  assert len(warnings) == 1, err  # once per data set, not per call
  assert '2 unreadable image(s)' in warnings[0] and 'metadata.json' in warnings[0]
  # the report: the prepared folder's metadata.json, read back by a fresh builder
  builder = data.prepare(cfg, folder['data_dir'])
  with open(os.path.join(builder.data_path, 'metadata.json')) as f:
    report = json.load(f)['skipped_images']
  assert [r['file'] for r in report] == ['1.png', '3.png']
  assert '0 bytes' in report[0]['error'] and 'truncated' in report[1]['error']
  fresh = builders.ReferenceFolder(config=builder.builder_config, data_dir=folder['data_dir'],
                                   file_format='array_record')
  assert [r['file'] for r in skipped_images(fresh)] == ['1.png', '3.png']
  # the strict config is another prepared copy: it still refuses the folder
  cfg.skip_bad = False
  with pytest.raises(DataError, match=r'1\.png: not an image file \(0 bytes\)'):
    data.prepare(cfg, folder['data_dir'])


def test_skip_bad_through_the_cli(folder, tmp_path):
  """--config.data.skip_bad=True gets past a broken image (the run then stops at the
  missing Stable Diffusion folder, the next input it checks)."""
  _write(os.path.join(folder['image_dir'], '2.png'), b'')
  line, err = cli_error(_sd_argv(folder, tmp_path / 'w', **{'data.skip_bad': True}),
                        'no_such_sd')
  assert 'skip_bad left out 1 unreadable image(s)' in err


def test_all_images_bad_with_skip_bad(folder, tmp_path):
  for name in os.listdir(folder['image_dir']):
    _write(os.path.join(folder['image_dir'], name), b'')
  cli_error(_sd_argv(folder, tmp_path / 'w', **{'data.skip_bad': True}),
            'none of the 5 images', 'is readable')


def _mode_images():
  rgb = _rgb(3, (12, 12))
  gray = rgb[..., 0]
  return {
      'L.png': (Image.fromarray(gray), np.repeat(gray[..., None], 3, -1)),
      'LA.png': (Image.fromarray(gray).convert('LA'), np.repeat(gray[..., None], 3, -1)),
      'RGBA.png': (Image.fromarray(rgb).convert('RGBA'), rgb),
      'P.png': (Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE), None),
      'P.gif': (Image.fromarray(rgb).convert('P'), None),
      '1.png': (Image.fromarray(gray).convert('1'), None),
      'CMYK.jpg': (Image.fromarray(rgb).convert('CMYK'), None),
      'I16.png': (Image.fromarray(gray.astype(np.uint16) * 257), np.repeat(gray[..., None], 3, -1)),
      'I.tiff': (Image.fromarray(gray.astype(np.int32)), np.repeat(gray[..., None], 3, -1)),
  }


@pytest.mark.parametrize('name', sorted(_mode_images()))
def test_image_modes_are_converted_to_rgb(tmp_path, name):
  image, expected = _mode_images()[name]
  path = str(tmp_path / name)
  image.save(path)
  out = builders.load_rgb(path, 12)
  assert out.shape == (12, 12, 3) and out.dtype == np.uint8
  if expected is not None:  # lossless modes: exactly the pixels (16-bit scaled to 8)
    np.testing.assert_array_equal(out, expected)
  else:  # palette / bilevel / CMYK: a real picture, not a saturated or empty one
    assert 10 < out.mean() < 245 and out.std() > 10


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(['png', 'jpeg', 'bmp', 'gif', 'tiff', 'webp']), st.data())
def test_corrupted_image_bytes_load_or_raise_data_error(tmp_path, kind, draw):
  """Any truncation or byte damage of a valid image file: a (R,R,3) uint8 image or a
  DataError naming the file, never another exception."""
  raw = bytearray(_encoded(_rgb(1, (16, 16)), kind.upper()))
  if draw.draw(st.booleans()):
    raw = raw[:draw.draw(st.integers(0, len(raw) - 1))]
  else:
    for _ in range(draw.draw(st.integers(1, 8))):
      raw[draw.draw(st.integers(0, len(raw) - 1))] = draw.draw(st.integers(0, 255))
  path = _write(tmp_path / f'x.{kind}', bytes(raw))
  try:
    out = builders.load_rgb(path, 8)
  except DataError as e:
    assert path in str(e) and '\n' not in str(e)
  else:
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8


# ----------------------------------------------------------------------------- diffusers folders

def _edit_json(path, fn):
  with open(path) as f:
    obj = json.load(f)
  with open(path, 'w') as f:
    json.dump(fn(obj), f)


def _edit_weights(path, fn):
  save_file(fn(load_file(str(path))), str(path))


UNET = 'unet/diffusion_pytorch_model.safetensors'
VAE = 'vae/diffusion_pytorch_model.safetensors'
TEXT = 'text_encoder/model.safetensors'

BAD_PIPELINES = [
    pytest.param('missing vae folder', lambda p: shutil.rmtree(p / 'vae'), r'vae: folder not found',
                 id='missing-subfolder'),
    pytest.param('missing scheduler folder', lambda p: shutil.rmtree(p / 'scheduler'),
                 r'scheduler: folder not found', id='missing-scheduler'),
    pytest.param('no vae in model_index', lambda p: _edit_json(
        p / 'model_index.json', lambda d: {k: v for k, v in d.items() if k != 'vae'}),
                 r"model_index\.json: no 'vae' component", id='model-index-component'),
    pytest.param('broken model_index', lambda p: _write(p / 'model_index.json', '{"unet": '),
                 r'model_index\.json: cannot read JSON', id='model-index-json'),
    pytest.param('broken unet config', lambda p: _write(p / 'unet' / 'config.json', 'nope'),
                 r'unet/config\.json: cannot read JSON', id='config-json'),
    pytest.param('truncated unet weights', lambda p: os.truncate(
        p / UNET, os.path.getsize(p / UNET) // 2),
                 r'unet/diffusion_pytorch_model\.safetensors: cannot read safetensors header',
                 id='truncated-weights'),
    pytest.param('garbage vae weights', lambda p: _write(p / VAE, os.urandom(4096)),
                 r'vae/diffusion_pytorch_model\.safetensors: cannot read safetensors header',
                 id='garbage-weights'),
    pytest.param('empty text weights', lambda p: _write(p / TEXT, b''),
                 r'text_encoder/model\.safetensors: cannot read safetensors header', id='empty-weights'),
    pytest.param('vae shape', lambda p: _edit_weights(p / VAE, lambda s: {
        **s, 'decoder.conv_in.weight': np.zeros((32, 3, 3, 3), np.float32)}),
                 r"'decoder\.conv_in\.weight' has shape \(32, 3, 3, 3\), the model expects "
                 r'\(32, 4, 3, 3\)', id='vae-shape'),
    pytest.param('unet unexpected key', lambda p: _edit_weights(p / UNET, lambda s: {
        **s, 'mid_block.extra.weight': np.zeros((2,), np.float32)}),
                 r"unet/diffusion_pytorch_model\.safetensors: unexpected key 'mid_block\.extra\.weight'",
                 id='unet-unexpected-key'),
    pytest.param('index without weight_map', lambda p: (
        os.rename(p / VAE, p / 'vae' / 'shard.safetensors'),
        _write(p / (VAE + '.index.json'), json.dumps({'metadata': {}}))),
                 r'index\.json: no "weight_map" object', id='index-no-weight-map'),
    pytest.param('index lists a missing key', lambda p: (
        os.rename(p / VAE, p / 'vae' / 'shard.safetensors'),
        _write(p / (VAE + '.index.json'), json.dumps({'weight_map': {
            **{k: 'shard.safetensors' for k in load_file(str(p / 'vae' / 'shard.safetensors'))},
            'encoder.ghost.weight': 'shard.safetensors'}}))),
                 r"shard\.safetensors: key 'encoder\.ghost\.weight' listed in the index is not in the file",
                 id='index-missing-key'),
    pytest.param('unknown beta schedule', lambda p: _edit_json(
        p / 'scheduler' / 'scheduler_config.json', lambda d: {**d, 'beta_schedule': 'cubic'}),
                 r"scheduler/scheduler_config\.json: beta_schedule 'cubic' is not supported",
                 id='scheduler-beta-schedule'),
    pytest.param('unet config is a list', lambda p: _write(p / 'unet' / 'config.json', '[1, 2]'),
                 r'unet/config\.json', id='config-not-object'),
    pytest.param('unet config wrong type', lambda p: _edit_json(
        p / 'unet' / 'config.json', lambda d: {**d, 'block_out_channels': 'abc'}),
                 r'unet/config\.json', id='config-wrong-type'),
    pytest.param('unet config impossible groups', lambda p: _edit_json(
        p / 'unet' / 'config.json', lambda d: {**d, 'norm_num_groups': 7}),
                 r'unet/config\.json', id='config-impossible-value'),
]


@pytest.mark.parametrize('what, damage, message', BAD_PIPELINES)
def test_bad_diffusers_folder_is_a_weights_error(pipe, what, damage, message):
  damage(pipe)
  with pytest.raises(WeightsError, match=message) as info:
    interop.load_pipeline(str(pipe))
  assert '\n' not in str(info.value), what


def test_bad_diffusers_folder_through_the_cli(folder, pipe, tmp_path):
  shutil.rmtree(pipe / 'vae')
  cli_error(_sd_argv(folder, tmp_path / 'w', **{'model.pretrained': str(pipe)}),
            f'{pipe}/vae: folder not found')
