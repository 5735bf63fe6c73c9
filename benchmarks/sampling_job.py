"""Sampling-job throughput: `sample.py` as a job (one host, then split over hosts) against
one `generate` call of the same batch, with each process's peak RSS.

python benchmarks/sampling_job.py --workdir=runs/demo [--num_samples=10000] [--hosts=2]

Prints one JSON line: images/s and peak RSS of the 1-host job at two sizes (flat memory
means the same peak at both), of the job split over `--hosts` processes running at once
(each with its share of the CPU cores), and seconds per image of the job against one
compiled `generate` call of the job's batch size (what streaming to PNG/npz costs).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_jobs(workdir, out, num_samples, hosts, batch_size, steps):
  """Start `hosts` sample.py processes at once; -> (wall seconds, [peak RSS MiB per process],
  the manifest: its images_per_sec counts sampling and writing only, not start-up)."""
  t0 = time.time()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(REPO, 'sample.py'), f'--workdir={workdir}',
       f'--output={out}', f'--num_samples={num_samples}', f'--batch_size={batch_size}',
       f'--steps={steps}', f'--num_hosts={hosts}', f'--host_index={h}'],
      cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for h in range(hosts)]
  rss = []
  for p in procs:
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
      raise SystemExit(f'sample.py failed: {p.stderr.read().decode()[-2000:]}')
    rss.append(round(usage.ru_maxrss / 1024, 1))
  wall = time.time() - t0
  with open(os.path.join(out, 'sampling.json'), encoding='utf-8') as f:
    return wall, rss, json.load(f)


def single_call(workdir, batch_size, steps, reps=3):
  """Seconds per image of one compiled `generate` call of `batch_size` images (warm)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddm_jax.generation.generator import generate  # pylint: disable=import-outside-toplevel
  from ddm_jax.generation.plan import plan_generator, plan_samples  # pylint: disable=import-outside-toplevel
  from ddm_jax.training.setup import load_trained  # pylint: disable=import-outside-toplevel
  t = load_trained(workdir)
  plan = plan_samples(t.ddm, t.config, batch_size, batch_size=batch_size, steps=steps)
  gen = plan_generator(t.ddm, t.mesh, plan)
  generate(gen, t.params, t.frozen, batch_size, jax.random.key(0), batch_size, progress=False)
  best = float('inf')
  for i in range(reps):
    t0 = time.perf_counter()
    generate(gen, t.params, t.frozen, batch_size, jax.random.key(i), batch_size, progress=False)
    best = min(best, time.perf_counter() - t0)
  return best / batch_size


def main(argv):
  p = argparse.ArgumentParser()
  p.add_argument('--workdir', required=True, help='a trained digits workdir (make demo)')
  p.add_argument('--num_samples', type=int, default=10000)
  p.add_argument('--hosts', type=int, default=2)
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--steps', type=int, default=50)
  args = p.parse_args(argv)
  tmp = tempfile.mkdtemp(prefix='ddm_sampling_job_')
  try:
    small = max(args.num_samples // 5, args.batch_size)
    t_small, rss_small, _ = run_jobs(args.workdir, os.path.join(tmp, 'small'), small, 1,
                                  args.batch_size, args.steps)
    t_one, rss_one, m_one = run_jobs(args.workdir, os.path.join(tmp, 'one'), args.num_samples, 1,
                              args.batch_size, args.steps)
    t_split, rss_split, m_split = run_jobs(args.workdir, os.path.join(tmp, 'split'), args.num_samples,
                                  args.hosts, args.batch_size, args.steps)
    per_image_call = single_call(args.workdir, args.batch_size, args.steps)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(json.dumps({
      'bench': 'sampling_job', 'workdir': args.workdir, 'steps': args.steps,
      'batch_size': args.batch_size, 'cores': os.cpu_count(),
      'load_avg_1m': round(os.getloadavg()[0], 2),
      'one_host': {'num_samples': args.num_samples, 'seconds': round(t_one, 1),
                   'images_per_s': round(args.num_samples / t_one, 1),
                   'images_per_s_sampling': round(m_one['images_per_sec'], 1),
                   'peak_rss_mib': rss_one[0]},
      'one_host_small': {'num_samples': small, 'seconds': round(t_small, 1),
                         'images_per_s': round(small / t_small, 1),
                         'peak_rss_mib': rss_small[0]},
      f'{args.hosts}_hosts': {'num_samples': args.num_samples, 'seconds': round(t_split, 1),
                              'images_per_s': round(args.num_samples / t_split, 1),
                              'sampling_seconds_all_hosts': round(m_split['seconds'], 1),
                              'peak_rss_mib_per_host': rss_split},
      'single_generate_call_s_per_image': round(per_image_call, 6),
      'job_s_per_image': round(1 / m_one['images_per_sec'], 6),
      'job_over_call': round(1 / m_one['images_per_sec'] / per_image_call, 3)}))


if __name__ == '__main__':
  main(sys.argv[1:])
