"""Optax optimizer from `config.optim`: clipping, AdamW, lr schedule, accumulation."""
import jax
import optax


def lr_schedule(optim_cfg, num_updates):
  lr, warm = optim_cfg.lr, optim_cfg.warmup_steps
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if optim_cfg.schedule == 'warmup':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.constant_schedule(lr)], [max(warm, 1)])
  if optim_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(num_updates, warm + 1))
  raise ValueError(f'unknown lr schedule {optim_cfg.schedule!r}')


def trainable_labels(params, trainable='all'):
  """'train' or 'freeze' for every leaf of `params` under config train.trainable: with
  'indicator', only the subtree params['indicator'] is trained."""
  if trainable == 'all':
    return jax.tree_util.tree_map(lambda _: 'train', params)
  if trainable == 'indicator':
    return {k: jax.tree_util.tree_map(lambda _, k=k: 'train' if k == 'indicator' else 'freeze', v)
            for k, v in params.items()}
  raise ValueError(f'unknown train.trainable {trainable!r}')


def make_optimizer(optim_cfg, num_steps, trainable='all'):
  """`num_steps` counts micro-batches; with grad_accum = k the schedule sees
  num_steps // k updates, and optax.MultiSteps applies one every k steps.
  `trainable` (train.trainable): 'indicator' updates params['indicator'] only; the rest
  gets zero updates and keeps no optimizer state (the train step also keeps those
  leaves and their EMA exactly as they were)."""
  k = optim_cfg.grad_accum
  clip = {'value': lambda: [optax.clip(optim_cfg.clip_value)],   # the reference's clip_grad_value_
          'norm': lambda: [optax.clip_by_global_norm(optim_cfg.clip_value)],
          'none': lambda: []}[optim_cfg.clip]()
  tx = optax.chain(*clip, optax.adamw(lr_schedule(optim_cfg, max(num_steps // k, 1)),
                                      b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                      weight_decay=optim_cfg.weight_decay))
  if trainable != 'all':
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx
