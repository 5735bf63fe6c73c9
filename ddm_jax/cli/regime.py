"""python -m ddm_jax.cli.regime: DDM in the paper's regime against its baselines
(`ddm_jax.experiments.regime` says what it runs and writes)."""
import dataclasses
import os
import sys
import time

from ddm_jax.cli.common import (CONFIG_HELP, OVERRIDES_EPILOG, cli, experiment_plan, list_flag,
                                load_config, make_parser, parse, result, split_overrides)
from ddm_jax.experiments.regime import PRESETS, Runner, write_summary
from ddm_jax.experiments.regime.plan import GUIDED, UNGUIDED
from ddm_jax.experiments.regime.runner import select_lr
from ddm_jax.errors import ConfigError
from ddm_jax.files import write_json
from ddm_jax.generation.guidance import VARIANTS


_METHODS = (', '.join(UNGUIDED + GUIDED) + '; a guided one with a variant, M:'
            + '|'.join(v for v in VARIANTS if v != 'plain') + ', e.g. classifier:stop')

# Plan fields given on the command line: (flag, type, help)
_PLAN_FLAGS = (
    ('pairs', list_flag(str, ';'), "groups of digits, ';'-separated: '0/1;7/8' (K = 3: '0/1/2')"),
    ('ratios', list_flag(str), "training share of each group, e.g. '4:1,9:1' or '4:1:1'"),
    ('methods', list_flag(str), f'comma-separated, from: {_METHODS}'),
    ('lora_targets', list_flag(str), 'LoRA fine-tunes on the Dense or Conv layers so named (e.g. '
     'to_q,to_v or to_q,to_v,conv1,conv2) instead of full ones'),
    ('lora_rank', int, 'LoRA rank'),
    ('lora_alpha', float, 'LoRA alpha (scale alpha / rank)'),
    ('alphas', list_flag(float), 'DDM indicator weights w_ind (w_rec = 1 - alpha; 0 = the plain arm)'),
    ('guided_alphas', list_flag(float), 'the alphas whose DDM models are also guided (ddm+guide)'),
    ('scales', list_flag(float), 'guidance scales tried on the dev seeds'),
    ('lrs', list_flag(float), 'fine-tune learning rates the lr rule picks from on the dev cell'),
    ('lr', float, 'use this fine-tune lr and skip the lr rule (> 0)'),
    ('dev_seeds', list_flag(int), 'seeds on which guidance scales (and the lr) are chosen'),
    ('test_seeds', list_flag(int), 'seeds reported, at the chosen scales'),
    ('base_steps', int, 'train steps of the pretrained base UNet'),
    ('finetune_steps', int, 'train steps of every fine-tune'),
    ('num_samples', int, 'samples per test (and every unguided) evaluation'),
    ('dev_num_samples', int, 'samples per guided evaluation on the dev seeds'),
    ('sample_steps', int, 'DDIM sampling steps'),
    ('eta', float, 'DDIM eta'),
    ('quality_n', int, 'samples per group for the equal-n quality figures (KID, FCD)'),
    ('fd_target', float, 'scale rule: the smallest dev scale whose FD is at most this'),
)


def build_parser():
  p = make_parser('regime', "DDM in the paper's regime against its baselines: a base UNet "
                  'pretrained once on all ten digits, short fine-tunes of it on biased digit '
                  'groups, evaluated unguided and guided.',
                  epilog=OVERRIDES_EPILOG + ' --base_config.SECTION.KEY=VALUE overrides the '
                  "base's config alike; the base and the fine-tunes must share the UNet "
                  '(model.*) and data.resolution, so shrink both, e.g. for a smoke test.')
  p.add_argument('--quick', action='store_true', help='the <= 15 minute preset')
  p.add_argument('--name', default=None, help='label of the run (default: the preset)')
  p.add_argument('--out', default=None,
                 help='folder of the run, resumed and grown by later invocations (default '
                 'sweeps/regime_<name> in the current folder)')
  p.add_argument('--base_config', default='digits_base',
                 help='the base UNet\'s config (--base_config.KEY=VALUE overrides it): '
                 + CONFIG_HELP)
  p.add_argument('--config', default='digits',
                 help='what every fine-tune starts from (--config.KEY=VALUE overrides it): '
                 + CONFIG_HELP)
  p.add_argument('--publish', default=None, help='copy summary, rows and plots here')
  p.add_argument('--summary_only', action='store_true',
                 help='only rebuild the summary and plots from the rows already there')
  plan = p.add_argument_group('the grid (default: the preset\'s, '
                              'ddm_jax/experiments/regime/plan.py)')
  for name, conv, text in _PLAN_FLAGS:
    plan.add_argument(f'--{name}', type=conv, default=None, help=text)
  plan.add_argument('--test_all_scales', action='store_true', default=None,
                    help='run the test seeds at every scale, not only the chosen one')
  return p


def parse_args(argv):
  return parse(build_parser(), argv, known=True)


@cli
def main(argv):
  base_overrides, argv = split_overrides(argv, 'base_config')
  args, plan, overrides = experiment_plan(argv, parse_args, PRESETS)
  preset = 'quick' if args.quick else 'full'
  base_cfg = load_config(args.base_config, base_overrides)
  ft_cfg = load_config(args.config, overrides)
  check_same_unet(base_cfg, ft_cfg)
  name = args.name or preset
  out = args.out or os.path.join('sweeps', f'regime_{name}')
  os.makedirs(out, exist_ok=True)
  runner = Runner(base_cfg, ft_cfg, plan, out, log=lambda m: print(m, flush=True))
  write_json(os.path.join(out, 'plan.json'), {'preset': preset, 'name': name,
                                               'plan': dataclasses.asdict(plan),
                                               'overrides': overrides,
                                               'base_overrides': base_overrides})
  t0 = time.time()
  if args.summary_only:
    lr = plan.lr or select_lr(runner.results.rows)
  else:
    print(f'{name} -> {os.path.abspath(out)} ({len(runner.results.done)} evaluations already '
          'done)', flush=True)
    lr = runner.run()
  _, md = write_summary(runner, name, None if args.summary_only else time.time() - t0, lr,
                        args.publish)
  result(md, f'total {time.time() - t0:.0f} s; results in {os.path.abspath(out)}')


def check_same_unet(base_cfg, ft_cfg):
  """ConfigError now, not after the base has trained, unless every fine-tune can start
  from the base: the same UNet (model.*) at the same data.resolution."""
  base = {**base_cfg.model.to_dict(), 'data.resolution': base_cfg.data.resolution}
  ft = {**ft_cfg.model.to_dict(), 'data.resolution': ft_cfg.data.resolution}
  differ = sorted(k for k in base.keys() | ft.keys() if base.get(k) != ft.get(k))
  if differ:
    key = differ[0] if '.' in differ[0] else f'model.{differ[0]}'
    raise ConfigError(f'the fine-tunes cannot start from the base: {key} is '
                      f'{ft.get(differ[0])!r} in --config but {base.get(differ[0])!r} in '
                      f'--base_config (give both, e.g. --config.{key}=V --base_config.{key}=V)')


if __name__ == '__main__':
  sys.exit(main())
