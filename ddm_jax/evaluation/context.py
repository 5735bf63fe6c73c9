"""What a set of evaluations shares: the settings, and the real-data context (the
evaluator trained on real images with their true groups, the reference features, the
real-vs-real noise floor, the training-set proportions)."""
import copy
import dataclasses
import json
import os
import time
from typing import Optional, Sequence

import ml_collections
import numpy as np

from ddm_jax import data as data_lib
from ddm_jax.data.builders import HELDOUT_LAYOUT, BiasedDigits
from ddm_jax.errors import ConfigError, DataError
from ddm_jax.evaluation import classifier, quality
from ddm_jax.generation.guidance import PATHS, VARIANTS, check_scale, parse_target
from ddm_jax.generation.plan import GUIDANCES

DEFAULT_CACHE = os.path.expanduser('~/.cache/ddm_jax/evaluators')


@dataclasses.dataclass
class EvalSettings:
  num_samples: int = 1000
  seed: int = 0
  sampler: Optional[str] = None           # default: config.sample.sampler
  steps: Optional[int] = None             # default: config.sample.steps
  eta: Optional[float] = None
  batch_size: int = 500
  target: Optional[Sequence[float]] = None  # default: uniform
  accuracy_floor: float = 0.95
  evaluator_split: Optional[str] = None   # default: 'evaluator' (biased_digits) / 'train'
  heldout_split: Optional[str] = None     # default: 'test'
  heldout_dir: Optional[str] = None       # reference_folder: held-out folder (default data.heldout_dir)
  evaluator: str = 'cnn'                  # 'cnn' or 'module:factory' (classifier.GroupEvaluator)
  reference_splits: Optional[Sequence[str]] = None  # default: evaluator + held-out splits
  evaluator_steps: int = 300
  evaluator_seed: int = 0
  cache_dir: Optional[str] = None         # default: $DDM_EVAL_CACHE or ~/.cache/ddm_jax/evaluators
  n_boot: int = 1000
  knn_k: int = 3
  entropy_samples: int = 1000
  guidance: str = 'none'                  # 'none' | 'indicator'
  guidance_scale: float = 0.0
  grad_clip: Optional[float] = None
  guidance_path: str = 'unet'             # 'unet' | 'x0' (generation.guidance.make_indicator_guidance)
  guidance_variant: str = 'plain'         # generation.guidance.VARIANTS
  use_ema: bool = True
  quality_n: int = 50                     # samples per group for quality['equal_n'] (KID, FCD)

  def validate(self):
    if self.num_samples < 2 * (self.knn_k + 1):
      raise ConfigError(f'num_samples must be >= {2 * (self.knn_k + 1)}, got {self.num_samples}')
    if self.batch_size < 1:
      raise ConfigError(f'batch_size must be positive, got {self.batch_size}')
    if (not isinstance(self.quality_n, (int, np.integer)) or isinstance(self.quality_n, bool)
        or self.quality_n < 2):
      raise ConfigError(f'quality_n must be an int >= 2, got {self.quality_n!r}')
    if not 0.0 <= self.accuracy_floor <= 1.0:
      raise ConfigError(f'accuracy_floor must be in [0, 1], got {self.accuracy_floor}')
    if self.evaluator != 'cnn' and ':' not in self.evaluator:
      raise ConfigError(f"evaluator must be 'cnn' or 'module:factory', got {self.evaluator!r}")
    if self.guidance not in GUIDANCES:
      raise ConfigError(f"guidance must be 'none' or 'indicator', got {self.guidance!r}")
    if self.guidance == 'indicator':
      check_scale(self.guidance_scale)
      if self.guidance_path not in PATHS:
        raise ConfigError(f'guidance_path must be one of {PATHS}, got {self.guidance_path!r}')
      if self.guidance_variant not in VARIANTS:
        raise ConfigError(f'guidance_variant must be one of {VARIANTS}, '
                          f'got {self.guidance_variant!r}')
    return self


def true_group_data_cfg(data_cfg, heldout_dir=None):
  """``data_cfg`` with pseudo-labels off: the evaluator always learns the *true* groups;
  ``heldout_dir`` (reference_folder) replaces ``data.heldout_dir``."""
  cfg = ml_collections.ConfigDict(copy.deepcopy(data_cfg.to_dict()))
  if 'pseudo_labels' in cfg:
    cfg.pseudo_labels = ''
  if heldout_dir:
    cfg.heldout_dir = os.path.abspath(os.path.expanduser(heldout_dir))
  return cfg


def check_heldout(data_cfg, splits):
  """A reference folder has a held-out (`test`) split only with data.heldout_dir: say so
  before anything is loaded, instead of tfds' list of splits."""
  if data_cfg.name == 'reference_folder' and not data_cfg.get('heldout_dir') and 'test' in splits:
    raise DataError('evaluating a reference_folder run needs held-out images: pass --heldout_dir '
                    f'DIR (DIR holding {HELDOUT_LAYOUT}) or train with data.heldout_dir set')


def default_splits(data_cfg, settings):
  """(evaluator split, held-out split, reference splits).

  biased_digits: the evaluator trains on `evaluator` and is validated on `test`, and the
  real reference set is both: 40 % of every digit that no generator trains on (the
  generators' images come from `balanced`). Other data: `train` and `test`."""
  if data_cfg.name == 'biased_digits':
    ev, ho = 'evaluator', 'test'
  else:
    ev, ho = 'train', 'test'
  ev = settings.evaluator_split or ev
  ho = settings.heldout_split or ho
  ref = tuple(settings.reference_splits or (ev, ho))
  return ev, ho, ref


def pool_split(data_cfg):
  """The generator-side pool of real images (real, never in the reference set unless a
  setting puts it there): `balanced` for biased_digits, else the training split."""
  return 'balanced' if data_cfg.name == 'biased_digits' else data_cfg.get('split', 'train')


# Data config fields that select which images and labels a data set yields.
_CONTENT_FIELDS = ('image_key', 'label_key', 'class_filter', 'groups', 'group_ratio',
                   'num_groups', 'image_dir', 'labels_file', 'heldout_dir', 'skip_bad')


def evaluator_cache_key(data_cfg, splits):
  """The evaluator cache key: the data's identity, not just its name. biased_digits: the
  groups and the builder version (its `evaluator`/`test` splits depend on nothing else);
  other data: the fields that select images, labels and classes."""
  key = {'data': data_cfg.name, 'evaluator_split': splits['evaluator'],
         'heldout_split': splits['heldout'], 'resolution': int(data_cfg.resolution),
         'channels': int(data_cfg.channels)}
  if data_cfg.name == 'biased_digits':
    key['groups'] = [[int(d) for d in g] for g in data_cfg.get('groups', ((0,), (1,)))]
    key['builder_version'] = str(BiasedDigits.VERSION)
    if splits['evaluator'] == 'train' or splits['heldout'] == 'train':
      key['proportions'] = [float(p) for p in data_cfg.get('proportions', (0.8, 0.2))]
      key['shuffle_seed'] = int(data_cfg.get('shuffle_seed', 0))
  else:
    for field in _CONTENT_FIELDS:
      if field in data_cfg:
        value = data_cfg[field]
        key[field] = value.to_dict() if hasattr(value, 'to_dict') else value
  return json.loads(json.dumps(key, sort_keys=True, default=str))


def arch_key(config):
  """The parts of a config that fix the compiled model functions (not weights, data or loss)."""
  d = config.to_dict() if hasattr(config, 'to_dict') else config
  sub = {k: d.get(k) for k in ('model', 'indicator', 'diffusion', 'lora', 'latent_factor')}
  sub['data'] = {k: d['data'].get(k) for k in ('resolution', 'channels', 'num_groups')}
  return json.dumps(sub, sort_keys=True, default=str)


class EvalContext:
  """Everything about the real data a set of evaluations shares: the evaluator, the
  reference features, the noise floor and the training-set proportions."""

  def __init__(self, config, settings, data_dir=None, progress=False):
    self.settings = settings.validate()
    self.config = config
    data_cfg = true_group_data_cfg(config.data, settings.heldout_dir)
    self.num_groups = int(data_cfg.num_groups)
    self.data_dir = data_dir or data_lib.resolve_data_dir(data_cfg)
    ev, ho, ref = default_splits(data_cfg, settings)
    check_heldout(data_cfg, {ev, ho, *ref})
    self.splits = {'evaluator': ev, 'heldout': ho, 'reference': list(ref)}
    t0 = time.time()
    x_ev, y_ev = data_lib.load_arrays(data_cfg, self.data_dir, ev)
    x_ho, y_ho = data_lib.load_arrays(data_cfg, self.data_dir, ho)
    self.evaluator, trained_info = self._evaluator(data_cfg, settings, x_ev, y_ev, x_ho, y_ho)
    acc, per_group = classifier.accuracy(self.evaluator, x_ho, y_ho)
    self.evaluator_info = {
        'kind': settings.evaluator, 'heldout_accuracy': acc, 'heldout_accuracy_recomputed': acc,
        'heldout_per_group_accuracy': [float(a) for a in per_group],
        'n_train': int(len(y_ev)), 'n_heldout': int(len(y_ho)), 'floor': settings.accuracy_floor,
        'train_split': ev, 'heldout_split': ho, **trained_info}
    # Refuse before any sampling: fairness numbers from a weak evaluator mislead.
    classifier.check_accuracy_floor(self.evaluator_info['heldout_accuracy'],
                                    settings.accuracy_floor)

    parts = {ev: (x_ev, y_ev), ho: (x_ho, y_ho)}
    xs, ys = [], []
    for split in ref:
      if split not in parts:
        parts[split] = data_lib.load_arrays(data_cfg, self.data_dir, split)
      xs.append(parts[split][0])
      ys.append(parts[split][1])
    self.ref_images, self.ref_labels = np.concatenate(xs), np.concatenate(ys)
    self.ref_feats = classifier.features(self.evaluator, self.ref_images)
    self.noise_floor = quality.noise_floor(self.ref_feats, seed=0, k=settings.knn_k)
    train_split = data_cfg.get('split', 'train')
    x_tr, y_tr = data_lib.load_arrays(data_cfg, self.data_dir, train_split)
    self.train_split = train_split
    self.train_feats = classifier.features(self.evaluator, x_tr)
    self.pool_split = pool_split(data_cfg)
    if self.pool_split == train_split:
      x_pool, self.pool_labels = x_tr, y_tr
    else:
      x_pool, self.pool_labels = data_lib.load_arrays(data_cfg, self.data_dir, self.pool_split)
    self.pool_feats = (self.train_feats if self.pool_split == train_split
                       else classifier.features(self.evaluator, x_pool))
    self.train_counts = np.bincount(y_tr, minlength=self.num_groups)
    self.train_proportions = self.train_counts / self.train_counts.sum()
    self.target = parse_target(settings.target, self.num_groups)
    self.digit_evaluator, self.group_of_class = self._off_target_check(data_cfg, settings)
    self.setup_seconds = time.time() - t0

  def _off_target_check(self, data_cfg, settings):
    """biased_digits: (a ten-digit CNN, int [10] group of each digit or -1), to find the
    samples that are no digit of any group (a base pretrained on all ten digits can still
    draw them); the group evaluator alone would count each as some group. Else (None, None)."""
    if data_cfg.name != 'biased_digits' or settings.evaluator != 'cnn':
      return None, None
    all_cfg = ml_collections.ConfigDict(copy.deepcopy(data_cfg.to_dict()))
    all_cfg.groups = tuple((d,) for d in range(10))
    all_cfg.num_groups = 10
    all_cfg.proportions = (0.1,) * 10
    all_cfg.shuffle_seed = 0   # its evaluator/test splits do not depend on it: prepare once
    data_lib.prepare(all_cfg, self.data_dir)
    x_ev, y_ev = data_lib.load_arrays(all_cfg, self.data_dir, 'evaluator')
    x_ho, y_ho = data_lib.load_arrays(all_cfg, self.data_dir, 'test')
    ev_obj = self._cached_cnn(
        settings, evaluator_cache_key(all_cfg, {'evaluator': 'evaluator', 'heldout': 'test'}),
        x_ev, y_ev, 10, x_ho, y_ho)
    self.evaluator_info['digit_evaluator_heldout_accuracy'] = float(ev_obj.accuracy)
    table = np.full(10, -1, np.int64)
    for g, digits in enumerate(data_cfg.groups):
      table[list(digits)] = g
    return ev_obj.params, table

  def _evaluator(self, data_cfg, settings, x_ev, y_ev, x_ho, y_ho):
    """(evaluator, info): the small CNN, trained once and cached, or a plugged-in one."""
    if settings.evaluator != 'cnn':
      return classifier.plugged_evaluator(settings.evaluator, x_ev, y_ev, self.num_groups,
                                          seed=settings.evaluator_seed), {}
    ev_obj = self._cached_cnn(settings, evaluator_cache_key(data_cfg, self.splits),
                              x_ev, y_ev, self.num_groups, x_ho, y_ho)
    return ev_obj.params, {'heldout_accuracy': float(ev_obj.accuracy), 'cache': ev_obj.path,
                           'from_cache': bool(ev_obj.from_cache)}

  @staticmethod
  def _cached_cnn(settings, key, x_ev, y_ev, num_groups, x_ho, y_ho):
    """The small CNN of cache entry ``key`` (a ``classifier.CachedEvaluator``), trained once
    and cached in settings.cache_dir, else $DDM_EVAL_CACHE, else DEFAULT_CACHE."""
    cache_dir = settings.cache_dir or os.environ.get('DDM_EVAL_CACHE') or DEFAULT_CACHE
    return classifier.load_or_train_evaluator(
        cache_dir, key, x_ev, y_ev, num_groups, val_images=x_ho, val_labels=y_ho,
        seed=settings.evaluator_seed, steps=settings.evaluator_steps)

  def describe(self):
    return {'evaluator': self.evaluator_info, 'splits': self.splits,
            'reference_size': int(self.ref_labels.size),
            'reference_group_counts': np.bincount(self.ref_labels,
                                                  minlength=self.num_groups).tolist(),
            'train_split': self.train_split, 'train_group_counts': self.train_counts.tolist(),
            'train_proportions': self.train_proportions.tolist(), 'target': self.target.tolist(),
            'noise_floor': self.noise_floor, 'pool_split': self.pool_split,
            'pool_group_counts': np.bincount(self.pool_labels,
                                             minlength=self.num_groups).tolist()}
