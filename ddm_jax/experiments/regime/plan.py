"""What the paper-regime experiment runs: the grid, the models each cell trains and the
evaluations each method makes.

One base UNet is pretrained on all ten digits (balanced; `configs/digits_base.py`) and
cached; every model of every cell is a short, constant-lr fine-tune of it on a biased
group split (`pair` x `ratio` x `seed`; the seed varies the data subsample, its order and
the initialisation). Methods, all from the same base, data and fine-tune length:

- `plain`      (a) fine-tune with alpha = 0, sampled unguided;
- `ddm`        DDM, w_ind = alpha, w_rec = 1 - alpha, sampled unguided (one per alpha);
- `classifier` (b) the plain model guided by a separately trained noise-aware classifier
               (indicator network reading x_t and t, trained on the frozen plain UNet's inputs);
- `posthoc`    (c) the plain model guided by a post-hoc indicator (DDM's network, reading the
               frozen plain UNet's predicted noise: DDM without the joint gradient);
- `reweight`   (d) alpha = 0 with the denoising loss reweighted by inverse group frequency;
- `cond`       (e) a group-conditioned UNet sampled balanced: the upper bound that needs the
               label at sampling time;
- `ddm+guide`  DDM guided by its own indicator (one per guided alpha);
- `M:variant`  guided method M with a guidance variant (`generation.guidance.VARIANTS`:
               norm, early, stop), e.g. `classifier:stop`: a method of its own, with its
               own scale picked by the same rule, plotted against plain M.

Guided methods are run at every scale of `scales` on the dev seeds; the selection rule
(`select_scale`) picks one scale per (method, pair, ratio) from the dev rows, and the test
seeds are run at that scale (and at every scale when `test_all_scales`).
"""
import copy
import dataclasses
import math
from typing import Tuple

import ml_collections

from ddm_jax.errors import ConfigError
from ddm_jax.generation.guidance import VARIANTS

GUIDED = ('classifier', 'posthoc', 'ddm+guide')
UNGUIDED = ('plain', 'ddm', 'reweight', 'cond')


@dataclasses.dataclass
class RegimePlan:
  pairs: Tuple[str, ...] = ('0/1', '7/8')        # groups: one digit each ('0/1/2' for K = 3)
  ratios: Tuple[str, ...] = ('4:1', '9:1')       # group 0 : group 1 (: ...) of the training split
  # DDM indicator weights (0 = the plain arm); the official entropy script loads 0.005, 0.01
  alphas: Tuple[float, ...] = (0.0, 0.005, 0.01, 0.05, 0.1)
  guided_alphas: Tuple[float, ...] = (0.05,)
  methods: Tuple[str, ...] = ('plain', 'ddm', 'reweight', 'cond', 'posthoc', 'classifier',
                              'ddm+guide', 'classifier:norm', 'classifier:early',
                              'classifier:stop')
  dev_seeds: Tuple[int, ...] = (0,)
  test_seeds: Tuple[int, ...] = (1, 2)
  scales: Tuple[float, ...] = (4.0, 8.0, 16.0, 32.0)
  test_all_scales: bool = False
  fd_target: float = 0.05              # selection rule: smallest dev scale with FD <= this
  base_steps: int = 1500
  finetune_steps: int = 150            # x batch 64 = 9.6k images (the reference: 4000 x 4 = 16k)
  lrs: Tuple[float, ...] = (1e-4, 3e-4, 1e-3)   # constant lr, picked on the dev cell
  lr: float = 0.0                      # > 0: use this lr, skip the selection
  num_samples: int = 400               # every test evaluation and every unguided one
  dev_num_samples: int = 200           # guided evaluations on the dev seeds (the scale sweep)
  sample_steps: int = 25
  eta: float = 1.0
  quality_n: int = 40                  # samples per group for the equal-n quality figures
  eval_batch: int = 500
  # LoRA instead of the full fine-tune (the reference: to_q, to_v, rank 8, alpha 32): the
  # UNet stays the base's, adapters on these Dense layers learn; () = full fine-tune
  lora_targets: Tuple[str, ...] = ()
  lora_rank: int = 8
  lora_alpha: float = 32.0


PRESETS = {
    'full': RegimePlan(),
    # Sized for <= 15 minutes on 2 CPU cores: one pair, one ratio, one dev and one test seed.
    'quick': RegimePlan(pairs=('0/1',), ratios=('4:1',), alphas=(0.0, 0.05),
                        methods=('plain', 'ddm', 'posthoc', 'ddm+guide'), test_seeds=(1,),
                        scales=(2.0, 8.0), base_steps=600, finetune_steps=150,
                        lrs=(), lr=3e-4, num_samples=400, dev_num_samples=200, quality_n=30),
}


def parse_pair(text):
  """'0/1' -> ((0,), (1,)); '0,6/1,7' -> ((0, 6), (1, 7)): the digits of each group."""
  try:
    groups = tuple(tuple(int(d) for d in g.split(',')) for g in str(text).split('/'))
  except ValueError:
    raise ConfigError(f'pair must look like 0/1 (or 0/1/2, 0,6/1,7), got {text!r}') from None
  flat = [d for g in groups for d in g]
  if len(groups) < 2 or len(set(flat)) != len(flat) or any(not 0 <= d <= 9 for d in flat):
    raise ConfigError(f'pair needs >= 2 groups of distinct digits 0..9, got {text!r}')
  return groups


def parse_ratio(text, num_groups):
  """'4:1' -> (0.8, 0.2); the number of parts must match the number of groups."""
  try:
    parts = [float(v) for v in str(text).split(':')]
  except ValueError:
    raise ConfigError(f'ratio must look like 4:1, got {text!r}') from None
  if len(parts) != num_groups or any(not p > 0 or math.isinf(p) for p in parts):
    raise ConfigError(f'ratio {text!r} needs {num_groups} positive parts (one per group)')
  return tuple(p / sum(parts) for p in parts)


def check(plan):
  """Fails on a bad grid before anything trains."""
  for pair in plan.pairs:
    k = len(parse_pair(pair))
    for ratio in plan.ratios:
      if len(str(ratio).split(':')) == k:
        parse_ratio(ratio, k)
  if not any(len(str(r).split(':')) == len(parse_pair(p)) for p in plan.pairs for r in plan.ratios):
    raise ConfigError('no ratio has as many parts as a pair has groups')
  unknown = [m for m in plan.methods if split_method(m)[0] not in UNGUIDED + GUIDED
             or split_method(m)[1] not in VARIANTS
             or (split_method(m)[0] in UNGUIDED and ':' in m)]
  if unknown:
    raise ConfigError(f'unknown methods {unknown}; known: {UNGUIDED + GUIDED}, and '
                      f"guided ones with a variant, e.g. classifier:{VARIANTS[-1]}")
  if ('ddm' in plan.methods or 'ddm+guide' in plan.methods) and not any(a > 0 for a in plan.alphas):
    raise ConfigError('the ddm methods need an alpha > 0 in alphas')
  if plan.lora_targets and 'cond' in plan.methods:
    raise ConfigError("method 'cond' learns a new class embedding, which a LoRA fine-tune "
                      'would leave untrained: run it without lora_targets')
  if not plan.lr and not plan.lrs:
    raise ConfigError('give lr, or lrs to select it from on the dev cell')
  if set(plan.dev_seeds) & set(plan.test_seeds):
    raise ConfigError(f'dev and test seeds overlap: {sorted(set(plan.dev_seeds) & set(plan.test_seeds))}')
  return plan


def sample_count(plan, method, pair, ratio, split, guided):
  """Samples of one evaluation: `dev_num_samples` for the dev seeds' scale sweep, else
  `num_samples`; but the plain model, every method's quality reference, draws enough that
  its rarest training group would hold 2 x `quality_n` (at 9:1 and n = 40: 800), so that
  its equal-n quality exists where the imbalance is strong."""
  if split == 'dev' and guided:
    return plan.dev_num_samples
  n = plan.num_samples
  if method == 'plain':
    rarest = min(parse_ratio(ratio, len(parse_pair(pair))))
    n = max(n, math.ceil(2 * plan.quality_n / rarest - 1e-9))
  return n


def split_method(method):
  """'classifier:stop' -> ('classifier', 'stop'); 'classifier' -> ('classifier', 'plain')."""
  base, _, variant = str(method).partition(':')
  return base, variant or 'plain'


def guided_runs(plan):
  """(method, alpha) of every guided method of the plan, in GUIDED order (a variant after
  its method); DDM + guide once per guided alpha > 0, the others at alpha 0."""
  out = []
  for m in sorted((m for m in plan.methods if split_method(m)[0] in GUIDED),
                  key=lambda m: (GUIDED.index(split_method(m)[0]), plan.methods.index(m))):
    if split_method(m)[0] == 'ddm+guide':
      out += [(m, a) for a in plan.guided_alphas if a > 0]
    else:
      out.append((m, 0.0))
  return out


def cells(plan):
  """(pair, ratio) combinations whose ratio has one part per group of the pair."""
  return [(p, r) for p in plan.pairs for r in plan.ratios
          if len(str(r).split(':')) == len(parse_pair(p))]


def inverse_frequency(shares):
  """Per-group loss weights 1 / (K p_g): the expected weight of a training sample is 1."""
  return tuple(1.0 / (len(shares) * s) for s in shares)


def base_config(base, steps):
  """The pretrained base: all ten digits, balanced, plain denoising (w_ind = 0)."""
  c = copy.deepcopy(base)
  c.train.num_steps = int(steps)
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, int(steps)))
  c.train.sample_every = 0
  return c


def finetune_config(base, pair, ratio, seed, lr, steps, model, base_workdir, plain_workdir=None,
                    alpha=0.0, lora=None):
  """The config of one fine-tuned model (`model` in plain/ddm/reweight/cond/posthoc/classifier);
  `lora` = (targets, rank, alpha): LoRA adapters instead of the full fine-tune (the guides
  then train on the plain model with its adapters merged)."""
  c = copy.deepcopy(base)
  groups = parse_pair(pair)
  shares = parse_ratio(ratio, len(groups))
  c.data.groups = groups
  c.data.num_groups = len(groups)
  c.data.proportions = shares
  c.data.shuffle_seed = int(seed)      # the subsample and its order
  c.train.seed = int(seed)             # init of the new parts, noise, timesteps
  c.train.num_steps = int(steps)
  c.train.checkpoint_every = int(steps)
  c.train.sample_every = 0
  c.train.ema_decay = 0.0              # the reference fine-tune keeps no EMA
  c.train.init_from = base_workdir
  c.optim.schedule = 'constant'
  c.optim.lr = float(lr)
  c.optim.clip, c.optim.clip_value = 'reference', 1.0   # the reference's clip_grad_value_(1.0)
  c.indicator.init = 'torch'           # the reference's nn.Linear init
  c.loss.w_ind, c.loss.w_rec = float(alpha), 1.0 - float(alpha)
  if model == 'reweight':
    c.loss.group_weights = inverse_frequency(shares)
  elif model == 'cond':
    c.model.num_class_embeds = len(groups)
  elif model in ('posthoc', 'classifier'):
    # The plain model's UNet, frozen; only the guide learns (w_rec 0: no denoising term).
    c.train.init_from = plain_workdir
    c.train.trainable = 'indicator'
    c.loss.w_ind, c.loss.w_rec = 1.0, 0.0
    if model == 'classifier':
      c.indicator.input = 'x_t'
  elif model != 'ddm' and model != 'plain':
    raise ConfigError(f'unknown model kind {model!r}')
  if lora and model in ('plain', 'ddm', 'reweight'):
    targets, rank, lora_alpha = lora
    c.lora = ml_collections.ConfigDict({'unet_targets': tuple(targets), 'unet_rank': int(rank),
                                        'unet_alpha': float(lora_alpha)})
    c.train.trainable = 'lora'
  return c


def model_name(model, alpha=0.0):
  return f'ddm_a{alpha:g}' if model == 'ddm' else model


def run_dir(pair, ratio, seed, name):
  return f"{pair.replace('/', '-').replace(',', '')}_r{ratio.replace(':', '-')}_s{seed}/{name}"


def eval_id(method, pair, ratio, seed, alpha=None, scale=None):
  """The key of one evaluation in the results file (what a resumed run skips)."""
  key = f'{method}/{pair}/r{ratio}/s{seed}'
  if alpha is not None:
    key += f'/a{alpha:g}'
  if scale is not None:
    key += f'/S{scale:g}'
  return key


def select_scale(rows, method, pair, ratio, alpha, scales, fd_target):
  """The selection rule, on the dev rows only: the smallest scale whose FD (mean over dev
  seeds) is <= fd_target; if none is, the scale with the lowest FD. None without rows."""
  fds = {}
  for s in scales:
    vals = [r['fd'] for r in rows if r['method'] == method and r['pair'] == pair
            and r['ratio'] == ratio and r.get('alpha') == alpha and r.get('scale') == s]
    if vals:
      fds[s] = sum(vals) / len(vals)
  if not fds:
    return None
  ok = [s for s in sorted(fds) if fds[s] <= fd_target]
  return ok[0] if ok else min(fds, key=lambda s: (fds[s], s))
