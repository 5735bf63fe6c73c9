"""Scoring: fairness and quality figures of generated images, and the indicator's own
entropy and accuracy on real images noised at random timesteps."""
import math

import jax
import jax.numpy as jnp
import numpy as np

from ddm_jax import trace_cache
from ddm_jax.config import program_config
from ddm_jax.diffusion.schedules import add_noise
from ddm_jax.evaluation import classifier, fairness, quality
from ddm_jax.evaluation.context import arch_key
from ddm_jax.objective import predicted_noise

_ENTROPY_FNS = {}   # (arch_key, argument shapes) -> the compiled logits program


def _entropy_program(config, ddm, args):
  """The indicator's logits on noised real images, compiled once per process and model
  architecture, through the trace cache (tracing it anew was a large part of a warm
  evaluate.py's start)."""
  sig = (arch_key(config), str(jax.tree_util.tree_map(lambda a: (np.shape(a), str(a.dtype)),
                                                      args[2:])))
  if sig not in _ENTROPY_FNS:
    def fn(params, frozen, batch, t, key_data):
      k_batch, k_noise = jax.random.split(jax.random.wrap_key_data(key_data))
      x0, _, cond = ddm.prepare_batch(frozen, batch, k_batch)
      noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
      x_t = add_noise(ddm.sched, x0, noise, t)
      out = ddm.model_fn(params, frozen, x_t, t, **cond)
      return ddm.indicator_fn(params, predicted_noise(ddm.sched, out, x_t, t), x_t, t)

    # replicated where the weights are (load_trained: over the mesh)
    where = jax.tree_util.tree_leaves(args[0])[0].sharding
    _ENTROPY_FNS[sig] = trace_cache.compile(
        trace_cache.jit(fn, trace_cache.describe('indicator entropy', program_config(config)),
                        in_shardings=where, out_shardings=where), *args)
  return _ENTROPY_FNS[sig]


def indicator_stats(config, ddm, params, frozen, images, labels, num, seed=0, batch_size=500):
  """Entropy (mean, std) and accuracy of the indicator's softmax on real images noised
  at uniformly random timesteps and passed through the UNet (as the reference code
  evaluates); accuracy also per quarter of the timestep range. Batches go through the
  model's own preparation (`host_features`, `prepare_batch`: for Stable Diffusion the
  prompt's tokens and the VAE), and the indicator reads the predicted noise as in training
  (or x_t and t, for an indicator with input 'x_t')."""
  n = min(int(num), len(labels))
  rng = np.random.default_rng(seed)
  idx = rng.permutation(len(labels))[:n]
  x, y = images[idx], np.asarray(labels)[idx].astype(np.int32)
  T = int(ddm.sched.num_train_timesteps)
  ts = rng.integers(0, T, size=n).astype(np.int32)
  # The real images carry no prompts here: host_features gives each the config's prompt.
  batch = _stack([{'image': x[i], 'label': y[i], **ddm.host_features({'label': y[i]})}
                  for i in range(n)])
  bs = max(1, min(batch_size, n))
  logits = []
  for i, start in enumerate(range(0, n, bs)):
    m = min(bs, n - start)
    pad = lambda a: np.concatenate([a, np.repeat(a[:1], bs - m, axis=0)]) if m < bs else a
    part = {k: pad(v[start:start + m]) for k, v in batch.items()}
    args = (params, frozen, part, pad(ts[start:start + m]),
            np.asarray(jax.random.key_data(jax.random.fold_in(jax.random.key(seed), i))))
    out = _entropy_program(config, ddm, args)(*args)
    logits.append(np.asarray(out, np.float64)[:m])
  logits = np.concatenate(logits)
  mean, std = fairness.entropy_stats(logits)
  ok = logits.argmax(1) == y
  quarters = [float(ok[(ts >= q * T // 4) & (ts < (q + 1) * T // 4)].mean())
              if np.any((ts >= q * T // 4) & (ts < (q + 1) * T // 4)) else float('nan')
              for q in range(4)]
  return {'entropy_mean': mean, 'entropy_std': std, 'max_entropy': math.log(logits.shape[1]),
          'accuracy': float(ok.mean()), 'accuracy_by_t_quarter': quarters, 'n': int(n)}


def _stack(examples):
  """[{key: array}] -> {key: stacked array}."""
  return {k: np.stack([np.asarray(e[k]) for e in examples]) for k in examples[0]}


def score(ctx, images, cond_labels=None, guide_labels=None):
  """Fairness and quality figures of generated ``images`` (NHWC in [-1, 1])."""
  s = ctx.settings
  logits, all_feats = classifier.logits_and_features(ctx.evaluator, images, 500)
  all_pred = logits.argmax(1).astype(np.int64)
  k = ctx.num_groups
  # Samples that belong to no group (off target: e.g. a 7 from a 0-vs-1 model fine-tuned
  # from an all-digits base) are marked -1 and left out of the fairness figures, where the
  # group evaluator would count each as some group; `off_target` reports their share.
  on = np.ones(all_pred.size, bool)
  if getattr(ctx, 'digit_evaluator', None) is not None:
    digit = classifier.logits_and_features(ctx.digit_evaluator, images, 500)[0].argmax(1)
    on = ctx.group_of_class[digit] >= 0
    all_pred = np.where(on, all_pred, -1)
  pred = all_pred[on]
  p_hat = fairness.proportions(pred, k)
  lo, hi = fairness.bootstrap_ci(pred, k, n_boot=s.n_boot, seed=s.seed)
  fair = {'n': int(pred.size), 'off_target': float(1.0 - on.mean()),
          'proportions': p_hat.tolist(), 'ci95_lo': lo.tolist(),
          'ci95_hi': hi.tolist(), 'target': ctx.target.tolist(),
          'fd': fairness.fairness_discrepancy(p_hat, ctx.target),
          'fd_uniform': fairness.fairness_discrepancy(p_hat),
          'kl': fairness.kl_divergence(p_hat, ctx.target)}
  if k == 2:
    fair['fd_paper'] = fairness.fd_paper_form(p_hat)
  # FD's own sampling noise: the bootstrap spread of FD itself.
  rng = np.random.default_rng(s.seed)
  boot = rng.multinomial(pred.size, p_hat, size=s.n_boot) / pred.size
  fds = np.linalg.norm(boot - ctx.target[None], axis=1)
  fair['fd_ci95'] = [float(np.percentile(fds, 2.5)), float(np.percentile(fds, 97.5))]
  if cond_labels is not None:  # hit rates per conditioned group; off target = a miss
    rates, spd = fairness.statistical_parity_difference(cond_labels, all_pred, k)
    fair['spd'] = spd
    fair['conditioned_hit_rates'] = rates.tolist()
  if guide_labels is not None:  # an off-target sample misses its assigned group
    fair['guide_hit_rate'] = float(np.mean(all_pred == np.asarray(guide_labels)))

  # Quality over every sample: an off-target one is a failure of quality, not left out.
  feats = all_feats
  qual = {'fcd': quality.frechet_distance_from_features(ctx.ref_feats, feats),
          'fcd_vs_train': quality.frechet_distance_from_features(ctx.train_feats, feats),
          'noise_floor_fcd': ctx.noise_floor['fd']}
  within = {}
  for g in range(k):
    fg, rg = feats[all_pred == g], ctx.ref_feats[ctx.ref_labels == g]
    within[str(g)] = (quality.frechet_distance_from_features(rg, fg)
                      if fg.shape[0] >= 2 and rg.shape[0] >= 2 else None)
  qual['fcd_within_group'] = within
  vals = [v for v in within.values() if v is not None]
  qual['fcd_within_group_mean'] = float(np.mean(vals)) if len(vals) == k else None
  prec, rec = quality.precision_recall(ctx.ref_feats, feats, k=s.knn_k)
  qual.update(precision=prec, recall=rec, noise_floor_precision=ctx.noise_floor['precision'],
              noise_floor_recall=ctx.noise_floor['recall'], knn_k=s.knn_k)
  qual['off_target'] = fair['off_target']
  # Per group at one sample size (quality_n), from the features above: each group's first
  # samples in generation order (off target, -1, in none), with real-vs-real floors drawn
  # from the generator-side pool (ctx.pool_split).
  qual['equal_n'] = quality.equal_n_quality(feats, all_pred, ctx.ref_feats, ctx.ref_labels,
                                            ctx.pool_feats, ctx.pool_labels, k, s.quality_n,
                                            seed=s.seed)
  return {'fairness': fair, 'quality': qual}, all_pred
