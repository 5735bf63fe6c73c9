"""python -m ddm_jax.cli.sweep: the DDM fairness sweep on the embedded digits
(`ddm_jax.experiments.sweep` says what it runs and writes)."""
import argparse
import dataclasses
import os
import sys
import time

from ddm_jax.cli.common import cli, experiment_plan, load_config, parse
from ddm_jax.experiments.sweep import PRESETS, Runner, parse_ratio, write_summary
from ddm_jax.files import write_json

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs', 'digits.py')


def _floats(text):
  return tuple(float(v) for v in text.split(',') if v.strip())


def _strs(text):
  return tuple(v.strip() for v in text.split(',') if v.strip())


def _ints(text):
  return tuple(int(v) for v in text.split(',') if v.strip())


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog='python -m ddm_jax.cli.sweep',
      description='Reproduce the DDM fairness table on the embedded digits, then go past it.')
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
  return parse(p, argv, known=True)


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
  print(md)
  print(f'total {time.time() - t0:.0f} s; results in {os.path.abspath(out)}', flush=True)


if __name__ == '__main__':
  sys.exit(main())
