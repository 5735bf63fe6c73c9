"""python -m ddm_jax.cli.sweep: the DDM fairness sweep on the embedded digits
(`ddm_jax.experiments.sweep` says what it runs and writes)."""
import dataclasses
import os
import sys
import time

from ddm_jax.cli.common import (CONFIG_HELP, OVERRIDES_EPILOG, cli, experiment_plan, list_flag,
                                load_config, make_parser, parse, result)
from ddm_jax.experiments.sweep import PRESETS, Runner, parse_ratio, write_summary
from ddm_jax.files import write_json

# Plan fields given on the command line: (flag, type, help)
_PLAN_FLAGS = (
    ('ratios', list_flag(str), "group 0 : group 1 training ratios, e.g. '1:4,4:1,9:1'"),
    ('alphas', list_flag(float), 'DDM indicator weights w_ind (w_rec = 1 - alpha)'),
    ('seeds', list_flag(int), 'training seeds of every unguided cell'),
    ('guided_ratios', list_flag(str), 'ratios whose models are also sampled with guidance'),
    ('guided_alphas', list_flag(float), 'alphas whose models are also sampled with guidance'),
    ('scales', list_flag(float), 'indicator guidance scales'),
    ('pseudo_ratios', list_flag(str), 'ratios trained on k-means pseudo-labels instead of '
     'the true groups'),
    ('pseudo_scales', list_flag(float), 'guidance scales of the pseudo-label models'),
    ('pseudo_seeds', list_flag(int), 'seeds of the pseudo-label models'),
    ('num_steps', int, 'train steps of every model (from scratch)'),
    ('num_samples', int, 'samples per evaluation'),
    ('sample_steps', int, 'sampling steps'),
    ('sampler', str, 'sampler of every evaluation'),
    ('eta', float, 'DDIM eta'),
    ('grad_clip', float, 'cap on the per-sample guidance gradient norm (0: none)'),
)


def build_parser():
  p = make_parser('sweep', 'Reproduce the DDM fairness table on the embedded digits, '
                  'training every model from scratch, then go past it.',
                  epilog=OVERRIDES_EPILOG)
  p.add_argument('--quick', action='store_true', help='the <= 20 minute preset')
  p.add_argument('--name', default=None,
                 help='label in the summary and published file names (default: the preset; '
                      'name a run whose grid differs from its preset)')
  p.add_argument('--out', default=None, help='folder of the run, resumed by a later invocation '
                 '(default sweeps/fairness_<name> in the current folder)')
  p.add_argument('--config', default='digits',
                 help='what every model starts from (--config.KEY=VALUE overrides it): '
                 + CONFIG_HELP)
  p.add_argument('--publish', default=None, help='copy summary and plots here (e.g. results)')
  p.add_argument('--summary_only', action='store_true', help='only rebuild summary and plots')
  plan = p.add_argument_group("the grid (default: the preset's, "
                              'ddm_jax/experiments/sweep/plan.py)')
  for name, conv, text in _PLAN_FLAGS:
    plan.add_argument(f'--{name}', type=conv, default=None, help=text)
  plan.add_argument('--guidance_path', default=None, choices=('unet', 'x0'),
                    help='gradient through the whole UNet (unet) or only its x0 estimate (x0)')
  return p


def parse_args(argv):
  return parse(build_parser(), argv, known=True)


@cli
def main(argv):
  args, plan, overrides = experiment_plan(argv, parse_args, PRESETS)
  preset = 'quick' if args.quick else 'full'
  for r in set(plan.ratios) | set(plan.guided_ratios) | set(plan.pseudo_ratios):
    parse_ratio(r)  # a bad ratio fails here, not after hours of training
  base = load_config(args.config, overrides)
  name = args.name or preset
  out = args.out or os.path.join('sweeps', f'fairness_{name}')
  os.makedirs(out, exist_ok=True)
  write_json(os.path.join(out, 'plan.json'), {'preset': preset, 'name': name,
                                               'plan': dataclasses.asdict(plan),
                                               'overrides': overrides})
  runner = Runner(base, plan, out, log=lambda m: print(m, flush=True))
  t0 = time.time()
  if not args.summary_only:
    print(f'{name} sweep -> {os.path.abspath(out)} ({len(runner.results.done)} evaluations '
          'already done)', flush=True)
    runner.run()
  _, md = write_summary(runner, name, None if args.summary_only else time.time() - t0,
                        args.publish)
  result(md, f'total {time.time() - t0:.0f} s; results in {os.path.abspath(out)}')


if __name__ == '__main__':
  sys.exit(main())
