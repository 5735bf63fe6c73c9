"""The evaluation report: trained DDM -> samples (the sampling plan) -> scores -> report.

``evaluate_workdir`` is what ``evaluate.py`` runs; the sweep calls ``evaluate_loaded``
with a shared ``EvalContext`` (context.py), so a trained model is loaded, and each
sampler compiled, once per process.

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
  real-vs-real noise floor on two halves of the reference set; per group at an
  equal number of samples (``quality_n``): KID and FCD against the group's
  reference images, next to the same figures for real pool images
  (``quality['equal_n']``, ``quality.equal_n_quality``);
* the indicator (the reference code's own check): mean/std entropy of its
  softmax, and its accuracy, on real images noised at random timesteps.

Fairness figures are refused (``DataError``) when the evaluator's held-out
accuracy is below the floor (default 0.95): its mistakes would show up as
generator bias.
"""
import dataclasses
import os
import time

import numpy as np

from ddm_jax.evaluation import plots
from ddm_jax.evaluation.context import EvalContext, arch_key
from ddm_jax.evaluation.scoring import indicator_stats, score
from ddm_jax.files import write_json, write_text
from ddm_jax.generation.job import read_samples, run_job
from ddm_jax.generation.plan import plan_generator, plan_samples, run_plan, sampling_params
from ddm_jax.images import to_uint8
from ddm_jax.training.checkpoint import config_to_json
from ddm_jax.training.setup import load_trained

# What a Stable Diffusion job's manifest says of its prompts (generation.plan.prompt_info).
PROMPT_KEYS = ('prompts', 'num_per_prompt', 'negative_prompt', 'cfg_scale', 'lora_merged')


def fmt(v, nd=4):
  if v is None:
    return 'n/a'
  if isinstance(v, (list, tuple)):
    return '(' + ', '.join(fmt(x, nd) for x in v) + ')'
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
              f"{report['sampling'].get('guidance_path', 'unet')}, variant "
              f"{report['sampling'].get('guidance_variant', 'plain')})"
              if report['sampling']['guidance'] != 'none' else ''), '',
           f"Evaluator: held-out accuracy {ev['heldout_accuracy']:.4f} on {ev['n_heldout']} images "
           f"of split `{ev['heldout_split']}` (floor {ev['floor']:.2f}); per group "
           f"{fmt(ev['heldout_per_group_accuracy'], 3)}.", '',
           '## Fairness', '', '| figure | value |', '|---|---|',
           f"| training-set proportions (`{report['data']['train_split']}`) | "
           f"{fmt(report['data']['train_proportions'], 3)} |",
           f"| target | {fmt(f['target'], 3)} |",
           f"| generated proportions (evaluator) | {fmt(f['proportions'], 4)} |",
           f"| 95% bootstrap CI, low | {fmt(f['ci95_lo'], 4)} |",
           f"| 95% bootstrap CI, high | {fmt(f['ci95_hi'], 4)} |",
           f"| FD = L2(p_hat, target) | {f['fd']:.4f} (95% CI {fmt(f['fd_ci95'], 4)}) |"]
  if 'fd_paper' in f:
    lines.append(f"| FD, DDM-table form abs(p_0 - 0.5) | {f['fd_paper']:.4f} |")
  if f.get('off_target') is not None:
    lines.append(f"| off target (no group's digit; left out of the proportions) | "
                 f"{f['off_target']:.4f} |")
  lines.append(f"| KL(p_hat ‖ target) | {f['kl']:.5f} |")
  if 'spd' in f:
    lines.append(f"| SPD (conditioned hit rates {fmt(f['conditioned_hit_rates'], 3)}) | "
                 f"{f['spd']:.4f} |")
  if 'guide_hit_rate' in f:
    lines.append(f"| samples landing in their assigned group | {f['guide_hit_rate']:.4f} |")
  lines += ['', '## Quality (evaluator features: Fréchet *classifier* distance, not FID)', '',
            '| figure | generated | real-vs-real noise floor |', '|---|---|---|',
            f"| FCD vs reference (`{'+'.join(report['data']['splits']['reference'])}`, "
            f"{report['data']['reference_size']} images) | {q['fcd']:.3f} | "
            f"{q['noise_floor_fcd']:.3f} (two halves of {report['data']['noise_floor']['n_half']}) |",
            f"| FCD vs training split | {q['fcd_vs_train']:.3f} | |",
            f"| FCD within group (per group) | {fmt(list(q['fcd_within_group'].values()), 3)} | |",
            f"| precision (k={q['knn_k']}) | {q['precision']:.4f} | "
            f"{q['noise_floor_precision']:.4f} |",
            f"| recall (k={q['knn_k']}) | {q['recall']:.4f} | {q['noise_floor_recall']:.4f} |"]
  if 'equal_n' in q:
    e = q['equal_n']
    kid_1e3 = lambda v: None if v is None else (  # noqa: E731
        [None if x is None else 1e3 * x for x in v] if isinstance(v, list) else 1e3 * v)
    pool = report['data'].get('pool_split', 'pool')
    lines += [f"| KID x 1e3 per group at n={e['n']} (mean) | {fmt(kid_1e3(e['kid']), 3)} "
              f"({fmt(kid_1e3(e['kid_mean']), 3)}) | {fmt(kid_1e3(e['kid_floor']), 3)} "
              f"({fmt(kid_1e3(e['kid_floor_mean']), 3)}), `{pool}` |",
              f"| FCD per group at n={e['n']} (mean) | {fmt(e['fcd'], 3)} "
              f"({fmt(e['fcd_mean'], 3)}) | {fmt(e['fcd_floor'], 3)} "
              f"({fmt(e['fcd_floor_mean'], 3)}), `{pool}` |",
              '', f"Samples per group (evaluator): {fmt(e['group_counts'])}; a group with "
              f"fewer than {e['n']} has n/a at equal n."]
  if ind:
    lines += ['', '## Indicator (real images noised at random timesteps)', '',
              f"entropy {ind['entropy_mean']:.4f} ± {ind['entropy_std']:.4f} nats "
              f"(max {ind['max_entropy']:.4f}); accuracy {ind['accuracy']:.4f}, by timestep "
              f"quarter {fmt(ind['accuracy_by_t_quarter'], 3)} (n={ind['n']})."]
  lines += ['', 'Plots: `proportions.png`, `samples_by_group.png`.', '']
  return '\n'.join(lines)


def write_outputs(out_dir, report, images, pred, num_groups):
  os.makedirs(out_dir, exist_ok=True)
  f = report['fairness']
  title = 'Generated group proportions'
  if report['sampling']['guidance'] != 'none':
    title += f" (indicator guidance S={report['sampling']['guidance_scale']:g})"
  plots.plot_group_proportions(os.path.join(out_dir, 'proportions.png'), f['proportions'],
                               f['ci95_lo'], f['ci95_hi'], f['target'],
                               report['data']['train_proportions'], title=title)
  m = min(256, len(pred))
  # Off-target samples (-1) get the last band of their own.
  shown = np.where(pred[:m] < 0, num_groups, pred[:m]).astype(np.int64)
  plots.save_grid_sorted_by_group(os.path.join(out_dir, 'samples_by_group.png'), images[:m],
                                  shown, num_groups + int(np.any(pred < 0)))
  np.savez_compressed(os.path.join(out_dir, 'samples.npz'), images=to_uint8(images), pred=pred)
  write_json(os.path.join(out_dir, 'report.json'), report, default=float)
  write_text(os.path.join(out_dir, 'report.md'), render_markdown(report))


def check_settings(trained, settings):
  """ConfigError if `settings` cannot run on the loaded model (guidance on a model whose
  indicator never learned, a bad sampler, ...), before anything is generated or written."""
  _plan(trained, settings)


def _plan(trained, settings):
  return plan_samples(trained.ddm, trained.config, settings.num_samples, seed=settings.seed,
                      batch_size=settings.batch_size, sampler=settings.sampler,
                      steps=settings.steps, eta=settings.eta, target=settings.target,
                      guidance=settings.guidance, guidance_scale=settings.guidance_scale)


def evaluate_loaded(workdir, trained, settings, ctx=None, out_dir=None, progress=False,
                    with_indicator=True, samples=None):
  """Evaluate an already loaded model (`training.setup.Trained`); returns the report dict.

  The images are generated here, or read from `samples`, a finished sampling job folder
  (sample.py's output, `generation.job`). Writes ``out_dir`` (report.json, report.md,
  plots, samples.npz) unless it is ``None``.
  """
  config, ddm = trained.config, trained.ddm
  settings.validate()
  ctx = ctx or EvalContext(config, settings, progress=progress)
  sampling = {'guidance': settings.guidance, 'guidance_scale': settings.guidance_scale,
              'guidance_path': settings.guidance_path,
              'guidance_variant': settings.guidance_variant, 'ema': settings.use_ema}
  if samples:
    images, per_sample, manifest = read_samples(samples)
    cond_labels, guide_labels = per_sample.get('class_labels'), per_sample.get('guide_labels')
    sampling = {**{k: manifest.get(k, v) for k, v in sampling.items()},
                'sampler': manifest['sampler'], 'steps': manifest['steps'],
                'eta': manifest['eta'], 'seconds': manifest.get('seconds'),
                'samples': os.path.abspath(samples),
                'samples_checkpoint_step': manifest.get('checkpoint_step'),
                **{k: manifest[k] for k in PROMPT_KEYS if k in manifest}}
    seed = manifest['seed']
  else:
    plan = _plan(trained, settings)
    t0 = time.time()
    images = run_plan(_generator(config, ddm, trained.mesh, plan, settings), plan,
                      *sampling_params(ddm, trained.params, trained.frozen), progress=progress)
    sampling.update(sampler=plan.sampler, steps=plan.steps, eta=plan.eta,
                    seconds=time.time() - t0, **(plan.prompt_info or {}))
    cond_labels, guide_labels, seed = plan.class_labels, plan.guide_labels, settings.seed
  scores, pred = score(ctx, images, cond_labels, guide_labels)
  report = {'workdir': os.path.abspath(workdir), 'checkpoint_step': int(trained.step),
            'seed': seed, 'num_samples': int(len(images)),
            'settings': dataclasses.asdict(settings), 'sampling': sampling,
            'data': ctx.describe(), **scores, 'config': config_to_json(config)}
  if with_indicator:
    report['indicator'] = indicator_stats(config, ddm, trained.params, trained.frozen,
                                          ctx.ref_images, ctx.ref_labels,
                                          settings.entropy_samples, seed=settings.seed)
  if out_dir:
    write_outputs(out_dir, report, images, pred, ctx.num_groups)
  return report


_GENERATORS = {}


def _generator(config, ddm, mesh, plan, settings):
  """One compiled sampler per (architecture, sampler settings, guidance) in this process:
  every model of a sweep with the same architecture reuses it (params are arguments)."""
  guided = plan.guide is not None
  key = (arch_key(config), plan.sampler, plan.steps, plan.eta, guided, settings.grad_clip,
         settings.guidance_path if guided else None,
         settings.guidance_variant if guided else None, tuple(mesh.devices.flat))
  if key not in _GENERATORS:
    _GENERATORS[key] = plan_generator(ddm, mesh, plan, settings.grad_clip,
                                      settings.guidance_path, settings.guidance_variant)
  return _GENERATORS[key]


def default_out_dir(workdir, settings):
  out = os.path.join(workdir, 'eval')
  if settings.guidance == 'indicator':
    tag = ''.join(f'_{v}' for v, default in ((settings.guidance_path, 'unet'),
                                             (settings.guidance_variant, 'plain')) if v != default)
    out = os.path.join(out, f'indicator{tag}_s{settings.guidance_scale:g}')
  return out


def evaluate_workdir(workdir, settings, out_dir=None, progress=True, samples=None,
                     host_index=0, num_hosts=1):
  """``evaluate.py``: load the latest checkpoint, evaluate, write ``out_dir`` (default
  ``<workdir>/eval``, or ``<workdir>/eval/indicator_s<S>`` for guided sampling).

  With several hosts, each generates its share of the samples as a sampling job in
  ``<out_dir>/samples`` (hosts never talk), and the host that finishes the job last
  scores it; the others return ``(None, out_dir)``."""
  settings.validate()
  trained = load_trained(workdir, use_ema=settings.use_ema)
  out_dir = out_dir or default_out_dir(workdir, settings)
  if num_hosts > 1 and not samples:
    plan = _plan(trained, settings)
    samples = os.path.join(out_dir, 'samples')
    job_info = {'workdir': os.path.abspath(workdir), 'checkpoint_step': trained.step,
                'ema': settings.use_ema}
    if not run_job(_generator(trained.config, trained.ddm, trained.mesh, plan, settings), plan,
                   *sampling_params(trained.ddm, trained.params, trained.frozen), samples,
                   job_info, host_index=host_index, num_hosts=num_hosts, progress=progress):
      return None, out_dir
  report = evaluate_loaded(workdir, trained, settings, out_dir=out_dir, progress=progress,
                           samples=samples)
  return report, out_dir
