"""Start-up time of the command lines, cold and warm persistent compilation cache.

python benchmarks/startup.py [--rounds 2] [--commands train,train_sd,sample,evaluate] [--out F.jsonl]

For each command and round: a fresh, empty cache folder (cold), then the same command
again on it (warm). Each run is a real `python train.py ...` (etc.) process; measured from
its start to the first step's metrics row in metrics.jsonl (train.py, log_every=1), to the
first PNG (sample.py), to its exit (evaluate.py: a small report; the evaluator classifier
is trained once beforehand, outside the measurement); its exit and its peak RSS are
reported too. With
JAX_LOG_COMPILES, each run also counts its XLA compiles, persistent-cache hits and the
programs compiled more than once with the same input signature; each row also has the
commit and the trace cache's entries after the cold run (`<cache>/traces`).

- train: configs/digits.py (the demo's model), 1 step;
- train_sd: configs/sd15_digits.py on the tiny diffusers folder (tests/sd_folder.py), 1 step;
- sample: sample.py --num_samples=1 on the `train` workdir;
- evaluate: evaluate.py --num_samples=64 on the `train` workdir.
"""
import argparse
import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
COMMANDS = ('train', 'train_sd', 'sample', 'evaluate')


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_LOG_COMPILES='1', PYTHONUNBUFFERED='1',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  for key in ('JAX_COMPILATION_CACHE_DIR', 'DDM_JAX_CACHE_DIR'):
    env.pop(key, None)   # the command's own --jax_cache_dir decides
  return env


def _first_png(folder):
  return os.path.isdir(folder) and any(n.endswith('.png') for n in os.listdir(folder))


def _metrics_row(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  return os.path.isfile(path) and os.path.getsize(path) > 0


def timed(argv, ready=lambda: False, timeout=1800):
  """Runs `python ARGV`; seconds to `ready()` (polled every 20 ms) and to exit, plus
  the compile counts from JAX's compile log."""
  with tempfile.TemporaryFile('w+') as log:   # a pipe would fill up and block the child
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable] + argv, cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=log)
    t_ready, status = None, None
    while status is None and time.perf_counter() - t0 < timeout:
      if t_ready is None and ready():
        t_ready = time.perf_counter() - t0
      pid, code, usage = os.wait4(proc.pid, os.WNOHANG)   # reaped here: its rusage too
      status = (code, usage) if pid else None
      time.sleep(0.02)
    if status is None:
      proc.kill()
      _, code, usage = os.wait4(proc.pid, 0)
      status = (code, usage)
    t_exit = time.perf_counter() - t0
    log.seek(0)
    err = log.read()
  rc = proc.returncode = os.waitstatus_to_exitcode(status[0])
  result = {'rc': rc, 'first_s': round(t_ready if t_ready else t_exit, 2),
            'exit_s': round(t_exit, 2), 'peak_rss_mib': round(status[1].ru_maxrss / 1024),
            **compile_counts(err)}
  if rc:
    result['stderr_tail'] = err[-1500:]
  return result


def compile_counts(log):
  """From a JAX_LOG_COMPILES log: XLA compiles, persistent-cache hits, compile seconds, and
  the (program, input signature) pairs compiled more than once."""
  signatures, current = collections.Counter(), None
  compiles, seconds = 0, 0.0
  for line in log.splitlines():
    m = re.search(r'Compiling (\S+) with global shapes and types (.*?)\. Argument mapping', line)
    if m:
      current = (m[1], m[2])
      signatures[current] += 1
    m = re.search(r'Finished XLA compilation of (\S+) in ([\d.e-]+) sec', line)
    if m:
      compiles += 1
      seconds += float(m[2])
  hits = len(re.findall(r'Persistent compilation cache hit', log))
  twice = {f'{name} {sig[:80]}': n for (name, sig), n in signatures.items() if n > 1}
  return {'xla_compiles': compiles, 'xla_compile_s': round(seconds, 1), 'cache_hits': hits,
          'programs': sum(signatures.values()), 'compiled_more_than_once': twice}


def _setup(root):
  """Data and folders every command needs, made once (outside the measurements)."""
  from tests.sd_folder import write_tiny_pipeline  # pylint: disable=import-outside-toplevel
  paths = {'root': root, 'data': os.path.join(root, 'data'), 'sd': os.path.join(root, 'sd'),
           'digits': os.path.join(root, 'sd_digits'), 'evalcache': os.path.join(root, 'evaluators')}
  write_tiny_pipeline(paths['sd'])
  proc = subprocess.run([sys.executable, '-m', 'ddm_jax.cli.prepare_sd_digits', '--out',
                         paths['digits'], '--pair', '0,1', '--ratio', '4:1', '--resolution=16'],
                        cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
  paths['sd_overrides'] = proc.stdout.split('SD15_DIR ', 1)[1].split()
  # a digits workdir for sample/evaluate (its data prepared, its evaluator trained)
  paths['trained'] = os.path.join(root, 'trained')
  run = timed(_train_argv(paths, paths['trained'], os.path.join(root, 'cache_setup')))
  assert run['rc'] == 0, run
  run = timed(_eval_argv(paths, os.path.join(root, 'eval_setup'), os.path.join(root, 'cache_setup')))
  assert run['rc'] == 0, run
  return paths


def _train_argv(paths, workdir, cache):
  return ['train.py', '--config=configs/digits.py', f'--workdir={workdir}', '--no_progress',
          f'--config.data.data_dir={paths["data"]}', '--config.train.num_steps=1',
          '--config.train.log_every=1', '--config.train.sample_every=0',
          '--config.train.checkpoint_every=1', f'--jax_cache_dir={cache}']


def _train_sd_argv(paths, workdir, cache):
  return ['train.py', '--config=configs/sd15_digits.py', f'--workdir={workdir}', '--no_progress',
          f'--config.model.pretrained={paths["sd"]}', *paths['sd_overrides'],
          '--config.data.resolution=16', f'--config.data.data_dir={paths["data"]}_sd',
          '--config.indicator.hidden=(16,)', '--config.train.num_steps=1',
          '--config.train.log_every=1', '--config.train.checkpoint_every=1',
          f'--jax_cache_dir={cache}']


def _eval_argv(paths, out, cache):
  return ['evaluate.py', f'--workdir={paths["trained"]}', '--num_samples=64', '--batch_size=64',
          f'--out_dir={out}', f'--cache_dir={paths["evalcache"]}', '--no_progress',
          f'--jax_cache_dir={cache}']


def measure(command, paths, cache, tag):
  """One run of `command` with the cache folder `cache`."""
  work = os.path.join(paths['root'], f'{command}_{tag}')
  if command == 'train':
    return timed(_train_argv(paths, work, cache), lambda: _metrics_row(work))
  if command == 'train_sd':
    return timed(_train_sd_argv(paths, work, cache), lambda: _metrics_row(work))
  if command == 'sample':
    out = os.path.join(work, 'images')
    return timed(['sample.py', f'--workdir={paths["trained"]}', '--num_samples=1',
                  f'--output={out}', f'--jax_cache_dir={cache}'], lambda: _first_png(out))
  if command == 'evaluate':
    return timed(_eval_argv(paths, work, cache))
  raise ValueError(command)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--rounds', type=int, default=2)
  ap.add_argument('--commands', default=','.join(COMMANDS))
  ap.add_argument('--root', default='', help='work folder (default: a temporary one, removed)')
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix='ddm_startup_')
  paths = _setup(root)
  if 'train_sd' in args.commands:   # prepare the SD data set once, outside the measurement
    run = timed(_train_sd_argv(paths, os.path.join(root, 'sd_setup'), os.path.join(root, 'cache_setup')))
    assert run['rc'] == 0, run
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
  out = open(args.out, 'a', encoding='utf-8') if args.out else None
  try:
    for rnd in range(args.rounds):
      for command in args.commands.split(','):
        cache = os.path.join(root, f'cache_{command}_{rnd}')
        row = {'command': command, 'round': rnd, 'commit': commit,
               'load_start': round(os.getloadavg()[0], 2)}
        row['cold'] = measure(command, paths, cache, f'{rnd}_cold')
        traces = os.path.join(cache, 'traces')   # ddm_jax.trace_cache's entries
        names = os.listdir(traces) if os.path.isdir(traces) else []
        row['trace_entries'] = sum(n.endswith('.trace') for n in names)
        row['stored_executables'] = sum(n.endswith('.exe') for n in names)
        row['warm'] = measure(command, paths, cache, f'{rnd}_warm')
        row['warm_over_cold_first'] = round(row['warm']['first_s'] / row['cold']['first_s'], 3)
        row['load_end'] = round(os.getloadavg()[0], 2)
        print(json.dumps(row), flush=True)
        if out:
          out.write(json.dumps(row) + '\n')
          out.flush()
  finally:
    if out:
      out.close()
    if not args.root:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == '__main__':
  main()
