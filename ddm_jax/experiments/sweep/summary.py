"""What a sweep found: mean ± std over seeds per cell, the markdown tables, the plots, and
the copies for RESULTS.md."""
import dataclasses
import os
import platform

import jax
import numpy as np

from ddm_jax.evaluation import plots
from ddm_jax.experiments import cells
from ddm_jax.experiments.sweep.plan import parse_ratio
from ddm_jax.files import write_json, write_text

_METRICS = ('fd', 'fd_paper', 'kl', 'p0', 'fcd', 'fcd_vs_train', 'fcd_within_group_mean',
            'precision', 'recall', 'indicator_entropy', 'indicator_accuracy', 'guide_hit_rate',
            'ari', 'pseudo_match_accuracy')


def _ratio_key(r):
  return parse_ratio(r)[0]


def summarize(rows):
  """Mean, std and n over seeds for every (kind, ratio, alpha, guided, path, scale) group."""
  groups = {}
  for r in rows:
    guided = bool(r.get('guided'))
    key = (r['kind'], r['ratio'], float(r['alpha']), guided,
           r.get('path', 'unet') if guided else '-', float(r.get('scale') or 0.0))
    groups.setdefault(key, []).append(r)
  out = []
  for key in sorted(groups, key=lambda k: (('ddm', 'guided', 'pseudo').index(k[0]),
                                           -_ratio_key(k[1]), k[2], k[3], k[4], k[5])):
    rs = groups[key]
    entry = {'kind': key[0], 'ratio': key[1], 'alpha': key[2], 'guided': key[3], 'path': key[4],
             'scale': key[5], 'n': len(rs), 'seeds': sorted(r['seed'] for r in rs)}
    for m in _METRICS:
      vals = [r['proportions'][0] if m == 'p0' else r.get(m) for r in rs]
      vals = [v for v in vals if v is not None]
      if vals:
        entry[m] = {'mean': float(np.mean(vals)), 'std': float(np.std(vals, ddof=1))
                    if len(vals) > 1 else 0.0}
    entry['noise_floor_fcd'] = float(np.mean([r['noise_floor_fcd'] for r in rs]))
    entry['train_p0'] = float(rs[0]['train_proportions'][0])
    out.append(entry)
  return out


def _ms(e, m, nd=3):
  if m not in e:
    return 'n/a'
  v = e[m]
  return f"{v['mean']:.{nd}f} ± {v['std']:.{nd}f}" if e['n'] > 1 else f"{v['mean']:.{nd}f}"


def summary_markdown(summary, plan, meta):
  """summary.md: what was run, then one table per part (ddm, guided, pseudo) present."""
  lines = ['# DDM fairness sweep on the embedded digits', '',
           f"Sweep `{meta['preset']}`; {meta['machine']}. Group 0 = digit 0, group 1 = digit 1; "
           'ratio = group 0 : group 1 in the training split; target uniform. '
           f'{plan.num_steps} training steps per model, {plan.num_samples} samples per '
           f'evaluation ({plan.sampler}, {plan.sample_steps} steps, eta {plan.eta:g}). Mean ± std '
           'over seeds '
           '(n = seeds). FD = L2 to uniform; FD_paper = |p0 - 0.5| (the DDM table form). '
           'FCD = Fréchet classifier distance in the evaluator features vs the group-balanced '
           'real reference set (NOT FID).', '']
  ddm = [e for e in summary if e['kind'] == 'ddm']
  if ddm:
    lines += ['## DDM: indicator weight alpha (unguided sampling)', '',
              '| ratio | alpha | n | p0 (train p0) | FD | FD_paper | FCD (floor) | FCD within-group '
              '| precision | recall | indicator entropy | indicator acc |',
              '|---|---|---|---|---|---|---|---|---|---|---|---|']
    for e in ddm:
      lines.append(
          f"| {e['ratio']} | {e['alpha']:g} | {e['n']} | {_ms(e, 'p0')} ({e['train_p0']:.2f}) | "
          f"{_ms(e, 'fd')} | {_ms(e, 'fd_paper')} | {_ms(e, 'fcd', 2)} "
          f"({e['noise_floor_fcd']:.2f}) | {_ms(e, 'fcd_within_group_mean', 2)} | "
          f"{_ms(e, 'precision')} | {_ms(e, 'recall')} | {_ms(e, 'indicator_entropy')} | "
          f"{_ms(e, 'indicator_accuracy')} |")
    lines.append('')
  for kind, title in (('guided', 'Indicator-guided sampling (target uniform)'),
                      ('pseudo', 'Pseudo-labels (k-means on pixel PCA) + DDM + guidance')):
    rows = [e for e in summary if e['kind'] == kind]
    if not rows:
      continue
    lines += [f'## {title}', '',
              '| ratio | alpha | guidance (path, S) | n | p0 | FD | FD_paper | FCD | FCD '
              'within-group | precision | recall | hit rate |' + (' ARI |' if kind == 'pseudo'
                                                                 else ''),
              '|---|---|---|---|---|---|---|---|---|---|---|---|' + ('---|' if kind == 'pseudo'
                                                                    else '')]
    for e in rows:
      how = f"{e['path']}, {e['scale']:g}" if e['guided'] else 'none'
      lines.append(
          f"| {e['ratio']} | {e['alpha']:g} | {how} | {e['n']} | {_ms(e, 'p0')} | "
          f"{_ms(e, 'fd')} | {_ms(e, 'fd_paper')} | {_ms(e, 'fcd', 2)} | "
          f"{_ms(e, 'fcd_within_group_mean', 2)} | {_ms(e, 'precision')} | {_ms(e, 'recall')} | "
          f"{_ms(e, 'guide_hit_rate')} |" + (f" {_ms(e, 'ari')} |" if kind == 'pseudo' else ''))
    lines.append('')
  train_s, eval_s = meta.get('train_seconds', 0.0), meta.get('eval_seconds', 0.0)
  lines.append(f'Recorded compute: {train_s:.0f} s training ({meta.get("models", 0)} models), '
               f'{eval_s:.0f} s sampling + evaluation'
               + (f"; wall time of this invocation: {meta['seconds']:.0f} s." if meta['seconds']
                  else '.'))
  return '\n'.join(lines) + '\n'


def make_plots(summary, out_dir):
  """FD vs alpha, and FD / FCD / hit rate vs guidance scale; returns the files written."""
  os.makedirs(out_dir, exist_ok=True)
  made = []
  ddm = [e for e in summary if e['kind'] == 'ddm']
  alphas = sorted({e['alpha'] for e in ddm})
  if len(alphas) > 1:
    series = {}
    for ratio in sorted({e['ratio'] for e in ddm}, key=_ratio_key):
      es = {e['alpha']: e for e in ddm if e['ratio'] == ratio}
      if set(es) != set(alphas):
        continue
      m = np.array([es[a]['fd']['mean'] for a in alphas])
      s = np.array([es[a]['fd']['std'] for a in alphas])
      series[f'train {ratio}'] = (m, m - s, m + s)
    if series:
      path = os.path.join(out_dir, 'fd_vs_alpha.png')
      plots.plot_xy(path, alphas, series, 'indicator weight alpha', 'FD (L2 to uniform)',
                    'DDM on digits: FD vs alpha (mean ± std over seeds)')
      made.append(path)
  for kind in ('guided', 'pseudo'):
    guided = [e for e in summary if e['kind'] == kind and e['guided']]
    if not guided:
      continue
    base_kind = 'ddm' if kind == 'guided' else 'pseudo'
    for metric, label in (('fd', 'FD (L2 to uniform)'), ('fcd', 'Fréchet classifier distance'),
                          ('guide_hit_rate', 'share in assigned group')):
      series = {}
      for ratio in sorted({e['ratio'] for e in guided}, key=_ratio_key):
        for alpha in sorted({e['alpha'] for e in guided if e['ratio'] == ratio}):
          for path in sorted({e['path'] for e in guided if e['ratio'] == ratio}):
            es = [e for e in guided if e['ratio'] == ratio and e['alpha'] == alpha
                  and e['path'] == path]
            if metric != 'guide_hit_rate':  # S = 0: the unguided row of the same models
              es += [e for e in summary if e['kind'] == base_kind and not e['guided']
                     and e['ratio'] == ratio and e['alpha'] == alpha]
            es = sorted((e for e in es if metric in e), key=lambda e: e['scale'])
            if len(es) < 2:
              continue
            m = np.array([e[metric]['mean'] for e in es])
            sd = np.array([e[metric]['std'] for e in es])
            name = f'train {ratio}, alpha {alpha:g}' + ('' if path == 'unet' else f', {path}')
            series[name] = ([e['scale'] for e in es], (m, m - sd, m + sd))
      xs_all = sorted({x for xs, _ in series.values() for x in xs})
      if not series:
        continue
      # Series measured at fewer scales get NaN at the others (plot_xy skips those points).
      aligned = {k: tuple(np.array([dict(zip(xs, arr)).get(x, np.nan) for x in xs_all])
                          for arr in v) for k, (xs, v) in series.items()}
      path_png = os.path.join(out_dir, f'{kind}_{metric}_vs_scale.png')
      plots.plot_xy(path_png, xs_all, aligned, 'guidance scale S (S = 0: unguided)', label,
                    f"{'Indicator' if kind == 'guided' else 'Pseudo-label'} guidance: {label}")
      made.append(path_png)
  return made


def machine_description():
  """Cores, CPU model and JAX backend: the timings in the summary mean little without them."""
  try:
    ncpu = len(os.sched_getaffinity(0))
  except AttributeError:
    ncpu = os.cpu_count()
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          cpu = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return f'{ncpu} CPU cores ({cpu}), JAX {jax.__version__} on {jax.default_backend()}'


def write_summary(runner, preset, seconds, publish=None):
  """summary.json, summary.md and plots/ under the runner's directory; with `publish`,
  copies suffixed with the preset name (none for 'full') for RESULTS.md."""
  summary = summarize(runner.results.rows)
  rows = runner.results.rows
  models = {r['workdir']: r.get('train_seconds') or 0.0 for r in rows}
  meta = {'preset': preset, 'machine': machine_description(), 'seconds': seconds,
          'plan': dataclasses.asdict(runner.plan), 'models': len(models),
          'train_seconds': float(sum(models.values())),
          'eval_seconds': float(sum(r.get('eval_seconds') or 0.0 for r in rows))}
  out = runner.out
  write_json(os.path.join(out, 'summary.json'), {'meta': meta, 'summary': summary})
  md = summary_markdown(summary, runner.plan, meta)
  write_text(os.path.join(out, 'summary.md'), md)
  made = make_plots(summary, os.path.join(out, 'plots'))
  if publish:
    suffix = '' if preset == 'full' else f'_{preset}'
    cells.publish(publish, out, runner.results.path, made, f'sweep{suffix}',
                  lambda f: '{}{}{}'.format(os.path.splitext(f)[0], suffix, os.path.splitext(f)[1]))
  return summary, md
