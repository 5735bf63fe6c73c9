"""What alpha means: how hard DDM's indicator term pulls on the UNet when a fine-tune
starts, for the reference's indicator init (PyTorch's nn.Linear) and Flax's default.

For each init and seed, on one training batch of a regime fine-tune (the base UNet, a
fresh indicator, the cell's biased training split, noised at random timesteps): the std
of the indicator's initial logits, and `objective.indicator_pull`, |d(w_ind CE)/d eps_pred| / |d(w_rec MSE)/d eps_pred|
at w_ind = alpha, w_rec = 1 - alpha (the metric `ind_grad_ratio` of every training run).

python benchmarks/indicator_pull.py --base=sweeps/regime_full/base --pair 0/1 --ratio 4:1 \
    --alpha 0.05 --seeds 0,1,2,3,4,5,6,7
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ddm_jax.config import load_config_file  # noqa: E402
from ddm_jax.data.builders import digits_splits, load_sklearn_digits  # noqa: E402
from ddm_jax.data.preprocessing import to_model_image  # noqa: E402
from ddm_jax.ddm import PixelDDM  # noqa: E402
from ddm_jax.diffusion.schedules import add_noise  # noqa: E402
from ddm_jax.experiments.regime.plan import finetune_config, parse_pair, parse_ratio  # noqa: E402
from ddm_jax.objective import ddm_loss  # noqa: E402
from ddm_jax.training.setup import load_base_unet  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def training_batch(config, seed, size):
  """`size` images of the cell's biased training split (its seed's subsample), in
  [-1, 1], and their group labels."""
  images, digits = load_sklearn_digits()
  groups = config.data.groups
  rows = digits_splits(digits, groups, config.data.proportions, seed)['train']
  rows = np.random.default_rng(seed).permutation(rows)[:size]
  group_of = {d: g for g, ds in enumerate(groups) for d in ds}
  x = np.stack([to_model_image(images[r], config.data.resolution, config.data.channels)
                for r in rows])
  return jnp.asarray(x, jnp.float32), jnp.asarray([group_of[int(digits[r])] for r in rows])


def measure(base, pair, ratio, alpha, seed, init, batch_size):
  cfg = finetune_config(load_config_file(os.path.join(CONFIGS, 'digits_base.py')), pair, ratio,
                        seed, 3e-4, 150, 'ddm', base, alpha=alpha)
  cfg.indicator.init = init
  ddm = PixelDDM(cfg)
  params = ddm.init(jax.random.key(seed))
  params['unet'] = load_base_unet(base)[0]
  x0, labels = training_batch(cfg, seed, batch_size)
  model_fn = lambda p, x_t, t: ddm.model_fn(p, {}, x_t, t)
  _, m = jax.jit(lambda p, k: ddm_loss(model_fn, ddm.indicator_fn, p, x0, labels, k, ddm.sched,
                                       1.0 - alpha, alpha))(params, jax.random.key(seed))
  k_t, k_n = jax.random.split(jax.random.key(seed + 1000))
  t = jax.random.randint(k_t, (x0.shape[0],), 0, ddm.sched.num_train_timesteps)
  x_t = add_noise(ddm.sched, x0, jax.random.normal(k_n, x0.shape), t)
  logits = ddm.indicator_fn(params, model_fn(params, x_t, t), x_t, t)
  return {'init': init, 'seed': seed, 'logit_std': float(jnp.std(logits)),
          'ind_grad_ratio': float(m['ind_grad_ratio']), 'loss_ind': float(m['loss_ind'])}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--base', required=True, help='the regime base workdir (its base/ folder)')
  p.add_argument('--pair', default='0/1', help='the digit groups, e.g. 0/1')
  p.add_argument('--ratio', default='4:1', help='the training ratio, e.g. 4:1')
  p.add_argument('--alpha', type=float, default=0.05, help='w_ind (w_rec = 1 - alpha)')
  p.add_argument('--seeds', default='0,1,2,3', help='seeds: indicator init, subsample, draws')
  p.add_argument('--batch', type=int, default=64, help='training batch size (the regime: 64)')
  args = p.parse_args(argv)
  parse_ratio(args.ratio, len(parse_pair(args.pair)))
  rows = [measure(args.base, args.pair, args.ratio, args.alpha, int(s), init, args.batch)
          for init in ('torch', 'flax') for s in args.seeds.split(',')]
  for row in rows:
    print(json.dumps(row))
  summary = {}
  for init in ('torch', 'flax'):
    sel = [r for r in rows if r['init'] == init]
    summary[init] = {k: (float(np.mean([r[k] for r in sel])), float(np.std([r[k] for r in sel])))
                     for k in ('logit_std', 'ind_grad_ratio')}
  print(json.dumps({'summary': summary, 'pair': args.pair, 'ratio': args.ratio,
                    'alpha': args.alpha, 'ratio_flax_over_torch': {
                        k: summary['flax'][k][0] / summary['torch'][k][0]
                        for k in ('logit_std', 'ind_grad_ratio')}}))
  return rows


if __name__ == '__main__':
  main()
