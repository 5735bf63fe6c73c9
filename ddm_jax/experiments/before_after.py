"""The demo's point in one picture: the same trained DDM sampled unguided and with its
indicator guidance toward a uniform mix, each grid labelled with its FD and group shares as
the evaluator measures them, beside the training split's shares (unguided DDM sampling need
not reproduce them)."""
import os

import numpy as np

from ddm_jax.evaluation import plots
from ddm_jax.evaluation.context import EvalSettings
from ddm_jax.evaluation.report import check_settings
from ddm_jax.experiments.cells import Evaluations
from ddm_jax.images import make_grid
from ddm_jax.training.setup import load_trained


def before_after(workdir, scale, num_samples=256, seed=0, out=None, show=64, steps=25,
                 evaluate=None, log=print):
  """Evaluates `workdir` unguided and guided at `scale`; writes the side-by-side picture
  (default <workdir>/before_after.png) and returns (path, [report unguided, report guided]).
  Both halves are checked before either is sampled, so a model that cannot be guided
  leaves no unguided half behind. `evaluate`: an `experiments.cells.Evaluations`."""
  evaluate = evaluate or Evaluations()
  out = out or os.path.join(workdir, 'before_after.png')
  halves = [(s, EvalSettings(num_samples=num_samples, seed=seed, sampler='ddim', steps=steps,
                             eta=1.0, guidance='none' if s is None else 'indicator',
                             guidance_scale=s or 0.0))
            for s in (None, float(scale))]
  trained = load_trained(workdir)
  for _, settings in halves:  # both halves can run (w_ind > 0, ...) before either writes
    check_settings(trained, settings.validate())
  train = ', '.join(f'{p:.2f}' for p in training_shares(trained.config.data))
  if train:
    log(f'training split: group shares ({train})')
  reports, grids, titles = [], [], []
  for s, settings in halves:
    out_dir = os.path.join(workdir, 'eval', 'before_after', 'unguided' if s is None else f'S{s:g}')
    rep = evaluate(workdir, settings, out_dir, with_indicator=False, trained=trained)
    with np.load(os.path.join(out_dir, 'samples.npz')) as z:
      images = z['images'][:show].astype(np.float32) / 127.5 - 1.0
    f = rep['fairness']
    shares = ', '.join(f'{p:.2f}' for p in f['proportions'])
    name = 'DDM, unguided' if s is None else f'DDM + indicator guidance, S = {s:g}'
    titles.append(f"{name}\nFD {f['fd']:.3f}, group shares ({shares})"
                  + (f'\ntraining split: ({train})' if train else ''))
    grids.append(make_grid(images, pad=1))
    reports.append(rep)
    log(f"{name}: FD {f['fd']:.4f}, group shares ({shares}), {num_samples} samples")
  plots.save_side_by_side(out, grids, titles)
  log(f'picture: {out}')
  return out, reports


def training_shares(data_cfg):
  """The group shares the model was trained at, where the config states them
  (biased_digits' proportions, a generic data set's group_ratio); () where it does not."""
  ratio = tuple(data_cfg.get('proportions') or ()) if data_cfg.get('name') == 'biased_digits' \
      else tuple(data_cfg.get('group_ratio') or ())
  total = float(sum(ratio)) if ratio else 0.0
  return tuple(float(r) / total for r in ratio) if total > 0 else ()
