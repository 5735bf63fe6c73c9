"""What a sweep pays per model beyond its steps: the fine-tunes of one paper-regime cell,
trained one after another in one process on a fresh compilation cache.

python benchmarks/finetune_sweep.py --base sweeps/regime_full/base [--root DIR] [--seed 0] [--out F.jsonl]

The models are the regime experiment's for one cell (pair 0/1, ratio 4:1, seed 0, lr 3e-4,
configs/digits.py, `experiments.regime.plan.finetune_config`): plain, DDM at each official
alpha, reweighting, group-conditioned, and the post-hoc indicator and the noise-aware
classifier on the plain model, in that order. For each: its seconds in all and those of
its steps alone (from metrics.jsonl: the steps/s of each logging interval; compiling comes
before the first). Run it from checkouts of two commits to compare (`git worktree`); one
JSON line per run, with the commit.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

KINDS = [('plain', 0.0)] + [('ddm', a) for a in (0.005, 0.01, 0.05, 0.1)] + [
    ('reweight', 0.0), ('cond', 0.0), ('posthoc', 0.0), ('classifier', 0.0)]


def step_seconds(workdir):
  """Seconds spent in the train steps: each logging interval's steps over its steps/s."""
  total, last = 0.0, 0
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as f:
    for line in f:
      row = json.loads(line)
      total += (row['step'] - last) / row['steps_per_sec']
      last = row['step']
  return total


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--base', required=True, help='the regime experiment\'s pretrained base workdir')
  ap.add_argument('--steps', type=int, default=150)
  ap.add_argument('--seed', type=int, default=0, help='the cell\'s seed (a second run on the '
                  'same --root: the next cell of a sweep, its cache warm)')
  ap.add_argument('--root', default='', help='work folder (default: a temporary one)')
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)
  root = args.root or tempfile.mkdtemp(prefix='finetune_sweep_')

  t_start, load_start = time.time(), os.getloadavg()[0]
  from ddm_jax.cli.common import load_config, use_compilation_cache  # pylint: disable=import-outside-toplevel
  cache = os.path.join(root, 'cache')
  warm = os.path.isdir(cache)
  use_compilation_cache(cache)
  from ddm_jax.experiments.regime import plan as P  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.loop import train  # pylint: disable=import-outside-toplevel
  ft = load_config(os.path.join(REPO, 'configs', 'digits.py'), {})
  base = os.path.abspath(args.base)
  rows, plain = [], None
  for kind, alpha in KINDS:
    workdir = os.path.join(root, f'{P.model_name(kind, alpha)}_s{args.seed}')
    config = P.finetune_config(ft, '0/1', '4:1', args.seed, 3e-4, args.steps, kind, base, plain,
                               alpha)
    t0 = time.time()
    train(config, workdir, progress=False)
    seconds = time.time() - t0
    if kind == 'plain':
      plain = workdir
    steps = step_seconds(workdir)
    rows.append({'model': P.model_name(kind, alpha), 'seconds': round(seconds, 1),
                 'step_seconds': round(steps, 1), 'other_seconds': round(seconds - steps, 1)})
    print(json.dumps(rows[-1]), flush=True)
  commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True,
                          text=True, check=False).stdout.strip()
  out = {'commit': commit, 'machine': f'{platform.machine()} {os.cpu_count()} cores',
         'load_start_end': [round(load_start, 2), round(os.getloadavg()[0], 2)], 'steps': args.steps,
         'seed': args.seed, 'cache_before': 'warm' if warm else 'empty', 'models': rows,
         'total_seconds': round(time.time() - t_start, 1),
         'train_seconds': round(sum(r['seconds'] for r in rows), 1),
         'other_seconds': round(sum(r['other_seconds'] for r in rows), 1)}
  print(json.dumps(out), flush=True)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.write(json.dumps(out) + '\n')


if __name__ == '__main__':
  main()
