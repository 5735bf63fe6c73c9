"""The evaluation pipeline: trained DDM -> samples -> fairness, quality, indicator -> report.

``evaluate_workdir`` is what ``evaluate.py`` runs; the sweep calls the same
pieces (``EvalContext``, ``sample``, ``score``) so a trained model is loaded,
and each sampler compiled, once per process.

What is measured, on ``N`` generated samples labelled by the evaluator (a CNN
trained on real images with their true group labels, ``classifier.py``):

* fairness: group proportions with percentile-bootstrap 95% CIs, FD
  ``||p_hat - p_target||_2`` (Choi et al. 2020), its |p_0 - 0.5| form of the
  DDM table (two groups), KL(p_hat || p_target); for group-conditioned UNets
  SPD; for guided sampling the share of samples landing in their assigned group;
* quality: Fréchet *classifier* distance (FCD, the FID formula in the
  evaluator's penultimate features; no Inception weights here) against the
  real reference set (group-balanced), against the biased training split, and
  within each group; k-NN precision/recall (Kynkäänniemi et al. 2019); the
  real-vs-real noise floor on two halves of the reference set;
* the indicator (the reference code's own check): mean/std entropy of its
  softmax, and its accuracy, on real images noised at random timesteps.

Fairness figures are refused (``DataError``) when the evaluator's held-out
accuracy is below the floor (default 0.95): its mistakes would show up as
generator bias.
"""
import copy
import dataclasses
import json
import math
import os
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ddm_jax.errors import ConfigError
from ddm_jax.evaluation import fairness, quality

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
  evaluator_split: Optional[str] = None   # default: 'balanced' (biased_digits) / 'train'
  heldout_split: Optional[str] = None     # default: 'test'
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
  guidance_path: str = 'unet'             # 'unet' | 'x0' (ddm_jax.guidance.make_indicator_guidance)
  use_ema: bool = True

  def validate(self):
    if self.num_samples < 2 * (self.knn_k + 1):
      raise ConfigError(f'num_samples must be >= {2 * (self.knn_k + 1)}, got {self.num_samples}')
    if self.batch_size < 1:
      raise ConfigError(f'batch_size must be positive, got {self.batch_size}')
    if not 0.0 <= self.accuracy_floor <= 1.0:
      raise ConfigError(f'accuracy_floor must be in [0, 1], got {self.accuracy_floor}')
    if self.guidance not in ('none', 'indicator'):
      raise ConfigError(f"guidance must be 'none' or 'indicator', got {self.guidance!r}")
    if self.guidance == 'indicator':
      from ddm_jax.guidance import PATHS, check_scale  # pylint: disable=import-outside-toplevel
      check_scale(self.guidance_scale)
      if self.guidance_path not in PATHS:
        raise ConfigError(f'guidance_path must be one of {PATHS}, got {self.guidance_path!r}')
    return self


# ----------------------------------------------------------------------------- real data


def true_group_data_cfg(data_cfg):
  """``data_cfg`` with pseudo-labels off: the evaluator always learns the *true* groups."""
  cfg = ml_collections.ConfigDict(copy.deepcopy(data_cfg.to_dict()))
  if 'pseudo_labels' in cfg:
    cfg.pseudo_labels = ''
  return cfg


def default_splits(data_cfg, settings):
  if data_cfg.name == 'biased_digits':
    ev, ho = 'balanced', 'test'
  else:
    ev, ho = 'train', 'test'
  ev = settings.evaluator_split or ev
  ho = settings.heldout_split or ho
  ref = tuple(settings.reference_splits or (ev, ho))
  return ev, ho, ref


def _arch_key(config):
  """The parts of a config that fix the compiled model functions (not weights, data or loss)."""
  d = config.to_dict() if hasattr(config, 'to_dict') else config
  sub = {k: d.get(k) for k in ('model', 'indicator', 'diffusion', 'lora', 'latent_factor')}
  sub['data'] = {k: d['data'].get(k) for k in ('resolution', 'channels', 'num_groups')}
  return json.dumps(sub, sort_keys=True, default=str)


class EvalContext:
  """Everything about the real data a set of evaluations shares: the evaluator, the
  reference features, the noise floor and the training-set proportions."""

  def __init__(self, config, settings, data_dir=None, progress=False):
    from ddm_jax import data as data_lib  # pylint: disable=import-outside-toplevel
    from ddm_jax.evaluation import classifier  # pylint: disable=import-outside-toplevel
    self.settings = settings.validate()
    self.config = config
    data_cfg = true_group_data_cfg(config.data)
    self.num_groups = int(data_cfg.num_groups)
    self.data_dir = data_dir or data_lib.resolve_data_dir(data_cfg)
    ev, ho, ref = default_splits(data_cfg, settings)
    self.splits = {'evaluator': ev, 'heldout': ho, 'reference': list(ref)}
    t0 = time.time()
    x_ev, y_ev = data_lib.load_arrays(data_cfg, self.data_dir, ev)
    x_ho, y_ho = data_lib.load_arrays(data_cfg, self.data_dir, ho)
    cache_dir = settings.cache_dir or os.environ.get('DDM_EVAL_CACHE') or DEFAULT_CACHE
    key = {'data': data_cfg.name, 'evaluator_split': ev, 'heldout_split': ho,
           'resolution': int(data_cfg.resolution), 'channels': int(data_cfg.channels)}
    ev_obj = classifier.load_or_train_evaluator(
        cache_dir, key, x_ev, y_ev, self.num_groups, val_images=x_ho, val_labels=y_ho,
        seed=settings.evaluator_seed, steps=settings.evaluator_steps)
    self.evaluator = ev_obj.params
    acc, per_group = classifier.accuracy(ev_obj.params, x_ho, y_ho)
    self.evaluator_info = {
        'heldout_accuracy': float(ev_obj.accuracy), 'heldout_accuracy_recomputed': acc,
        'heldout_per_group_accuracy': [float(a) for a in per_group],
        'n_train': int(len(y_ev)), 'n_heldout': int(len(y_ho)), 'floor': settings.accuracy_floor,
        'cache': ev_obj.path, 'from_cache': bool(ev_obj.from_cache),
        'train_split': ev, 'heldout_split': ho}
    # Refuse before any sampling: fairness numbers from a weak evaluator mislead.
    classifier.check_accuracy_floor(ev_obj.accuracy, settings.accuracy_floor)

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
    self.train_counts = np.bincount(y_tr, minlength=self.num_groups)
    self.train_proportions = self.train_counts / self.train_counts.sum()
    from ddm_jax.guidance import parse_target  # pylint: disable=import-outside-toplevel
    self.target = parse_target(settings.target, self.num_groups)
    self.setup_seconds = time.time() - t0

  def describe(self):
    return {'evaluator': self.evaluator_info, 'splits': self.splits,
            'reference_size': int(self.ref_labels.size),
            'reference_group_counts': np.bincount(self.ref_labels,
                                                  minlength=self.num_groups).tolist(),
            'train_split': self.train_split, 'train_group_counts': self.train_counts.tolist(),
            'train_proportions': self.train_proportions.tolist(), 'target': self.target.tolist(),
            'noise_floor': self.noise_floor}


# ----------------------------------------------------------------------------- sampling

_GENERATORS = {}


def get_generator(config, ddm, mesh, sampler, steps, eta, guided, grad_clip=None, path='unet'):
  """One compiled sampler per (architecture, sampler settings, guided) in this process:
  every model of a sweep with the same architecture reuses it (params are arguments)."""
  from ddm_jax.guidance import make_guided_generator  # pylint: disable=import-outside-toplevel
  from ddm_jax.sampling import make_generator  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.loop import sampler_extra  # pylint: disable=import-outside-toplevel
  key = (_arch_key(config), sampler, int(steps), float(eta), bool(guided), grad_clip,
         path if guided else None, tuple(mesh.devices.flat))
  if key not in _GENERATORS:
    if guided:
      _GENERATORS[key] = make_guided_generator(ddm, mesh, sampler, steps, eta, grad_clip, path)
    else:
      _GENERATORS[key] = make_generator(ddm, mesh, sampler, steps, eta, **sampler_extra(ddm))
  return _GENERATORS[key]


def sampler_settings(config, settings):
  from ddm_jax.diffusion.samplers import SAMPLERS  # pylint: disable=import-outside-toplevel
  sampler = settings.sampler or config.sample.sampler
  steps = settings.steps or config.sample.steps
  eta = config.sample.eta if settings.eta is None else settings.eta
  if sampler not in SAMPLERS:
    raise ConfigError(f'sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}')
  if not 0 < steps <= config.diffusion.num_train_timesteps:
    raise ConfigError(f'steps must be in [1, {config.diffusion.num_train_timesteps}], got {steps}')
  return sampler, int(steps), float(eta)


def sample(config, ddm, params, frozen, mesh, settings, target, guidance_scale=None,
           progress=False):
  """Generate ``settings.num_samples`` images. Returns ``(images, cond_labels, guide_labels)``.

  Group-conditioned UNets get a stratified class label per sample (the target
  mix); indicator guidance gets a stratified target group per sample; either
  is ``None`` when unused.
  """
  from ddm_jax.guidance import make_guide, stratified_groups  # pylint: disable=import-outside-toplevel
  from ddm_jax.sampling import effective_batch_size, generate  # pylint: disable=import-outside-toplevel
  sampler, steps, eta = sampler_settings(config, settings)
  n = settings.num_samples
  bs = effective_batch_size(n, settings.batch_size)
  guided = settings.guidance == 'indicator'
  scale = settings.guidance_scale if guidance_scale is None else guidance_scale
  cond = guide_labels = guide = None
  if ddm.unet.num_class_embeds:
    cond = stratified_groups(n, target, bs, seed=settings.seed + 1)
  if guided:
    # The same assignment as the condition when both are used: guide toward the asked group.
    guide_labels = cond if cond is not None else stratified_groups(n, target, bs, settings.seed + 1)
    guide = make_guide(guide_labels, scale)
  gen = get_generator(config, ddm, mesh, sampler, steps, eta, guided, settings.grad_clip,
                      settings.guidance_path)
  images = generate(gen, params, frozen, n, jax.random.key(settings.seed), bs,
                    class_labels=cond, progress=progress, guide=guide)
  return images, cond, guide_labels


# ----------------------------------------------------------------------------- scoring

_ENTROPY_FNS = {}


def indicator_stats(config, ddm, params, frozen, images, labels, num, seed=0, batch_size=500):
  """Entropy (mean, std) and accuracy of the indicator's softmax on real images noised
  at uniformly random timesteps and passed through the UNet (as the reference code
  evaluates); accuracy also per quarter of the timestep range."""
  n = min(int(num), len(labels))
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(labels))[:n]
  x, y = images[idx], np.asarray(labels)[idx].astype(np.int32)
  T = int(config.diffusion.num_train_timesteps)
  ts = rng.integers(0, T, size=n).astype(np.int32)
  key = _arch_key(config)
  if key not in _ENTROPY_FNS:
    from ddm_jax.diffusion.schedules import add_noise  # pylint: disable=import-outside-toplevel

    def fn(params, frozen, x0, y, t, noise_key):
      x0, _, cond = ddm.prepare_batch(frozen, {'image': x0, 'label': y}, noise_key)
      noise = jax.random.normal(noise_key, x0.shape, jnp.float32)
      x_t = add_noise(ddm.sched, x0, noise, t)
      return ddm.indicator_fn(params, ddm.model_fn(params, frozen, x_t, t, **cond))

    _ENTROPY_FNS[key] = jax.jit(fn)
  fn = _ENTROPY_FNS[key]
  bs = max(1, min(batch_size, n))
  logits = []
  for i, start in enumerate(range(0, n, bs)):
    sl = slice(start, start + bs)
    m = len(y[sl])
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], bs - m, axis=0)]) if m < bs else a
    out = fn(params, frozen, pad(x[sl]), pad(y[sl]), pad(ts[sl]),
             jax.random.fold_in(jax.random.key(seed), i))
    logits.append(np.asarray(out, np.float64)[:m])
  logits = np.concatenate(logits)
  mean, std = fairness.entropy_stats(logits)
  ok = logits.argmax(1) == y
  quarters = [float(ok[(ts >= q * T // 4) & (ts < (q + 1) * T // 4)].mean())
              if np.any((ts >= q * T // 4) & (ts < (q + 1) * T // 4)) else float('nan')
              for q in range(4)]
  return {'entropy_mean': mean, 'entropy_std': std, 'max_entropy': math.log(logits.shape[1]),
          'accuracy': float(ok.mean()), 'accuracy_by_t_quarter': quarters, 'n': int(n)}


def score(ctx, images, cond_labels=None, guide_labels=None):
  """Fairness and quality figures of generated ``images`` (NHWC in [-1, 1])."""
  from ddm_jax.evaluation import classifier  # pylint: disable=import-outside-toplevel
  s = ctx.settings
  logits, feats = classifier._run_batched(ctx.evaluator, images, 500)  # pylint: disable=protected-access
  pred = logits.argmax(1).astype(np.int64)
  k = ctx.num_groups
  p_hat = fairness.proportions(pred, k)
  lo, hi = fairness.bootstrap_ci(pred, k, n_boot=s.n_boot, seed=s.seed)
  fair = {'n': int(pred.size), 'proportions': p_hat.tolist(), 'ci95_lo': lo.tolist(),
          'ci95_hi': hi.tolist(), 'target': ctx.target.tolist(),
          'fd': fairness.fairness_discrepancy(p_hat, ctx.target),
          'fd_uniform': fairness.fairness_discrepancy(p_hat),
          'kl': fairness.kl_divergence(p_hat, ctx.target)}
  if k == 2:
    fair['fd_paper'] = fairness.fd_paper_form(p_hat)
  # FD's own sampling noise: the bootstrap spread of FD itself.
  rng = np.random.default_rng(s.seed)
  boot = rng.multinomial(pred.size, p_hat, size=s.n_boot) / pred.size
  fds = np.linalg.norm(boot - ctx.target[None], axis=1)
  fair['fd_ci95'] = [float(np.percentile(fds, 2.5)), float(np.percentile(fds, 97.5))]
  if cond_labels is not None:
    rates, spd = fairness.statistical_parity_difference(cond_labels, pred, k)
    fair['spd'] = spd
    fair['conditioned_hit_rates'] = rates.tolist()
  if guide_labels is not None:
    fair['guide_hit_rate'] = float(np.mean(pred == np.asarray(guide_labels)))

  qual = {'fcd': quality.frechet_distance_from_features(ctx.ref_feats, feats),
          'fcd_vs_train': quality.frechet_distance_from_features(ctx.train_feats, feats),
          'noise_floor_fcd': ctx.noise_floor['fd']}
  within = {}
  for g in range(k):
    fg, rg = feats[pred == g], ctx.ref_feats[ctx.ref_labels == g]
    within[str(g)] = (quality.frechet_distance_from_features(rg, fg)
                      if fg.shape[0] >= 2 and rg.shape[0] >= 2 else None)
  qual['fcd_within_group'] = within
  vals = [v for v in within.values() if v is not None]
  qual['fcd_within_group_mean'] = float(np.mean(vals)) if len(vals) == k else None
  prec, rec = quality.precision_recall(ctx.ref_feats, feats, k=s.knn_k)
  qual.update(precision=prec, recall=rec, noise_floor_precision=ctx.noise_floor['precision'],
              noise_floor_recall=ctx.noise_floor['recall'], knn_k=s.knn_k)
  return {'fairness': fair, 'quality': qual}, pred


# ----------------------------------------------------------------------------- reports


def _fmt(v, nd=4):
  if v is None:
    return 'n/a'
  if isinstance(v, (list, tuple)):
    return '(' + ', '.join(_fmt(x, nd) for x in v) + ')'
  if isinstance(v, float):
    return f'{v:.{nd}f}'
  return str(v)


def render_markdown(report):
  f, q, ind = report['fairness'], report['quality'], report.get('indicator') or {}
  ev = report['data']['evaluator']
  lines = [f"# Evaluation of {report['workdir']}", '',
           f"checkpoint step {report['checkpoint_step']}, {f['n']} samples, seed {report['seed']}, "
           f"sampler {report['sampling']['sampler']} ({report['sampling']['steps']} steps), "
           f"guidance {report['sampling']['guidance']}"
           + (f" (scale {report['sampling']['guidance_scale']:g}, gradient path "
              f"{report['sampling'].get('guidance_path', 'unet')})"
              if report['sampling']['guidance'] != 'none' else ''), '',
           f"Evaluator: held-out accuracy {ev['heldout_accuracy']:.4f} on {ev['n_heldout']} images "
           f"of split `{ev['heldout_split']}` (floor {ev['floor']:.2f}); per group "
           f"{_fmt(ev['heldout_per_group_accuracy'], 3)}.", '',
           '## Fairness', '', '| figure | value |', '|---|---|',
           f"| training-set proportions (`{report['data']['train_split']}`) | "
           f"{_fmt(report['data']['train_proportions'], 3)} |",
           f"| target | {_fmt(f['target'], 3)} |",
           f"| generated proportions (evaluator) | {_fmt(f['proportions'], 4)} |",
           f"| 95% bootstrap CI, low | {_fmt(f['ci95_lo'], 4)} |",
           f"| 95% bootstrap CI, high | {_fmt(f['ci95_hi'], 4)} |",
           f"| FD = L2(p_hat, target) | {f['fd']:.4f} (95% CI {_fmt(f['fd_ci95'], 4)}) |"]
  if 'fd_paper' in f:
    lines.append(f"| FD, DDM-table form abs(p_0 - 0.5) | {f['fd_paper']:.4f} |")
  lines.append(f"| KL(p_hat ‖ target) | {f['kl']:.5f} |")
  if 'spd' in f:
    lines.append(f"| SPD (conditioned hit rates {_fmt(f['conditioned_hit_rates'], 3)}) | "
                 f"{f['spd']:.4f} |")
  if 'guide_hit_rate' in f:
    lines.append(f"| samples landing in their assigned group | {f['guide_hit_rate']:.4f} |")
  lines += ['', '## Quality (evaluator features: Fréchet *classifier* distance, not FID)', '',
            '| figure | generated | real-vs-real noise floor |', '|---|---|---|',
            f"| FCD vs reference (`{'+'.join(report['data']['splits']['reference'])}`, "
            f"{report['data']['reference_size']} images) | {q['fcd']:.3f} | "
            f"{q['noise_floor_fcd']:.3f} (two halves of {report['data']['noise_floor']['n_half']}) |",
            f"| FCD vs training split | {q['fcd_vs_train']:.3f} | |",
            f"| FCD within group (per group) | {_fmt(list(q['fcd_within_group'].values()), 3)} | |",
            f"| precision (k={q['knn_k']}) | {q['precision']:.4f} | "
            f"{q['noise_floor_precision']:.4f} |",
            f"| recall (k={q['knn_k']}) | {q['recall']:.4f} | {q['noise_floor_recall']:.4f} |"]
  if ind:
    lines += ['', '## Indicator (real images noised at random timesteps)', '',
              f"entropy {ind['entropy_mean']:.4f} ± {ind['entropy_std']:.4f} nats "
              f"(max {ind['max_entropy']:.4f}); accuracy {ind['accuracy']:.4f}, by timestep "
              f"quarter {_fmt(ind['accuracy_by_t_quarter'], 3)} (n={ind['n']})."]
  lines += ['', 'Plots: `proportions.png`, `samples_by_group.png`.', '']
  return '\n'.join(lines)


def write_outputs(out_dir, report, images, pred, num_groups):
  from ddm_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  from ddm_jax.images import to_uint8  # pylint: disable=import-outside-toplevel
  os.makedirs(out_dir, exist_ok=True)
  f = report['fairness']
  title = 'Generated group proportions'
  if report['sampling']['guidance'] != 'none':
    title += f" (indicator guidance S={report['sampling']['guidance_scale']:g})"
  plots.plot_group_proportions(os.path.join(out_dir, 'proportions.png'), f['proportions'],
                               f['ci95_lo'], f['ci95_hi'], f['target'],
                               report['data']['train_proportions'], title=title)
  m = min(256, len(pred))
  plots.save_grid_sorted_by_group(os.path.join(out_dir, 'samples_by_group.png'), images[:m],
                                  pred[:m].astype(np.int64), num_groups)
  np.savez_compressed(os.path.join(out_dir, 'samples.npz'), images=to_uint8(images), pred=pred)
  _atomic_text(os.path.join(out_dir, 'report.json'), json.dumps(report, indent=2, default=float))
  _atomic_text(os.path.join(out_dir, 'report.md'), render_markdown(report))


def _atomic_text(path, text):
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as fh:
    fh.write(text)
  os.replace(tmp, path)


def evaluate_loaded(workdir, loaded, settings, ctx=None, out_dir=None, progress=False,
                    with_indicator=True):
  """Evaluate an already loaded model (``cli.load_trained``'s tuple); returns the report dict.

  Writes ``out_dir`` (report.json, report.md, plots, samples.npz) unless it is ``None``.
  """
  from ddm_jax.training.checkpoint import config_to_json  # pylint: disable=import-outside-toplevel
  config, ddm, params, frozen, mesh, step = loaded
  settings.validate()
  if settings.guidance == 'indicator' and float(config.loss.w_ind) == 0.0:
    raise ConfigError('this model was trained with loss.w_ind = 0: its indicator never learned, '
                      'so indicator guidance would steer with a random classifier')
  ctx = ctx or EvalContext(config, settings, progress=progress)
  t0 = time.time()
  images, cond, guide_labels = sample(config, ddm, params, frozen, mesh, settings, ctx.target,
                                      progress=progress)
  t_sample = time.time() - t0
  scores, pred = score(ctx, images, cond, guide_labels)
  sampler, steps, eta = sampler_settings(config, settings)
  report = {'workdir': os.path.abspath(workdir), 'checkpoint_step': int(step),
            'seed': settings.seed, 'num_samples': settings.num_samples,
            'settings': dataclasses.asdict(settings),
            'sampling': {'sampler': sampler, 'steps': steps, 'eta': eta,
                         'guidance': settings.guidance,
                         'guidance_scale': settings.guidance_scale,
                         'guidance_path': settings.guidance_path, 'ema': settings.use_ema,
                         'seconds': t_sample},
            'data': ctx.describe(), **scores, 'config': config_to_json(config)}
  if with_indicator:
    report['indicator'] = indicator_stats(config, ddm, params, frozen, ctx.ref_images,
                                          ctx.ref_labels, settings.entropy_samples,
                                          seed=settings.seed)
  if out_dir:
    write_outputs(out_dir, report, images, pred, ctx.num_groups)
  return report


def default_out_dir(workdir, settings):
  out = os.path.join(workdir, 'eval')
  if settings.guidance == 'indicator':
    tag = '' if settings.guidance_path == 'unet' else f'_{settings.guidance_path}'
    out = os.path.join(out, f'indicator{tag}_s{settings.guidance_scale:g}')
  return out


def evaluate_workdir(workdir, settings, out_dir=None, progress=True):
  """``evaluate.py``: load the latest checkpoint, evaluate, write ``out_dir`` (default
  ``<workdir>/eval``, or ``<workdir>/eval/indicator_s<S>`` for guided sampling)."""
  from ddm_jax.cli import load_trained  # pylint: disable=import-outside-toplevel
  settings.validate()
  loaded = load_trained(workdir, use_ema=settings.use_ema)
  out_dir = out_dir or default_out_dir(workdir, settings)
  report = evaluate_loaded(workdir, loaded, settings, out_dir=out_dir, progress=progress)
  return report, out_dir


# ----------------------------------------------------------------------------- CLI


def _parse_args(argv):
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(
      prog='evaluate.py',
      description='Fairness and quality of a trained DDM: group proportions (bootstrap CIs), FD, '
                  'KL, SPD, Fréchet classifier distance, precision/recall, indicator entropy.')
  p.add_argument('--workdir', required=True, help='a train.py workdir')
  p.add_argument('--num_samples', type=int, default=1000)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--sampler', default=None, help='ddim | ddpm | dpm++2m (default: config.sample)')
  p.add_argument('--steps', type=int, default=None)
  p.add_argument('--eta', type=float, default=None)
  p.add_argument('--batch_size', type=int, default=500)
  p.add_argument('--target', default=None,
                 help='target group distribution, e.g. 0.5,0.5 (default uniform; ratios ok)')
  p.add_argument('--accuracy_floor', type=float, default=0.95,
                 help='refuse fairness figures when the evaluator is less accurate than this')
  p.add_argument('--evaluator_split', default=None)
  p.add_argument('--heldout_split', default=None)
  p.add_argument('--reference_splits', default=None, help='comma-separated real splits for FCD')
  p.add_argument('--evaluator_steps', type=int, default=300)
  p.add_argument('--cache_dir', default=None, help='evaluator cache (default '
                 '$DDM_EVAL_CACHE or ~/.cache/ddm_jax/evaluators)')
  p.add_argument('--guidance', default='none', choices=('none', 'indicator'))
  p.add_argument('--guidance_scale', type=float, default=0.0)
  p.add_argument('--grad_clip', type=float, default=None)
  p.add_argument('--guidance_path', default='unet', choices=('unet', 'x0'),
                 help='gradient through the whole UNet (unet) or only its x0 estimate (x0)')
  p.add_argument('--no_ema', action='store_true')
  p.add_argument('--out_dir', default=None, help='default <workdir>/eval[/indicator_s<S>]')
  p.add_argument('--no_progress', action='store_true')
  return p.parse_args(argv)


def _main(argv):
  args = _parse_args(argv)
  target = None
  if args.target:
    try:
      target = [float(v) for v in args.target.split(',')]
    except ValueError:
      raise ConfigError(f'--target must be comma-separated numbers, got {args.target!r}') from None
  settings = EvalSettings(
      num_samples=args.num_samples, seed=args.seed, sampler=args.sampler, steps=args.steps,
      eta=args.eta, batch_size=args.batch_size, target=target, accuracy_floor=args.accuracy_floor,
      evaluator_split=args.evaluator_split, heldout_split=args.heldout_split,
      reference_splits=args.reference_splits.split(',') if args.reference_splits else None,
      evaluator_steps=args.evaluator_steps, cache_dir=args.cache_dir, guidance=args.guidance,
      guidance_scale=args.guidance_scale, grad_clip=args.grad_clip,
      guidance_path=args.guidance_path, use_ema=not args.no_ema)
  report, out_dir = evaluate_workdir(args.workdir, settings, args.out_dir,
                                     progress=not args.no_progress)
  f, q = report['fairness'], report['quality']
  print(f"proportions {_fmt(f['proportions'], 4)} (target {_fmt(f['target'], 3)}), "
        f"FD {f['fd']:.4f}, KL {f['kl']:.5f}, FCD {q['fcd']:.3f} "
        f"(noise floor {q['noise_floor_fcd']:.3f}), precision {q['precision']:.3f}, "
        f"recall {q['recall']:.3f}")
  print(f'wrote {os.path.abspath(out_dir)}/report.json, report.md, proportions.png, '
        'samples_by_group.png')


def evaluate_main(argv=None):
  from ddm_jax.cli import cli  # pylint: disable=import-outside-toplevel
  return cli(_main)(argv)
