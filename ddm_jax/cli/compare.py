"""python -m ddm_jax.cli.compare: a trained DDM sampled unguided and with indicator guidance,
side by side with their FD (`ddm_jax.experiments.before_after`; the end of `make demo`)."""
import os
import sys

from ddm_jax.cli.common import cli, make_parser, parse, result
from ddm_jax.errors import ConfigError
from ddm_jax.experiments.before_after import before_after
from ddm_jax.files import check_writable_dir


def build_parser():
  p = make_parser('compare', __doc__)
  p.add_argument('--workdir', required=True, help='a train.py workdir whose model has w_ind > 0')
  p.add_argument('--guidance_scale', type=float, default=8.0,
                 help='default 8: the smallest scale of RESULTS.md that brought the demo model '
                      'near FD 0.03 at 4:1')
  p.add_argument('--num_samples', type=int, default=256, help='images per half (at least 8)')
  p.add_argument('--seed', type=int, default=0, help='sampling seed (the same for both halves)')
  p.add_argument('--steps', type=int, default=25, help='DDIM steps')
  p.add_argument('--out', default=None, help='the picture (default <workdir>/before_after.png); '
                 'the evaluations go to <workdir>/eval/before_after/{unguided,S<scale>}/')
  return p


def parse_args(argv):
  return parse(build_parser(), argv)


@cli
def main(argv):
  args = parse_args(argv)
  if args.num_samples < 8:
    raise ConfigError(f'--num_samples must be >= 8, got {args.num_samples}')
  for folder in (os.path.join(args.workdir, 'eval', 'before_after'),  # before either half runs
                 os.path.dirname(os.path.abspath(args.out)) if args.out else args.workdir):
    check_writable_dir(folder)
  before_after(args.workdir, args.guidance_scale, args.num_samples, args.seed, args.out,
               steps=args.steps, log=result)


if __name__ == '__main__':
  sys.exit(main())
