"""The fairness sweep: cell configs, resume (finished cells are skipped), summary and plots."""
import json
import os

import numpy as np
import pytest

from configs import digits
from ddm_jax.errors import ConfigError
from ddm_jax.cli.sweep import main as sweep_main
from ddm_jax.experiments import sweep as S


def test_parse_ratio_and_cell_config():
  assert S.parse_ratio('4:1') == pytest.approx((0.8, 0.2))
  assert S.parse_ratio('1:1') == pytest.approx((0.5, 0.5))
  for bad in ('4', '4:0', 'a:b'):
    with pytest.raises(ConfigError):
      S.parse_ratio(bad)
  base = digits.get_config()
  c = S.cell_config(base, '9:1', 0.05, 2, 123, pseudo=True)
  assert c.data.proportions == pytest.approx((0.9, 0.1))
  assert (c.loss.w_ind, c.loss.w_rec) == pytest.approx((0.05, 0.95))  # w_rec = 1 - alpha
  assert c.train.seed == 2 and c.train.num_steps == 123 and c.train.sample_every == 0
  assert c.data.pseudo_labels == 'kmeans'
  assert base.loss.w_ind == 0.05 and base.data.pseudo_labels == ''  # base untouched


def _fake_report(workdir, settings, p0):
  p = [p0, 1 - p0]
  return {
      'fairness': {'fd': float(np.linalg.norm(np.array(p) - 0.5)), 'fd_paper': abs(p0 - 0.5),
                   'kl': 0.0, 'proportions': p, 'ci95_lo': p, 'ci95_hi': p,
                   **({'guide_hit_rate': 0.9} if settings.guidance != 'none' else {})},
      'quality': {'fcd': 1.0 + settings.guidance_scale, 'fcd_vs_train': 1.0,
                  'fcd_within_group_mean': 1.0, 'precision': 0.9, 'recall': 0.8,
                  'noise_floor_fcd': 0.5, 'noise_floor_precision': 0.95,
                  'noise_floor_recall': 0.95},
      'indicator': {'entropy_mean': 0.5, 'entropy_std': 0.1, 'accuracy': 0.8},
      'data': {'train_proportions': [0.8, 0.2], 'evaluator': {'heldout_accuracy': 1.0}},
      'sampling': {'seconds': 0.0}, 'num_samples': settings.num_samples,
      'checkpoint_step': 1, 'workdir': workdir}


class Fakes:
  def __init__(self, fail_after=None):
    self.trained, self.evaluated = [], []
    self.fail_after = fail_after

  def train(self, config, workdir):
    self.trained.append(workdir)
    os.makedirs(workdir, exist_ok=True)

  def evaluate(self, workdir, settings, out_dir):
    if self.fail_after is not None and len(self.evaluated) >= self.fail_after:
      raise KeyboardInterrupt  # a killed sweep
    self.evaluated.append((os.path.basename(workdir), settings.guidance, settings.guidance_scale,
                           settings.seed))
    # Deterministic per cell: FD falls with the guidance scale.
    p0 = 0.8 - 0.05 * settings.guidance_scale - 0.01 * settings.seed
    return _fake_report(workdir, settings, p0)


PLAN = S.Plan(ratios=('4:1', '1:1'), alphas=(0.0, 0.05), seeds=(0, 1), num_steps=3,
              num_samples=16, guided_ratios=('4:1',), guided_alphas=(0.05,), scales=(1.0, 2.0),
              pseudo_ratios=(), pseudo_scales=(), pseudo_seeds=())


def _runner(out, fakes, plan=PLAN):
  return S.Runner(digits.get_config(), plan, str(out), log=lambda m: None,
                  train_fn=fakes.train, evaluate_fn=fakes.evaluate)


def test_resume_skips_finished_cells(tmp_path):
  # 2 seeds x (2 ratios x 2 alphas unguided + 2 guided scales at 4:1, alpha 0.05) = 12 evals.
  killed = Fakes(fail_after=5)
  with pytest.raises(KeyboardInterrupt):
    _runner(tmp_path, killed).run()
  assert len(killed.evaluated) == 5
  rows = [json.loads(l) for l in open(tmp_path / 'results.jsonl')]
  assert len(rows) == 5

  resumed = Fakes()
  _runner(tmp_path, resumed).run()
  assert len(resumed.evaluated) == 12 - 5  # only what was missing
  done_before = {(r['workdir'].split('/')[-1], r['scale']) for r in rows}
  assert not any((w, s if g != 'none' else 0.0) in done_before
                 for w, g, s, _ in resumed.evaluated)
  # Models whose evaluations were all done are not trained again; a model is trained once.
  assert len(set(killed.trained)) == len(killed.trained)
  assert not set(resumed.trained) & set(killed.trained)
  rows = [json.loads(l) for l in open(tmp_path / 'results.jsonl')]
  assert len(rows) == 12 and len({r['id'] for r in rows}) == 12

  again = Fakes()
  _runner(tmp_path, again).run()
  assert again.evaluated == [] and again.trained == []


def test_truncated_last_line_is_rerun(tmp_path):
  fakes = Fakes()
  _runner(tmp_path, fakes).run()
  lines = open(tmp_path / 'results.jsonl').read().splitlines()
  with open(tmp_path / 'results.jsonl', 'w') as f:
    f.write('\n'.join(lines[:-1]) + '\n' + lines[-1][:20])  # killed mid-write
  again = Fakes()
  _runner(tmp_path, again).run()
  assert len(again.evaluated) == 1
  # The file is whole again: every line parses and each cell appears once.
  rows = [json.loads(l) for l in open(tmp_path / 'results.jsonl')]
  assert len(rows) == len(lines) == len({r['id'] for r in rows})


def test_summary_and_plots(tmp_path):
  fakes = Fakes()
  runner = _runner(tmp_path, fakes)
  runner.run()
  summary, md = S.write_summary(runner, 'test', 1.0, publish=str(tmp_path / 'pub'))
  ddm = {(e['ratio'], e['alpha']): e for e in summary if e['kind'] == 'ddm'}
  e = ddm[('4:1', 0.05)]
  assert e['n'] == 2 and e['seeds'] == [0, 1]
  # p0 = 0.8 (seed 0) and 0.79 (seed 1): mean and sample std.
  assert e['p0']['mean'] == pytest.approx(0.795)
  assert e['p0']['std'] == pytest.approx(np.std([0.8, 0.79], ddof=1))
  assert e['fd_paper']['mean'] == pytest.approx(0.295)
  guided = [e for e in summary if e['kind'] == 'guided']
  assert [g['scale'] for g in guided] == [1.0, 2.0]
  assert guided[1]['fd']['mean'] < guided[0]['fd']['mean']
  assert '| 4:1 | 0.05 | 2 |' in md and 'Indicator-guided' in md
  for name in ('fd_vs_alpha.png', 'guided_fd_vs_scale.png', 'guided_fcd_vs_scale.png'):
    assert os.path.getsize(tmp_path / 'plots' / name) > 0
  assert os.path.exists(tmp_path / 'pub' / 'sweep_test.md')
  assert len(open(tmp_path / 'pub' / 'sweep_test_rows.jsonl').readlines()) == len(runner.results.rows)
  assert os.path.exists(tmp_path / 'pub' / 'fd_vs_alpha_test.png')


def test_cli_rejects_bad_arguments(tmp_path, capsys):
  assert sweep_main(['--out', str(tmp_path), '--ratios', '4:0']) == 2
  assert 'ratio' in capsys.readouterr().err
  assert sweep_main(['--out', str(tmp_path), '--bogus']) == 2
  assert sweep_main(['--out', str(tmp_path), '--config.train.nope=1']) == 2


def test_guided_plots_keep_series_measured_at_other_scales(tmp_path, monkeypatch):
  from ddm_jax.evaluation import plots
  seen = {}
  monkeypatch.setattr(plots, 'plot_xy', lambda path, xs, series, *a: seen.setdefault(
      os.path.basename(path), (list(xs), series)))
  m = lambda v: {'mean': v, 'std': 0.0}
  entry = lambda ratio, scale, fd, guided=True: {
      'kind': 'guided' if guided else 'ddm', 'ratio': ratio, 'alpha': 0.05, 'guided': guided,
      'path': 'unet' if guided else '-', 'scale': scale, 'fd': m(fd), 'fcd': m(1.0),
      'guide_hit_rate': m(0.9)}
  summary = [entry('4:1', 0.0, 0.6, False), entry('9:1', 0.0, 0.7, False),
             entry('4:1', 8.0, 0.02), entry('9:1', 8.0, 0.1), entry('9:1', 32.0, 0.01)]
  S.make_plots(summary, str(tmp_path))
  xs, series = seen['guided_fd_vs_scale.png']
  assert xs == [0.0, 8.0, 32.0] and set(series) == {'train 4:1, alpha 0.05', 'train 9:1, alpha 0.05'}
  ys = series['train 4:1, alpha 0.05'][0]
  assert ys[:2].tolist() == [0.6, 0.02] and np.isnan(ys[2])
