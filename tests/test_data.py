"""Tests of ddm_jax.data: builders, safe label readers and the grain pipeline (offline)."""
import collections
import json
import os
import pickle
import tempfile
import time

from hypothesis import given, settings, strategies as st
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from configs import digits as digits_config
from ddm_jax import data
from ddm_jax.data import builders, preprocessing, subsample
from ddm_jax.errors import DataError


pytestmark = pytest.mark.usefixtures('no_network')  # every test here runs offline


def data_cfg(**overrides):
  cfg = ml_collections.ConfigDict(digits_config.get_config().data.to_dict())
  cfg.resolution = 16  # upsampled from the 8x8 digits: the resize path is exercised
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data_dir'))
  data.prepare(data_cfg(), data_dir)
  return data_dir


# ----------------------------------------------------------------------------- biased_digits


def test_biased_digits_train_has_configured_proportions(digits_dir):
  cfg = data_cfg()
  counts = data.group_counts(cfg, digits_dir, 'train')
  total = counts.sum()
  assert np.all(np.abs(counts - np.asarray(cfg.proportions) * total) <= 1), counts
  balanced = data.group_counts(cfg, digits_dir, 'balanced')
  assert np.all(counts <= balanced) and counts[0] == balanced[0]  # uses every image it can
  test = data.group_counts(cfg, digits_dir, 'test')
  evaluator = data.group_counts(cfg, digits_dir, 'evaluator')
  assert abs(test[0] - test[1]) <= 2 and np.array_equal(test, evaluator)  # 20 % + 20 % per digit
  whole = test + evaluator + balanced
  np.testing.assert_allclose(balanced / whole, 0.6, atol=0.01)


def test_biased_digits_test_split_is_disjoint(digits_dir):
  builder = data.prepare(data_cfg(), digits_dir)
  rows = {s: {int(ex['index']) for ex in builder.as_data_source(s)}
          for s in ('train', 'balanced', 'test', 'evaluator')}
  assert not rows['test'] & rows['balanced'] and not rows['evaluator'] & rows['balanced']
  assert not rows['test'] & rows['evaluator']
  assert rows['train'] <= rows['balanced']
  assert builder.info.version == builders.BiasedDigits.VERSION == '1.1.0'
  example = builder.as_data_source('train')[0]
  assert example['image'].shape == (8, 8, 1) and example['image'].dtype == np.uint8
  assert example['label'] == builders.digit_to_group(((0,), (1,)))[example['digit']]


def test_biased_digits_config_names():
  a = builders.biased_digits_config(((0,), (1,)), (0.8, 0.2), 0)
  assert a.name == 'g0_g1_p80-20_s0'
  assert builders.biased_digits_config(((0,), (1,)), (4, 1), 0).name == a.name
  others = {builders.biased_digits_config(((0,), (1,)), (0.5, 0.5), 0).name,
            builders.biased_digits_config(((0,), (1,)), (0.8, 0.2), 1).name,
            builders.biased_digits_config(((7,), (8,)), (0.8, 0.2), 0).name,
            builders.biased_digits_config(((0, 2), (1,)), (0.8, 0.2), 0).name}
  assert len(others) == 4 and a.name not in others
  for groups, proportions in [(((0,), (0,)), (1, 1)), (((0,), (12,)), (1, 1)), (((0,),), (1,)),
                              (((0,), (1,)), (1, 1, 1)), (((0,), (1,)), (-1, 2))]:
    with pytest.raises(DataError):
      builders.biased_digits_config(groups, proportions, 0)


def test_digits_splits_deterministic_and_multi_class_groups():
  _, digits = builders.load_sklearn_digits()
  a = builders.digits_splits(digits, ((0, 2), (1,)), (0.25, 0.75), 3)
  b = builders.digits_splits(digits, ((0, 2), (1,)), (0.25, 0.75), 3)
  assert all(np.array_equal(a[k], b[k]) for k in a)
  groups = builders.digit_to_group(((0, 2), (1,)))[digits[a['train']]]
  counts = np.bincount(groups, minlength=2)
  assert np.all(np.abs(counts - np.array([0.25, 0.75]) * counts.sum()) <= 1)


def test_digits_splits_never_depend_on_pair_ratio_or_seed():
  """The same image is in the same split whatever the pair, ratio or seed: a base
  trained on all ten digits' pools never sees a test or evaluator image."""
  _, digits = builders.load_sklearn_digits()
  def digit0(split, **kw):
    rows = builders.digits_splits(digits, **kw)[split]
    return set(rows[digits[rows] == 0].tolist())
  cases = [dict(groups=((0,), (1,)), proportions=p, seed=s) for p in ((4, 1), (1, 1)) for s in (0, 3)]
  cases.append(dict(groups=((0, 2), (5,)), proportions=(1, 3), seed=7))
  for split in ('test', 'evaluator', 'balanced'):
    assert len({frozenset(digit0(split, **kw)) for kw in cases}) == 1, split
  everything = builders.digits_splits(digits, tuple((d,) for d in range(10)), (1,) * 10, 5)
  for kw in cases:
    s = builders.digits_splits(digits, **kw)
    test, ev, pool, train = (set(s[k].tolist()) for k in ('test', 'evaluator', 'balanced', 'train'))
    assert train <= pool and not ev & pool and not test & ev and not test & pool
    assert not (test | ev) & set(everything['balanced'].tolist())
  # the shuffle seed still varies the biased subsample
  a = builders.digits_splits(digits, ((0,), (1,)), (4, 1), 0)['train']
  b = builders.digits_splits(digits, ((0,), (1,)), (4, 1), 3)['train']
  assert not np.array_equal(a, b)
  # sizes: 20 % / 20 % / 60 % of each digit, every row in exactly one split
  for digit, count in enumerate(np.bincount(digits)):
    t, e, p = builders.digit_rows(digits, digit)
    assert len(t) == len(e) == round(0.2 * count) and len(t) + len(e) + len(p) == count
    assert len(set(t) | set(e) | set(p)) == count


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 300), min_size=2, max_size=5).flatmap(
    lambda avail: st.tuples(st.just(avail), st.lists(st.integers(0, 20), min_size=len(avail),
                                                     max_size=len(avail)).filter(lambda r: sum(r) > 0))))
def test_ratio_counts_property(case):
  available, ratio = np.asarray(case[0]), case[1]
  shares = subsample.normalize_ratio(ratio, len(ratio), 'ratio')
  counts = subsample.ratio_counts(available, shares)
  total = counts.sum()
  assert np.all(counts <= available)
  assert np.all(np.abs(counts - shares * total) <= 1 + 1e-9)
  positive = shares > 0  # maximal: one more image in total would overflow some group
  assert np.any(shares[positive] * (total + 1) > available[positive])


# ----------------------------------------------------------------------------- iterator


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_iterator_batches_are_deterministic(digits_dir):
  cfg = data_cfg()
  batches = _take(data.make_iterator(cfg, digits_dir, 'train', 8, seed=3), 5)
  _assert_same(batches, _take(data.make_iterator(cfg, digits_dir, 'train', 8, seed=3), 5))
  other = _take(data.make_iterator(cfg, digits_dir, 'train', 8, seed=4), 5)
  assert any(not np.array_equal(a['image'], b['image']) for a, b in zip(batches, other))
  batch = batches[0]
  assert batch['image'].shape == (8, 16, 16, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0


def test_iterator_state_round_trips(digits_dir):
  cfg = data_cfg()
  iterator = data.make_iterator(cfg, digits_dir, 'train', 8, seed=0)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 3)
  fresh = data.make_iterator(cfg, digits_dir, 'train', 8, seed=0)
  fresh.set_state(state)
  _assert_same(expected, _take(fresh, 3))


def test_process_shards_are_disjoint_and_cover(digits_dir):
  cfg = data_cfg()
  images, _ = data.load_arrays(cfg, digits_dir, 'train')
  everything = collections.Counter(image.tobytes() for image in images)
  seen = collections.Counter()
  for index in range(3):
    shard_len = len(range(index, len(images), 3))
    iterator = data.make_iterator(cfg, digits_dir, 'train', 1, 0, index, 3)
    epoch = [batch['image'][0].tobytes() for batch in _take(iterator, shard_len)]
    assert len(set(epoch)) == len(collections.Counter(epoch))  # no repeats within the epoch
    seen.update(epoch)
  assert seen == everything


def test_epochs_are_reshuffled(digits_dir):
  cfg = data_cfg()
  n = int(data.group_counts(cfg, digits_dir, 'train').sum())
  iterator = data.make_iterator(cfg, digits_dir, 'train', 1, 0)
  images = [batch['image'][0].tobytes() for batch in _take(iterator, 2 * n)]
  assert collections.Counter(images[:n]) == collections.Counter(images[n:])  # two full epochs
  assert images[:n] != images[n:]


def test_load_arrays_matches_source_order(digits_dir):
  cfg = data_cfg()
  images, labels = data.load_arrays(cfg, digits_dir, 'test', limit=10)
  source = data.make_source(cfg, digits_dir, 'test')
  assert images.shape == (10, 16, 16, 1) and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [source[i]['label'] for i in range(10)])
  np.testing.assert_array_equal(images[3], data.preprocess(source[3], 16, 1)['image'])


def test_bad_iterator_arguments(digits_dir):
  with pytest.raises(DataError):
    data.make_iterator(data_cfg(), digits_dir, 'train', 8, 0, process_index=2, process_count=2)
  with pytest.raises(DataError):
    data.make_source(data_cfg(), digits_dir, 'validation')
  with pytest.raises(DataError):
    data.make_source(data_cfg(num_groups=1), digits_dir, 'train')


# ----------------------------------------------------------------------------- preprocessing


def test_preprocess_range_shape_and_channels():
  rgb = np.zeros((10, 7, 3), np.uint8)
  rgb[..., 0] = 255
  out = preprocessing.to_model_image(rgb, 4, 3)
  assert out.shape == (4, 4, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[..., 0], 1.0)
  np.testing.assert_allclose(out[..., 1:], -1.0)
  gray = preprocessing.to_model_image(rgb, 4, 1)
  assert gray.shape == (4, 4, 1) and -1.0 < gray.min() <= gray.max() < 1.0  # red -> mid grey
  one = np.full((5, 5, 1), 255, np.uint8)
  np.testing.assert_allclose(preprocessing.to_model_image(one, 5, 3), 1.0)
  rgba = np.concatenate([rgb, np.zeros((10, 7, 1), np.uint8)], -1)
  np.testing.assert_array_equal(preprocessing.to_model_image(rgba, 4, 3), out)
  ramp = np.arange(64, dtype=np.uint8).reshape(8, 8, 1) * 4
  np.testing.assert_allclose(preprocessing.to_model_image(ramp, 8, 1)[..., 0], ramp[..., 0] / 127.5 - 1, atol=1e-6)
  with pytest.raises(DataError):
    preprocessing.to_model_image(rgb, 4, 2)


# ----------------------------------------------------------------------------- generic TFDS


@pytest.fixture
def mock_tfds(monkeypatch):
  """`tfds.testing.mock_data`, plus what a real data_dir would say: prepared as array_record."""
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'is_prepared', lambda self: True)
  monkeypatch.setattr(tfds.core.DatasetInfo, 'file_format', tfds.core.FileFormat.ARRAY_RECORD)
  with tfds.testing.mock_data(num_examples=120, policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def test_generic_tfds_class_filter_and_group_ratio(mock_tfds, tmp_path):
  cfg = data_cfg(name='mnist', class_filter=(7, 3), group_ratio=(0.75, 0.25))
  source = data.make_source(cfg, str(tmp_path), 'train')
  raw = tfds.data_source('mnist', split='train', data_dir=str(tmp_path))
  for i in range(len(source)):
    assert (7, 3)[source[i]['label']] == raw[int(source.indices[i])]['label']
    np.testing.assert_array_equal(source[i]['image'], raw[int(source.indices[i])]['image'])
  counts = data.group_counts(cfg, str(tmp_path), 'train')
  assert counts.sum() == len(source) > 0
  assert np.all(np.abs(counts - np.array([0.75, 0.25]) * counts.sum()) <= 1)
  batch = next(data.make_iterator(cfg, str(tmp_path), 'train', 4, 0))
  assert batch['image'].shape == (4, 16, 16, 1) and set(batch['label']) <= {0, 1}


def test_generic_tfds_nested_boolean_label(mock_tfds, tmp_path):
  cfg = data_cfg(name='celeb_a', label_key='attributes/Male', channels=3, resolution=8)
  source = data.make_source(cfg, str(tmp_path), 'train')
  assert len(source) == 120 and source[0]['image'].shape == (218, 178, 3)
  images, labels = data.load_arrays(cfg, str(tmp_path), 'train', limit=6)
  assert images.shape == (6, 8, 8, 3) and set(labels) <= {0, 1}
  with pytest.raises(DataError, match='attributes/Nope'):
    data.make_source(data_cfg(name='celeb_a', label_key='attributes/Nope'), str(tmp_path), 'train')


def test_generic_tfds_labels_out_of_range(mock_tfds, tmp_path):
  with pytest.raises(DataError, match=r'outside \[0, 2\)'):
    data.make_source(data_cfg(name='mnist'), str(tmp_path), 'train')
  with pytest.raises(DataError, match='class_filter'):
    data.make_source(data_cfg(name='mnist', class_filter=(11, 12)), str(tmp_path), 'train')


def test_unprepared_tfds_data_set_fails_fast(tmp_path):
  start = time.monotonic()
  with pytest.raises(DataError, match='not prepared'):
    data.prepare(data_cfg(name='mnist'), str(tmp_path))
  with pytest.raises(DataError, match='not prepared'):
    data.make_iterator(data_cfg(name='mnist'), str(tmp_path), 'train', 4, 0)
  with pytest.raises(DataError, match='does not exist'):
    data.prepare(data_cfg(name='mnist'), str(tmp_path / 'missing'))
  with pytest.raises(DataError, match='not a TFDS data set'):
    data.prepare(data_cfg(name='no_such_data_set_xyz'), str(tmp_path))
  assert time.monotonic() - start < 5.0


def test_resolve_data_dir(monkeypatch, tmp_path):
  monkeypatch.delenv('DDM_DATA_DIR', raising=False)
  assert data.resolve_data_dir(data_cfg()) == os.path.expanduser('~/.cache/ddm_jax/data')
  monkeypatch.setenv('DDM_DATA_DIR', str(tmp_path / 'env'))
  assert data.resolve_data_dir(data_cfg()) == str(tmp_path / 'env')
  assert data.resolve_data_dir(data_cfg(data_dir=str(tmp_path / 'cfg'))) == str(tmp_path / 'cfg')


# ----------------------------------------------------------------------------- label readers


def _write(path, content):
  mode = 'wb' if isinstance(content, bytes) else 'w'
  with open(path, mode) as f:
    f.write(content)
  return str(path)


class _Exploit:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
  marker = tmp_path / 'pwned'
  path = _write(tmp_path / 'labels.pkl', pickle.dumps([0, 1, _Exploit(marker)]))
  with pytest.raises(DataError, match='labels.pkl'):
    data.read_labels(path)
  assert not marker.exists()
  numpy_pickle = _write(tmp_path / 'np.pkl', pickle.dumps(np.array([0, 1])))
  with pytest.raises(DataError, match='refused'):
    data.read_labels(numpy_pickle)


def test_read_labels_formats(tmp_path):
  expected = [0, 1, 1, 0]
  files = {
      'a.json': json.dumps(expected), 'b.csv': '0\n1\n1\n0\n', 'c.csv': 'file,label\nx,0\ny,1\nz,1\nw,0\n',
      'd.pkl': pickle.dumps(expected), 'e.pickle': pickle.dumps(tuple(expected)), 'f.txt': '0\n1\n1\n0',
  }
  for name, content in files.items():
    np.testing.assert_array_equal(data.read_labels(_write(tmp_path / name, content), 2), expected)
  np.save(tmp_path / 'g.npy', np.array(expected, np.int32))
  labels = data.read_labels(str(tmp_path / 'g.npy'), 2)
  assert labels.dtype == np.int64 and labels.tolist() == expected
  by_name = _write(tmp_path / 'h.json', json.dumps({'b.png': 1, 'a.png': 0, 'c.png': 1}))
  assert data.read_labels(by_name).tolist() == [0, 1, 1]
  assert data.read_labels(by_name, names=['c.png', 'a.png']).tolist() == [1, 0]
  with pytest.raises(DataError, match="'d.png'"):
    data.read_labels(by_name, names=['a.png', 'd.png'])


@pytest.mark.parametrize('name, content', [
    ('empty.json', ''), ('empty.csv', '\n\n'), ('empty_list.json', '[]'), ('float.json', '[0, 1.5]'),
    ('str.json', '[0, "1"]'), ('word.csv', '0\nmale\n'), ('float.csv', '0\n1.0\n'), ('bad.json', '[0,'),
    ('nested.json', '[[0, 1]]'), ('obj.json', '"0 1"'), ('neg.csv', '0\n-1\n'), ('big.json', '[0, 2]'),
    ('huge.json', '[0, 99999999999999999999999]'), ('labels.yaml', '[0, 1]'), ('empty.pkl', b''),
])
def test_read_labels_rejects(tmp_path, name, content):
  path = _write(tmp_path / name, content)
  with pytest.raises(DataError, match=name.replace('.', r'\.')) as info:
    data.read_labels(path, num_groups=2)
  assert '\n' not in str(info.value)


def test_read_labels_rejects_bad_npy(tmp_path):
  np.save(tmp_path / 'float.npy', np.array([0.0, 1.0]))
  np.save(tmp_path / 'obj.npy', np.array([0, 'a'], dtype=object), allow_pickle=True)
  np.save(tmp_path / 'twod.npy', np.zeros((2, 2), np.int64))
  for name in ('float.npy', 'obj.npy', 'twod.npy', 'missing.npy'):
    with pytest.raises(DataError, match=name):
      data.read_labels(str(tmp_path / name))


def test_read_prompts(tmp_path):
  path = _write(tmp_path / 'p.txt', 'a face\n  A human face \n')
  assert data.read_prompts(path) == ['a face', 'A human face']
  with pytest.raises(DataError, match='line 2'):
    data.read_prompts(_write(tmp_path / 'gap.txt', 'a\n\nb\n'))
  with pytest.raises(DataError, match='empty'):
    data.read_prompts(_write(tmp_path / 'none.txt', ''))
  with pytest.raises(DataError, match='UTF-8'):
    data.read_prompts(_write(tmp_path / 'bin.txt', b'\xff\xfe\x00'))


_LABEL_WRITERS = {
    'json': lambda path, labels: _write(path, json.dumps(labels)),
    'csv': lambda path, labels: _write(path, ''.join(f'{v}\n' for v in labels)),
    'pkl': lambda path, labels: _write(path, pickle.dumps(labels)),
    'npy': lambda path, labels: np.save(path, np.asarray(labels, np.int64)),
}


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6).flatmap(
    lambda k: st.tuples(st.just(k), st.lists(st.integers(0, k - 1), min_size=1, max_size=40))),
       st.sampled_from(sorted(_LABEL_WRITERS)))
def test_read_labels_round_trip(case, suffix):
  k, labels = case
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f'labels.{suffix}')
    _LABEL_WRITERS[suffix](path, labels)
    assert data.read_labels(path, num_groups=k).tolist() == labels


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.lists(st.integers(0, 5), max_size=20), st.integers(-(2**40), 2**40),
       st.integers(0, 20), st.sampled_from(sorted(_LABEL_WRITERS)))
def test_read_labels_out_of_range(k, labels, bad, where, suffix):
  if 0 <= bad < k:
    bad = k + abs(bad)
  labels = [v % k for v in labels]
  labels.insert(min(where, len(labels)), bad)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, f'labels.{suffix}')
    _LABEL_WRITERS[suffix](path, labels)
    with pytest.raises(DataError, match='labels'):
      data.read_labels(path, num_groups=k)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters='\r\n', blacklist_categories=('Cs',)), min_size=1)
                .filter(lambda s: s.strip()), min_size=1, max_size=10))
def test_read_prompts_round_trip(prompts):
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'prompts.txt')
    with open(path, 'w', encoding='utf-8', newline='') as f:
      f.write('\n'.join(prompts) + '\n')
    assert data.read_prompts(path) == [p.strip() for p in prompts]


# ----------------------------------------------------------------------------- reference_folder


def _reference_folder(root):
  """Five small images of different modes, labels (pickle list) and prompts."""
  folder = root / 'images'
  folder.mkdir()
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
  Image.fromarray(rgb).save(folder / 'a.png')
  Image.fromarray(np.concatenate([rgb, np.full((12, 12, 1), 128, np.uint8)], -1)).save(folder / 'b.png')
  Image.fromarray(rgb).convert('P', palette=Image.Palette.ADAPTIVE).save(folder / 'c.png')
  Image.fromarray(rgb[..., 0]).save(folder / 'd.png')
  Image.fromarray(rng.integers(0, 256, (16, 10, 3), dtype=np.uint8)).save(folder / 'e.png')
  _write(folder / 'notes.md', 'not an image')
  labels = _write(root / 'labels.pkl', pickle.dumps([0, 1, 0, 1, 1]))
  prompts = _write(root / 'prompts.txt', ''.join(f'a photo {i}\n' for i in range(5)))
  return folder, labels, prompts


def test_reference_folder_end_to_end(tmp_path):
  folder, labels, prompts = _reference_folder(tmp_path)
  cfg = data_cfg(name='reference_folder', image_dir=str(folder), labels_file=labels,
                 prompts_file=prompts, resolution=8, channels=3)
  data_dir = str(tmp_path / 'data_dir')
  source = data.make_source(cfg, data_dir, 'train')
  assert len(source) == 5
  builder = data.prepare(cfg, data_dir)
  names = [ex['filename'].decode() for ex in builder.as_data_source('train')]
  assert names == [f'{name}.png' for name in 'abcde']  # sorted file order, notes.md skipped
  assert [source[i]['label'] for i in range(5)] == [0, 1, 0, 1, 1]
  assert [source[i]['prompt'] for i in range(5)] == [f'a photo {i}' for i in range(5)]
  for i, name in enumerate('abcde'):
    with Image.open(folder / f'{name}.png') as image:
      expected = np.asarray(builders.resize_square(image.convert('RGB'), 8))
    np.testing.assert_array_equal(source[i]['image'], expected)
  np.testing.assert_array_equal(data.group_counts(cfg, data_dir, 'train'), [2, 3])
  batch = next(data.make_iterator(cfg, data_dir, 'train', 2, 0))
  assert batch['image'].shape == (2, 8, 8, 3)
  gray = data.load_arrays(data_cfg(**{**cfg.to_dict(), 'channels': 1}), data_dir, 'train')[0]
  assert gray.shape == (5, 8, 8, 1)


def test_reference_folder_count_mismatch(tmp_path):
  folder, labels, prompts = _reference_folder(tmp_path)
  short = _write(tmp_path / 'short.json', json.dumps([0, 1, 0, 1]))
  cfg = data_cfg(name='reference_folder', image_dir=str(folder), labels_file=short,
                 prompts_file=prompts, resolution=8)
  with pytest.raises(DataError, match=r'5 images in .*images, 4 labels in .*short\.json, 5 prompts'):
    data.prepare(cfg, str(tmp_path / 'data_dir'))
  cfg.labels_file = labels
  cfg.prompts_file = _write(tmp_path / 'six.txt', 'p\n' * 6)
  with pytest.raises(DataError, match='6 prompts in .*six.txt'):
    data.prepare(cfg, str(tmp_path / 'data_dir'))
  cfg.prompts_file = prompts
  cfg.labels_file = _write(tmp_path / 'wide.json', json.dumps([0, 1, 2, 1, 0]))
  with pytest.raises(DataError, match='outside'):
    data.prepare(cfg, str(tmp_path / 'data_dir'))
  cfg.image_dir = str(tmp_path / 'nowhere')
  with pytest.raises(DataError, match='nowhere'):
    data.prepare(cfg, str(tmp_path / 'data_dir'))
