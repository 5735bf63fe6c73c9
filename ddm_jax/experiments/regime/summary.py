"""What the paper-regime run found: per (method, pair, ratio, alpha, scale, split) mean ±
std over seeds, the selected scales, the markdown tables, the FD-vs-quality plots, and the
copies published for RESULTS.md. Everything here is recomputed from the rows alone."""
import os

import numpy as np

from ddm_jax.evaluation import plots
from ddm_jax.experiments import cells
from ddm_jax.experiments.regime import plan as P
from ddm_jax.experiments.sweep.summary import machine_description
from ddm_jax.files import write_json, write_text
from ddm_jax.generation.guidance import VARIANTS

METRICS = ('fd', 'fd_paper', 'off_target', 'kid_mean', 'kid_floor_mean', 'fcd_n_mean', 'fcd_n_floor_mean',
           'fcd_within_group_mean', 'guide_hit_rate', 'spd', 'indicator_entropy',
           'indicator_accuracy', 'fcd_vs_train', 'p0', 'fd_lo', 'fd_hi')
METHOD_ORDER = ('plain', 'ddm', 'reweight', 'posthoc', 'classifier', 'ddm+guide', 'cond', 'lr')


def _value(row, m):
  if m == 'p0':
    return row['proportions'][0]
  if m in ('fd_lo', 'fd_hi'):
    ci = row.get('fd_ci95')
    return None if ci is None else ci[0 if m == 'fd_lo' else 1]
  return row.get(m)


def _key(r):
  return (r['method'], r['pair'], r['ratio'], float(r.get('alpha') or 0.0),
          None if r.get('scale') is None else float(r['scale']), r['split'], r.get('lr'))


def summarize(rows):
  """One entry per (method, pair, ratio, alpha, scale, split, lr): mean, std, n over seeds."""
  groups = {}
  for r in rows:
    groups.setdefault(_key(r), []).append(r)
  out = []
  method_order = lambda m: (METHOD_ORDER.index(P.split_method(m)[0]),
                            VARIANTS.index(P.split_method(m)[1]))
  order = lambda k: (method_order(k[0]), k[1], -P.parse_ratio(k[2], len(k[2].split(':')))[0],
                     k[3], -1.0 if k[4] is None else k[4], k[5], k[6] or 0.0)
  for key in sorted(groups, key=order):
    rs = groups[key]
    e = {'method': key[0], 'pair': key[1], 'ratio': key[2], 'alpha': key[3], 'scale': key[4],
         'split': key[5], 'lr': key[6], 'n': len(rs), 'seeds': sorted(r['seed'] for r in rs),
         'train_p0': float(rs[0]['train_proportions'][0]),
         'quality_n': rs[0].get('quality_n'), 'num_samples': rs[0].get('num_samples')}
    for m in METRICS:
      vals = [v for v in (_value(r, m) for r in rs) if v is not None]
      if len(vals) == len(rs):  # a figure some seed could not give is not averaged
        e[m] = {'mean': float(np.mean(vals)),
                'std': float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    out.append(e)
  return out


def selected_scales(rows, plan):
  """{(method, pair, ratio, alpha): scale} by the plan's rule on the dev rows."""
  dev = [r for r in rows if r.get('split') == 'dev']
  chosen = {}
  for pair, ratio in P.cells(plan):
    for method, alpha in P.guided_runs(plan):
      s = P.select_scale(dev, method, pair, ratio, alpha, plan.scales, plan.fd_target)
      if s is not None:
        chosen[(method, pair, ratio, alpha)] = s
  return chosen


def _cells(summary, plan):
  """The plan's (pair, ratio) cells that have rows: a grid cut short shows what ran."""
  ran = {(e['pair'], e['ratio']) for e in summary if e['method'] != 'lr'}
  return [c for c in P.cells(plan) if c in ran]


def _ms(e, m, nd=3, scale=1.0):
  if e is None or m not in e:
    return 'n/a'
  v = e[m]
  mean, std = scale * v['mean'], scale * v['std']
  return f'{mean:.{nd}f} ± {std:.{nd}f}' if e['n'] > 1 else f'{mean:.{nd}f}'


def _find(summary, split, method, pair, ratio, alpha=0.0, scale=None):
  for e in summary:
    if (e['split'], e['method'], e['pair'], e['ratio'], e['alpha'], e['scale']) == (
        split, method, pair, ratio, alpha, scale):
      return e
  return None


def _label(method, alpha):
  base, variant = P.split_method(method)
  return {'plain': '(a) plain fine-tune', 'reweight': '(d) inverse-frequency reweighting',
          'cond': '(e) group-conditioned, sampled balanced',
          'posthoc': '(c) plain + post-hoc indicator guidance',
          'classifier': '(b) plain + noise-aware classifier guidance'}.get(
              base, f'DDM alpha {alpha:g}' + (' + its indicator guidance'
                                              if base == 'ddm+guide' else ', unguided')) + (
                  '' if variant == 'plain' else f', {variant} variant')


def method_rows(summary, plan, chosen, split='test'):
  """Every method of every cell on `split`, guided ones at their selected scale:
  [(pair, ratio, method, alpha, scale, entry)]."""
  out = []
  for pair, ratio in _cells(summary, plan):
    for method in (m for m in P.UNGUIDED if m in plan.methods):
      for a in ([a for a in plan.alphas if a > 0] if method == 'ddm' else [0.0]):
        e = _find(summary, split, method, pair, ratio, a)
        if e is not None:  # a cell may run only some methods (e.g. 1:1 plain and DDM)
          out.append((pair, ratio, method, a, None, e))
    for method, a in P.guided_runs(plan):
      scale = chosen.get((method, pair, ratio, a))
      if scale is not None:
        out.append((pair, ratio, method, a, scale,
                    _find(summary, split, method, pair, ratio, a, scale)))
  return out


def summary_markdown(summary, plan, meta, chosen):
  test_seeds = ', '.join(map(str, plan.test_seeds))
  tune = (f"LoRA (rank {plan.lora_rank}, alpha {plan.lora_alpha:g} on "
          f"{', '.join(plan.lora_targets)}) on it" if plan.lora_targets
          else 'a full fine-tune of it')
  lines = ['# DDM in the paper\'s regime: fine-tuning a pretrained base on biased digits', '',
           f"Run `{meta['name']}`; {meta['machine']}. Base: the UNet of configs/digits.py "
           f"pretrained on all ten digits (balanced, {plan.base_steps} steps). Every model: "
           f"{tune}, {plan.finetune_steps} steps at batch 64, constant lr "
           f"{meta['lr']:g} ({meta['lr_rule']}), AdamW, clip by value 1.0 as the reference "
           "clips, the indicator initialised as PyTorch's nn.Linear. Evaluation: "
           f"{plan.num_samples} samples per "
           f'model and seed ({plan.dev_num_samples} for the dev seeds\' scale sweep; DDIM {plan.sample_steps} steps, eta {plan.eta:g}), classified by a CNN '
           'trained on real images disjoint from every generator\'s training images. Dev seeds '
           f"{', '.join(map(str, plan.dev_seeds))} pick the guidance scale (smallest with dev "
           f'FD <= {plan.fd_target:g}, else the lowest dev FD); every figure below is on the '
           f'held-out test seeds {test_seeds} (mean ± std over seeds; a seed varies the '
           'training subsample, its order and the initialisation). FD = L2 to uniform; '
           'FD_paper = |p0 - 0.5| (K = 2). Off target: the share of samples a ten-digit CNN '
           'reads as no digit of the groups (the base knows all ten); they are left out of p0 '
           'and FD and count as misses in the hit rate. Quality at equal n: for each group the first '
           f'{plan.quality_n} samples the evaluator puts in it, against the real held-out '
           'images of that group: KID x 1e3 (unbiased) and FCD at that n, each with its '
           'real-vs-real floor at the same n; n/a where some seed had fewer samples in a group.',
           '']
  unguided = [a for a in plan.alphas]
  if 'ddm' in plan.methods:
    lines += ['## Does DDM training reduce FD? (unguided, test seeds)', '',
              '| pair | ratio | train p0 | ' + ' | '.join(f'alpha {a:g}' for a in unguided) + ' |',
              '|---|---|---|' + '---|' * len(unguided)]
    for pair, ratio in _cells(summary, plan):
      cells = []
      for a in unguided:
        e = _find(summary, 'test', 'plain' if a == 0 else 'ddm', pair, ratio, a)
        cells.append(f"{_ms(e, 'fd')} ({_ms(e, 'fd_paper')})")
      tp = next((e['train_p0'] for e in summary if e['pair'] == pair and e['ratio'] == ratio), None)
      lines.append(f"| {pair} | {ratio} | {'n/a' if tp is None else f'{tp:.2f}'} | "
                   + ' | '.join(cells) + ' |')
    lines += ['', 'Cells: FD (FD_paper). Indicator entropy (nats, the official check) and '
              'accuracy on noised real images:', '',
              '| pair | ratio | ' + ' | '.join(f'alpha {a:g}' for a in unguided if a > 0) + ' |',
              '|---|---|' + '---|' * len([a for a in unguided if a > 0])]
    for pair, ratio in _cells(summary, plan):
      cells = [f"{_ms(e, 'indicator_entropy')} / {_ms(e, 'indicator_accuracy')}"
               for e in (_find(summary, 'test', 'ddm', pair, ratio, a) for a in unguided if a > 0)]
      lines.append(f'| {pair} | {ratio} | ' + ' | '.join(cells) + ' |')
    lines.append('')
  lines += ['## Every method at its selected scale (test seeds)', '',
            '| pair | ratio | method | S | n | p0 | FD | FD 95% CI (per seed, mean) | FD_paper '
            '| off target | KID x1e3 (floor) | FCD@n (floor) | hit rate | SPD |',
            '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|']
  for pair, ratio, method, a, scale, e in method_rows(summary, plan, chosen):
    ci = ('n/a' if e is None or 'fd_lo' not in e
          else f"[{e['fd_lo']['mean']:.3f}, {e['fd_hi']['mean']:.3f}]")
    lines.append(
        f"| {pair} | {ratio} | {_label(method, a)} | {'-' if scale is None else f'{scale:g}'} | "
        f"{0 if e is None else e['n']} | {_ms(e, 'p0')} | {_ms(e, 'fd')} | {ci} | "
        f"{_ms(e, 'fd_paper')} | {_ms(e, 'off_target')} | {_ms(e, 'kid_mean', 2, 1e3)} ({_ms(e, 'kid_floor_mean', 2, 1e3)}) | "
        f"{_ms(e, 'fcd_n_mean', 2)} ({_ms(e, 'fcd_n_floor_mean', 2)}) | "
        f"{_ms(e, 'guide_hit_rate')} | {_ms(e, 'spd')} |")
  lines.append('')
  lines += quality_check(summary, plan, chosen)
  lines += ['## Selected scales (dev rule)', '', '| pair | ratio | method | alpha | S |',
            '|---|---|---|---|---|']
  for (method, pair, ratio, a), s in sorted(chosen.items()):
    lines.append(f'| {pair} | {ratio} | {method} | {a:g} | {s:g} |')
  lines.append('')
  lines.append(f"Recorded compute: {meta['train_seconds']:.0f} s training ({meta['models']} "
               f"models), {meta['eval_seconds']:.0f} s sampling + evaluation"
               + (f"; wall time of this invocation {meta['seconds']:.0f} s." if meta.get('seconds')
                  else '.'))
  return '\n'.join(lines) + '\n'


def quality_check(summary, plan, chosen, bound=0.15):
  """Guided methods at their selected scale against the plain model, unguided: the
  equal-n FCD within `bound` (15 %)?"""
  lines = [f'## Balance without paying in quality? (FCD@n within {100 * bound:.0f} % of the '
           'plain model, test seeds)', '',
           '| pair | ratio | method | S | FD | FCD@n | plain FCD@n | ratio | within bound |',
           '|---|---|---|---|---|---|---|---|---|']
  for pair, ratio, method, a, scale, e in method_rows(summary, plan, chosen):
    if scale is None and method != 'cond':
      continue
    ref = _find(summary, 'test', 'plain', pair, ratio, 0.0)
    if e is None or ref is None or 'fcd_n_mean' not in e or 'fcd_n_mean' not in ref:
      verdict, r = 'n/a', 'n/a'
    else:
      q = e['fcd_n_mean']['mean'] / ref['fcd_n_mean']['mean']
      r, verdict = f'{q:.2f}', ('yes' if q <= 1 + bound else 'no')
    lines.append(f"| {pair} | {ratio} | {_label(method, a)} | {'-' if scale is None else f'{scale:g}'} "
                 f"| {_ms(e, 'fd')} | {_ms(e, 'fcd_n_mean', 2)} | {_ms(ref, 'fcd_n_mean', 2)} | "
                 f'{r} | {verdict} |')
  return lines + ['']


def make_plots(summary, plan, chosen, out_dir):
  """Per (pair, ratio): FD against the equal-n FCD, every guided method a curve over its
  scales (dev seeds), every method's test point at its selected scale."""
  os.makedirs(out_dir, exist_ok=True)
  made = []
  for pair, ratio in _cells(summary, plan):
    curves, points = {}, {}
    for method, a in P.guided_runs(plan):
      es = [_find(summary, 'dev', method, pair, ratio, a, s) for s in plan.scales]
      es = [e for e in es if e is not None and 'fcd_n_mean' in e]
      if es:
        curves[f'{_label(method, a)} (dev, S {es[0]["scale"]:g}..{es[-1]["scale"]:g})'] = (
            [e['fcd_n_mean']['mean'] for e in es], [e['fd']['mean'] for e in es])
    for p_, r_, method, a, scale, e in method_rows(summary, plan, chosen):
      if p_ == pair and r_ == ratio and e is not None and 'fcd_n_mean' in e:
        points[_label(method, a) + ('' if scale is None else f', S {scale:g}')] = (
            e['fcd_n_mean']['mean'], e['fd']['mean'])
    if not curves and not points:
      continue
    path = os.path.join(out_dir, f"fd_vs_quality_{pair.replace('/', '-').replace(',', '')}"
                                 f"_r{ratio.replace(':', '-')}.png")
    plots.plot_frontier(path, curves, points, f'FCD at n = {plan.quality_n} per group (lower is better)',
                        'FD (L2 to uniform)', f'{pair}, train {ratio}: balance vs quality')
    made.append(path)
  return made


def write_summary(runner, name, seconds, lr, publish=None):
  """summary.json / summary.md / plots under the run folder; with `publish`, copies named
  regime[_NAME] for RESULTS.md, with the raw rows the summary is recomputed from."""
  rows = runner.results.rows
  plan = runner.plan
  summary = summarize(rows)
  chosen = selected_scales(rows, plan)
  models = {r['workdir']: r.get('train_seconds') or 0.0 for r in rows}
  meta = {'name': name, 'machine': machine_description(), 'seconds': seconds, 'lr': lr,
          'lr_rule': ('given' if plan.lr else 'selected from ' + ', '.join(f'{v:g}' for v in plan.lrs)
                      + ' on the dev cell: lowest FCD against its training split'),
          'plan': {k: v for k, v in vars(plan).items()}, 'models': len(models),
          'train_seconds': float(sum(models.values())),
          'eval_seconds': float(sum(r.get('eval_seconds') or 0.0 for r in rows))}
  out = runner.out
  payload = {'meta': meta, 'summary': summary,
             'selected_scales': [{'method': k[0], 'pair': k[1], 'ratio': k[2], 'alpha': k[3],
                                  'scale': v} for k, v in sorted(chosen.items())]}
  write_json(os.path.join(out, 'summary.json'), payload)
  md = summary_markdown(summary, plan, meta, chosen)
  write_text(os.path.join(out, 'summary.md'), md)
  made = make_plots(summary, plan, chosen, os.path.join(out, 'plots'))
  if publish:
    stem = 'regime' if name == 'full' else f'regime_{name}'
    cells.publish(publish, out, runner.results.path, made, stem, lambda f: f'{stem}_{f}')
  return summary, md
