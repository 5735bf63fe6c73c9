"""JAX (ddm_jax) vs the PyTorch reference, side by side: one JSON line per preset.

python benchmarks/run.py [PRESET_SPEC ...] [--rounds 5] [--gpu] [--out FILE.jsonl]

Presets (benchmarks/presets.py): small, sd15-lora-32, sd15-lora-512 (accelerator),
sample-small, sample-sd15-32, sample-sd15-512 (accelerator), tiny*, each with optional
`:key=value` overrides. Default: the CPU set; `--gpu`: the GPU set.

Method: for each preset, `--rounds` rounds; a round runs one process per framework
(`--frameworks`, default jax and torch with their default threads, jax:1 and torch:1
with one thread)
one after the other, the order rotating between rounds, so that load from elsewhere
hits all alike. Each process builds, compiles / warms up (reported apart: compile_s,
first_call_s), then times `steps` steps; its figure is the median step. Across rounds:
median and min-max. ratio_jax_over_torch = PyTorch step time / JAX step time (= JAX
images/s / PyTorch images/s), fastest configuration against fastest configuration (all
are listed in jax_variants / torch_variants; ratio_default_threads compares the defaults). FLOPs per step come from XLA's cost analysis of
the compiled JAX program (the same computation is asked of PyTorch); achieved GFLOP/s
= FLOPs / step time, as a fraction of the best matmul GFLOP/s measured in the same run
by both frameworks (f32 on CPU, bf16 on GPU).
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


def _ok(runs):
  return [r for r in runs if 'step_s' in r]


def _variants(runs_by_label, batch):
  """{label: summary of one configuration's rounds}; each round's figure is its median step."""
  out = {}
  for label, runs in runs_by_label.items():
    ok = _ok(runs)
    steps = [_median_step(r) for r in ok]
    if steps:
      out[label] = {'runs': ok, 'steps': steps, 'summary': metrics.summary(steps),
                    'threads': ok[0].get('threads')}
  return out


def _best(variants):
  return min(variants, key=lambda k: variants[k]['summary']['median']) if variants else None


def _memory_summary(runs):
  """Where one framework's memory went (benchmarks/memory.py, from its processes' results):
  the RSS at each phase (median over processes) and the first process's byte counts."""
  phases = {}
  for r in runs:
    for label, at in r.get('memory', {}).get('phases', {}).items():
      phases.setdefault(label, []).append(at['rss'])
  out = {'rss_at_mib': {k: metrics.summary(v)['median'] for k, v in phases.items()}}
  for key in ('xla_memory_mib', 'buffers_mib', 'residuals_mib', 'tensors_mib', 'saved_mib'):
    if runs and key in runs[0]:
      out[key] = runs[0][key]
  return out


def aggregate(preset, jax_runs, torch_runs, peaks, loads):
  """The per-preset JSON line from the workers' results (pure; unit-tested).

  `jax_runs` / `torch_runs`: a list, or {label: list} for several configurations of that
  framework ('jax' / 'torch' = its default threads, 'jax:1' / 'torch:1' = one thread).
  The headline compares the fastest configuration of each (the strongest baseline
  against our best); every configuration is listed in jax_variants / torch_variants,
  with ratio_default_threads comparing the two defaults."""
  if not isinstance(jax_runs, dict):
    jax_runs = {'jax': jax_runs}
  if not isinstance(torch_runs, dict):
    torch_runs = {'torch': torch_runs}
  line = {'bench': 'train_step' if preset.kind == 'train' else 'cfg_sampling',
          **preset.describe(),
          'rounds': max([len(v) for v in list(jax_runs.values()) + list(torch_runs.values())] or [0])}
  if preset.kind == 'sample':
    line['unit'] = f'one sampling run: {preset.sample_steps} steps, CFG, batch {preset.batch}'
  every = [r for runs in list(jax_runs.values()) + list(torch_runs.values()) for r in runs]
  skipped = [r['skipped'] for r in every if 'skipped' in r]
  errors = [r['error'] for r in every if 'error' in r]
  if skipped:
    line['skipped'] = skipped[0]
  if errors:
    line['errors'] = errors
  ms = lambda s: None if s is None else {k: (v * 1e3 if k != 'n' else v) for k, v in s.items()}
  jv, tv = _variants(jax_runs, preset.batch), _variants(torch_runs, preset.batch)
  jb, tb = _best(jv), _best(tv)
  js = jv[jb]['summary'] if jb else None
  ts = tv[tb]['summary'] if tb else None
  line['jax_step_ms'], line['torch_step_ms'] = ms(js), ms(ts)
  thread_word = lambda n: f"{n} thread{'s' if n != 1 else ''}" if n else 'default threads'
  if jb:
    line['jax_images_per_s'] = metrics.images_per_s(preset.batch, js['median'])
    line['jax_config'] = f"{jb} ({thread_word(jv[jb]['threads'])})"
  if tb:
    line['torch_images_per_s'] = metrics.images_per_s(preset.batch, ts['median'])
    line['torch_baseline'] = f"{tb} ({thread_word(tv[tb]['threads'])})"
  if jb and tb:
    line['ratio_jax_over_torch'] = metrics.ratio(js['median'], ts['median'])
    # rounds are paired by index: the processes of a round ran back to back, same load
    line['ratio_per_round'] = metrics.summary(
        [metrics.ratio(a, b) for a, b in zip(jv[jb]['steps'], tv[tb]['steps'])])
    if 'jax' in jv and 'torch' in tv and (jb, tb) != ('jax', 'torch'):
      line['ratio_default_threads'] = metrics.ratio(jv['jax']['summary']['median'],
                                                    tv['torch']['summary']['median'])
  for name, variants, other in (('jax', jv, ts), ('torch', tv, js)):
    if len(variants) > 1:
      key = 'ratio_jax_over_it' if name == 'torch' else 'ratio_it_over_torch'
      line[f'{name}_variants'] = {
          k: {'threads': v['threads'], 'step_ms': ms(v['summary']),
              key: (metrics.ratio(other['median'], v['summary']['median']) if name == 'torch'
                    else metrics.ratio(v['summary']['median'], other['median'])) if other else None}
          for k, v in variants.items()}
  if jb:
    jr = jv[jb]['runs']
    every_jax = [r for v in jv.values() for r in v['runs']]
    cold = [r for r in jr if not r.get('jax_cache')]
    line['jax_compile_s'] = metrics.summary([r['compile_s'] for r in (cold or jr[:1])])
    if len(cold) < len(jr):   # a persistent cache: round 1 cold, later rounds cached
      line['jax_compile_cached_s'] = metrics.summary([r['compile_s'] for r in jr[1:]])
    line['jax_first_call_s'] = metrics.summary([r['first_call_s'] for r in jr])
    line['jax_peak_rss_mib'] = max(r['peak_rss_mib'] for r in every_jax)
    if len(cold) < len(jr):   # the compiler's own peak is paid by cold processes only
      line['jax_peak_rss_cold_mib'] = max(r['peak_rss_mib'] for r in (cold or jr[:1]))
      line['jax_peak_rss_cached_mib'] = max(r['peak_rss_mib'] for r in jr[1:])
    line['jax_memory'] = _memory_summary(jr)
    if any('device_peak_mib' in r for r in jr):
      line['jax_device_peak_mib'] = max(r.get('device_peak_mib', 0) for r in jr)
    line['flops_per_step'] = jr[0].get('flops')
    line['jax_device'] = f"{jr[0]['backend']}:{jr[0]['device']}"
    line['jax_attention'] = jr[0].get('attention', 'xla')
  if tb:
    tr = tv[tb]['runs']
    line['torch_first_step_s'] = metrics.summary([r['first_call_s'] for r in tr])
    line['torch_peak_rss_mib'] = max(r['peak_rss_mib'] for v in tv.values() for r in v['runs'])
    line['torch_memory'] = _memory_summary(tr)
    if any('device_peak_mib' in r for r in tr):
      line['torch_device_peak_mib'] = max(r.get('device_peak_mib', 0) for r in tr)
    t0 = tr[0]
    line.update(torch_device=t0['device'], torch_threads=t0['threads'], torch_sdpa=t0['sdpa'],
                torch_attention=t0['attention_processors'], torch_channels_last=t0['channels_last'],
                torch_autocast_bf16=t0['autocast_bf16'])
  for fw, runs in (('jax', jv[jb]['runs'] if jb else []), ('torch', tv[tb]['runs'] if tb else [])):
    for key in ('minor_faults_per_step', 'sys_s_per_step'):
      if runs and all(key in r for r in runs):
        line[f'{fw}_{key}'] = metrics.summary([r[key] for r in runs])['median']
    if runs:
      line[f'{fw}_glibc_tunables'] = runs[0].get('glibc_tunables', '')
  if jb and tb and preset.kind == 'train':
    line['loss_first'] = {'jax': jv[jb]['runs'][0]['loss_first'],
                          'torch': tv[tb]['runs'][0]['loss_first']}
  key = 'bfloat16' if preset.dtype == 'bfloat16' else 'float32'
  peak_vals = {}
  for p in peaks:
    if p.get(key):
      peak_vals[p['framework']] = max(peak_vals.get(p['framework'], 0), p[key])
  if peak_vals:
    line['matmul_peak_gflops'] = max(peak_vals.values())
    line['matmul_peak_by'] = {'dtype': key, **peak_vals}
  flops = line.get('flops_per_step')
  for fw, s in (('jax', js), ('torch', ts)):
    if s and flops:
      g = metrics.gflops(flops, s['median'])
      line[f'{fw}_gflops'] = g
      if peak_vals:
        line[f'{fw}_peak_frac'] = metrics.peak_fraction(g, line['matmul_peak_gflops'])
  line['load_1min'] = metrics.summary(loads)
  if jb:
    line['versions'] = {'jax': jv[jb]['runs'][0]['jax_version']}
  if tb:
    t0 = tv[tb]['runs'][0]
    line.setdefault('versions', {}).update(torch=t0['torch_version'],
                                           diffusers=t0['diffusers_version'])
    if t0.get('peft_version'):
      line['versions']['peft'] = t0['peft_version']
  return metrics.rounded(line)


def worker_args(label, spec):
  """'jax' / 'torch' / 'jax:N' / 'torch:N' (N threads) -> worker command-line arguments."""
  fw, _, threads = label.partition(':')
  if fw not in ('jax', 'torch') or (threads and not threads.isdigit()):
    raise ValueError(f'unknown framework {label!r}: use jax, torch, jax:N or torch:N')
  return [fw, spec] + (['--threads', threads] if threads else [])


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('presets', nargs='*', help='preset specs (default: the CPU set, or --gpu set)')
  ap.add_argument('--rounds', type=int, default=5)
  ap.add_argument('--gpu', action='store_true', help='default to the GPU presets')
  ap.add_argument('--allow-cpu', action='store_true', help='run accelerator presets on CPU')
  ap.add_argument('--frameworks', default='',
                  help="comma list of jax, torch (default threads), jax:N, torch:N (N threads); "
                       "default jax,jax:1,torch,torch:1 (jax,torch with --gpu)")
  ap.add_argument('--no-peak', action='store_true', help='skip the matmul peak measurement')
  ap.add_argument('--timeout', type=int, default=3600, help='seconds per worker process')
  ap.add_argument('--budget', type=float, default=600.0,
                  help='per process: stop timing once the timed steps took this long (>= 2 steps)')
  ap.add_argument('--out', default='', help='raw JSONL of every worker result')
  ap.add_argument('--jax-cache', default='',
                  help="JAX persistent compilation cache folder: round 1 compiles cold, later "
                       "rounds load from it (jax_compile_s then reports both; saves GPU time)")
  args = ap.parse_args(argv)
  specs = args.presets or list(DEFAULT_GPU if args.gpu else DEFAULT_CPU)
  presets = parse_presets(specs)
  frameworks = [f for f in (args.frameworks or ('jax,torch' if args.gpu else 'jax,jax:1,torch,torch:1'))
                .split(',') if f]
  for label in frameworks:
    worker_args(label, 'x')   # validates the labels before anything runs
  out_path = args.out or os.path.join(REPO, 'runs', 'bench', time.strftime('%Y%m%d-%H%M%S') + '.jsonl')
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  extra = (['--allow-cpu'] if args.allow_cpu else []) + ['--budget', str(args.budget)]
  if args.jax_cache:
    os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.abspath(args.jax_cache)
    os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  peaks = []
  with open(out_path, 'a', encoding='utf-8') as raw:
    record = lambda r: (raw.write(json.dumps(r) + '\n'), raw.flush())
    for preset, spec in zip(presets, specs):
      runs = {label: [] for label in frameworks}
      loads = []
      if not args.no_peak:
        for fw in ('peak-jax', 'peak-torch'):
          if any(f.split(':')[0] == fw[5:] for f in frameworks):
            p = run_worker([fw], args.timeout, log)
            record(p)
            if 'error' not in p:
              peaks.append(p)
      for rnd in range(args.rounds):
        k = rnd % len(frameworks)      # rotate the order: each framework runs first in turn
        for label in frameworks[k:] + frameworks[:k]:
          log(f'[{time.strftime("%H:%M:%S")}] {spec} round {rnd + 1}/{args.rounds}: {label} '
              f'(load {os.getloadavg()[0]:.1f})')
          r = run_worker(worker_args(label, spec) + extra, args.timeout, log)
          r.update(round=rnd, label=label)
          record(r)
          runs[label].append(r)
          loads += [r[key] for key in ('load_start', 'load_end') if key in r]
          if 'skipped' in r:
            break
        if any('skipped' in r for rs in runs.values() for r in rs):
          break
      pick = lambda fw: {k: v for k, v in runs.items() if k.split(':')[0] == fw}
      line = aggregate(preset, pick('jax'), pick('torch'), peaks, loads)
      line['spec'] = spec
      print(json.dumps(line), flush=True)
  log(f'raw results: {out_path}')


if __name__ == '__main__':
  main()
