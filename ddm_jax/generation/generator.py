"""Generating images from a trained DDM: batch-sharded across devices, one compiled scan."""
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ddm_jax.diffusion.samplers import SAMPLERS, make_denoiser
from ddm_jax.parallel import batch_sharding, replicated


def make_generator(ddm, mesh, sampler='ddim', steps=50, eta=0.0, guidance=None, **sampler_kw):
  """Returns gen(params, frozen, key, batch_size, class_labels=None, guide=None, cond=None,
  latents=None) -> images [B,...] (global, sharded).

  `guidance(params, frozen, denoise, cond) -> denoise` may wrap the denoiser (classifier-free
  or indicator guidance); every sampler then uses it unchanged. `cond` holds the UNet's
  conditioning and, when given, `cond['guide']`: a pytree of per-sample arrays [B, ...] that
  reach the guidance as traced, batch-sharded inputs (e.g. generation.guidance's target group
  and scale per sample, so changing them never recompiles).

  `cond` (optional) is a pytree of per-sample arrays [B, ...] handed, batch-sharded, to
  `ddm.sample_cond(params, frozen, B, **cond)` (e.g. prompt token ids for Stable Diffusion,
  see ddm_jax.generation.prompts). `latents` (optional, [B, *ddm.sample_shape]) replaces the
  initial noise drawn from `key`, as diffusers' `latents=` does."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)}')
  data, repl = batch_sharding(mesh), replicated(mesh)
  kw = dict(steps=steps, **sampler_kw)
  if sampler == 'ddim':
    kw['eta'] = eta

  def run(params, frozen, x, key, class_labels, guide, per_sample):
    cond = ddm.sample_cond(params, frozen, x.shape[0], **(per_sample or {}))
    if class_labels is not None:
      cond['class_labels'] = class_labels
    denoise = make_denoiser(lambda x_t, t: ddm.model_fn(params, frozen, x_t, t, **cond), ddm.sched)
    if guidance is not None:
      denoise = guidance(params, frozen, denoise,
                         cond if guide is None else {**cond, 'guide': guide})
    return ddm.decode(frozen, SAMPLERS[sampler](denoise, ddm.sched, x, key, **kw))

  run_jit = jax.jit(run, in_shardings=(repl, repl, data, repl, data, data, data),
                    out_shardings=data)
  cache = {}

  def gen(params, frozen, key, batch_size, class_labels=None, guide=None, cond=None,
          latents=None):
    shape = (batch_size,) + ddm.sample_shape
    if shape not in cache:
      cache[shape] = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=data)
    k_init, k_steps = jax.random.split(key)
    if latents is None:
      latents = cache[shape](k_init)
    else:
      if tuple(np.shape(latents)) != shape:
        raise ValueError(f'latents must have shape {shape}, got {np.shape(latents)}')
      latents = jax.device_put(jnp.asarray(latents, jnp.float32), data)
    if cond is not None:
      cond = jax.device_put(jax.tree_util.tree_map(jnp.asarray, cond), data)
    if class_labels is not None:
      class_labels = jax.device_put(jnp.asarray(class_labels, jnp.int32), data)
    if guide is not None:
      guide = jax.device_put(jax.tree_util.tree_map(jnp.asarray, guide), data)
    return run_jit(params, frozen, latents, k_steps, class_labels, guide, cond)

  return gen


def _chunk(a, i, batch_size):
  """Rows [i*bs, (i+1)*bs) of `a`, the last chunk padded by wrapping (its extra rows are dropped)."""
  part = np.asarray(a)[i * batch_size:(i + 1) * batch_size]
  return np.resize(part, (batch_size,) + part.shape[1:])


def effective_batch_size(num, batch_size):
  """The chunk size `generate` uses: min(batch_size, num) rounded up to the device count."""
  n_dev = jax.device_count()
  return max(n_dev, -(-min(batch_size, num) // n_dev) * n_dev)


def generate(gen, params, frozen, num, key, batch_size, class_labels=None, progress=True,
             guide=None, cond=None):
  """Draw `num` images in chunks of `batch_size` (padded to a multiple of the device
  count); chunk i uses fold_in(key, i), so a seed fixes every image. `class_labels` is a `[num]`
  array, `guide` a pytree of `[num, ...]` arrays for the guidance hook, `cond` one of
  `[num, ...]` arrays for `ddm.sample_cond` (make_generator)."""
  batch_size = effective_batch_size(num, batch_size)
  chunks = -(-num // batch_size)
  out = []
  for i in tqdm(range(chunks), desc='sampling', disable=not progress, leave=False):
    chunk = lambda a: None if a is None else _chunk(a, i, batch_size)
    g = None if guide is None else jax.tree_util.tree_map(chunk, guide)
    c = None if cond is None else jax.tree_util.tree_map(chunk, cond)
    kw = {} if c is None else {'cond': c}
    imgs = gen(params, frozen, jax.random.fold_in(key, i), batch_size, chunk(class_labels), g, **kw)
    out.append(np.asarray(jax.device_get(imgs)))
  return np.clip(np.concatenate(out)[:num], -1.0, 1.0)
