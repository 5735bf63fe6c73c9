"""Trains and evaluates the sweep's cells, recording each finished evaluation."""
import os
import time

import numpy as np

from ddm_jax import data as data_lib
from ddm_jax import pseudo_labels as pl
from ddm_jax.evaluation.context import EvalSettings, true_group_data_cfg
from ddm_jax.experiments.cells import Evaluations, report_row, train_once
from ddm_jax.experiments.sweep.plan import cell_config, cell_id, run_name
from ddm_jax.experiments.sweep.store import Results
from ddm_jax.training.loop import train as train_workdir


class Runner:
  """Trains and evaluates cells, sharing evaluator contexts and compiled samplers."""

  def __init__(self, base_config, plan, out_dir, log=print, train_fn=None, evaluate_fn=None):
    self.base, self.plan, self.out = base_config, plan, out_dir
    self.log = log
    self.results = Results(os.path.join(out_dir, 'results.jsonl'))
    self._evaluations = Evaluations()
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
    return self._evaluations(workdir, settings, out_dir, with_indicator)

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
    if not os.path.exists(os.path.join(workdir, 'TRAINED')):
      self.log(f'[train] {name} ({self.plan.num_steps} steps)')
    seconds, _ = train_once(self.train, config, workdir)
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
      row = report_row(rep, id=ids[0], scale=0.0, guided=False, eval_seconds=time.time() - t0, **common)
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
      row = report_row(rep, id=cid, scale=float(s), guided=True, path=path,
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
