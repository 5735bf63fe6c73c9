"""sample.py: a sampling job from a trained DDM (pixel or Stable Diffusion workdir),
streamed to disk, resumable, split across hosts (generation/job.py)."""
import argparse
import os

from ddm_jax.cli.common import cli, host_split, parse
from ddm_jax.errors import DDMError
from ddm_jax.generation.guidance import VARIANTS
from ddm_jax.generation.job import DEFAULT_SHARD_SIZE, run_job
from ddm_jax.generation.plan import plan_generator, plan_samples, sampling_params
from ddm_jax.generation.prompts import DEFAULT_CFG_SCALE, split_prompts
from ddm_jax.training.setup import load_trained


def parse_args(argv):
  p = argparse.ArgumentParser(prog='sample.py', description='Sample images from a trained DDM.')
  p.add_argument('--workdir', required=True)
  p.add_argument('--output', default=None, help='default: <workdir>/generated')
  p.add_argument('--num_samples', type=int, default=64)
  p.add_argument('--sampler', default=None, help='ddim | ddpm | dpm++2m | pndm (default: '
                 'config.sample; pndm for Stable Diffusion workdirs)')
  p.add_argument('--steps', type=int, default=None,
                 help='default: config.sample.steps; 40 for Stable Diffusion workdirs')
  p.add_argument('--eta', type=float, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--batch_size', type=int, default=256)
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
  p.add_argument('--guidance', default='none', choices=('none', 'indicator'),
                 help='indicator: steer each sample to a target group with the trained indicator')
  p.add_argument('--target', default=None, help='target group distribution, e.g. 0.5,0.5 '
                 '(default uniform); every prefix of the job holds this mix as closely as integers allow')
  p.add_argument('--guidance_scale', type=float, default=1.0)
  p.add_argument('--grad_clip', type=float, default=None,
                 help='cap the per-sample norm of the guidance gradient')
  p.add_argument('--guidance_path', default='unet', choices=('unet', 'x0'),
                 help='gradient through the whole UNet (unet) or only its x0 estimate (x0)')
  p.add_argument('--guidance_variant', default='plain', choices=VARIANTS,
                 help='norm: unit-RMS gradient; early: guide the first half of the steps only; '
                 'stop: stop pushing a sample while the guide puts it in its group (p >= 0.9)')
  sd_args = p.add_argument_group('Stable Diffusion workdirs')
  sd_args.add_argument('--prompt', action='append', default=None,
                       help="text prompt; repeat the flag or separate prompts with ';' "
                       '(default: the training prompt); --num_samples images per prompt')
  sd_args.add_argument('--negative_prompt', default=None,
                       help='the unconditional prompt of classifier-free guidance (default "")')
  sd_args.add_argument('--cfg_scale', type=float, default=DEFAULT_CFG_SCALE,
                       help='classifier-free guidance scale (<= 1: no guidance)')
  args = parse(p, argv)
  if args.target is not None and args.guidance != 'indicator':
    raise DDMError('--target needs --guidance=indicator')
  return args


@cli
def main(argv):
  args = parse_args(argv)
  trained = load_trained(args.workdir, use_ema=not args.no_ema)
  ddm = trained.ddm
  plan = plan_samples(ddm, trained.config, args.num_samples, seed=args.seed,
                      batch_size=args.batch_size, sampler=args.sampler, steps=args.steps,
                      eta=args.eta, target=args.target, class_label=args.class_label,
                      guidance=args.guidance, guidance_scale=args.guidance_scale,
                      prompts=split_prompts(args.prompt), negative_prompt=args.negative_prompt,
                      cfg_scale=args.cfg_scale, arg_prefix='--')
  gen = plan_generator(ddm, trained.mesh, plan, args.grad_clip, args.guidance_path,
                       args.guidance_variant)
  params, frozen = sampling_params(ddm, trained.params, trained.frozen)
  out = args.output or os.path.join(args.workdir, 'generated')
  job_info = {'workdir': os.path.abspath(args.workdir), 'checkpoint_step': trained.step,
              'ema': not args.no_ema}
  if plan.guide is not None:
    job_info.update(grad_clip=args.grad_clip, guidance_path=args.guidance_path,
                    guidance_variant=args.guidance_variant)
  host_index, num_hosts = host_split(args.host_index, args.num_hosts)
  complete = run_job(gen, plan, params, frozen, out, job_info, args.shard_size, host_index,
                     num_hosts)
  if complete:
    print(f'wrote {plan.num_samples} PNGs, samples.npz and grid.png to {os.path.abspath(out)}')
  else:
    print(f'host {host_index} of {num_hosts} finished its shards in {os.path.abspath(out)}; '
          'the host that finishes last writes samples.npz and grid.png')
