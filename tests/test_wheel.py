"""The package as a user installs it: a wheel built from the checkout's tracked files,
installed into a fresh virtual environment outside the checkout, and a tiny train ->
sample -> evaluate -> regime through the console scripts from another folder, with a
shipped config named, not given as a path (regime finds its two default configs by name:
its base and fine-tunes get the tiny UNet by --base_config.KEY / --config.KEY, and its
grid is --quick cut to one plain and one guided DDM model of a few steps each).

The fresh environment reuses the test environment's dependencies (a .pth line; nothing is
downloaded) and gets ddm_jax only from the wheel: the checkout is never on its path."""
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from tests.helpers import REPO, TINY_KEYS, config_overrides, subprocess_env, tiny_config


def _run(argv, cwd, env, timeout=600):
  proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=timeout, check=False)
  assert proc.returncode == 0, (argv, proc.stdout[-3000:], proc.stderr[-5000:])
  return proc


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
  """(venv bin folder, environment) with the wheel of the checkout (its files that git
  tracks or would track) installed."""
  root = tmp_path_factory.mktemp('wheel')
  src = root / 'src'
  tracked = subprocess.run(['git', 'ls-files', '-z', '--cached', '--others', '--exclude-standard'],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split('\0')
  for rel in filter(None, tracked):
    if os.path.isfile(os.path.join(REPO, rel)):
      os.makedirs(src / os.path.dirname(rel), exist_ok=True)
      shutil.copy2(os.path.join(REPO, rel), src / rel)
  env = {k: v for k, v in subprocess_env().items() if k != 'PYTHONPATH'}
  _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
        '-w', str(root / 'dist'), str(src)], root, env)
  wheel, = (root / 'dist').glob('ddm_jax-*.whl')
  venv = root / 'venv'
  _run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], root, env)
  site = subprocess.run([str(venv / 'bin' / 'python'), '-c',
                         'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                        capture_output=True, text=True, check=True).stdout.strip()
  with open(os.path.join(site, 'test_env_dependencies.pth'), 'w') as f:
    f.write(sysconfig.get_paths()['purelib'] + '\n')  # jax & co. from the test environment
  _run([sys.executable, '-m', 'pip', '--python', str(venv / 'bin' / 'python'), 'install',
        '--no-deps', '-q', str(wheel)], root, env)
  env['PATH'] = str(venv / 'bin') + os.pathsep + env['PATH']
  return venv / 'bin', env


def test_wheel_installs_commands_and_configs(installed, tmp_path):
  bin_dir, env = installed
  where = _run([str(bin_dir / 'python'), '-c',
                'import ddm_jax, ddm_jax.configs.digits_base as d; print(ddm_jax.__file__); '
                'print(d.get_config().data.num_groups)'], tmp_path, env).stdout.split()
  assert not where[0].startswith(REPO) and where[1] == '10'
  for name in ('train', 'sample', 'evaluate', 'export', 'compare', 'regime', 'sweep',
               'prepare-sd-digits'):
    out = _run([str(bin_dir / f'ddm-{name}'), '--version'], tmp_path, env).stdout
    assert out.startswith(f'ddm-{name} (ddm_jax) '), out


def test_train_sample_evaluate_regime_from_another_folder(installed, tmp_path, data_dir):
  bin_dir, env = installed
  config = tiny_config(data_dir)
  tiny = config_overrides(config, TINY_KEYS)
  _run([str(bin_dir / 'ddm-train'), '--config=digits', '--workdir=run', '--no_progress'] + tiny,
       tmp_path, env)
  assert (tmp_path / 'run' / 'metrics.jsonl').is_file()
  _run([str(bin_dir / 'ddm-sample'), '--workdir=run', '--num_samples=4', '--steps=2',
        '--no_progress'], tmp_path, env)
  assert (tmp_path / 'run' / 'generated' / 'samples.npz').is_file()
  out = _run([str(bin_dir / 'ddm-evaluate'), '--workdir=run', '--num_samples=16', '--steps=2',
              '--evaluator_steps=30', '--accuracy_floor=0', '--no_progress',
              f'--cache_dir={tmp_path / "eval_cache"}'], tmp_path, env).stdout
  assert 'FD' in out and (tmp_path / 'run' / 'eval' / 'report.json').is_file()
  # the tiny UNet for the base and the fine-tunes; the regime sets their steps, checkpoints
  # and sampling itself
  unet = [a for a in tiny if not a.startswith(('--config.train.num_steps', '--config.sample',
                                               '--config.train.checkpoint_every'))]
  out = _run([str(bin_dir / 'ddm-regime'), '--quick', '--out=regime', '--quiet',
              '--methods=plain,ddm+guide', '--scales=2', '--base_steps=2', '--finetune_steps=2',
              '--num_samples=16', '--dev_num_samples=16', '--quality_n=2', '--sample_steps=2']
             + unet + [a.replace('--config.', '--base_config.', 1) for a in unet], tmp_path,
             {**env, 'DDM_EVAL_CACHE': str(tmp_path / 'eval_cache')}).stdout
  assert out.startswith('# DDM in the paper') and 'DDM alpha 0.05' in out, out
  assert out.splitlines()[-1].endswith(f'results in {tmp_path / "regime"}'), out
  with open(tmp_path / 'regime' / 'results.jsonl', encoding='utf-8') as f:
    rows = [json.loads(line) for line in f]
  assert {r['method'] for r in rows} == {'plain', 'ddm', 'ddm+guide'}
  assert {r['split'] for r in rows} == {'dev', 'test'}
