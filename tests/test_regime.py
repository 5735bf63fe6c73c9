"""The paper-regime experiment: model configs, the dev/test selection rule, resume, K >= 3,
and the published summary recomputed from its published rows."""
import glob
import json
import os

import numpy as np
import pytest

from configs import digits, digits_base
from ddm_jax.cli.regime import main as regime_main
from ddm_jax.errors import ConfigError
from ddm_jax.experiments import regime as R
from ddm_jax.config import validate
from ddm_jax.experiments.regime import plan as P

RESULTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'results')


def test_finetune_configs():
  base = digits.get_config()
  c = P.finetune_config(base, '7/8', '9:1', 3, 3e-4, 250, 'reweight', '/b')
  assert c.data.groups == ((7,), (8,)) and c.data.proportions == pytest.approx((0.9, 0.1))
  assert c.data.shuffle_seed == 3 and c.train.seed == 3     # subsample, order and init vary
  assert c.train.init_from == '/b' and c.optim.schedule == 'constant' and c.optim.lr == 3e-4
  assert c.loss.group_weights == pytest.approx((1 / 1.8, 1 / 0.2))
  # the reference's shape: clip by value 1.0 (its per-micro-step order), nn.Linear's init
  assert (c.optim.clip, c.optim.clip_value, c.indicator.init) == ('reference', 1.0, 'torch')
  assert np.dot(c.data.proportions, c.loss.group_weights) == pytest.approx(1.0)
  ph = P.finetune_config(base, '0/1', '4:1', 0, 1e-4, 10, 'classifier', '/b', plain_workdir='/p')
  assert ph.train.init_from == '/p' and ph.train.trainable == 'indicator'
  assert (ph.loss.w_rec, ph.loss.w_ind) == (0.0, 1.0) and ph.indicator.input == 'x_t'
  d = P.finetune_config(base, '0/1/2', '4:1:1', 0, 1e-4, 10, 'ddm', '/b', alpha=0.05)
  assert d.data.num_groups == 3 and (d.loss.w_rec, d.loss.w_ind) == pytest.approx((0.95, 0.05))
  assert P.finetune_config(base, '0/1', '1:1', 0, 1e-4, 10, 'cond', '/b').model.num_class_embeds == 2
  assert base.train.init_from == '' and base.loss.group_weights == ()   # left as it was
  lora = (('to_q', 'to_v'), 8, 32.0)                 # the reference's LoRA
  ld = P.finetune_config(base, '0/1', '4:1', 0, 1e-4, 10, 'ddm', '/b', alpha=0.05, lora=lora)
  assert ld.train.trainable == 'lora' and ld.lora.unet_targets == ('to_q', 'to_v')
  assert (ld.lora.unet_rank, ld.lora.unet_alpha) == (8, 32.0)
  validate(ld)
  lp = P.finetune_config(base, '0/1', '4:1', 0, 1e-4, 10, 'posthoc', '/b', '/p', lora=lora)
  assert 'lora' not in lp and lp.train.trainable == 'indicator'   # guides: on the merged UNet
  assert 'lora' not in base
  b = digits_base.get_config()
  assert b.data.num_groups == 10 and b.loss.w_ind == 0 and b.data.split == 'balanced'


@pytest.mark.parametrize('plan_kw', [dict(pairs=('0/0',)), dict(pairs=('0/1',), ratios=('4:0',)),
                                     dict(ratios=('4:1:1',)), dict(methods=('plain', 'magic')),
                                     dict(dev_seeds=(1,), test_seeds=(1,)), dict(lr=0.0, lrs=()),
                                     dict(lora_targets=('to_q',))])
def test_bad_plans_fail_before_training(plan_kw):
  with pytest.raises(ConfigError):
    P.check(R.RegimePlan(**plan_kw))


def test_selection_rule():
  rows = [dict(method='posthoc', pair='0/1', ratio='4:1', alpha=0.0, scale=s, fd=fd, split='dev')
          for s, fd in ((1.0, 0.3), (2.0, 0.04), (4.0, 0.01))]
  assert P.select_scale(rows, 'posthoc', '0/1', '4:1', 0.0, (1.0, 2.0, 4.0), 0.05) == 2.0
  assert P.select_scale(rows, 'posthoc', '0/1', '4:1', 0.0, (1.0, 2.0, 4.0), 0.005) == 4.0
  assert P.select_scale(rows, 'classifier', '0/1', '4:1', 0.0, (1.0,), 0.05) is None


class Fakes:
  """Training makes the folder; an evaluation's FD falls with the guidance scale, more for
  DDM than for the post-hoc guide, and differs per seed (so dev and test differ)."""

  def __init__(self, fail_after=None):
    self.trained, self.evaluated, self.fail_after = [], [], fail_after
    self.variants = set()

  def train(self, config, workdir):
    self.trained.append(os.path.relpath(workdir))
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'cfg.json'), 'w') as f:
      json.dump({'w_ind': config.loss.w_ind, 'k': config.data.num_groups,
                 'init_from': config.train.init_from}, f)

  def evaluate(self, workdir, settings, out_dir, with_indicator):
    if self.fail_after is not None and len(self.evaluated) >= self.fail_after:
      raise KeyboardInterrupt
    self.evaluated.append((workdir, settings.guidance_scale, settings.seed))
    with open(os.path.join(workdir, 'cfg.json')) as f:
      cfg = json.load(f)
    k = cfg['k']
    pull = 0.2 if 'ddm' in workdir else 0.1
    pull *= 0.5 if settings.guidance_variant == 'stop' else 1.0   # a gentler variant
    self.variants.add((os.path.basename(workdir), settings.guidance_variant))
    p0 = max(1.0 / k, 0.8 - pull * settings.guidance_scale - 0.01 * settings.seed)
    p = [p0] + [(1 - p0) / (k - 1)] * (k - 1)
    fd = float(np.linalg.norm(np.array(p) - 1.0 / k))
    return {'fairness': {'fd': fd, 'fd_paper': abs(p0 - 0.5) if k == 2 else None, 'kl': 0.0,
                         'fd_ci95': [fd * 0.9, fd * 1.1], 'proportions': p, 'ci95_lo': p,
                         'ci95_hi': p, 'guide_hit_rate': 0.9 if settings.guidance_scale else None},
            'quality': {'fcd': 1.0, 'fcd_vs_train': 1.0 + settings.seed, 'fcd_within_group_mean': 1.0,
                        'precision': 0.9, 'recall': 0.8, 'noise_floor_fcd': 0.5,
                        'noise_floor_precision': 0.9, 'noise_floor_recall': 0.9,
                        'equal_n': {'n': 5, 'group_counts': [5] * k, 'kid_mean': 1e-3,
                                    'kid_floor_mean': 1e-4, 'fcd_mean': 2.0 + settings.guidance_scale,
                                    'fcd_floor_mean': 1.0}},
            'indicator': {'entropy_mean': 0.4, 'accuracy': 0.7} if with_indicator else None,
            'data': {'train_proportions': [0.8] + [0.2 / (k - 1)] * (k - 1),
                     'evaluator': {'heldout_accuracy': 1.0}},
            'sampling': {'seconds': 0.0}, 'num_samples': settings.num_samples,
            'checkpoint_step': 1, 'workdir': workdir}


PLAN = dict(pairs=('0/1', '0/1/2'), ratios=('4:1', '4:1:1'), alphas=(0.0, 0.05),
            dev_seeds=(0,), test_seeds=(1, 2), scales=(1.0, 2.0, 4.0), base_steps=5,
            finetune_steps=5, lrs=(1e-4, 1e-3), num_samples=20, dev_num_samples=10, quality_n=5)


def _runner(tmp_path, fakes, **kw):
  return R.Runner(digits_base.get_config(), digits.get_config(), R.RegimePlan(**{**PLAN, **kw}),
                  str(tmp_path), log=lambda m: None, train_fn=fakes.train,
                  evaluate_fn=fakes.evaluate)


def test_dev_then_test_resume_and_summary(tmp_path):
  with pytest.raises(KeyboardInterrupt):
    _runner(tmp_path, Fakes(fail_after=9)).run()
  fakes = Fakes()
  runner = _runner(tmp_path, fakes)
  lr = runner.run()
  assert lr == 1e-4                                   # lowest FCD vs train on the dev cell
  assert len(fakes.evaluated) == len(runner.results.rows) - 9   # nothing evaluated twice
  assert len({r['id'] for r in runner.results.rows}) == len(runner.results.rows)
  # one base for everything, trained once; the post-hoc guide starts from the plain model
  assert fakes.trained.count(os.path.relpath(os.path.join(tmp_path, 'base'))) == 0
  # the dev cell's plain model at the chosen lr is the lr selection's: not trained again
  assert not os.path.exists(tmp_path / 'runs' / '0-1_r4-1_s0' / 'plain')
  assert 'lr_select' in next(r['workdir'] for r in runner.results.rows
                             if r['id'] == 'plain/0/1/r4:1/s0')
  rows = runner.results.rows
  chosen = R.selected_scales(rows, runner.plan)
  # the rule on the dev rows: ddm falls faster, so it needs a smaller scale
  assert chosen[('ddm+guide', '0/1', '4:1', 0.05)] == 2.0
  assert chosen[('posthoc', '0/1', '4:1', 0.0)] == 4.0
  # a guidance variant is a method of its own: the classifier model, its own scale
  assert chosen[('classifier', '0/1', '4:1', 0.0)] == 4.0
  assert chosen[('classifier:stop', '0/1', '4:1', 0.0)] == 4.0   # none meets 0.05: lowest FD
  assert {v for w, v in fakes.variants if w == 'classifier'} == {'plain', 'norm', 'early', 'stop'}
  assert {v for w, v in fakes.variants if w != 'classifier'} == {'plain'}
  test_scales = {r['scale'] for r in rows if r['split'] == 'test' and r['method'] == 'posthoc'
                 and r['pair'] == '0/1'}
  assert test_scales == {4.0}                         # test seeds: the selected scale only
  assert {r['pair'] for r in rows} >= {'0/1', '0/1/2'}   # K = 3 with the same commands
  # samples per evaluation: 20, 10 for the dev scale sweep; the plain model (the quality
  # reference) enough for 2 x quality_n in its rarest group: 2 * 5 / 0.2, 2 * 5 / (1 / 6)
  counts = {(r['method'], r['ratio'], r['split'], r['scale'] is None) for r in rows}
  for method, ratio, split, unguided in counts:
    want = {('plain', '4:1'): 50, ('plain', '4:1:1'): 60}.get(
        (method, ratio), 20 if unguided or split == 'test' else 10)
    assert {r['num_samples'] for r in rows if (r['method'], r['ratio'], r['split'],
                                               r['scale'] is None) == (method, ratio, split,
                                                                       unguided)} == {want}
  for r in rows:
    if r['method'] in ('posthoc', 'classifier'):
      with open(os.path.join(r['workdir'], 'cfg.json')) as f:
        assert f.read().count('plain') == 1           # init_from: the plain fine-tune
  # A later invocation on the same folder with other cells keeps the recorded lr choice.
  more = Fakes()
  assert _runner(tmp_path, more, pairs=('7/8',), ratios=('4:1',)).run() == lr
  assert more.trained and not any('lr_select' in w for w in more.trained)
  runner = _runner(tmp_path, Fakes())
  summary, md = R.write_summary(runner, 'unit', 1.0, lr, publish=str(tmp_path / 'pub'))
  assert 'Every method at its selected scale' in md and '0/1/2' in md
  _check_published(str(tmp_path / 'pub' / 'regime_unit.json'))
  assert glob.glob(str(tmp_path / 'pub' / 'regime_unit_fd_vs_quality_*.png'))
  assert 'Every model: a full fine-tune of it, 5 steps' in md
  lora = _runner(tmp_path, Fakes(), lora_targets=('to_q', 'to_v'), methods=('plain', 'ddm'))
  _, md = R.write_summary(lora, 'unit', 1.0, lr)
  assert 'Every model: LoRA (rank 8, alpha 32 on to_q, to_v) on it, 5 steps' in md


def test_a_wider_lr_grid_tries_the_new_lr_on_the_recorded_dev_cell(tmp_path):
  _runner(tmp_path, Fakes(), pairs=('0/1',), ratios=('4:1',), test_seeds=(), methods=('plain',)).run()
  fakes = Fakes()
  # another cell this time: the lr rule still runs on the folder's dev cell, 0/1 4:1 seed 0
  runner = _runner(tmp_path, fakes, pairs=('7/8',), ratios=('4:1',), test_seeds=(),
                   methods=('plain',), lrs=(1e-4, 1e-3, 3e-3))
  assert runner.learning_rate() == 1e-4              # fakes: every lr fits alike, the lowest
  assert fakes.trained == [os.path.relpath(tmp_path / 'lr_select' / 'lr0.003' / 'runs' /
                                           '0-1_r4-1_s0' / 'plain')]
  assert sorted(r['lr'] for r in runner.results.rows if r['method'] == 'lr') == [1e-4, 1e-3, 3e-3]


def test_a_changed_setting_does_not_reuse_trained_models(tmp_path):
  """Runs are named by cell and method only: a model trained under other settings (here
  the fine-tune length) is refused, not silently reused, also from an older marker that
  holds no config (then the workdir's config.json tells)."""
  one_cell = dict(pairs=('0/1',), ratios=('4:1',), dev_seeds=(), test_seeds=(1,), lr=1e-4,
                  methods=('plain',))
  _runner(tmp_path, Fakes(), **one_cell).run()
  marker = tmp_path / 'runs' / '0-1_r4-1_s1' / 'plain' / 'TRAINED'
  recorded = json.loads(marker.read_text())
  assert recorded['config']['train']['num_steps'] == 5
  assert _runner(tmp_path, Fakes(), **one_cell).run() == 1e-4       # same settings: reused
  for older in (False, True):
    if older:   # the marker format before it recorded the config
      marker.write_text(json.dumps({'seconds': recorded['seconds']}))
      (marker.parent / 'config.json').write_text(json.dumps(recorded['config']))
    fakes = Fakes()
    with pytest.raises(ConfigError, match=r'0-1_r4-1_s1/plain holds a model trained under '
                       r'another config \(train.num_steps 5 -> 6\)'):
      _runner(tmp_path, fakes, **one_cell, finetune_steps=6).run()
    assert fakes.trained == [] and fakes.evaluated == []


def _check_published(path):
  with open(path, encoding='utf-8') as f:
    published = json.load(f)
  with open(path.replace('.json', '_rows.jsonl'), encoding='utf-8') as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert published['summary'] == json.loads(json.dumps(R.summarize(rows)))
  plan = R.RegimePlan(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in published['meta']['plan'].items()})
  chosen = [{'method': k[0], 'pair': k[1], 'ratio': k[2], 'alpha': k[3], 'scale': v}
            for k, v in sorted(R.selected_scales(rows, plan).items())]
  assert published['selected_scales'] == chosen


@pytest.mark.parametrize('path', sorted(glob.glob(os.path.join(RESULTS, 'regime*.json'))))
def test_published_summary_matches_its_rows(path):
  _check_published(path)


def test_results_folder_has_a_published_regime_run():
  assert glob.glob(os.path.join(RESULTS, 'regime*.json')), 'run python -m ddm_jax.cli.regime --publish=results'


def test_cli_lists():
  from ddm_jax.cli.regime import parse_args
  args, _ = parse_args(['--pairs', '0/1;7,2/8', '--ratios', '4:1,9:1', '--scales', '4,8',
                        '--test_seeds', '1,2'])
  assert args.pairs == ('0/1', '7,2/8') and args.ratios == ('4:1', '9:1')
  assert args.scales == (4.0, 8.0) and args.test_seeds == (1, 2)


def test_cli_bad_input(tmp_path, capsys):
  assert regime_main(['--out', str(tmp_path / 'o'), '--pairs', '0/11']) != 0
  assert 'pair' in capsys.readouterr().err


def test_results_md_regime_tables_are_the_published_summary():
  """Every table row of RESULTS.md's A1 and A2 is a row of results/regime.md, the summary
  `test_published_summary_matches_its_rows` recomputes from its rows: the document cannot
  drift from what was measured."""
  root = os.path.dirname(RESULTS)
  with open(os.path.join(root, 'RESULTS.md'), encoding='utf-8') as f:
    text = f.read()
  section = text[text.index('### A1.'):text.index('### A3.')]
  rows = [line for line in section.splitlines()
          if line.startswith('| ') and not set(line) <= set('|- ')]
  with open(os.path.join(RESULTS, 'regime.md'), encoding='utf-8') as f:
    published = set(f.read().splitlines())
  assert len(rows) > 40
  assert [r for r in rows if r not in published] == []
