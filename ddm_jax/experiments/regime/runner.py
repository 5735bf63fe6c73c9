"""Trains the base and the fine-tuned models, evaluates every method, records the rows."""
import os
import time

import numpy as np

from ddm_jax.evaluation.context import EvalSettings
from ddm_jax.experiments.cells import Evaluations, report_row, train_once
from ddm_jax.experiments.regime import plan as P
from ddm_jax.experiments.sweep.store import Results
from ddm_jax.training.loop import train as train_workdir

# Models each method needs trained, and the model it evaluates.
_NEEDS = {'plain': ('plain',), 'ddm': (), 'reweight': ('reweight',), 'cond': ('cond',),
          'posthoc': ('plain', 'posthoc'), 'classifier': ('plain', 'classifier'),
          'ddm+guide': ()}


class Runner:
  """`base_cfg`: the pretraining config (configs/digits_base.py); `finetune_cfg`: the one
  every fine-tune starts from (configs/digits.py). Hooks `train_fn`/`evaluate_fn` let the
  tests check the bookkeeping without a UNet."""

  def __init__(self, base_cfg, finetune_cfg, plan, out_dir, log=print, train_fn=None,
               evaluate_fn=None):
    self.base_cfg, self.ft_cfg, self.plan, self.out = base_cfg, finetune_cfg, P.check(plan), out_dir
    self.log = log
    self.results = Results(os.path.join(out_dir, 'results.jsonl'))
    self._train_fn = train_fn or (lambda c, w: train_workdir(c, w, progress=False))
    self._evaluate = evaluate_fn or Evaluations()

  # ------------------------------------------------------------------ training
  def _train(self, config, workdir, what):
    if not os.path.exists(os.path.join(workdir, 'TRAINED')):
      self.log(f'[train] {what} ({config.train.num_steps} steps)')
    seconds, _ = train_once(self._train_fn, config, workdir)
    return seconds

  def base(self):
    workdir = os.path.join(self.out, 'base')
    self._train(P.base_config(self.base_cfg, self.plan.base_steps), workdir, 'base: all digits')
    return workdir

  def model(self, pair, ratio, seed, kind, lr, alpha=0.0, root=None):
    """Trains (once) one fine-tuned model; -> (workdir, seconds)."""
    root = root or self.out
    name = P.model_name(kind, alpha)
    workdir = os.path.join(root, 'runs', P.run_dir(pair, ratio, seed, name))
    if kind == 'plain' and root == self.out and not os.path.exists(workdir):
      workdir = self._from_lr_selection(pair, ratio, seed, lr) or workdir
    plain = None
    if kind in ('posthoc', 'classifier'):
      plain, _ = self.model(pair, ratio, seed, 'plain', lr, root=root)
    p = self.plan
    config = P.finetune_config(self.ft_cfg, pair, ratio, seed, lr, p.finetune_steps, kind,
                               self.base(), plain, alpha,
                               (p.lora_targets, p.lora_rank, p.lora_alpha) if p.lora_targets
                               else None)
    seconds = self._train(config, workdir, f'{pair} {ratio} seed {seed}: {name}')
    return workdir, seconds

  def _lr_root(self, lr):
    return os.path.join(self.out, 'lr_select', f'lr{lr:g}')

  def _from_lr_selection(self, pair, ratio, seed, lr):
    """The lr selection trained this very model (the dev cell's plain fine-tune at the
    chosen lr: same config, only the folder differs): its workdir, else None."""
    workdir = os.path.join(self._lr_root(lr), 'runs', P.run_dir(pair, ratio, seed, 'plain'))
    return workdir if os.path.exists(os.path.join(workdir, 'TRAINED')) else None

  # ------------------------------------------------------------------ evaluation
  def settings(self, seed, n, scale=None, variant='plain'):
    p = self.plan
    return EvalSettings(num_samples=n, seed=seed, sampler='ddim', steps=p.sample_steps,
                        eta=p.eta, batch_size=p.eval_batch,
                        guidance='indicator' if scale is not None else 'none',
                        guidance_scale=0.0 if scale is None else float(scale),
                        guidance_variant=variant, quality_n=p.quality_n)

  def evaluate(self, eid, workdir, seconds, seed, scale=None, split='test', **fields):
    if eid in self.results.done:
      return
    t0 = time.time()
    method, variant = P.split_method(fields.get('method'))
    n = P.sample_count(self.plan, method, fields['pair'], fields['ratio'], split, scale is not None)
    # named by every setting that varies, so that another plan's evaluation of the same
    # model (e.g. a finer quality check at a larger n) writes beside this one
    name = (('unguided' if scale is None else f'S{scale:g}')
            + ('' if variant == 'plain' else f'_{variant}') + f'_n{n}_q{self.plan.quality_n}')
    out_dir = os.path.join(workdir, 'eval', name)
    with_indicator = method in ('ddm', 'posthoc', 'classifier')
    rep = self._evaluate(workdir, self.settings(seed, n, scale, variant), out_dir, with_indicator)
    row = report_row(rep, id=eid, seed=seed, split=split, scale=scale, train_seconds=seconds,
                     finetune_steps=self.plan.finetune_steps, eval_seconds=time.time() - t0,
                     **fields)
    self.results.add(row)
    kid = row.get('kid_mean')
    self.log(f"[eval] {eid}: FD {row['fd']:.4f} p {np.round(row['proportions'], 3)} "
             f"KIDx1e3 {'n/a' if kid is None else f'{1e3 * kid:.2f}'}")

  # ------------------------------------------------------------------ the learning rate
  def learning_rate(self):
    """plan.lr, or the lr in plan.lrs whose plain fine-tune on the dev cell (first pair
    and ratio, first dev seed) fits its own training data best: the lowest FCD against
    its training split (all samples; the same n for every lr). The folder's recorded rows
    keep that cell for every later invocation (which may name other cells); an lr of
    plan.lrs they lack is tried there and the rule applied again."""
    p = self.plan
    if p.lr:
      return p.lr
    tried = [r for r in self.results.rows if r.get('method') == 'lr']
    if tried:
      pair, ratio, seed = tried[0]['pair'], tried[0]['ratio'], tried[0]['seed']
    else:
      (pair, ratio), seed = P.cells(p)[0], p.dev_seeds[0]
    for lr in p.lrs:
      if any(r['lr'] == lr for r in tried):
        continue
      workdir, seconds = self.model(pair, ratio, seed, 'plain', lr, root=self._lr_root(lr))
      self.evaluate(P.eval_id('lr', pair, ratio, seed, scale=None) + f'/lr{lr:g}', workdir,
                    seconds, seed, split='dev', method='lr', pair=pair, ratio=ratio, lr=lr, alpha=0.0)
    return select_lr(self.results.rows)

  # ------------------------------------------------------------------ one cell
  def run_cell(self, pair, ratio, seed, lr, split):
    p = self.plan
    common = dict(pair=pair, ratio=ratio, lr=lr, split=split)
    for method in p.methods:
      for kind in _NEEDS[P.split_method(method)[0]]:
        self.model(pair, ratio, seed, kind, lr)
    if 'plain' in p.methods:
      w, s = self.model(pair, ratio, seed, 'plain', lr)
      self.evaluate(P.eval_id('plain', pair, ratio, seed), w, s, seed, method='plain', alpha=0.0,
                    **common)
    for alpha in (a for a in p.alphas if a > 0):
      if 'ddm' in p.methods or ('ddm+guide' in p.methods and alpha in p.guided_alphas):
        w, s = self.model(pair, ratio, seed, 'ddm', lr, alpha)
        self.evaluate(P.eval_id('ddm', pair, ratio, seed, alpha), w, s, seed, method='ddm',
                      alpha=alpha, **common)
    for method in ('reweight', 'cond'):
      if method in p.methods:
        w, s = self.model(pair, ratio, seed, method, lr)
        self.evaluate(P.eval_id(method, pair, ratio, seed), w, s, seed, method=method, alpha=0.0,
                      **common)
    for method, alpha in P.guided_runs(p):
      base = P.split_method(method)[0]
      w, s = self.model(pair, ratio, seed, 'ddm' if base == 'ddm+guide' else base, lr, alpha)
      for scale in self.scales(method, pair, ratio, alpha, split):
        self.evaluate(P.eval_id(method, pair, ratio, seed, alpha, scale), w, s, seed, scale,
                      method=method, alpha=alpha, **common)

  def scales(self, method, pair, ratio, alpha, split):
    p = self.plan
    if split == 'dev' or p.test_all_scales:
      return p.scales
    dev = [r for r in self.results.rows if r.get('split') == 'dev']
    chosen = P.select_scale(dev, method, pair, ratio, alpha, p.scales, p.fd_target)
    if chosen is None:
      raise RuntimeError(f'no dev rows for {method} {pair} {ratio}: run the dev seeds first')
    return (chosen,)

  def run(self):
    lr = self.learning_rate()
    self.log(f'[lr] fine-tune learning rate {lr:g}')
    # Dev seeds first: the test seeds' guidance scales are chosen from their rows.
    for split, seeds in (('dev', self.plan.dev_seeds), ('test', self.plan.test_seeds)):
      for seed in seeds:
        for pair, ratio in P.cells(self.plan):
          self.run_cell(pair, ratio, seed, lr, split)
    return lr


def select_lr(rows):
  """The lr rule on the recorded lr-selection rows: the lowest FCD against the training split."""
  cand = [r for r in rows if r.get('method') == 'lr']
  if not cand:
    raise RuntimeError('no learning-rate selection rows')
  return min(cand, key=lambda r: (r['fcd_vs_train'], r['lr']))['lr']
