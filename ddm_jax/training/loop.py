"""The training loop: config -> data -> compiled step -> checkpoints, metrics, sample grids."""
import itertools
import json
import os
import sys
import time

import jax
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from ddm_jax import data as data_lib
from ddm_jax import parallel
from ddm_jax.config import validate
from ddm_jax.ddm import build_ddm
from ddm_jax.errors import DDMError
from ddm_jax.files import write_json
from ddm_jax.generation.generator import generate, make_generator
from ddm_jax.images import save_grid
from ddm_jax.training.checkpoint import Checkpointer, check_compatible, config_to_json
from ddm_jax.training.setup import TrainSetup


class NonFiniteError(DDMError):
  pass


class MetricsWriter:
  """metrics.jsonl (one object per logged step) + TensorBoard events, process 0 only."""

  def __init__(self, workdir, enabled):
    self.enabled, self.workdir, self.tb = enabled, workdir, None
    if enabled:
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')

  def write(self, step, metrics):
    if not self.enabled:
      return
    if self.tb is None:   # made at the first row: no import cost before the first step
      self.tb = summary_writer(os.path.join(self.workdir, 'tensorboard'))
    row = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    self.jsonl.write(json.dumps(row) + '\n')
    self.jsonl.flush()
    for k, v in row.items():
      if k != 'step':
        self.tb.add_scalar(f'train/{k}', v, step)

  def close(self):
    if self.enabled:
      self.jsonl.close()
      if self.tb is not None:
        self.tb.close()


def summary_writer(logdir):
  """tensorboardX's SummaryWriter. tensorboardX imports torch when it is installed (seconds
  of a start-up, `python -X importtime`) only to accept torch tensors; we log floats, so torch
  is hidden from that import unless something has imported it already."""
  hide = 'torch' not in sys.modules
  if hide:
    sys.modules['torch'] = None   # `import torch` raises ImportError
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if hide:
      del sys.modules['torch']
  return SummaryWriter(logdir)


def train(config, workdir, should_stop=lambda: False, progress=True):
  """Train (or resume) a DDM in `workdir`. Returns the final TrainState.

  `should_stop()` is polled after every step (SIGTERM): the run then checkpoints and returns.
  """
  validate(config)
  parallel.maybe_initialize_distributed(config.train.distributed)
  local_batch = parallel.check_batch_divides(config.train.batch_size)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  data_dir = data_lib.resolve_data_dir(config.data, workdir)
  if is_main:
    data_lib.prepare(config.data, data_dir)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('data prepared')
  ddm = build_ddm(config)
  iterator = data_lib.make_iterator(config.data, data_dir, config.data.split, local_batch,
                                    seed=config.data.shuffle_seed,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    extra_fn=ddm.host_features)
  num_steps = config.train.num_steps
  setup = TrainSetup(ddm, config)
  mesh = setup.mesh

  ckpt = Checkpointer(workdir, keep=config.train.keep_checkpoints)
  ckpt.check_writable()  # fail now, not at the first checkpoint hours later
  # The newest checkpoint that restores and matches its checksums; damaged ones are moved aside.
  start, state, it_state = ckpt.restore_latest(
      setup.target, check_config=lambda saved: check_compatible(saved, config, workdir))
  if start is not None:
    iterator.set_state(it_state)
    if is_main:
      print(f'resumed from {ckpt.directory}/{start}', flush=True)
  else:
    start = 0
    init_from = config.train.get('init_from', '')
    if init_from:  # a new run only: a resumed one restores its own checkpoint
      state, info = setup.init_state_from(init_from)
      if is_main:
        write_json(os.path.join(workdir, 'init_from.json'), info)
        print(f"init_from {info['base']} (step {info['step']}, {info['source']}): copied "
              f"{info['copied']} UNet leaves, kept {len(info['kept'])} fresh "
              f"({', '.join(info['kept']) or 'none'}), {len(info['unused'])} base leaves unused",
              flush=True)
    else:
      state = setup.init_state()
    if is_main:
      write_json(os.path.join(workdir, 'config.json'), config_to_json(config))

  frozen = setup.frozen()
  step_fn = setup.step_fn()
  writer = MetricsWriter(workdir, is_main)
  sample_gen = None
  skip_nonfinite = config.train.get('skip_nonfinite', False)

  def check_finite():
    count = int(jax.device_get(state.nonfinite_count))
    if count and not skip_nonfinite:
      first = int(jax.device_get(state.first_nonfinite_step))
      raise NonFiniteError(
          f'non-finite loss or gradient at step {first + 1} ({count} such steps so far); '
          f'stopped without writing a checkpoint (set config.train.skip_nonfinite=True to skip them)')

  def save(step):
    check_finite()
    ckpt.save(step, state, config, iterator.get_state())

  batches = (parallel.global_batch(mesh, b) for b in iterator)
  if start < num_steps:  # compiled before its first run; with many hosts they meet first
    first = next(batches)
    step_fn = parallel.compile_and_meet(step_fn, state, first, frozen, setup.hyper,
                                        name='train step')
    batches = itertools.chain([first], batches)
  multi = jax.process_count() > 1
  pbar = tqdm(total=num_steps, initial=start, disable=not (progress and is_main),
              desc='train', dynamic_ncols=True)
  t_last, s_last = time.time(), start
  step = start
  try:
    for step in range(start + 1, num_steps + 1):
      state, metrics = step_fn(state, next(batches), frozen, setup.hyper)
      pbar.update(1)
      if step % config.train.log_every == 0 or step == num_steps:
        m = parallel.to_host(metrics)
        now = time.time()
        m['steps_per_sec'] = (step - s_last) / max(now - t_last, 1e-9)
        m['nonfinite_count'] = int(jax.device_get(state.nonfinite_count))
        t_last, s_last = now, step
        writer.write(step, m)
        pbar.set_postfix(loss=f"{m['loss']:.4f}", rec=f"{m['loss_rec']:.4f}",
                         ind=f"{m['loss_ind']:.3f}", acc=f"{m['indicator_acc']:.2f}",
                         it_s=f"{m['steps_per_sec']:.1f}")
        check_finite()
        ckpt.check()  # a failed background checkpoint write stops the run here
      if config.train.sample_every and step % config.train.sample_every == 0:
        if sample_gen is None:
          sampler = config.sample.sampler
          sample_gen = make_generator(ddm, mesh, sampler, config.sample.steps, config.sample.eta,
                                      **ddm.sampler_kwargs(sampler))
        imgs = generate(sample_gen, state.sample_params, frozen, config.train.num_sample_images,
                        jax.random.key(config.train.seed), config.train.num_sample_images,
                        progress=False)
        if is_main:
          save_grid(os.path.join(workdir, 'samples', f'step_{step:07d}.png'), imgs)
      if step % config.train.checkpoint_every == 0 or step == num_steps:
        save(step)
      # Every host must stop at the same step: with several, they agree at the logging
      # steps (a collective), so a SIGTERM on one host stops all within log_every steps.
      if ((not multi or step % config.train.log_every == 0 or step == num_steps)
          and parallel.any_process(should_stop())):
        if is_main:
          print(f'\nstop requested: checkpointing step {step} and exiting', flush=True)
        if step % config.train.checkpoint_every and step != num_steps:
          save(step)
        break
  finally:
    pbar.close()
    writer.close()
    ckpt.close()  # waits for the last write: CheckpointError if it failed
  return state

