"""Generating images from a trained DDM: batch-sharded across devices, one compiled scan."""
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from ddm_jax.diffusion.samplers import SAMPLERS, make_denoiser
from ddm_jax.training.parallel import batch_sharding, replicated


def make_generator(ddm, mesh, sampler='ddim', steps=50, eta=0.0, guidance=None, **sampler_kw):
  """Returns gen(params, frozen, key, batch_size, class_labels=None) -> images [B,...] (global, sharded).

  `guidance(params, frozen, denoise) -> denoise` may wrap the denoiser (classifier-free
  or indicator guidance); every sampler then uses it unchanged."""
  if sampler not in SAMPLERS:
    raise ValueError(f'unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)}')
  data, repl = batch_sharding(mesh), replicated(mesh)
  kw = dict(steps=steps, **sampler_kw)
  if sampler == 'ddim':
    kw['eta'] = eta

  def run(params, frozen, x, key, class_labels):
    cond = {} if class_labels is None else {'class_labels': class_labels}
    denoise = make_denoiser(lambda x_t, t: ddm.model_fn(params, frozen, x_t, t, **cond), ddm.sched)
    if guidance is not None:
      denoise = guidance(params, frozen, denoise, cond)
    return SAMPLERS[sampler](denoise, ddm.sched, x, key, **kw)

  run_jit = jax.jit(run, in_shardings=(repl, repl, data, repl, data), out_shardings=data)
  cache = {}

  def gen(params, frozen, key, batch_size, class_labels=None):
    shape = (batch_size,) + ddm.sample_shape
    if shape not in cache:
      cache[shape] = jax.jit(lambda k: jax.random.normal(k, shape, jnp.float32), out_shardings=data)
    k_init, k_steps = jax.random.split(key)
    if class_labels is not None:
      class_labels = jax.device_put(jnp.asarray(class_labels, jnp.int32), data)
    return run_jit(params, frozen, cache[shape](k_init), k_steps, class_labels)

  return gen


def generate(gen, params, frozen, num, key, batch_size, class_labels=None, progress=True):
  """Draw `num` images in chunks of `batch_size` (padded to a multiple of the device
  count); chunk i uses fold_in(key, i), so a seed fixes every image."""
  n_dev = jax.device_count()
  batch_size = max(n_dev, -(-min(batch_size, num) // n_dev) * n_dev)
  chunks = -(-num // batch_size)
  out = []
  for i in tqdm(range(chunks), desc='sampling', disable=not progress, leave=False):
    labels = None
    if class_labels is not None:
      labels = np.resize(np.asarray(class_labels)[i * batch_size:(i + 1) * batch_size], batch_size)
    imgs = gen(params, frozen, jax.random.fold_in(key, i), batch_size, labels)
    out.append(np.asarray(jax.device_get(imgs)))
  return np.clip(np.concatenate(out)[:num], -1.0, 1.0)
