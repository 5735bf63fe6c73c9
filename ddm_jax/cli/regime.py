"""python -m ddm_jax.cli.regime: DDM in the paper's regime against its baselines
(`ddm_jax.experiments.regime` says what it runs and writes)."""
import argparse
import dataclasses
import os
import sys
import time

from ddm_jax.cli.common import cli, experiment_plan, load_config, parse
from ddm_jax.experiments.regime import PRESETS, Runner, write_summary
from ddm_jax.experiments.regime.runner import select_lr
from ddm_jax.files import write_json

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')


def _list(conv, sep=','):
  return lambda text: tuple(conv(v.strip()) for v in text.split(sep) if v.strip())


def parse_args(argv):
  p = argparse.ArgumentParser(prog='python -m ddm_jax.cli.regime',
                              description="DDM in the paper's regime against its baselines.")
  p.add_argument('--quick', action='store_true', help='the <= 15 minute preset')
  p.add_argument('--name', default=None, help='label of the run (default: the preset)')
  p.add_argument('--out', default=None, help='default sweeps/regime_<name>')
  p.add_argument('--base_config', default=os.path.join(CONFIGS, 'digits_base.py'))
  p.add_argument('--config', default=os.path.join(CONFIGS, 'digits.py'),
                 help='what every fine-tune starts from (--config.KEY=VALUE overrides it)')
  p.add_argument('--publish', default=None, help='copy summary, rows and plots here')
  p.add_argument('--summary_only', action='store_true')
  p.add_argument('--pairs', type=_list(str, ';'), default=None,
                 help="groups of digits, ';'-separated: '0/1;7/8' (K = 3: '0/1/2')")
  p.add_argument('--ratios', type=_list(str), default=None, help="e.g. '4:1,9:1' or '4:1:1'")
  p.add_argument('--methods', type=_list(str), default=None)
  p.add_argument('--lora_targets', type=_list(str), default=None,
                 help='LoRA fine-tunes on the Dense or Conv layers so named (e.g. to_q,to_v or '
                 'to_q,to_v,conv1,conv2) instead of full ones')
  p.add_argument('--lora_rank', type=int, default=None)
  p.add_argument('--lora_alpha', type=float, default=None)
  for name in ('alphas', 'guided_alphas', 'scales', 'lrs'):
    p.add_argument(f'--{name}', type=_list(float), default=None)
  for name in ('dev_seeds', 'test_seeds'):
    p.add_argument(f'--{name}', type=_list(int), default=None)
  for name in ('base_steps', 'finetune_steps', 'num_samples', 'dev_num_samples', 'sample_steps',
               'quality_n'):
    p.add_argument(f'--{name}', type=int, default=None)
  for name in ('lr', 'fd_target', 'eta'):
    p.add_argument(f'--{name}', type=float, default=None)
  p.add_argument('--test_all_scales', action='store_true', default=None)
  return parse(p, argv, known=True)


@cli
def main(argv):
  args, plan, overrides = experiment_plan(argv, parse_args, PRESETS)
  preset = 'quick' if args.quick else 'full'
  base_cfg = load_config(args.base_config, {})
  ft_cfg = load_config(args.config, overrides)
  name = args.name or preset
  out = args.out or os.path.join('sweeps', f'regime_{name}')
  os.makedirs(out, exist_ok=True)
  runner = Runner(base_cfg, ft_cfg, plan, out, log=lambda m: print(m, flush=True))
  write_json(os.path.join(out, 'plan.json'), {'preset': preset, 'name': name,
                                               'plan': dataclasses.asdict(plan),
                                               'overrides': overrides})
  t0 = time.time()
  if args.summary_only:
    lr = plan.lr or select_lr(runner.results.rows)
  else:
    print(f'{name} -> {os.path.abspath(out)} ({len(runner.results.done)} evaluations already '
          'done)', flush=True)
    lr = runner.run()
  _, md = write_summary(runner, name, None if args.summary_only else time.time() - t0, lr,
                        args.publish)
  print(md)
  print(f'total {time.time() - t0:.0f} s; results in {os.path.abspath(out)}', flush=True)


if __name__ == '__main__':
  sys.exit(main())
