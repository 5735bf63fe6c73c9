"""sample.py: a sampling job from a trained DDM (pixel or Stable Diffusion workdir),
streamed to disk, resumable, split across hosts (generation/job.py)."""
import os
import sys

from ddm_jax.cli.common import (add_guidance_flags, add_progress_flag, cli, guidance_scale,
                                host_split, make_parser, parse, result)
from ddm_jax.diffusion.samplers import SAMPLERS
from ddm_jax.errors import DDMError
from ddm_jax.files import check_writable_dir
from ddm_jax.generation.job import DEFAULT_SHARD_SIZE, run_job
from ddm_jax.generation.plan import plan_generator, plan_samples, sampling_params
from ddm_jax.generation.prompts import DEFAULT_CFG_SCALE, split_prompts
from ddm_jax.training.setup import load_trained


def build_parser():
  p = make_parser('sample', 'Sample images from a trained DDM: a streamed, resumable job '
                  '(PNGs as batches finish, .npz shards, a manifest sampling.json).')
  p.add_argument('--workdir', required=True, help='a train.py workdir (its latest checkpoint)')
  p.add_argument('--output', default=None, help='folder to write (default: <workdir>/generated)')
  p.add_argument('--num_samples', type=int, default=64,
                 help='images to generate (per prompt, for Stable Diffusion workdirs)')
  p.add_argument('--sampler', default=None, choices=sorted(SAMPLERS),
                 help='default: config.sample.sampler; pndm for Stable Diffusion workdirs')
  p.add_argument('--steps', type=int, default=None,
                 help='sampling steps (default: config.sample.steps; 40 for Stable Diffusion '
                 'workdirs)')
  p.add_argument('--eta', type=float, default=None,
                 help='DDIM noise: 0 deterministic, 1 ancestral (default: config.sample.eta)')
  p.add_argument('--seed', type=int, default=0, help='image i depends on the seed and i only')
  p.add_argument('--batch_size', type=int, default=256, help='images per compiled batch')
  p.add_argument('--shard_size', type=int, default=DEFAULT_SHARD_SIZE,
                 help='images per .npz shard; a restarted job skips finished shards')
  p.add_argument('--num_hosts', type=int, default=None,
                 help='split the job over this many hosts, which never talk to each other '
                 '(default: $JAX_NUM_PROCESSES, $SLURM_NTASKS or 1)')
  p.add_argument('--host_index', type=int, default=None,
                 help='this host\'s index (default: $JAX_PROCESS_ID, $SLURM_PROCID or 0)')
  p.add_argument('--no_ema', action='store_true', help='use the raw instead of the EMA weights')
  p.add_argument('--class_label', type=int, default=None,
                 help='group to condition on (class-conditioned UNets only)')
  p.add_argument('--target', default=None, help='target group distribution, e.g. 0.5,0.5 '
                 '(default uniform); every prefix of the job holds this mix as closely as '
                 'integers allow')
  add_progress_flag(p)
  add_guidance_flags(p)
  sd_args = p.add_argument_group('Stable Diffusion workdirs')
  sd_args.add_argument('--prompt', action='append', default=None,
                       help="text prompt; repeat the flag or separate prompts with ';' "
                       '(default: the training prompt); --num_samples images per prompt')
  sd_args.add_argument('--negative_prompt', default=None,
                       help='the unconditional prompt of classifier-free guidance (default "")')
  sd_args.add_argument('--cfg_scale', type=float, default=DEFAULT_CFG_SCALE,
                       help='classifier-free guidance scale (<= 1: no guidance)')
  return p


def parse_args(argv):
  args = parse(build_parser(), argv)
  if args.target is not None and args.guidance != 'indicator':
    raise DDMError('--target needs --guidance=indicator')
  return args


@cli
def main(argv):
  args = parse_args(argv)
  out = args.output or os.path.join(args.workdir, 'generated')
  check_writable_dir(out)  # before the model loads and the samples are made
  trained = load_trained(args.workdir, use_ema=not args.no_ema)
  ddm = trained.ddm
  plan = plan_samples(ddm, trained.config, args.num_samples, seed=args.seed,
                      batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                      eta=args.eta, target=args.target, class_label=args.class_label,
                      guidance=args.guidance, guidance_scale=guidance_scale(args),
                      prompts=split_prompts(args.prompt), negative_prompt=args.negative_prompt,
                      cfg_scale=args.cfg_scale, arg_prefix='--')
  gen = plan_generator(ddm, trained.mesh, plan, args.grad_clip, args.guidance_path,
                       args.guidance_variant)
  params, frozen = sampling_params(ddm, trained.params, trained.frozen)
  job_info = {'workdir': os.path.abspath(args.workdir), 'checkpoint_step': trained.step,
              'ema': not args.no_ema}
  if plan.guide is not None:
    job_info.update(grad_clip=args.grad_clip, guidance_path=args.guidance_path,
                    guidance_variant=args.guidance_variant)
  host_index, num_hosts = host_split(args.host_index, args.num_hosts)
  complete = run_job(gen, plan, params, frozen, out, job_info, args.shard_size, host_index,
                     num_hosts, progress=not args.no_progress)
  if complete:
    result(f'wrote {plan.num_samples} PNGs, samples.npz and grid.png to {os.path.abspath(out)}')
  else:
    result(f'host {host_index} of {num_hosts} finished its shards in {os.path.abspath(out)}; '
           'the host that finishes last writes samples.npz and grid.png')


if __name__ == '__main__':
  sys.exit(main())
