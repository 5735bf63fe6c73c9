"""Guided against unguided sampling, with and without the im2col path for the guidance
gradient, in one process.

python benchmarks/guided.py --workdir=runs/demo [--batch 64] [--steps 25] [--reps 6]

Why: guidance takes the gradient of the indicator through the UNet inside the sampler's
`lax.scan`. On CPU, XLA lays out the kernel of an input-gradient convolution inside a loop
body as `01oi`, which its fast (YNNPACK) convolution does not take, and falls back to a
kernel 5-20x slower; the library's im2col path (`models.cpu_conv.conv_general_dilated`) has
no such convolution, so guidance traces convolutions up to
`ddm_jax.kernels.Kernels.im2col_max_pixels_loop_grad` pixels that way. Here 'guided, no loop im2col' is the
guided sampler with that raised threshold turned off (as before). Each sampler is compiled
once, then all take turns (`kernels.interleaved_medians`). Prints one JSON line: seconds per
image and the ratios; BENCHMARKS.md quotes it.
"""
import argparse
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.kernels import interleaved_medians  # noqa: E402


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--workdir', required=True, help='a trained run (train.py --workdir)')
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--steps', type=int, default=25)
  ap.add_argument('--reps', type=int, default=6)
  ap.add_argument('--out', help='also append the JSON line to this file')
  args = ap.parse_args(argv)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddm_jax.generation.generator import make_generator  # pylint: disable=import-outside-toplevel
  from ddm_jax.generation.guidance import make_guide, make_guided_generator  # pylint: disable=import-outside-toplevel
  from ddm_jax import kernels  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.setup import load_trained  # pylint: disable=import-outside-toplevel

  t = load_trained(args.workdir)
  key, b = jax.random.key(0), args.batch
  guide = make_guide(np.arange(b) % t.config.data.num_groups, 8.0)
  fns = {}
  default = kernels.current()
  for name, loop_px in (('unguided', None), ('guided', default.im2col_max_pixels_loop_grad),
                        ('guided, no loop im2col', default.im2col_max_pixels)):
    if loop_px is None:
      gen = make_generator(t.ddm, t.mesh, 'ddim', args.steps)
      call = lambda gen=gen: jax.block_until_ready(gen(t.params, t.frozen, key, b))
    else:
      gen = make_guided_generator(t.ddm, t.mesh, 'ddim', args.steps)
      call = lambda gen=gen: jax.block_until_ready(gen(t.params, t.frozen, key, b, guide=guide))
    with kernels.using(im2col_max_pixels_loop_grad=loop_px or 0):
      call()  # compiles with the threshold in force (it is read at trace time)
    fns[name] = call
  per_image = {k: v / b for k, v in interleaved_medians(fns, args.reps, block=2, warm=1).items()}
  row = {'workdir': args.workdir, 'image_shape': list(t.ddm.sample_shape), 'batch': b,
         'steps': args.steps, 'machine': f'{platform.machine()} {os.cpu_count()} cores',
         'backend': jax.default_backend(), 'seconds_per_image': per_image,
         'guided / unguided': per_image['guided'] / per_image['unguided'],
         'no loop im2col / guided': per_image['guided, no loop im2col'] / per_image['guided']}
  line = json.dumps(row)
  print(line)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.write(line + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
