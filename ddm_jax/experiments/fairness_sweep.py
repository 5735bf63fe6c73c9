"""Reproduce the DDM fairness table on the embedded digits, then go past it.

    python -m ddm_jax.experiments.fairness_sweep [--quick] [--out=DIR] [--publish=results]

Three parts, each a list of cells; every finished evaluation is one JSON line
in ``DIR/results.jsonl`` and a rerun skips the cells already there (training
itself resumes from its last checkpoint), so a killed sweep continues where
it stopped:

1. ``ddm``: train at group ratios (group 0 : group 1) x indicator weights
   alpha (``w_ind = alpha``, ``w_rec = 1 - alpha`` as in the reference) x
   seeds, evaluate unguided sampling: FD (both forms), proportions, Fréchet
   classifier distance, precision/recall, indicator entropy.
2. ``guided``: on the alpha > 0 models at the guided ratios, indicator-guided
   sampling toward a uniform target at several scales S (same sampling seeds).
3. ``pseudo``: the same DDM + guidance with k-means pseudo-labels instead of
   the true groups; adjusted Rand index of the pseudo-groups.

``DIR/summary.md`` / ``summary.json`` hold mean ± std over seeds per cell and
``DIR/plots/`` the figures; ``--publish=results`` copies both for RESULTS.md.
"""
import argparse
import dataclasses
import json
import os
import platform
import shutil
import sys
import time
from typing import Tuple

import numpy as np

from ddm_jax.errors import ConfigError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'digits.py')


@dataclasses.dataclass
class Plan:
  ratios: Tuple[str, ...] = ('1:4', '1:1', '4:1', '9:1')
  alphas: Tuple[float, ...] = (0.0, 0.01, 0.05, 0.1)
  seeds: Tuple[int, ...] = (0, 1, 2)
  num_steps: int = 800
  num_samples: int = 1000
  sampler: str = 'ddim'
  sample_steps: int = 25
  eta: float = 1.0                      # stochastic DDIM: see RESULTS.md for why
  guided_ratios: Tuple[str, ...] = ('4:1', '9:1')
  guided_alphas: Tuple[float, ...] = (0.05,)
  scales: Tuple[float, ...] = (2.0, 4.0, 8.0)
  pseudo_ratios: Tuple[str, ...] = ('4:1', '9:1')
  pseudo_alpha: float = 0.05
  pseudo_scales: Tuple[float, ...] = (4.0,)
  pseudo_seeds: Tuple[int, ...] = (0, 1, 2)
  grad_clip: float = 0.0                # 0: none
  guidance_path: str = 'unet'           # 'unet' | 'x0' (ddm_jax.guidance)
  eval_batch: int = 500


PRESETS = {
    'full': Plan(),
    # Sized for <= 20 minutes on 2 CPU cores (see RESULTS.md for the measured time).
    'quick': Plan(ratios=('4:1',), alphas=(0.0, 0.05), seeds=(0,), num_steps=300,
                  num_samples=400, sample_steps=25, guided_ratios=('4:1',),
                  guided_alphas=(0.05,), scales=(4.0,), pseudo_ratios=(),
                  pseudo_scales=(), pseudo_seeds=()),
}


def parse_ratio(text):
  """'4:1' -> (0.8, 0.2): group 0 : group 1 training shares."""
  try:
    parts = [float(v) for v in str(text).split(':')]
  except ValueError:
    raise ConfigError(f'ratio must look like 4:1, got {text!r}') from None
  if len(parts) < 2 or any(p <= 0 for p in parts):
    raise ConfigError(f'ratio must have >= 2 positive parts, got {text!r}')
  total = sum(parts)
  return tuple(p / total for p in parts)


def cell_id(kind, ratio, alpha, seed, scale=None, path='unet'):
  base = f'{kind}/r{ratio}/a{alpha:g}/s{seed}'
  if scale is None:
    return base
  return f'{base}/S{scale:g}' + ('' if path == 'unet' else f'/{path}')


def run_name(ratio, alpha, seed, pseudo=False):
  return f"r{ratio.replace(':', '-')}_a{alpha:g}_s{seed}" + ('_pseudo' if pseudo else '')


def cell_config(base, ratio, alpha, seed, num_steps, pseudo=False):
  import copy  # pylint: disable=import-outside-toplevel
  c = copy.deepcopy(base)
  c.data.proportions = parse_ratio(ratio)
  c.loss.w_ind = float(alpha)
  c.loss.w_rec = 1.0 - float(alpha)
  c.train.seed = int(seed)
  c.train.num_steps = int(num_steps)
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, int(num_steps)))
  c.train.sample_every = 0  # the sweep evaluates afterwards; no extra sampler compile
  if pseudo:
    c.data.pseudo_labels = 'kmeans'
  return c


# ----------------------------------------------------------------------------- results file


class Results:
  """Append-only JSONL of finished evaluations; the ids in it are skipped on resume."""

  def __init__(self, path):
    self.path = path
    self.rows = []
    if os.path.exists(path):
      with open(path, encoding='utf-8') as f:
        text = f.read()
      damaged = bool(text) and not text.endswith('\n')
      for line in text.splitlines():
        if not line.strip():
          continue
        try:
          self.rows.append(json.loads(line))
        except json.JSONDecodeError:
          damaged = True  # a line cut by a kill mid-write: that cell simply runs again
      if damaged:  # rewrite without the cut line, so new rows start on a line of their own
        tmp = path + '.tmp'
        with open(tmp, 'w', encoding='utf-8') as f:
          f.writelines(json.dumps(r, default=float) + '\n' for r in self.rows)
        os.replace(tmp, path)
    self.done = {r['id'] for r in self.rows}

  def add(self, row):
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    with open(self.path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row, default=float) + '\n')
      f.flush()
      os.fsync(f.fileno())
    self.rows.append(row)
    self.done.add(row['id'])


# ----------------------------------------------------------------------------- one cell


def _row(report, **extra):
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
    from ddm_jax.training.loop import train  # pylint: disable=import-outside-toplevel
    train(config, workdir, progress=False)

  def evaluate(self, workdir, settings, out_dir, with_indicator=True):
    if self._evaluate_fn:
      return self._evaluate_fn(workdir, settings, out_dir)
    from ddm_jax.cli import load_trained  # pylint: disable=import-outside-toplevel
    from ddm_jax.evaluation import report as report_lib  # pylint: disable=import-outside-toplevel
    loaded = load_trained(workdir)
    config = loaded[0]
    key = json.dumps(report_lib.true_group_data_cfg(config.data).to_dict(), sort_keys=True,
                     default=str)
    if key not in self._ctx:
      self._ctx[key] = report_lib.EvalContext(config, settings)
    ctx = self._ctx[key]
    ctx.settings = settings.validate()
    return report_lib.evaluate_loaded(workdir, loaded, settings, ctx=ctx, out_dir=out_dir,
                                      with_indicator=with_indicator)

  def settings(self, seed, guidance='none', scale=0.0):
    from ddm_jax.evaluation.report import EvalSettings  # pylint: disable=import-outside-toplevel
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
      with open(marker, 'w', encoding='utf-8') as f:
        json.dump({'seconds': seconds}, f)
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
    from ddm_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    from ddm_jax import pseudo_labels as pl  # pylint: disable=import-outside-toplevel
    from ddm_jax.evaluation.report import true_group_data_cfg  # pylint: disable=import-outside-toplevel
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


# ----------------------------------------------------------------------------- summary

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
  from ddm_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
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
  import jax  # pylint: disable=import-outside-toplevel
  return f'{ncpu} CPU cores ({cpu}), JAX {jax.__version__} on {jax.default_backend()}'


def write_summary(runner, preset, seconds, publish=None):
  summary = summarize(runner.results.rows)
  rows = runner.results.rows
  models = {r['workdir']: r.get('train_seconds') or 0.0 for r in rows}
  meta = {'preset': preset, 'machine': machine_description(), 'seconds': seconds,
          'plan': dataclasses.asdict(runner.plan), 'models': len(models),
          'train_seconds': float(sum(models.values())),
          'eval_seconds': float(sum(r.get('eval_seconds') or 0.0 for r in rows))}
  out = runner.out
  with open(os.path.join(out, 'summary.json'), 'w', encoding='utf-8') as f:
    json.dump({'meta': meta, 'summary': summary}, f, indent=2)
  md = summary_markdown(summary, runner.plan, meta)
  with open(os.path.join(out, 'summary.md'), 'w', encoding='utf-8') as f:
    f.write(md)
  made = make_plots(summary, os.path.join(out, 'plots'))
  if publish:
    os.makedirs(publish, exist_ok=True)
    suffix = '' if preset == 'full' else f'_{preset}'
    shutil.copy(os.path.join(out, 'summary.md'), os.path.join(publish, f'sweep{suffix}.md'))
    shutil.copy(os.path.join(out, 'summary.json'), os.path.join(publish, f'sweep{suffix}.json'))
    shutil.copy(runner.results.path, os.path.join(publish, f'sweep{suffix}_rows.jsonl'))
    for path in made:
      name, ext = os.path.splitext(os.path.basename(path))
      shutil.copy(path, os.path.join(publish, f'{name}{suffix}{ext}'))
  return summary, md


# ----------------------------------------------------------------------------- CLI


def _floats(text):
  return tuple(float(v) for v in text.split(',') if v.strip())


def _strs(text):
  return tuple(v.strip() for v in text.split(',') if v.strip())


def _ints(text):
  return tuple(int(v) for v in text.split(',') if v.strip())


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m ddm_jax.experiments.fairness_sweep',
                              description=__doc__.split('\n\n')[0])
  p.add_argument('--quick', action='store_true', help='the <= 20 minute preset')
  p.add_argument('--name', default=None,
                 help='label in the summary and published file names (default: the preset; '
                      'name a run whose grid differs from its preset)')
  p.add_argument('--out', default=None, help='default sweeps/fairness_<name>')
  p.add_argument('--config', default=DEFAULT_CONFIG)
  p.add_argument('--publish', default=None, help='copy summary and plots here (e.g. results)')
  p.add_argument('--summary_only', action='store_true', help='only rebuild summary and plots')
  for name, conv in (('ratios', _strs), ('alphas', _floats), ('seeds', _ints),
                     ('guided_ratios', _strs), ('guided_alphas', _floats), ('scales', _floats),
                     ('pseudo_ratios', _strs), ('pseudo_scales', _floats),
                     ('pseudo_seeds', _ints)):
    p.add_argument(f'--{name}', type=conv, default=None)
  for name in ('num_steps', 'num_samples', 'sample_steps'):
    p.add_argument(f'--{name}', type=int, default=None)
  p.add_argument('--sampler', default=None)
  p.add_argument('--eta', type=float, default=None)
  p.add_argument('--guidance_path', default=None, choices=('unet', 'x0'))
  p.add_argument('--grad_clip', type=float, default=None)
  return p.parse_known_args(argv)


def main(argv=None):
  from ddm_jax.cli import _split_overrides  # pylint: disable=import-outside-toplevel
  from ddm_jax.config import apply_overrides, load_config_file, validate  # pylint: disable=import-outside-toplevel
  argv = sys.argv[1:] if argv is None else argv
  overrides, rest = _split_overrides(argv)
  args, unknown = parse_args(rest)
  if unknown:
    raise ConfigError(f'unknown arguments: {unknown}')
  preset = 'quick' if args.quick else 'full'
  plan = dataclasses.replace(PRESETS[preset], **{
      k: v for k, v in vars(args).items()
      if v is not None and k in {f.name for f in dataclasses.fields(Plan)}})
  for r in set(plan.ratios) | set(plan.guided_ratios) | set(plan.pseudo_ratios):
    parse_ratio(r)
  base = validate(apply_overrides(load_config_file(args.config), overrides))
  name = args.name or preset
  out = args.out or os.path.join('sweeps', f'fairness_{name}')
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'plan.json'), 'w', encoding='utf-8') as f:
    json.dump({'preset': preset, 'name': name, 'plan': dataclasses.asdict(plan), 'overrides': overrides},
              f, indent=2)
  runner = Runner(base, plan, out, log=lambda m: print(m, flush=True))
  t0 = time.time()
  if not args.summary_only:
    print(f'{name} sweep -> {os.path.abspath(out)} ({len(runner.results.done)} evaluations '
          'already done)', flush=True)
    runner.run()
  _, md = write_summary(runner, name, None if args.summary_only else time.time() - t0,
                        args.publish)
  print(md)
  print(f'total {time.time() - t0:.0f} s; results in {os.path.abspath(out)}', flush=True)


def cli_main(argv=None):
  from ddm_jax.cli import cli  # pylint: disable=import-outside-toplevel
  return cli(main)(argv)


if __name__ == '__main__':
  sys.exit(cli_main())
