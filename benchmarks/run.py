"""JAX (ddm_jax) vs the PyTorch reference, side by side: one JSON line per preset.

python benchmarks/run.py [PRESET_SPEC ...] [--rounds 5] [--gpu] [--out FILE.jsonl]

Presets (benchmarks/presets.py): small, sd15-lora-32, sd15-lora-512 (accelerator),
sample-small, sample-sd15-32, sample-sd15-512 (accelerator), tiny*, each with optional
`:key=value` overrides. Default: the CPU set; `--gpu`: the GPU set.

Method: for each preset, `--rounds` rounds; a round runs the JAX process and the
PyTorch process one after the other, the order alternating between rounds, so that
load from elsewhere hits both alike. Each process builds, compiles / warms up
(reported apart: compile_s, first_call_s), then times `steps` steps; its figure is
the median step. Across rounds: median and min-max. ratio_jax_over_torch = PyTorch
step time / JAX step time (= JAX images/s / PyTorch images/s). FLOPs per step come
from XLA's cost analysis of the compiled JAX program (the same computation is asked
of PyTorch); achieved GFLOP/s = FLOPs / step time, as a fraction of the best matmul
GFLOP/s measured in the same run by both frameworks (f32 on CPU, bf16 on GPU).
Every worker's raw output goes to --out (default runs/bench/<time>.jsonl).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import metrics  # noqa: E402
from benchmarks.presets import DEFAULT_CPU, DEFAULT_GPU, parse_presets  # noqa: E402
from benchmarks.worker import MARK  # noqa: E402


def run_worker(args, timeout, log):
  """Runs `python -m benchmarks.worker ARGS`; returns its result dict (or an error dict)."""
  cmd = [sys.executable, '-m', 'benchmarks.worker'] + list(args)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
  except subprocess.TimeoutExpired:
    return {'error': f'timed out after {timeout} s', 'cmd': ' '.join(args)}
  for line in proc.stdout.splitlines():
    if line.startswith(MARK):
      return json.loads(line[len(MARK):])
  tail = (proc.stderr or proc.stdout)[-2000:]
  log(f'worker {" ".join(args)} failed (rc {proc.returncode}, {time.time() - t0:.0f} s):\n{tail}')
  return {'error': f'rc {proc.returncode}', 'stderr_tail': tail, 'cmd': ' '.join(args)}


def _median_step(result):
  return metrics.summary(result['step_s'])['median']


def aggregate(preset, jax_runs, torch_runs, peaks, loads):
  """The per-preset JSON line from the workers' results (pure; unit-tested)."""
  ok = lambda runs: [r for r in runs if 'step_s' in r]
  jr, tr = ok(jax_runs), ok(torch_runs)
  line = {'bench': 'train_step' if preset.kind == 'train' else 'cfg_sampling',
          **preset.describe(), 'rounds': len(jax_runs)}
  if preset.kind == 'sample':
    line['unit'] = f'one sampling run: {preset.sample_steps} steps, CFG, batch {preset.batch}'
  skipped = [r['skipped'] for r in jax_runs + torch_runs if 'skipped' in r]
  errors = [r['error'] for r in jax_runs + torch_runs if 'error' in r]
  if skipped:
    line['skipped'] = skipped[0]
  if errors:
    line['errors'] = errors
  j_steps = [_median_step(r) for r in jr]
  t_steps = [_median_step(r) for r in tr]
  js, ts = metrics.summary(j_steps), metrics.summary(t_steps)
  ms = lambda s: None if s is None else {k: (v * 1e3 if k != 'n' else v) for k, v in s.items()}
  line['jax_step_ms'], line['torch_step_ms'] = ms(js), ms(ts)
  if js:
    line['jax_images_per_s'] = metrics.images_per_s(preset.batch, js['median'])
  if ts:
    line['torch_images_per_s'] = metrics.images_per_s(preset.batch, ts['median'])
  if js and ts:
    line['ratio_jax_over_torch'] = metrics.ratio(js['median'], ts['median'])
    paired = [metrics.ratio(j, t) for j, t in zip(j_steps, t_steps)]
    line['ratio_per_round'] = metrics.summary(paired)
  if jr:
    cold = [r for r in jr if not r.get('jax_cache')]
    line['jax_compile_s'] = metrics.summary([r['compile_s'] for r in (cold or jr[:1])])
    if len(cold) < len(jr):   # a persistent cache: round 1 cold, later rounds cached
      line['jax_compile_cached_s'] = metrics.summary([r['compile_s'] for r in jr[1:]])
    line['jax_first_call_s'] = metrics.summary([r['first_call_s'] for r in jr])
    line['jax_peak_rss_mib'] = max(r['peak_rss_mib'] for r in jr)
    if any('device_peak_mib' in r for r in jr):
      line['jax_device_peak_mib'] = max(r.get('device_peak_mib', 0) for r in jr)
    line['flops_per_step'] = jr[0].get('flops')
    line['jax_device'] = f"{jr[0]['backend']}:{jr[0]['device']}"
    line['jax_attention'] = jr[0].get('attention', 'xla')
  if tr:
    line['torch_first_step_s'] = metrics.summary([r['first_call_s'] for r in tr])
    line['torch_peak_rss_mib'] = max(r['peak_rss_mib'] for r in tr)
    if any('device_peak_mib' in r for r in tr):
      line['torch_device_peak_mib'] = max(r.get('device_peak_mib', 0) for r in tr)
    t0 = tr[0]
    line.update(torch_device=t0['device'], torch_threads=t0['threads'], torch_sdpa=t0['sdpa'],
                torch_attention=t0['attention_processors'], torch_channels_last=t0['channels_last'],
                torch_autocast_bf16=t0['autocast_bf16'])
  if jr and tr and preset.kind == 'train':
    line['loss_first'] = {'jax': jr[0]['loss_first'], 'torch': tr[0]['loss_first']}
  key = 'bfloat16' if preset.dtype == 'bfloat16' else 'float32'
  peak_vals = {p['framework']: p.get(key) for p in peaks if p.get(key)}
  if peak_vals:
    peak = max(peak_vals.values())
    line['matmul_peak_gflops'] = peak
    line['matmul_peak_by'] = {'dtype': key, **peak_vals}
  flops = line.get('flops_per_step')
  for fw, s in (('jax', js), ('torch', ts)):
    if s and flops:
      g = metrics.gflops(flops, s['median'])
      line[f'{fw}_gflops'] = g
      if peak_vals:
        line[f'{fw}_peak_frac'] = metrics.peak_fraction(g, line['matmul_peak_gflops'])
  line['load_1min'] = metrics.summary(loads)
  if jr:
    line['versions'] = {'jax': jr[0]['jax_version']}
  if tr:
    line.setdefault('versions', {}).update(torch=tr[0]['torch_version'],
                                           diffusers=tr[0]['diffusers_version'])
    if tr[0].get('peft_version'):
      line['versions']['peft'] = tr[0]['peft_version']
  return metrics.rounded(line)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('presets', nargs='*', help='preset specs (default: the CPU set, or --gpu set)')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--gpu', action='store_true', help='default to the GPU presets')
  ap.add_argument('--allow-cpu', action='store_true', help='run accelerator presets on CPU')
  ap.add_argument('--frameworks', default='jax,torch', help='jax,torch (or one of them)')
  ap.add_argument('--no-peak', action='store_true', help='skip the matmul peak measurement')
  ap.add_argument('--timeout', type=int, default=3600, help='seconds per worker process')
  ap.add_argument('--out', default='', help='raw JSONL of every worker result')
  ap.add_argument('--jax-cache', default='',
                  help="JAX persistent compilation cache folder: round 1 compiles cold, later "
                       "rounds load from it (jax_compile_s then reports both; saves GPU time)")
  args = ap.parse_args(argv)
  presets = parse_presets(args.presets or list(DEFAULT_GPU if args.gpu else DEFAULT_CPU))
  specs = args.presets or list(DEFAULT_GPU if args.gpu else DEFAULT_CPU)
  frameworks = [f for f in args.frameworks.split(',') if f]
  out_path = args.out or os.path.join(REPO, 'runs', 'bench', time.strftime('%Y%m%d-%H%M%S') + '.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  extra = ['--allow-cpu'] if args.allow_cpu else []
  if args.jax_cache:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.abspath(args.jax_cache)
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  peaks = []
  with open(out_path, 'a', encoding='utf-8') as raw:
    record = lambda r: (raw.write(json.dumps(r) + '\n'), raw.flush())
    for preset, spec in zip(presets, specs):
      runs = {'jax': [], 'torch': []}
      loads = []
      if not args.no_peak:
        for fw in ('peak-jax', 'peak-torch'):
          if fw[5:] in frameworks:
            p = run_worker([fw], args.timeout, log)
            record(p)
            if 'error' not in p:
              peaks.append(p)
      for rnd in range(args.rounds):
        order = frameworks if rnd % 2 == 0 else frameworks[::-1]
        for fw in order:
          log(f'[{time.strftime("%H:%M:%S")}] {spec} round {rnd + 1}/{args.rounds}: {fw} '
              f'(load {os.getloadavg()[0]:.1f})')
          r = run_worker([fw, spec] + extra, args.timeout, log)
          r['round'] = rnd
          record(r)
          runs[fw].append(r)
          loads += [r[k] for k in ('load_start', 'load_end') if k in r]
          if 'skipped' in r:
            break
        if any('skipped' in r for r in runs['jax'] + runs['torch']):
          break
      line = aggregate(preset, runs['jax'], runs['torch'], peaks, loads)
      line['spec'] = spec
      print(json.dumps(line), flush=True)
  log(f'raw results: {out_path}')


if __name__ == '__main__':
  main()
