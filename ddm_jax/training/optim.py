"""Optax optimizer from `config.optim`: clipping, AdamW, lr schedule, accumulation."""
import jax
import optax


def lr_schedule(optim_cfg, num_updates, lr=None):
  """`lr`: the peak learning rate, default optim.lr (the train step passes its argument)."""
  lr, warm = optim_cfg.lr if lr is None else lr, optim_cfg.warmup_steps
  if optim_cfg.schedule == 'constant':
    return optax.constant_schedule(lr)
  if optim_cfg.schedule == 'warmup':
    return optax.join_schedules([optax.linear_schedule(0.0, lr, max(warm, 1)),
                                 optax.constant_schedule(lr)], [max(warm, 1)])
  if optim_cfg.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 1), max(num_updates, warm + 1))
  raise ValueError(f'unknown lr schedule {optim_cfg.schedule!r}')


# train.trainable -> the subtrees of params the optimizer updates (None: all of them)
TRAINED = {'all': None, 'indicator': ('indicator',), 'lora': ('unet_lora', 'indicator')}


def trained_subtrees(trainable='all'):
  if trainable not in TRAINED:
    raise ValueError(f'unknown train.trainable {trainable!r}')
  return TRAINED[trainable]


def trainable_labels(params, trainable='all'):
  """'train' or 'freeze' for every leaf of `params` under config train.trainable: with
  'indicator', only params['indicator'] is trained; with 'lora', the UNet's LoRA adapters
  and the indicator (the UNet itself stays as it was)."""
  keys = trained_subtrees(trainable)
  if keys is None:
    return jax.tree_util.tree_map(lambda _: 'train', params)
  return {k: jax.tree_util.tree_map(lambda _, k=k: 'train' if k in keys else 'freeze', v)
          for k, v in params.items()}


def make_optimizer(optim_cfg, num_steps, trainable='all', lr=None):
  """`num_steps` counts micro-batches; with grad_accum = k the schedule sees
  num_steps // k updates, and optax.MultiSteps applies one every k steps.
  `trainable` (train.trainable): 'indicator' updates params['indicator'] only, 'lora'
  params['unet_lora'] and params['indicator']; the rest gets zero updates and keeps no
  optimizer state (the train step also keeps those leaves and their EMA exactly as they
  were). `lr` overrides optim.lr (a traced value in the train step: the optimizer state's
  structure does not depend on it)."""
  k = optim_cfg.grad_accum
  clip = {'value': lambda: [optax.clip(optim_cfg.clip_value)],   # the reference's clip_grad_value_
          'norm': lambda: [optax.clip_by_global_norm(optim_cfg.clip_value)],
          'none': lambda: []}[optim_cfg.clip]()
  tx = optax.chain(*clip, optax.adamw(lr_schedule(optim_cfg, max(num_steps // k, 1), lr),
                                      b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                                      weight_decay=optim_cfg.weight_decay))
  if trainable != 'all':
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()},
                               lambda params: trainable_labels(params, trainable))
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx
