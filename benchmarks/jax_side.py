"""The JAX side: ddm_jax's own train step and compiled sampler on a preset.

The train step is the library's (`training.step.make_train_step` + `jit_train_step`
over a mesh, donated state, `training.optim.make_optimizer` with clip-by-value and
AdamW, `objective.ddm_loss`), fed through a DDM object whose `prepare_batch`
passes cached latents and a text embedding (the PyTorch reference gets the same).
LoRA goes through `LatentDDM.model_fn` itself (the UNet from the preset, no VAE or text
encoder). The state, shardings and step come from `training.setup.TrainSetup`.
Weights come from benchmarks/weights.py (numpy, identical to the PyTorch side).

Order (the process's peak memory, BENCHMARKS.md "Memory"): the step and the sampler are
compiled from shapes alone (`compile()`), and the weights are drawn after (`build()`, or
the first `step()` / `run()`), so XLA's compile-time peak never sits on top of them.
"""
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import inputs, memory, weights
from benchmarks.presets import LOSS, OPTIM, SCHEDULE
from ddm_jax import parallel
from ddm_jax.ddm import DDM, LatentDDM
from ddm_jax.diffusion import samplers
from ddm_jax.diffusion.schedules import make_schedule
from ddm_jax.interop.diffusers import expected_params, path_to_torch_key
from ddm_jax.models import lora as lora_lib
from ddm_jax.models.indicator import Indicator
from ddm_jax.models.unet import unet_from_config
from ddm_jax.hostmem import release_host_memory
from ddm_jax.training.setup import TrainSetup


def run_config(preset):
  """The ml_collections config the library's step and optimizer read."""
  c = ml_collections.ConfigDict()
  c.train = dict(seed=preset.seed, ema_decay=0.0, num_steps=1000)   # the reference keeps no EMA
  c.loss = dict(LOSS)
  c.optim = dict(lr=OPTIM['lr'], schedule='constant', warmup_steps=0, b1=OPTIM['b1'],
                 b2=OPTIM['b2'], eps=OPTIM['eps'], weight_decay=OPTIM['weight_decay'],
                 clip='value', clip_value=OPTIM['clip_value'], grad_accum=1)
  c.lora = dict(dropout=0.0)
  return c


def build_unet(preset, **overrides):
  return unet_from_config(dict(preset.unet), dtype=jnp.dtype(preset.dtype), **overrides)


def _unet_dummy(preset, unet):
  r, c = preset.latent, preset.unet.get('in_channels', 4)
  return (jnp.zeros((1, r, r, c)), jnp.zeros((1,)), jnp.zeros((1, 1, unet.cross_attention_dim)))


def unet_params(preset, unet, seed, dtype=np.float32, abstract=False):
  """The UNet's params from the shared numpy weights: flax path -> PyTorch key and layout
  (`abstract`: their jax.ShapeDtypeStructs, nothing drawn)."""
  flat = {}
  for path, leaf in expected_params(unet, *_unet_dummy(preset, unet)).items():
    if abstract:
      flat[path] = jax.ShapeDtypeStruct(leaf.shape, dtype)
      continue
    key = path_to_torch_key(path)
    array = weights.draw('unet', key, weights.flax_to_torch_shape(path[-1], leaf.shape), seed)
    flat[path] = jnp.asarray(np.ascontiguousarray(weights.torch_to_flax(array, path[-1])), dtype)
    del array
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  return traverse_util.unflatten_dict(flat)


def indicator_params(preset, seed, abstract=False):
  c = preset.unet.get('out_channels', 4)
  chw = (c, preset.latent, preset.latent)
  out = {}
  for key, shape in weights.indicator_layers(chw, preset.indicator_hidden, preset.num_groups):
    _, i, kind = key.split('.')
    if abstract:
      out.setdefault(f'layers_{i}', {})['kernel' if kind == 'weight' else 'bias'] = (
          jax.ShapeDtypeStruct(shape[::-1], jnp.float32))
      continue
    array = weights.draw('indicator', key, shape, seed)
    if kind == 'weight':
      array = (weights.indicator_first_kernel_to_flax(array, chw) if i == '0' else array.T)
    out.setdefault(f'layers_{i}', {})['kernel' if kind == 'weight' else 'bias'] = jnp.asarray(
        np.ascontiguousarray(array))
  return out


def lora_params(preset, base_params, seed, lora_b_std=0.0, abstract=False):
  """{dotted flax path: {'lora_A' [in, r], 'lora_B' [r, out]}} from peft-layout arrays
  (`base_params` may be abstract)."""
  from flax import traverse_util  # pylint: disable=import-outside-toplevel
  flat = traverse_util.flatten_dict(base_params)
  out = {}
  for path in lora_lib.find_targets(base_params, tuple(preset.lora['targets'])):
    d_in, d_out = flat[tuple(path.split('.')) + ('kernel',)].shape
    if abstract:
      r = preset.lora['r']
      out[path] = {'lora_A': jax.ShapeDtypeStruct((d_in, r), jnp.float32),
                   'lora_B': jax.ShapeDtypeStruct((r, d_out), jnp.float32)}
      continue
    name = path_to_torch_key(tuple(path.split('.')) + ('kernel',))[:-len('.weight')]
    a, b = weights.lora_arrays(name, d_in, d_out, preset.lora['r'], seed, lora_b_std)
    out[path] = {'lora_A': jnp.asarray(np.ascontiguousarray(a.T)),
                 'lora_B': jnp.asarray(np.ascontiguousarray(b.T))}
  return out


def _latent_cond(self, frozen, batch, rng):  # pylint: disable=unused-argument
  return batch['latent'], batch['label'], {'context': batch['context']}


class FullDDM(DDM):
  """Full fine-tune of UNet + indicator on cached latents with a text embedding."""

  def __init__(self, preset, seed, lora_b_std=0.0):  # pylint: disable=unused-argument
    self.config, self.preset, self.seed = run_config(preset), preset, seed
    self.unet = build_unet(preset)
    self.indicator = Indicator(preset.num_groups, tuple(preset.indicator_hidden))
    self.sched = make_schedule(SCHEDULE['beta_schedule'], SCHEDULE['num_train_timesteps'],
                               SCHEDULE['beta_start'], SCHEDULE['beta_end'], 'epsilon')
    r = preset.latent
    self.sample_shape = (r, r, self.unet.in_channels)
    self.eps_shape = (r, r, self.unet.out_channels)

  def init(self, rng=None, abstract=False):
    return {'unet': unet_params(self.preset, self.unet, self.seed, abstract=abstract),
            'indicator': indicator_params(self.preset, self.seed, abstract)}

  def frozen(self, abstract=False):
    return {}

  prepare_batch = _latent_cond

  def model_fn(self, params, frozen, x_t, t, context=None):
    return self.unet.apply({'params': params['unet']}, x_t, t, context)


class LoraDDM(FullDDM):
  """LatentDDM's own LoRA model_fn on the preset's UNet (frozen base, trained adapters)."""
  model_fn = LatentDDM.model_fn
  _lora = LatentDDM._lora

  def __init__(self, preset, seed, lora_b_std=0.0):
    super().__init__(preset, seed)
    self.unet_scale = preset.lora['alpha'] / preset.lora['r']
    self._frozen = None   # drawn at the first frozen() call
    self._lora_b_std = lora_b_std

  def frozen(self, abstract=False):
    if abstract:
      return {'unet': unet_params(self.preset, self.unet, self.seed, abstract=True)}
    if self._frozen is None:
      self._frozen = {'unet': unet_params(self.preset, self.unet, self.seed)}
    return self._frozen

  def init(self, rng=None, abstract=False):
    return {'unet_lora': lora_params(self.preset, self.frozen(abstract=True)['unet'], self.seed,
                                     self._lora_b_std, abstract),
            'indicator': indicator_params(self.preset, self.seed, abstract)}

  prepare_batch = _latent_cond


def build_ddm(preset, seed=None, lora_b_std=0.0):
  seed = preset.seed if seed is None else seed
  return (LoraDDM if preset.lora else FullDDM)(preset, seed, lora_b_std)


class TrainStep:
  """The library's compiled step on a fixed batch: `compile()` (from shapes; returns the
  seconds), then `step()` runs one step (the first one draws the weights) and returns the
  metrics (not blocked on)."""

  def __init__(self, preset, seed=None, lora_b_std=0.0):
    self.preset = preset
    self.ddm = ddm = build_ddm(preset, seed, lora_b_std)
    self.config = run_config(preset)
    self.setup = TrainSetup(ddm, self.config, params=ddm.init(abstract=True))
    self.tx = self.setup.tx
    b = inputs.train_batch(preset)
    self.batch = parallel.global_batch(self.setup.mesh, {
        'latent': inputs.nhwc(b['latents']), 'context': b['context'],
        'label': b['labels'].astype(np.int32)})
    self.compiled = self.state = self.frozen = None

  def compile(self):
    t0 = time.perf_counter()
    self.compiled = self.setup.compile(self.batch, self.ddm.frozen(abstract=True))
    return time.perf_counter() - t0

  def build(self):
    """The weights and the train state (once)."""
    if self.state is None:
      self.state = self.setup.init_state(self.ddm.init())
      self.frozen = self.setup.frozen()
      release_host_memory()   # the numpy draws' freed blocks, as load_pipeline does
    return self

  def step(self):
    self.build()
    self.state, metrics = self.compiled(self.state, self.batch, self.frozen, self.setup.hyper)
    return metrics

  def trainable_count(self):
    return int(sum(x.size for x in jax.tree_util.tree_leaves(self.setup.target.params)))

  def residuals_mib(self):
    """MiB the loss's VJP keeps for the backward pass (benchmarks/memory.py), from shapes."""
    return memory.train_residuals_mib(self.ddm, self.config, self.setup.target.params,
                                      self.ddm.frozen(abstract=True), self.batch)

  def buffers_mib(self):
    """MiB of what the step's arguments hold, by kind."""
    s = self.state
    return {'params': memory.tree_mib(s.params), 'opt_state': memory.tree_mib(s.opt_state),
            'ema': memory.tree_mib(s.ema_params), 'frozen': memory.tree_mib(self.frozen),
            'batch': memory.tree_mib(self.batch)}

  def draws(self, step=None):
    """The (noise NHWC, timesteps) the library's step draws at `step` (training/step.py:
    fold_in(key(seed), step) -> split -> k_loss; objective.ddm_loss: split -> t, noise)."""
    if step is None:
      step = 0 if self.state is None else int(self.state.step)
    rng = jax.random.fold_in(jax.random.key(self.config.train.seed), step)
    _, k_loss = jax.random.split(rng)
    k_t, k_n = jax.random.split(k_loss)
    x0 = self.batch['latent']
    t = jax.random.randint(k_t, (x0.shape[0],), 0, self.ddm.sched.num_train_timesteps)
    return np.asarray(jax.random.normal(k_n, x0.shape, jnp.float32)), np.asarray(t)


class Sampler:
  """40 DDIM steps with classifier-free guidance as one compiled `lax.scan`
  (ddm_jax.diffusion.samplers.ddim + make_denoiser); the UNet runs on [uncond; cond].
  `compile()` from shapes, then `run()` (the first one draws the weights)."""

  def __init__(self, preset, seed=None):
    self.preset = p = preset
    self.seed = p.seed if seed is None else seed
    self.unet = unet = build_unet(p)
    # bfloat16 presets hold bf16 weights (load_pipeline(param_dtype=bf16)), as the torch side.
    self.pdtype = jnp.bfloat16 if p.dtype == 'bfloat16' else jnp.float32
    self.params = None
    self.sched = make_schedule(SCHEDULE['beta_schedule'], SCHEDULE['num_train_timesteps'],
                               SCHEDULE['beta_start'], SCHEDULE['beta_end'], 'epsilon')
    ins = inputs.sample_inputs(p)
    self.x_t = jnp.asarray(inputs.nhwc(ins['x_T']))
    self.context = jnp.asarray(ins['context'], self.pdtype)
    scale, steps, sched = p.guidance_scale, p.sample_steps, self.sched

    def run(params, context, x):
      def model_fn(x_t, t):
        out = unet.apply({'params': params}, jnp.concatenate([x_t, x_t]),
                         jnp.concatenate([t, t]), context)
        uncond, cond = jnp.split(out, 2)
        return uncond + scale * (cond - uncond)
      denoise = samplers.make_denoiser(model_fn, sched)
      return samplers.ddim(denoise, sched, x, jax.random.key(0), steps=steps, eta=0.0)

    self.jitted = jax.jit(run)
    self.compiled = None

  def compile(self):
    t0 = time.perf_counter()
    shapes = unet_params(self.preset, self.unet, self.seed, self.pdtype, abstract=True)
    self.compiled = self.jitted.lower(shapes, self.context, self.x_t).compile()
    release_host_memory()
    return time.perf_counter() - t0

  def build(self):
    if self.params is None:
      self.params = unet_params(self.preset, self.unet, self.seed, self.pdtype)
      release_host_memory()
    return self

  def run(self, x_t=None):
    self.build()
    return self.compiled(self.params, self.context, self.x_t if x_t is None else x_t)


def matmul_peak(dtype, n, reps=5):
  """Best-of-`reps` GFLOP/s of an n x n x n matmul on the default device."""
  f = jax.jit(lambda a, b: a @ b)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f(a, b).block_until_ready()
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e9
