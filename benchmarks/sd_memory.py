"""Peak memory and step time of a LoRA + indicator train step on a full SD-1.5-sized UNet.

python benchmarks/sd_memory.py [--steps=3] [--resolution=32] [--batch=1] [--remat] [--dtype=bfloat16]
SD_MEMORY_COMPILE_ONLY=1 python benchmarks/sd_memory.py --resolution=512 --batch=8 --remat --dtype=bfloat16

The UNet has diffusers' SD-1.5 config (860M parameters); its weights are random, drawn
with numpy one tensor at a time and turned into jax arrays (no download, no
`module.init`). The step is the library's (`training.step.make_train_step`, donated
state, the sd15_lora config's optimizer: clip by value, AdamW, gradient accumulation 4)
on 4x4 latents (32x32 images) with a fixed 77-token text context: UNet LoRA r 8 / alpha
32 on to_q/to_v + the reference indicator (4*4*4 -> 1024 -> 512 -> 2), loss
w_rec*MSE + w_ind*CE. The VAE encoder and the text encoder are left out, as in the
PyTorch reference figure (SD-1.5 UNet LoRA step at 4x4 latents, batch 1: about 1.0 s/step,
3.6 GiB RSS on the 2-core CPU). The step is compiled from shapes first, the weights are
drawn after (as benchmarks/jax_side.py does). Prints one JSON line: XLA's memory analysis
of the compiled step, peak RSS after compiling, after the weights and after the steps,
the RSS phases, compile time, seconds per step. SD_MEMORY_COMPILE_ONLY=1 stops after the
compile: no weights are ever made, so the 512x512 program's memory analysis needs
neither a GPU nor the host memory of the weights.
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from benchmarks import memory  # noqa: E402
from ddm_jax.config import load_config_file  # noqa: E402
from ddm_jax.diffusion.schedules import make_schedule  # noqa: E402
from ddm_jax.interop.diffusers import expected_params  # noqa: E402
from ddm_jax.models import lora as lora_lib  # noqa: E402
from ddm_jax.models.indicator import Indicator  # noqa: E402
from ddm_jax.models.unet import unet_from_config  # noqa: E402
from ddm_jax.ddm import DDM, LatentDDM  # noqa: E402
from ddm_jax.training.setup import TrainSetup  # noqa: E402

# diffusers' runwayml/stable-diffusion-v1-5 unet/config.json (the keys our UNet reads)
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
    up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3, attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
    freq_shift=0, downsample_padding=1, mid_block_scale_factor=1, act_fn='silu',
    center_input_sample=False)
GIB = 2.0 ** 30


def peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def random_params(module, seed, *inputs, abstract=False):
  """Weights ~ N(0, 1/fan_in), norms 1 + N(0, 0.1^2), biases N(0, 0.02^2), drawn in numpy
  one tensor at a time; each numpy array is dropped once its jax copy exists.
  `abstract`: their jax.ShapeDtypeStructs."""
  rng = np.random.default_rng(seed)
  out = {}
  for path, leaf in expected_params(module, *inputs).items():
    shape = leaf.shape
    if abstract:
      out[path] = jax.ShapeDtypeStruct(shape, jnp.float32)
      continue
    z = rng.standard_normal(shape, dtype=np.float32)
    if path[-1] in ('kernel', 'embedding'):
      z *= np.float32((np.prod(shape[:-1]) if path[-1] == 'kernel' else shape[-1]) ** -0.5)
    elif path[-1] == 'scale':
      z = 1 + np.float32(0.1) * z
    else:
      z *= np.float32(0.02)
    out[path] = jnp.asarray(z)
    del z
  return traverse_util.unflatten_dict(out)


class UNetLoRA(DDM):
  """LatentDDM's training path (its own model_fn) on precomputed latents and text context."""
  model_fn = LatentDDM.model_fn
  _lora = LatentDDM._lora

  def __init__(self, config, unet, base, indicator, sched, latent):
    self.config, self.unet, self.indicator, self.sched = config, unet, indicator, sched
    self.eps_shape = (latent, latent, 4)
    self.unet_scale = config.lora.unet_alpha / config.lora.unet_rank
    self._frozen = {'unet': base}

  def init(self, rng):
    k_u, k_i = jax.random.split(rng)
    return {'unet_lora': lora_lib.init_lora(k_u, self._frozen['unet'],
                                            tuple(self.config.lora.unet_targets),
                                            self.config.lora.unet_rank),
            'indicator': self.indicator.init(k_i, jnp.zeros((1,) + self.eps_shape))['params']}

  def frozen(self):
    return self._frozen

  def prepare_batch(self, frozen, batch, rng):
    return batch['latent'], batch['label'], {'context': batch['context']}


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument('--steps', type=int, default=3, help='timed steps after the first')
  p.add_argument('--resolution', type=int, default=32, help='image side (latents: /8)')
  p.add_argument('--batch', type=int, default=1)
  p.add_argument('--remat', action='store_true')
  p.add_argument('--dtype', default='float32', help='compute dtype (params stay float32)')
  args = p.parse_args(argv)
  timeline = memory.RssTimeline()
  config = load_config_file(os.path.join(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), 'configs', 'sd15_lora.py'))
  unet = unet_from_config(SD15_UNET, dtype=jnp.dtype(args.dtype), remat=args.remat)
  r, b = args.resolution // 8, args.batch
  dummy = (jnp.zeros((1, 8, 8, 4)), jnp.zeros((1,)), jnp.zeros((1, 1, SD15_UNET['cross_attention_dim'])))
  shapes = random_params(unet, 0, *dummy, abstract=True)
  n_base = sum(x.size for x in jax.tree_util.tree_leaves(shapes))
  indicator = Indicator(2, tuple(config.indicator.hidden))
  sched = make_schedule('scaled_linear', 1000, 0.00085, 0.012)
  model = UNetLoRA(config, unet, shapes, indicator, sched, r)
  setup = TrainSetup(model, config)
  rng = np.random.default_rng(0)
  batch = {'latent': rng.standard_normal((b, r, r, 4)).astype(np.float32),
           'label': (np.arange(b) % 2).astype(np.int32),
           'context': rng.standard_normal((b, 77, 768)).astype(np.float32)}
  batch = jax.device_put(batch, setup.data)
  timeline.mark('imported')

  t0 = time.time()
  compiled = setup.compile(batch, model.frozen())     # from shapes: no weights exist yet
  t_compile = time.time() - t0
  timeline.mark('compiled')
  rss_compiled = peak_rss_gib()
  mem = compiled.memory_analysis()
  xla_mem = {k: round(getattr(mem, k) / GIB, 3) for k in (
      'argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
      'alias_size_in_bytes', 'generated_code_size_in_bytes') if hasattr(mem, k)} if mem else None
  common = {'image_resolution': args.resolution, 'latent': [r, r, 4], 'batch': b,
            'remat': args.remat, 'dtype': args.dtype, 'base_params': int(n_base),
            'xla_memory_gib': xla_mem, 'compile_s': round(t_compile, 1),
            'rss_after_compile_gib': round(rss_compiled, 3), 'backend': jax.default_backend(),
            'load_avg_1m': round(os.getloadavg()[0], 2), 'jax': jax.__version__}
  if os.environ.get('SD_MEMORY_COMPILE_ONLY'):
    # before XLA: what the VJP keeps, which remat changes (XLA:CPU undoes remat, see
    # BENCHMARKS.md "Memory"; its temporaries above are those of a program without it)
    common['residuals_gib'] = round(memory.train_residuals_mib(
        model, config, setup.target.params, model.frozen(), batch) / 1024, 3)
    if mem:
      common['xla_total_gib'] = round((mem.argument_size_in_bytes + mem.output_size_in_bytes
                                       - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / GIB, 3)
    print(json.dumps({'benchmark': 'sd15_unet_lora_compile_only', **common,
                      'memory': timeline.result()}))
    return
  t0 = time.time()
  model._frozen = {'unet': random_params(unet, 0, *dummy)}  # pylint: disable=protected-access
  state = setup.init_state()
  frozen = setup.frozen()
  t_weights = time.time() - t0
  timeline.mark('built')
  rss_weights = peak_rss_gib()
  n_train = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  t0 = time.time()
  state, metrics = compiled(state, batch, frozen, setup.hyper)
  jax.block_until_ready(metrics)
  t_first = time.time() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.time()
    state, metrics = compiled(state, batch, frozen, setup.hyper)
    jax.block_until_ready(metrics)
    times.append(time.time() - t0)
  timeline.mark('timed')
  loss = float(metrics['loss'])
  print(json.dumps({
      'benchmark': 'sd15_unet_lora_indicator_train_step', **common,
      'trainable_params': int(n_train), 'peak_rss_gib': round(peak_rss_gib(), 3),
      'rss_after_weights_gib': round(rss_weights, 3), 'weights_s': round(t_weights, 1),
      'first_step_s': round(t_first, 3),
      'step_s_median': round(float(np.median(times)), 3) if times else None,
      'step_s_all': [round(x, 3) for x in times], 'loss': loss, 'finite': bool(np.isfinite(loss)),
      'devices': jax.device_count(), 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'memory': timeline.result()}))


if __name__ == '__main__':
  main(sys.argv[1:])
