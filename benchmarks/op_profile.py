"""Where a benchmark step's time goes, per operation kind, from each framework's profiler.

python benchmarks/op_profile.py {jax,torch} PRESET_SPEC [--steps 3] [--top 12] [--out FILE]

JAX: `jax.profiler.trace` (its Perfetto JSON) around `steps` compiled steps; every XLA
operation event (thunks such as `convolution.12`, `dot.3`, `fusion.40`) is summed by name
and by kind. PyTorch: `torch.profiler` around the same number of steps, self CPU time per
aten operator. Both report the share of the traced wall time, so the two lists compare.
Prints one JSON line (and writes it to --out); BENCHMARKS.md quotes it.
"""
import argparse
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.presets import parse_preset  # noqa: E402

# Operation kinds by name; the first matching pattern wins.
KINDS = (
    ('convolution', r'conv'),
    ('matmul', r'\bdot|gemm|matmul|\bmm\b|addmm|bmm|baddbmm|linear|ynn'),
    ('attention', r'attention|softmax'),
    ('normalization', r'norm'),
    ('copy/transpose', r'copy|transpose|permute|contiguous|clone|concat|cat\b|slice|pad'),
    ('reduction', r'reduce|sum|mean'),
    ('optimizer', r'adam|foreach|lerp|addcdiv|addcmul'),
    ('elementwise/fusion', r'fusion|add|mul|div|sub|silu|gelu|exp|tanh|sigmoid|where|neg|sqrt'),
)
# Runtime bookkeeping in the JAX trace (host side), not operations.
_JAX_RUNTIME = re.compile(r'^\$|::|PjitFunction|Handle |Wait for|Allocate|ParseArguments|'
                          r'^end: |ExecuteHelper|CollectGarbage|Await|ThunkExecutor|'
                          r'^while|^call|^cond|^conditional|^tuple|^get-tuple-element|^parameter|'
                          r'^Thunk|^Execute')


def kind_of(name):
  low = name.lower()
  for kind, pattern in KINDS:
    if re.search(pattern, low):
      return kind
  return 'other'


def summarize(durations_us, wall_s, top):
  """{name: total µs} -> shares of the traced wall time, by kind and for the top names."""
  total = sum(durations_us.values())
  by_kind = {}
  for name, d in durations_us.items():
    by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + d
  wall_us = wall_s * 1e6
  share = lambda d: round(d / wall_us, 4)
  return {'traced_wall_s': round(wall_s, 4), 'op_time_s': round(total / 1e6, 4),
          'op_time_over_wall': share(total),
          'by_kind': {k: share(v) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
          'top_ops': [{'name': n, 'kind': kind_of(n), 'share': share(d)}
                      for n, d in sorted(durations_us.items(), key=lambda kv: -kv[1])[:top]]}


def jax_ops(trace_dir):
  path = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'),
                          recursive=True))[-1]
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    data = json.load(f)
  events = data['traceEvents'] if isinstance(data, dict) else data
  out = {}
  for e in events:
    if e.get('ph') == 'X' and not _JAX_RUNTIME.search(e['name']):
      out[e['name']] = out.get(e['name'], 0.0) + float(e.get('dur', 0.0))
  return out


def profile_jax(preset, steps):
  import jax  # pylint: disable=import-outside-toplevel
  from benchmarks import jax_side  # pylint: disable=import-outside-toplevel
  bench = jax_side.TrainStep(preset) if preset.kind == 'train' else jax_side.Sampler(preset)
  bench.compile()
  one = (lambda: jax.block_until_ready(bench.step())) if preset.kind == 'train' else (
      lambda: jax.block_until_ready(bench.run()))
  one()
  one()
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(steps):
        one()
      wall = time.perf_counter() - t0
    ops = jax_ops(tmp)
  return ops, wall, {'jax_version': jax.__version__, 'backend': jax.default_backend()}


def profile_torch(preset, steps):
  import torch  # pylint: disable=import-outside-toplevel
  from benchmarks import torch_ref  # pylint: disable=import-outside-toplevel
  bench = torch_ref.TrainStep(preset) if preset.kind == 'train' else torch_ref.Sampler(preset)
  one = (lambda: float(bench.step())) if preset.kind == 'train' else (lambda: bench.run())
  one()
  one()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      one()
    wall = time.perf_counter() - t0
  ops = {e.key: float(e.self_cpu_time_total) for e in prof.key_averages()
         if e.self_cpu_time_total > 0}
  return ops, wall, {'torch_version': torch.__version__, 'threads': torch.get_num_threads()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('framework', choices=('jax', 'torch'))
  ap.add_argument('preset')
  ap.add_argument('--steps', type=int, default=3)
  ap.add_argument('--top', type=int, default=12)
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)
  preset = parse_preset(args.preset)
  run = profile_jax if args.framework == 'jax' else profile_torch
  ops, wall, versions = run(preset, args.steps)
  line = {'framework': args.framework, 'spec': args.preset, 'steps': args.steps,
          'load_1min': round(os.getloadavg()[0], 2), **versions,
          **summarize(ops, wall, args.top)}
  text = json.dumps(line)
  print(text, flush=True)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
