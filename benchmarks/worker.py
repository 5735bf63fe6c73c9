"""One measurement in its own process: one framework, one preset (or the matmul peak).

python -m benchmarks.worker {jax,torch} PRESET_SPEC [--allow-cpu] [--threads N]
python -m benchmarks.worker {peak-jax,peak-torch}

--threads N: PyTorch: torch.set_num_threads(N) before anything runs; JAX: 1 only (XLA's
CPU flags for one thread). The default is each framework's own (one thread per core).

Prints one line `BENCH_RESULT {json}` (benchmarks/run.py reads it). A process imports
only its own framework. Timed: `preset.steps` steps (or sampling runs) after
compilation and `preset.warmup` untimed steps; each timed step ends with the loss
(or the samples) on the host, as the reference loop's `loss.item()` does.

Memory (benchmarks/memory.py): `memory.phases` is the RSS and its peak so far at each
phase (imported, compiled, built: weights and state, warm, timed), `memory.samples` the
RSS over time; JAX adds XLA's memory analysis of the program (`xla_memory_mib`), the
step's arguments by kind (`buffers_mib`) and the residuals kept for the backward pass
(`residuals_mib`); PyTorch its tensors by kind (`tensors_mib`) and what autograd saves
for the backward pass (`saved_mib`, one extra step after the timed ones).
"""
import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import memory, metrics  # noqa: E402
from benchmarks.presets import parse_preset  # noqa: E402

MARK = 'BENCH_RESULT '


def _rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _base(framework, preset=None):
  out = {'framework': framework, 'pid': os.getpid(), 'python': platform.python_version(),
         'load_start': os.getloadavg()[0], 'glibc_tunables': os.environ.get('GLIBC_TUNABLES', '')}
  if preset is not None:
    out.update(preset.describe())
  return out


def _timed(fn, n, budget_s=0.0, usage=None):
  """Times `n` calls; with a budget, stops early (after at least 2) once the timed calls
  have taken `budget_s` seconds in all (a pathologically slow configuration under load).
  `usage` (a dict) gets the process's minor page faults and user / kernel CPU seconds per
  call: memory the allocator hands back to the OS and takes again every step shows there."""
  times, before = [], resource.getrusage(resource.RUSAGE_SELF)
  for _ in range(n):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
    if budget_s and len(times) >= 2 and sum(times) > budget_s:
      break
  if usage is not None:
    after = resource.getrusage(resource.RUSAGE_SELF)
    usage.update(minor_faults_per_step=(after.ru_minflt - before.ru_minflt) / len(times),
                 user_s_per_step=(after.ru_utime - before.ru_utime) / len(times),
                 sys_s_per_step=(after.ru_stime - before.ru_stime) / len(times))
  return times


XLA_ONE_THREAD = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


def run_jax(preset, allow_cpu, budget_s=0.0, threads=0, timeline=None):
  if threads == 1:   # before jax is imported: XLA reads its flags once
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + XLA_ONE_THREAD).strip()
  elif threads:
    raise ValueError('jax: --threads supports 1 (one thread) or 0 (default)')
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from benchmarks import jax_side  # pylint: disable=import-outside-toplevel
  out = _base('jax', preset)
  out['threads'] = threads or os.cpu_count()
  from ddm_jax import kernels  # pylint: disable=import-outside-toplevel
  out.update(jax_version=jax.__version__, backend=jax.default_backend(),
             device=jax.devices()[0].device_kind, devices=jax.device_count(),
             attention=kernels.current().attention,
             jax_cache=bool(os.environ.get('JAX_COMPILATION_CACHE_DIR')))
  if preset.accelerator and jax.default_backend() == 'cpu' and not allow_cpu:
    return {**out, 'skipped': 'no accelerator (preset is for a GPU; --allow-cpu forces it)'}
  timeline.mark('imported')
  # Compiled from shapes first, the weights drawn after: XLA's compile-time peak never
  # meets them (jax_side's docstring).
  bench = jax_side.TrainStep(preset) if preset.kind == 'train' else jax_side.Sampler(preset)
  out['compile_s'] = bench.compile()
  timeline.mark('compiled')
  t0 = time.perf_counter()
  bench.build()
  out['build_s'] = time.perf_counter() - t0
  timeline.mark('built')
  out['xla_memory_mib'] = memory.xla_memory_mib(bench.compiled)
  if preset.kind == 'train':
    out['trainable_params'] = bench.trainable_count()
    out['buffers_mib'] = bench.buffers_mib()
  else:
    out['buffers_mib'] = {'params': memory.tree_mib(bench.params)}
  flops = metrics.xla_flops(bench.compiled)
  if preset.kind == 'train':
    out['flops'] = flops
    losses = []
    one = lambda: losses.append(float(bench.step()['loss']))
  else:
    out['flops_program'] = flops
    out['flops'] = metrics.scan_flops(flops, preset.sample_steps)
    one = lambda: np.asarray(bench.run())
  warm = _timed(one, preset.warmup)
  timeline.mark('warm')
  times = _timed(one, preset.steps, budget_s, usage=out)
  timeline.mark('timed')
  if preset.kind == 'train':
    jax.block_until_ready(bench.state)
    out['loss_first'], out['loss_last'] = losses[0], losses[-1]
    out['residuals_mib'] = bench.residuals_mib()
  out.update(first_call_s=warm[0], warmup_s=warm, step_s=times)
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    out['device_peak_mib'] = stats['peak_bytes_in_use'] / 2 ** 20
  return out


def run_torch(preset, allow_cpu, threads=0, budget_s=0.0, timeline=None):
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_ref  # pylint: disable=import-outside-toplevel
  if threads:
    torch.set_num_threads(threads)
  out = _base('torch', preset)
  device = torch_ref.device_of(preset)
  out.update(torch_version=torch.__version__, device=device.type, threads=torch.get_num_threads())
  if device.type == 'cuda':
    out['device'] = torch.cuda.get_device_name()
  if preset.accelerator and device.type == 'cpu' and not allow_cpu:
    return {**out, 'skipped': 'no accelerator (preset is for a GPU; --allow-cpu forces it)'}
  import diffusers  # pylint: disable=import-outside-toplevel
  out['diffusers_version'] = diffusers.__version__
  if preset.kind == 'train' and preset.lora:
    import peft  # pylint: disable=import-outside-toplevel,unused-import
  timeline.mark('imported')
  t0 = time.perf_counter()
  if preset.kind == 'train':
    bench = torch_ref.TrainStep(preset, device)
    out['trainable_params'] = bench.trainable_count()
    import peft  # pylint: disable=import-outside-toplevel
    out['peft_version'] = peft.__version__ if preset.lora else None
  else:
    bench = torch_ref.Sampler(preset, device)
  out['build_s'] = time.perf_counter() - t0
  timeline.mark('built')
  out['attention_processors'] = torch_ref.attention_processors(bench.unet)
  out['sdpa'] = all(p == 'AttnProcessor2_0' for p in out['attention_processors'])
  out['channels_last'] = False
  out['autocast_bf16'] = preset.dtype == 'bfloat16' and preset.kind == 'train'
  if preset.kind == 'train':
    losses = []
    one = lambda: losses.append(float(bench.step()))    # float(): the reference's loss.item()
  else:
    def one():
      x = bench.run()
      bench.sync()
      x.float().cpu()
  warm = _timed(one, preset.warmup)
  timeline.mark('warm')
  times = _timed(one, preset.steps, budget_s, usage=out)
  timeline.mark('timed')
  if preset.kind == 'train':
    out['loss_first'], out['loss_last'] = losses[0], losses[-1]
    params = list(bench.params())
    trainable = [t for t in params if t.requires_grad]
    state = [v for st in bench.opt.state.values() for v in st.values()
             if torch.is_tensor(v) and v.dim()]
    out['tensors_mib'] = {'params': memory.torch_tensors_mib(params),
                          'trainable': memory.torch_tensors_mib(trainable),
                          'grads (as trainable)': memory.torch_tensors_mib(trainable),
                          'opt_state': memory.torch_tensors_mib(state)}
    out['saved_mib'] = memory.torch_saved_mib(one, exclude=params)
  else:
    out['tensors_mib'] = {'params': memory.torch_tensors_mib(list(bench.unet.parameters()))}
  out.update(first_call_s=warm[0], warmup_s=warm, step_s=times)
  if device.type == 'cuda':
    out['device_peak_mib'] = torch.cuda.max_memory_allocated() / 2 ** 20
    out['device_reserved_peak_mib'] = torch.cuda.max_memory_reserved() / 2 ** 20
  return out


def run_peak(framework, threads=0):
  """Matmul peak on the device this framework uses: f32 (n=2048) on CPU; f32 and bf16
  (n=8192) on a GPU."""
  out = _base(framework)
  if framework == 'peak-jax':
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from benchmarks import jax_side  # pylint: disable=import-outside-toplevel
    cpu = jax.default_backend() == 'cpu'
    out['device'] = jax.devices()[0].device_kind
    out['float32'] = jax_side.matmul_peak(jnp.float32, 2048 if cpu else 8192)
    if not cpu:
      out['bfloat16'] = jax_side.matmul_peak(jnp.bfloat16, 8192)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    from benchmarks import torch_ref  # pylint: disable=import-outside-toplevel
    if threads:
      torch.set_num_threads(threads)
    out['threads'] = torch.get_num_threads()
    device = torch_ref.device_of()
    cpu = device.type == 'cpu'
    out['device'] = device.type if cpu else torch.cuda.get_device_name()
    out['float32'] = torch_ref.matmul_peak(device, torch.float32, 2048 if cpu else 8192)
    if not cpu:
      out['bfloat16'] = torch_ref.matmul_peak(device, torch.bfloat16, 8192)
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('framework', choices=['jax', 'torch', 'peak-jax', 'peak-torch'])
  ap.add_argument('preset', nargs='?', default=None)
  ap.add_argument('--allow-cpu', action='store_true',
                  help='run accelerator presets on the CPU too (slow; for smoke tests)')
  ap.add_argument('--threads', type=int, default=0, help='intra-op threads (0: the default)')
  ap.add_argument('--budget', type=float, default=0.0,
                  help='stop timing after this many seconds of timed steps (at least 2 steps)')
  args = ap.parse_args(argv)
  t0 = time.perf_counter()
  timeline = memory.RssTimeline()
  if args.framework.startswith('peak'):
    out = run_peak(args.framework, args.threads)
  else:
    if not args.preset:
      ap.error('a preset spec is required')
    preset = parse_preset(args.preset)
    if args.framework == 'jax':
      out = run_jax(preset, args.allow_cpu, args.budget, args.threads, timeline)
    else:
      out = run_torch(preset, args.allow_cpu, args.threads, args.budget, timeline)
    out['spec'] = args.preset
  out.update(peak_rss_mib=_rss_mib(), wall_s=time.perf_counter() - t0,
             load_end=os.getloadavg()[0], memory=timeline.result())
  print(MARK + json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
