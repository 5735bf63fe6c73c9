"""The `small` preset's kernels one at a time, JAX against PyTorch, in one process.

python benchmarks/kernels.py [--reps 30] [--batch 16] [--out FILE.jsonl] [--quick]

Why: the `small` train step is as fast in both frameworks (BENCHMARKS.md), and a whole-step
profile cannot say whose kernels are faster. Here each kernel at the shapes of the `small`
UNet (8x8 latents, batch 16, channels 64-256) runs alone: matmuls, 3x3 convolutions (forward,
and forward + backward for input and kernel), GroupNorm + SiLU (forward + backward) and
attention (forward + backward). JAX runs XLA's own lowering and, for convolutions, the
library's im2col path (`ddm_jax.models.cpu_conv.conv_general_dilated` with every size
allowed); PyTorch runs its eager kernels (oneDNN) as the reference does. The two frameworks
take turns in blocks of ten timed calls (after two untimed ones), so load from elsewhere hits
both. Prints one JSON line per kernel: median ms for each, and ratio = PyTorch ms / JAX ms
(> 1: JAX faster). BENCHMARKS.md quotes it.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def interleaved_medians(fns, reps, block=10, warm=2):
  """{name: fn} -> {name: median seconds of `reps` timed calls}. The fns take turns in
  blocks of `block` timed calls, each block after `warm` untimed ones: right after a switch
  the other framework's threads are still spinning and would slow the first calls."""
  times = {name: [] for name in fns}
  for _ in range(-(-reps // block)):
    for name, fn in fns.items():
      for i in range(warm + block):
        t0 = time.perf_counter()
        fn()
        if i >= warm:
          times[name].append(time.perf_counter() - t0)
  return {name: float(np.median(t)) for name, t in times.items()}


def cases(batch, quick=False):
  """(name, kind, shapes) at the `small` UNet's sizes; `quick`: two tiny ones (for tests)."""
  if quick:
    return [('matmul 64x32x16', 'matmul', (64, 32, 16)),
            ('conv3x3 2x4x4x8->8', 'conv', (2, 4, 8, 8))]
  b = batch
  out = [(f'matmul {m}x{k}x{n}', 'matmul', (m, k, n))
         for m, k, n in [(b * 64, 576, 64), (b * 64, 1152, 128), (b * 16, 2304, 256),
                         (b * 77, 256, 256), (b * 64, 256, 2048)]]
  out += [(f'conv3x3 {b}x{h}x{h}x{c}->{o}', 'conv', (b, h, c, o))
          for h, c, o in [(8, 64, 64), (8, 128, 128), (8, 192, 128), (8, 128, 64), (4, 128, 256)]]
  out += [(f'groupnorm+silu {b}x{h}x{h}x{c}', 'groupnorm', (b, h, c))
          for h, c in [(8, 64), (8, 128), (4, 256)]]
  out += [(f'attention {b}x{t}x{s} heads 8x{d}', 'attention', (b, t, s, d))
          for t, s, d in [(64, 64, 8), (64, 77, 8), (16, 77, 16)]]
  return out


def _jax_fns(kind, shape, arrays):
  """{label: zero-arg fn} for JAX (forward, and forward + backward where there is one)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax import lax  # pylint: disable=import-outside-toplevel
  from ddm_jax import kernels  # pylint: disable=import-outside-toplevel
  from ddm_jax.models import cpu_conv  # pylint: disable=import-outside-toplevel
  a = [jnp.asarray(x) for x in arrays]
  ready = jax.block_until_ready
  if kind == 'matmul':
    f = jax.jit(lambda x, w: x @ w)
    return {'fwd': lambda: ready(f(*a))}
  if kind == 'conv':
    dn = lax.conv_dimension_numbers(a[0].shape, a[1].shape, ('NHWC', 'HWIO', 'NHWC'))
    xla = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                                dimension_numbers=dn)

    def im2col(x, w):
      with kernels.using(im2col_max_pixels=1 << 30):  # traced so: every size takes im2col
        return cpu_conv.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                             dimension_numbers=dn)
    out = {}
    for label, conv in (('xla', xla), ('im2col', im2col)):
      f = jax.jit(conv)
      g = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
      out[f'{label} fwd'] = lambda f=f: ready(f(*a))
      out[f'{label} fwd+bwd'] = lambda g=g: ready(g(*a))
    return out
  if kind == 'groupnorm':
    import flax.linen as nn  # pylint: disable=import-outside-toplevel
    gn = nn.GroupNorm(num_groups=32, epsilon=1e-5)
    p = gn.init(jax.random.key(0), a[0])
    g = jax.jit(jax.grad(lambda p, x: jnp.sum(nn.swish(gn.apply(p, x)) ** 2), argnums=(0, 1)))
    return {'fwd+bwd': lambda: ready(g(p, a[0]))}
  d = shape[3]
  att = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5)
  g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(att(q, k, v) ** 2), argnums=(0, 1, 2)))
  return {'fwd+bwd': lambda: ready(g(*a))}


def _torch_fns(kind, shape, arrays):
  import torch  # pylint: disable=import-outside-toplevel
  import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
  if kind == 'matmul':
    x, w = (torch.from_numpy(v) for v in arrays)
    return {'fwd': lambda: x @ w}
  if kind == 'conv':  # NCHW / OIHW, as the reference's tensors
    x = torch.from_numpy(arrays[0].transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    w = torch.from_numpy(arrays[1].transpose(3, 2, 0, 1).copy()).requires_grad_(True)

    def fwd():
      with torch.no_grad():
        return F.conv2d(x, w, padding=1)
    fb = lambda: torch.autograd.grad((F.conv2d(x, w, padding=1) ** 2).sum(), (x, w))
    return {'fwd': fwd, 'fwd+bwd': fb}
  if kind == 'groupnorm':
    x = torch.from_numpy(arrays[0].transpose(0, 3, 1, 2).copy()).requires_grad_(True)
    gn = torch.nn.GroupNorm(32, x.shape[1], eps=1e-5)
    ins = [x] + list(gn.parameters())
    return {'fwd+bwd': lambda: torch.autograd.grad((F.silu(gn(x)) ** 2).sum(), ins)}
  q, k, v = (torch.from_numpy(t.transpose(0, 2, 1, 3).copy()).requires_grad_(True)
             for t in arrays)   # [B, heads, T, d], as diffusers hands SDPA
  return {'fwd+bwd': lambda: torch.autograd.grad(
      (F.scaled_dot_product_attention(q, k, v) ** 2).sum(), (q, k, v))}


def _arrays(kind, shape, rng):
  f32 = lambda *s: rng.standard_normal(s).astype(np.float32)
  if kind == 'matmul':
    m, k, n = shape
    return [f32(m, k), f32(k, n) * k ** -0.5]
  if kind == 'conv':
    b, h, c, o = shape
    return [f32(b, h, h, c), f32(3, 3, c, o) * (9 * c) ** -0.5]
  if kind == 'groupnorm':
    b, h, c = shape
    return [f32(b, h, h, c)]
  b, t, s, d = shape
  return [f32(b, t, 8, d), f32(b, s, 8, d), f32(b, s, 8, d)]   # q, k, v: [B, T, heads, d]


def measure(name, kind, shape, reps, rng):
  """One kernel: {'kernel', 'kind', 'jax_ms': {...}, 'torch_ms': {...}, 'ratio': {...}}."""
  arrays = _arrays(kind, shape, rng)
  jax_fns, torch_fns = _jax_fns(kind, shape, arrays), _torch_fns(kind, shape, arrays)
  fns = {f'jax {k}': v for k, v in jax_fns.items()}
  fns.update({f'torch {k}': v for k, v in torch_fns.items()})
  med = interleaved_medians(fns, reps)
  jax_ms = {k: round(med[f'jax {k}'] * 1e3, 3) for k in jax_fns}
  torch_ms = {k: round(med[f'torch {k}'] * 1e3, 3) for k in torch_fns}
  # a JAX label ends with the pass it times ('fwd', 'fwd+bwd'), PyTorch's is that pass
  ratio = {label: round(torch_ms[label.split(' ')[-1]] / ms, 3) for label, ms in jax_ms.items()}
  return {'kernel': name, 'kind': kind, 'jax_ms': jax_ms, 'torch_ms': torch_ms, 'ratio': ratio}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--reps', type=int, default=30)
  ap.add_argument('--batch', type=int, default=16)
  ap.add_argument('--quick', action='store_true', help='two tiny kernels (a smoke test)')
  ap.add_argument('--out', default='')
  args = ap.parse_args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  rows = []
  for name, kind, shape in cases(args.batch, args.quick):
    row = measure(name, kind, shape, args.reps, rng)
    row.update(load_1min=round(os.getloadavg()[0], 2), jax=jax.__version__,
               torch=torch.__version__, torch_threads=torch.get_num_threads())
    rows.append(row)
    print(json.dumps(row), flush=True)
  if args.out:
    with open(args.out, 'a', encoding='utf-8') as f:
      f.writelines(json.dumps(r) + '\n' for r in rows)
  return rows


if __name__ == '__main__':
  main()
