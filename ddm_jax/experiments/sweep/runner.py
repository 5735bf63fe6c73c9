"""Trains and evaluates the sweep's cells, recording each finished evaluation."""
import json
import os
import time

import numpy as np

from ddm_jax import data as data_lib
from ddm_jax import pseudo_labels as pl
from ddm_jax.evaluation.context import EvalContext, EvalSettings, true_group_data_cfg
from ddm_jax.evaluation.report import evaluate_loaded
from ddm_jax.experiments.sweep.plan import cell_config, cell_id, run_name
from ddm_jax.experiments.sweep.store import Results
from ddm_jax.files import write_text
from ddm_jax.training.loop import train as train_workdir
from ddm_jax.training.setup import load_trained


def _row(report, **extra):
  """The figures of one evaluation report the summary needs, flattened into one row."""
  f, q, ind = report['fairness'], report['quality'], report.get('indicator') or {}
  row = dict(extra)
  row.update(
      fd=f['fd'], fd_paper=f.get('fd_paper'), kl=f['kl'], proportions=f['proportions'],
      ci95_lo=f['ci95_lo'], ci95_hi=f['ci95_hi'], guide_hit_rate=f.get('guide_hit_rate'),
      fcd=q['fcd'], fcd_vs_train=q['fcd_vs_train'], fcd_within_group_mean=q['fcd_within_group_mean'],
      precision=q['precision'], recall=q['recall'], noise_floor_fcd=q['noise_floor_fcd'],
      noise_floor_precision=q['noise_floor_precision'], noise_floor_recall=q['noise_floor_recall'],
      indicator_entropy=ind.get('entropy_mean'), indicator_entropy_std=ind.get('entropy_std'),
      indicator_accuracy=ind.get('accuracy'),
      train_proportions=report['data']['train_proportions'],
      evaluator_accuracy=report['data']['evaluator']['heldout_accuracy'],
      sample_seconds=report['sampling']['seconds'], num_samples=report['num_samples'],
      checkpoint_step=report['checkpoint_step'], workdir=report['workdir'])
  return row


class Runner:
  """Trains and evaluates cells, sharing evaluator contexts and compiled samplers."""

  def __init__(self, base_config, plan, out_dir, log=print, train_fn=None, evaluate_fn=None):
    self.base, self.plan, self.out = base_config, plan, out_dir
    self.log = log
    self.results = Results(os.path.join(out_dir, 'results.jsonl'))
    self._ctx = {}
    self._train_fn = train_fn
    self._evaluate_fn = evaluate_fn

  # Hooks (tests replace them to check the bookkeeping without compiling a UNet).
  def train(self, config, workdir):
    if self._train_fn:
      return self._train_fn(config, workdir)
    train_workdir(config, workdir, progress=False)

  def evaluate(self, workdir, settings, out_dir, with_indicator=True):
    if self._evaluate_fn:
      return self._evaluate_fn(workdir, settings, out_dir)
    trained = load_trained(workdir)
    # One evaluator context per real-data setup: models that differ only in ratio, alpha
    # or seed share the evaluator, its reference features and the noise floor.
    key = json.dumps(true_group_data_cfg(trained.config.data).to_dict(), sort_keys=True,
                     default=str)
    if key not in self._ctx:
      self._ctx[key] = EvalContext(trained.config, settings)
    ctx = self._ctx[key]
    ctx.settings = settings.validate()
    return evaluate_loaded(workdir, trained, settings, ctx=ctx, out_dir=out_dir,
                           with_indicator=with_indicator)

  def settings(self, seed, guidance='none', scale=0.0):
    p = self.plan
    return EvalSettings(num_samples=p.num_samples, seed=seed, sampler=p.sampler,
                        steps=p.sample_steps, eta=p.eta, batch_size=p.eval_batch, guidance=guidance,
                        guidance_scale=scale, grad_clip=p.grad_clip or None,
                        guidance_path=p.guidance_path)

  def ensure_trained(self, ratio, alpha, seed, pseudo=False):
    name = run_name(ratio, alpha, seed, pseudo)
    workdir = os.path.join(self.out, 'runs', name)
    config = cell_config(self.base, ratio, alpha, seed, self.plan.num_steps, pseudo)
    marker = os.path.join(workdir, 'TRAINED')
    seconds = None
    if not os.path.exists(marker):
      self.log(f'[train] {name} ({self.plan.num_steps} steps)')
      t0 = time.time()
      self.train(config, workdir)
      seconds = time.time() - t0
      os.makedirs(workdir, exist_ok=True)
      write_text(marker, json.dumps({'seconds': seconds}))
    else:
      with open(marker, encoding='utf-8') as f:
        seconds = json.load(f).get('seconds')
    return workdir, config, seconds

  def run_cell(self, kind, ratio, alpha, seed, scales=(), pseudo=False):
    path = self.plan.guidance_path
    ids = [cell_id(kind, ratio, alpha, seed)] + [cell_id(kind, ratio, alpha, seed, s, path)
                                                 for s in scales]
    if kind == 'guided':
      ids = ids[1:]
    if all(i in self.results.done for i in ids):
      return
    workdir, config, train_s = self.ensure_trained(ratio, alpha, seed, pseudo)
    common = dict(kind=kind, ratio=ratio, alpha=alpha, seed=seed, pseudo=pseudo,
                  train_seconds=train_s, train_steps=self.plan.num_steps)
    if pseudo:
      common.update(self.pseudo_quality(config))
    if kind != 'guided' and ids[0] not in self.results.done:
      t0 = time.time()
      rep = self.evaluate(workdir, self.settings(seed), os.path.join(workdir, 'eval'))
      row = _row(rep, id=ids[0], scale=0.0, guided=False, eval_seconds=time.time() - t0, **common)
      self.results.add(row)
      self.log(f"[eval] {ids[0]}: FD {row['fd']:.4f} p {np.round(row['proportions'], 3)} "
               f"FCD {row['fcd']:.3f}")
    tag = '' if path == 'unet' else f'_{path}'
    for s in scales:
      cid = cell_id(kind, ratio, alpha, seed, s, path)
      if cid in self.results.done:
        continue
      t0 = time.time()
      rep = self.evaluate(workdir, self.settings(seed, 'indicator', s),
                          os.path.join(workdir, 'eval', f'indicator{tag}_s{s:g}'))
      row = _row(rep, id=cid, scale=float(s), guided=True, path=path,
                 eval_seconds=time.time() - t0, **common)
      self.results.add(row)
      self.log(f"[eval] {cid}: FD {row['fd']:.4f} p {np.round(row['proportions'], 3)} "
               f"FCD {row['fcd']:.3f} hit {row['guide_hit_rate']:.3f}")

  def pseudo_quality(self, config):
    """ARI and best-match accuracy of the k-means pseudo-groups on the training split."""
    data_dir = data_lib.resolve_data_dir(config.data)
    pseudo = data_lib.make_source(config.data, data_dir, config.data.split).labels
    true = data_lib.make_source(true_group_data_cfg(config.data), data_dir,
                                config.data.split).labels
    k = int(config.data.num_groups)
    return {'ari': pl.adjusted_rand_index(true, pseudo),
            'pseudo_match_accuracy': pl.best_match_accuracy(true, pseudo, k),
            'pseudo_group_counts': np.bincount(pseudo, minlength=k).tolist()}

  def run(self):
    p = self.plan
    for seed in p.seeds:  # seed-major: after one pass every cell has a first estimate
      for ratio in p.ratios:
        for alpha in p.alphas:
          self.run_cell('ddm', ratio, alpha, seed)
          if ratio in p.guided_ratios and alpha in p.guided_alphas and alpha > 0:
            self.run_cell('guided', ratio, alpha, seed, p.scales)
    for seed in p.pseudo_seeds:
      for ratio in p.pseudo_ratios:
        self.run_cell('pseudo', ratio, p.pseudo_alpha, seed, p.pseudo_scales, pseudo=True)
