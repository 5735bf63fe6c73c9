"""Generating images from a trained DDM: batch-sharded across devices, one compiled scan.

Image i of a run is drawn from its own key fold_in(key(seed), i) (initial noise and every
step's noise), so it depends on the seed, its index and the model only: not on the batch
it falls in, the batch size, the device count or the host count."""
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ddm_jax import parallel, trace_cache
from ddm_jax.config import program_config
from ddm_jax.diffusion.samplers import SAMPLERS, make_denoiser


def make_generator(ddm, mesh, sampler='ddim', steps=50, eta=0.0, guidance=None, **sampler_kw):
  """Returns gen(params, frozen, key, batch_size, class_labels=None, guide=None, cond=None,
  latents=None, indices=None) -> images [B,...] (global, sharded).

  `key` is the run's key: image b of the batch is drawn from fold_in(key, indices[b])
  (`indices` default 0..B-1).

  `guidance(params, frozen, denoise, cond) -> denoise` may wrap the denoiser (classifier-free
  or indicator guidance); every sampler then uses it unchanged. `cond` holds the UNet's
  conditioning and, when given, `cond['guide']`: a pytree of per-sample arrays [B, ...] that
  reach the guidance as traced, batch-sharded inputs (e.g. generation.guidance's target group
  and scale per sample, so changing them never recompiles).

  `cond` (optional) is a pytree of per-sample arrays [B, ...] handed, batch-sharded, to
  `ddm.sample_cond(params, frozen, B, **cond)` (e.g. prompt token ids for Stable Diffusion,
  see ddm_jax.generation.prompts). `latents` (optional, [B, *ddm.sample_shape]) replaces the
  initial noise, as diffusers' `latents=` does.

  Each batch shape is compiled ahead of time, and with several processes they all meet at
  a barrier before the first run (`parallel.compile_and_meet`): uneven compile times never
  trip the collectives' timeout."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)}')
  data, repl = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  kw = dict(steps=steps, **sampler_kw)
  if sampler == 'ddim':
    kw['eta'] = eta

  def run(params, frozen, key_data, indices, latents, class_labels, guide, per_sample):
    key = jax.random.wrap_key_data(key_data)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)
    pairs = jax.vmap(jax.random.split)(keys)
    k_init, k_steps = pairs[:, 0], pairs[:, 1]
    x = latents
    if x is None:
      x = jax.vmap(lambda k: jax.random.normal(k, ddm.sample_shape, jnp.float32))(k_init)
    cond = ddm.sample_cond(params, frozen, x.shape[0], **(per_sample or {}))
    if class_labels is not None:
      cond['class_labels'] = class_labels
    denoise = make_denoiser(lambda x_t, t: ddm.model_fn(params, frozen, x_t, t, **cond), ddm.sched)
    if guidance is not None:
      denoise = guidance(params, frozen, denoise,
                         cond if guide is None else {**cond, 'guide': guide})
    return ddm.decode(frozen, SAMPLERS[sampler](denoise, ddm.sched, x, k_steps, **kw))

  run_jit = trace_cache.jit(run, _description(ddm, sampler, kw, guidance),
                            in_shardings=(repl, repl, repl, data, data, data, data, data),
                            out_shardings=data)
  compiled = {}

  def gen(params, frozen, key, batch_size, class_labels=None, guide=None, cond=None,
          latents=None, indices=None):
    shape = (batch_size,) + ddm.sample_shape
    indices = np.arange(batch_size) if indices is None else indices
    if latents is not None:
      if tuple(np.shape(latents)) != shape:
        raise ValueError(f'latents must have shape {shape}, got {np.shape(latents)}')
      latents = np.asarray(latents, np.float32)
    if class_labels is not None:
      class_labels = np.asarray(class_labels, np.int32)
    put = lambda tree, sharding=data: None if tree is None else parallel.put_global(  # noqa: E731
        tree, sharding)
    args = (params, frozen, put(np.asarray(jax.random.key_data(key)), repl),
            put(np.asarray(indices, np.uint32)), put(latents), put(class_labels), put(guide),
            put(cond))
    sig = str(jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), args[2:]))
    if sig not in compiled:
      compiled[sig] = parallel.compile_and_meet(run_jit, *args, name=f'sampler {shape}',
                                                mesh=mesh)
    return compiled[sig](*args)

  gen.num_devices = mesh.size
  return gen


def _description(ddm, sampler, kw, guidance):
  """What the sampler program closes over (trace_cache): the model's config and type, the
  sampler settings, the guidance hook's; None (never cached) for a model without a config
  or a hook without a description."""
  config, hook = getattr(ddm, 'config', None), getattr(guidance, 'description', None)
  if config is None or (guidance is not None and hook is None):
    return None
  return trace_cache.describe(('sampler', type(ddm).__name__, sampler, sorted(kw.items()), hook),
                              program_config(config))


def _rows(a, lo, hi, size):
  """Rows [lo, hi) of `a`, padded to `size` rows by wrapping (the extra rows are dropped)."""
  part = np.asarray(a)[lo:hi]
  return np.resize(part, (size,) + part.shape[1:])


def effective_batch_size(num, batch_size, devices=None):
  """The chunk size `generate` uses: min(batch_size, num) rounded up to the device count."""
  n_dev = devices or jax.device_count()
  return max(n_dev, -(-min(batch_size, num) // n_dev) * n_dev)


def iter_batches(gen, params, frozen, key, lo, hi, batch_size, class_labels=None, guide=None,
                 cond=None):
  """Images [lo, hi) of a run, one host array per batch: yields (start, images in [-1, 1]).
  The per-sample inputs are indexed by the global image index ([num, ...] arrays)."""
  for start in range(lo, hi, batch_size):
    stop = min(start + batch_size, hi)
    rows = lambda a: None if a is None else _rows(a, start, stop, batch_size)  # noqa: E731
    idx = np.resize(np.arange(start, stop), batch_size)
    imgs = gen(params, frozen, key, batch_size, rows(class_labels),
               None if guide is None else jax.tree_util.tree_map(rows, guide),
               None if cond is None else jax.tree_util.tree_map(rows, cond), indices=idx)
    yield start, np.clip(parallel.fetch(imgs)[:stop - start], -1.0, 1.0)


def generate(gen, params, frozen, num, key, batch_size, class_labels=None, progress=True,
             guide=None, cond=None):
  """All `num` images in memory, drawn in chunks of `batch_size` (padded to a multiple of
  the device count); image i from fold_in(key, i). `class_labels` is a `[num]` array,
  `guide` a pytree of `[num, ...]` arrays for the guidance hook, `cond` one of `[num, ...]`
  arrays for `ddm.sample_cond` (make_generator). Streamed jobs: `generation.job`."""
  batch_size = effective_batch_size(num, batch_size, getattr(gen, 'num_devices', None))
  batches = iter_batches(gen, params, frozen, key, 0, num, batch_size, class_labels, guide, cond)
  out = [imgs for _, imgs in tqdm(batches, total=-(-num // batch_size), desc='sampling',
                                  disable=not progress, leave=False)]
  return np.concatenate(out)
