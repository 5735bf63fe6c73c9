"""What every experiment does per cell: train a model once (a rerun finds it trained),
evaluate it with one evaluator context per real-data setup, and record the evaluation as
one flat row."""
import json
import os
import shutil
import time

import flax

from ddm_jax.errors import ConfigError
from ddm_jax.evaluation.context import EvalContext, true_group_data_cfg
from ddm_jax.evaluation.report import evaluate_loaded
from ddm_jax.files import write_text
from ddm_jax.training.checkpoint import config_to_json
from ddm_jax.training.setup import load_trained


def report_row(report, **extra):
  """The figures of one evaluation report the summaries need, flattened into one row."""
  f, q, ind = report['fairness'], report['quality'], report.get('indicator') or {}
  eq = q.get('equal_n') or {}
  row = dict(extra)
  row.update(
      fd=f['fd'], fd_paper=f.get('fd_paper'), fd_ci95=f.get('fd_ci95'), kl=f['kl'],
      proportions=f['proportions'], ci95_lo=f['ci95_lo'], ci95_hi=f['ci95_hi'],
      guide_hit_rate=f.get('guide_hit_rate'), spd=f.get('spd'), off_target=f.get('off_target'),
      fcd=q['fcd'], fcd_vs_train=q['fcd_vs_train'], fcd_within_group_mean=q['fcd_within_group_mean'],
      precision=q['precision'], recall=q['recall'], noise_floor_fcd=q['noise_floor_fcd'],
      noise_floor_precision=q['noise_floor_precision'], noise_floor_recall=q['noise_floor_recall'],
      quality_n=eq.get('n'), group_counts=eq.get('group_counts'), kid_mean=eq.get('kid_mean'),
      kid_floor_mean=eq.get('kid_floor_mean'), fcd_n_mean=eq.get('fcd_mean'),
      fcd_n_floor_mean=eq.get('fcd_floor_mean'),
      indicator_entropy=ind.get('entropy_mean'), indicator_entropy_std=ind.get('entropy_std'),
      indicator_accuracy=ind.get('accuracy'),
      train_proportions=report['data']['train_proportions'],
      evaluator_accuracy=report['data']['evaluator']['heldout_accuracy'],
      sample_seconds=report['sampling']['seconds'], num_samples=report['num_samples'],
      checkpoint_step=report['checkpoint_step'], workdir=report['workdir'])
  return row


class Evaluations:
  """Evaluates trained workdirs; models that differ only in weights share the evaluator,
  its reference features and the noise floor (one EvalContext per real-data setup)."""

  def __init__(self):
    self._ctx = {}

  def __call__(self, workdir, settings, out_dir, with_indicator=True, trained=None):
    """`trained`: `workdir`'s model, if the caller has loaded it already."""
    trained = trained or load_trained(workdir)
    key = json.dumps(true_group_data_cfg(trained.config.data).to_dict(), sort_keys=True,
                     default=str)
    if key not in self._ctx:
      self._ctx[key] = EvalContext(trained.config, settings)
    ctx = self._ctx[key]
    ctx.settings = settings.validate()
    return evaluate_loaded(workdir, trained, settings, ctx=ctx, out_dir=out_dir,
                           with_indicator=with_indicator)


# Not what a model is: where its inputs were found (a sweep folder whose runs/ links to
# another's names the same base by another path) and what the run wrote on the side.
_NOT_THE_MODEL = ('data.data_dir', 'train.init_from', 'train.checkpoint_every',
                  'train.keep_checkpoints', 'train.log_every', 'train.num_sample_images',
                  'train.sample_every')


def _identity(config):
  """`config` as flat {dotted key: value}, without _NOT_THE_MODEL."""
  flat = flax.traverse_util.flatten_dict(config_to_json(config), sep='.')
  return {k: v for k, v in flat.items() if k not in _NOT_THE_MODEL}


def _check_same_model(config, workdir, recorded):
  """ConfigError unless the model finished in `workdir` was trained under `config`
  (`recorded`: the config its marker holds; older markers hold none, then the workdir's
  config.json, if any, is compared). A folder's runs are named by cell and method, not
  by every setting: another lr or step count must not silently reuse them."""
  if recorded is None:
    path = os.path.join(workdir, 'config.json')
    if not os.path.isfile(path):
      return
    with open(path, encoding='utf-8') as f:
      recorded = json.load(f)
  saved, wanted = _identity(recorded), _identity(config)
  differ = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
  if differ:
    shown = ', '.join(f'{k} {saved.get(k)!r} -> {wanted.get(k)!r}' for k in differ[:3])
    raise ConfigError(f'{workdir} holds a model trained under another config ({shown}'
                      f'{", ..." if len(differ) > 3 else ""}): give the sweep another --out '
                      'or remove that folder')


def train_once(train_fn, config, workdir):
  """Runs `train_fn(config, workdir)` unless `workdir` holds the TRAINED marker a finished
  run leaves (a killed run resumes from its checkpoint) for the same config; -> (seconds
  it took, trained now)."""
  marker = os.path.join(workdir, 'TRAINED')
  if os.path.exists(marker):
    with open(marker, encoding='utf-8') as f:
      done = json.load(f)
    _check_same_model(config, workdir, done.get('config'))
    return done.get('seconds'), False
  t0 = time.time()
  train_fn(config, workdir)
  seconds = time.time() - t0
  os.makedirs(workdir, exist_ok=True)
  write_text(marker, json.dumps({'seconds': seconds, 'config': config_to_json(config)}))
  return seconds, True


def publish(dest, out_dir, rows_path, plots, stem, plot_name):
  """Copies an experiment's summary.md / summary.json (as STEM.md / STEM.json), its rows
  (STEM_rows.jsonl: what the summary is recomputed from) and its plots (each named by
  `plot_name(file name)`) into `dest`, e.g. results/ for RESULTS.md."""
  os.makedirs(dest, exist_ok=True)
  for ext in ('md', 'json'):
    shutil.copy(os.path.join(out_dir, f'summary.{ext}'), os.path.join(dest, f'{stem}.{ext}'))
  shutil.copy(rows_path, os.path.join(dest, f'{stem}_rows.jsonl'))
  for path in plots:
    shutil.copy(path, os.path.join(dest, plot_name(os.path.basename(path))))
