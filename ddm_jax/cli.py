"""Command lines (thin wiring). Every user error becomes one line on stderr and exit 2."""
import argparse
import functools
import json
import os
import signal
import sys

import numpy as np

from ddm_jax.errors import DDMError


def _split_overrides(argv):
  """`--config.a.b=V` (or `--config.a.b V`) -> ({'a.b': 'V'}, remaining argv)."""
  overrides, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        if i + 1 >= len(argv):
          raise DDMError(f'{arg} needs a value')
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def cli(fn):
  """Run `fn(argv)`; turn known errors into one clear line and a non-zero exit."""
  @functools.wraps(fn)
  def wrapper(argv=None):
    try:
      return fn(sys.argv[1:] if argv is None else argv) or 0
    except DDMError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      return 130
  return wrapper


@cli
def train_main(argv):
  from ddm_jax.config import apply_overrides, load_config_file, validate
  overrides, rest = _split_overrides(argv)
  p = argparse.ArgumentParser(prog='train.py', description='Train a Debiasing Diffusion Model.')
  p.add_argument('--config', required=True, help='config file, e.g. configs/digits.py')
  p.add_argument('--workdir', required=True, help='checkpoints, metrics and samples go here')
  p.add_argument('--no_progress', action='store_true')
  args = p.parse_args(rest)
  config = validate(apply_overrides(load_config_file(args.config), overrides))

  stop = {'requested': False}

  def on_term(signum, frame):  # preemption: finish the step, checkpoint, exit 0
    stop['requested'] = True
  signal.signal(signal.SIGTERM, on_term)

  from ddm_jax.training.loop import train
  train(config, args.workdir, should_stop=lambda: stop['requested'],
        progress=not args.no_progress)
  print(f'workdir: {os.path.abspath(args.workdir)} (checkpoints/, metrics.jsonl, '
        f'tensorboard/, samples/)')


def load_trained(workdir, use_ema=True):
  """-> (config, ddm, params, frozen, mesh, step) from the latest checkpoint in workdir."""
  import jax
  import ml_collections
  from ddm_jax.errors import CheckpointError
  from ddm_jax.training import parallel
  from ddm_jax.training.checkpoint import Checkpointer
  from ddm_jax.training.loop import build_ddm
  from ddm_jax.training.optim import make_optimizer
  from ddm_jax.training.state import create_train_state

  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise CheckpointError(f'no checkpoints in {workdir} (train first with train.py)')
  ckpt = Checkpointer(workdir, async_save=False)
  step = ckpt.latest_step()
  if step is None:
    raise CheckpointError(f'no finished checkpoint in {ckpt.directory}')
  config = ml_collections.ConfigDict(_tuples(ckpt.read_config(step)))
  ddm = build_ddm(config)
  tx = make_optimizer(config.optim, config.train.num_steps)
  mesh = parallel.make_mesh()
  repl = parallel.replicated(mesh)
  abstract = jax.eval_shape(lambda k: create_train_state(ddm.init(k), tx, config.train.ema_decay),
                            jax.random.key(0))
  target = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                                  abstract)
  state, _ = ckpt.restore(step, target, with_data=False)
  ckpt.close()
  params = state.sample_params if use_ema else state.params
  return config, ddm, params, jax.device_put(ddm.frozen(), repl), mesh, step


def _tuples(obj):
  """JSON lists back to the tuples our configs use."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


@cli
def sample_main(argv):
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
  p.add_argument('--no_ema', action='store_true', help='use the raw instead of the EMA weights')
  p.add_argument('--class_label', type=int, default=None,
                 help='group to condition on (class-conditioned UNets only)')
  p.add_argument('--guidance', default='none', choices=('none', 'indicator'),
                 help='indicator: steer each sample to a target group with the trained indicator')
  p.add_argument('--target', default=None, help='target group distribution, e.g. 0.5,0.5 '
                 '(default uniform); samples are assigned groups stratified per batch')
  p.add_argument('--guidance_scale', type=float, default=1.0)
  p.add_argument('--grad_clip', type=float, default=None,
                 help='cap the per-sample norm of the guidance gradient')
  p.add_argument('--guidance_path', default='unet', choices=('unet', 'x0'),
                 help='gradient through the whole UNet (unet) or only its x0 estimate (x0)')
  sd_args = p.add_argument_group('Stable Diffusion workdirs')
  sd_args.add_argument('--prompt', action='append', default=None,
                       help="text prompt; repeat the flag or separate prompts with ';' "
                       '(default: the training prompt); --num_samples images per prompt')
  sd_args.add_argument('--negative_prompt', default=None,
                       help='the unconditional prompt of classifier-free guidance (default "")')
  sd_args.add_argument('--cfg_scale', type=float, default=7.5,
                       help='classifier-free guidance scale (<= 1: no guidance)')
  args = p.parse_args(argv)
  if args.num_samples <= 0:
    raise DDMError(f'--num_samples must be positive, got {args.num_samples}')

  import jax
  from ddm_jax.images import save_grid, save_png, to_uint8
  from ddm_jax.sampling import generate, make_generator
  from ddm_jax.training.loop import sampler_extra

  config, ddm, params, frozen, mesh, step = load_trained(args.workdir, use_ema=not args.no_ema)
  sd = None
  if getattr(ddm, 'latent', False):  # Stable Diffusion: prompts, CFG, LoRA merged, PNDM 40
    from ddm_jax import sd_sampling
    sd = sd_sampling.setup_cli(args, ddm, params, frozen)  # num_samples: per prompt -> total
    ddm, params, frozen = sd.model, sd.params, sd.frozen
  elif args.prompt or args.negative_prompt is not None:
    raise DDMError('--prompt/--negative_prompt need a Stable Diffusion workdir')
  sampler = args.sampler or (sd.sampler if sd else config.sample.sampler)
  steps = args.steps if args.steps is not None else (sd.steps if sd else config.sample.steps)
  eta = config.sample.eta if args.eta is None else args.eta
  from ddm_jax.diffusion.samplers import SAMPLERS
  if sampler not in SAMPLERS:
    raise DDMError(f'--sampler must be one of {sorted(SAMPLERS)}, got {sampler!r}')
  if not 0 < steps <= ddm.sched.num_train_timesteps:
    raise DDMError(f'--steps must be in [1, {ddm.sched.num_train_timesteps}], got {steps}')
  labels = None
  if ddm.unet.num_class_embeds:
    if args.class_label is None:
      labels = np.arange(args.num_samples) % config.data.num_groups  # balanced by construction
    elif not 0 <= args.class_label < config.data.num_groups:
      raise DDMError(f'--class_label must be in [0, {config.data.num_groups}), got {args.class_label}')
    else:
      labels = np.full(args.num_samples, args.class_label)
  guide = hook = None
  if args.guidance == 'indicator':
    from ddm_jax import guidance as guidance_lib
    from ddm_jax.sampling import effective_batch_size
    if float(config.loss.w_ind) == 0.0:
      raise DDMError('this model was trained with loss.w_ind = 0: its indicator never learned')
    target = guidance_lib.parse_target(args.target, config.data.num_groups)
    groups = guidance_lib.stratified_groups(
        args.num_samples, target, effective_batch_size(args.num_samples, args.batch_size),
        seed=args.seed + 1)
    if labels is not None and args.class_label is None:
      labels = groups  # a conditioned UNet asks for the same group the guidance steers to
    guide = guidance_lib.make_guide(groups, args.guidance_scale)
  elif args.target is not None:
    raise DDMError('--target needs --guidance=indicator')
  extra = sampler_extra(ddm) if sd is None else sd.sampler_kwargs(sampler)
  if guide is not None:  # x0 clipping moves ahead of the guidance term (see ddm_jax.guidance)
    extra, clip = guidance_lib.move_clip(sampler, extra)
    hook = guidance_lib.make_indicator_guidance(ddm, args.grad_clip, args.guidance_path,
                                                clip_x0=clip)
  gen = make_generator(ddm, mesh, sampler, steps, eta, guidance=hook, **extra)
  imgs = generate(gen, params, frozen, args.num_samples, jax.random.key(args.seed),
                  args.batch_size, class_labels=labels, guide=guide,
                  **({} if sd is None else {'cond': sd.cond}))

  out = args.output or os.path.join(args.workdir, 'generated')
  os.makedirs(out, exist_ok=True)
  u8 = to_uint8(imgs)
  for i, img in enumerate(u8):
    save_png(os.path.join(out, f'{i:05d}.png'), img)
  npz = os.path.join(out, 'samples.npz')
  np.savez(npz + '.tmp.npz', images=u8, seed=args.seed, step=step,
           **({} if labels is None else {'class_labels': labels}),
           **({} if guide is None else {'guide_labels': guide['labels']}),
           **({} if sd is None else {'prompt_index': sd.prompt_index}))
  os.replace(npz + '.tmp.npz', npz)
  save_grid(os.path.join(out, 'grid.png'), imgs[:256])
  with open(os.path.join(out, 'sampling.json'), 'w', encoding='utf-8') as f:
    json.dump({'workdir': os.path.abspath(args.workdir), 'checkpoint_step': step,
               'sampler': sampler, 'steps': steps, 'eta': eta, 'seed': args.seed,
               'num_samples': args.num_samples, 'ema': not args.no_ema,
               'guidance': args.guidance, **({} if sd is None else sd.info),
               **({} if guide is None else {'guidance_scale': args.guidance_scale,
                                            'target': target.tolist(),
                                            'grad_clip': args.grad_clip,
                                            'guidance_path': args.guidance_path})}, f, indent=2)
  print(f'wrote {args.num_samples} PNGs, samples.npz and grid.png to {os.path.abspath(out)}')
