"""evaluate.py: fairness and quality of a trained DDM, written as a report."""
import os
import sys

from ddm_jax.cli.common import (add_guidance_flags, add_progress_flag, cli, guidance_scale,
                                host_split, make_parser, parse, result)
from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.errors import ConfigError
from ddm_jax.evaluation.context import EvalSettings
from ddm_jax.evaluation.report import default_out_dir, evaluate_workdir, fmt
from ddm_jax.files import check_writable_dir


def build_parser():
  p = make_parser(
      'evaluate',
      'Fairness and quality of a trained DDM: group proportions (bootstrap CIs), FD, KL, SPD, '
      'Fréchet classifier distance, precision/recall, indicator entropy.')
  p.add_argument('--workdir', required=True, help='a train.py workdir')
  p.add_argument('--num_samples', type=int, default=1000, help='images to generate and score')
  p.add_argument('--seed', type=int, default=0, help='sampling seed')
  p.add_argument('--sampler', default=None, choices=sorted(SAMPLERS),
                 help='default: config.sample.sampler; pndm for Stable Diffusion workdirs')
  p.add_argument('--steps', type=int, default=None,
                 help='sampling steps (default: config.sample.steps)')
  p.add_argument('--eta', type=float, default=None,
                 help='DDIM noise: 0 deterministic, 1 ancestral (default: config.sample.eta)')
  p.add_argument('--batch_size', type=int, default=500, help='images per compiled batch')
  p.add_argument('--target', default=None,
                 help='target group distribution, e.g. 0.5,0.5 (default uniform; ratios ok)')
  p.add_argument('--accuracy_floor', type=float, default=0.95,
                 help='refuse fairness figures when the evaluator is less accurate than this')
  p.add_argument('--evaluator_split', default=None,
                 help='real split the evaluator trains on (default: evaluator for biased_digits, '
                 'else train)')
  p.add_argument('--heldout_split', default=None,
                 help='real split the evaluator is checked on (default: test)')
  p.add_argument('--heldout_dir', default=None, help='reference-format runs: held-out images/, '
                 'labels.json and prompts.txt (default: the run\'s data.heldout_dir)')
  p.add_argument('--evaluator', default='cnn', help="'cnn' (a small CNN trained on the real "
                 "data) or 'module:factory' returning a GroupEvaluator (evaluation/classifier.py)")
  p.add_argument('--reference_splits', default=None,
                 help='comma-separated real splits for FCD (default: the evaluator and held-out '
                 'splits)')
  p.add_argument('--evaluator_steps', type=int, default=300, help="the evaluator CNN's train steps")
  p.add_argument('--cache_dir', default=None, help='evaluator cache (default '
                 '$DDM_EVAL_CACHE or ~/.cache/ddm_jax/evaluators)')
  p.add_argument('--no_ema', action='store_true', help='use the raw instead of the EMA weights')
  p.add_argument('--out_dir', default=None, help='folder to write (default <workdir>/eval, or '
                 '<workdir>/eval/indicator_s<S> with guidance)')
  add_progress_flag(p)
  p.add_argument('--samples', default=None,
                 help='score a finished sample.py output folder instead of generating')
  p.add_argument('--num_hosts', type=int, default=None,
                 help='generate the samples as a job split over this many hosts; the host that '
                 'finishes last writes the report (default: $JAX_NUM_PROCESSES, $SLURM_NTASKS, 1)')
  p.add_argument('--host_index', type=int, default=None,
                 help="this host's index (default: $JAX_PROCESS_ID, $SLURM_PROCID or 0)")
  add_guidance_flags(p)
  return p


def parse_args(argv):
  return parse(build_parser(), argv)


@cli
def main(argv):
  args = parse_args(argv)
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
      heldout_dir=args.heldout_dir, evaluator=args.evaluator,
      reference_splits=args.reference_splits.split(',') if args.reference_splits else None,
      evaluator_steps=args.evaluator_steps, cache_dir=args.cache_dir, guidance=args.guidance,
      guidance_scale=guidance_scale(args), grad_clip=args.grad_clip,
      guidance_path=args.guidance_path, guidance_variant=args.guidance_variant,
      use_ema=not args.no_ema)
  host_index, num_hosts = host_split(args.host_index, args.num_hosts)
  out_dir = args.out_dir or default_out_dir(args.workdir, settings)
  check_writable_dir(out_dir)  # before the evaluator trains and the samples are made
  report, out_dir = evaluate_workdir(args.workdir, settings, out_dir,
                                     progress=not args.no_progress, samples=args.samples,
                                     host_index=host_index, num_hosts=num_hosts)
  if report is None:
    result(f'host {host_index} of {num_hosts} finished its share of the samples in '
           f'{os.path.abspath(out_dir)}/samples; the host that finishes last writes the report')
    return
  f, q = report['fairness'], report['quality']
  result(f"proportions {fmt(f['proportions'], 4)} (target {fmt(f['target'], 3)}), "
         f"FD {f['fd']:.4f}, KL {f['kl']:.5f}, FCD {q['fcd']:.3f} "
         f"(noise floor {q['noise_floor_fcd']:.3f}), precision {q['precision']:.3f}, "
         f"recall {q['recall']:.3f}",
         f'wrote {os.path.abspath(out_dir)}/report.json, report.md, proportions.png, '
         'samples_by_group.png')


if __name__ == '__main__':
  sys.exit(main())
