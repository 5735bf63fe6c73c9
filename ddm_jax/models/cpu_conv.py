"""XLA:CPU's slow convolutions computed another way: `conv_general_dilated`, handed to
`nn.Conv` by models/blocks.py's `Conv`.

Why: XLA's ConvOperandSwapper swaps the operands of a convolution whose
kernel is larger than its input, and the swapped convolution has no fast CPU kernel
(a large share of the `small` train step's time); and at 4x4 and below the input-gradient
convolution reverses and transposes the whole kernel every step (a 1x1 convolution's at
any size). Which sizes take this path is `kernels.current()`'s im2col thresholds.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

from ddm_jax import kernels


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """`lax.conv_general_dilated`, except on CPU for a 1x1 convolution, or an NHWC input of at
  most `kernels.current().im2col_max_pixels` pixels or spatially smaller than its kernel
  (the low levels of a UNet on small latents): that is computed as one matmul over the
  kernel taps that touch the input (im2col; a 1x1 convolution is a plain matmul), the same
  sum. The matmul reads the HWIO kernel as a [taps*C, O] matrix, without a copy when every
  tap touches the input; taps that only ever see padding are dropped, so a 1x1 input reads
  only the kernel's centre. Other backends and other convolutions go to
  `lax.conv_general_dilated` as before."""
  spatial = lhs.shape[1:-1]
  plain = (lhs.ndim == 4 and feature_group_count == 1 and not kwargs
           and all(d == 1 for d in tuple(lhs_dilation or (1, 1)) + tuple(rhs_dilation or (1, 1)))
           and dimension_numbers == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                               ('NHWC', 'HWIO', 'NHWC')))
  pointwise = rhs.shape[:2] == (1, 1) and tuple(window_strides) == (1, 1) and padding in (
      'VALID', 'SAME', ((0, 0), (0, 0)), [(0, 0), (0, 0)])
  small = (pointwise or any(s < k for s, k in zip(spatial, rhs.shape[:2]))
           or spatial[0] * spatial[1] <= kernels.current().im2col_max_pixels) if plain else False
  if not (small and jax.default_backend() == 'cpu'):
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision,
                                    **kwargs)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(spatial, rhs.shape[:2], window_strides, padding)
  (plh, phh), (plw, phw) = padding
  (sh, sw), (h, w), (kh, kw, _, _) = window_strides, spatial, rhs.shape
  oh, ow = (h + plh + phh - kh) // sh + 1, (w + plw + phw - kw) // sw + 1
  touches = lambda tap, stride, pad, size, n: any(0 <= tap + stride * q - pad < size
                                                  for q in range(n))
  taps = tuple((i, j) for i in range(kh) for j in range(kw)
               if touches(i, sh, plh, h, oh) and touches(j, sw, plw, w, ow))
  geometry = ((sh, sw), ((plh, phh), (plw, phw)), (oh, ow), taps)
  if pointwise:   # the patches are the input and the kernel a reshape: nothing is copied
    return _im2col_dot(lhs, rhs, geometry, precision, None)
  return _im2col(lhs, rhs, geometry, precision)


_IM2COL_DIMS = (((3,), (0,)), ((), ()))


def _tied(x, tie):
  """`x + tie[0] * 0`: the data dependence that makes XLA compute a copy of `x` when `tie`
  exists. Without it XLA computes every kernel copy of the network at the program's start
  (they need only the weights) or hoists them out of a sampler's loop, and merges the
  backward pass's copies with the forward pass's (XLA:CPU drops optimization barriers
  before CSE). Float x * 0 is not folded away; a non-finite tie[0] makes the result
  non-finite, as it would make the result anyway."""
  return x if tie is None else x + (tie.reshape(-1)[0] * 0).astype(x.dtype)


def _im2col_dot(x, rhs, geometry, precision, tie):
  """The patches of `x` at the kernel taps, [B, oh, ow, taps*C], times those taps of the
  kernel, [taps*C, O] ((i, j, c) order on both sides)."""
  (sh, sw), pads, (oh, ow), taps = geometry
  kh, kw, c, o = rhs.shape
  xp = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  patches = [lax.slice(xp, (0, i, j, 0), (xp.shape[0], i + sh * (oh - 1) + 1,
                                          j + sw * (ow - 1) + 1, c), (1, sh, sw, 1))
             for i, j in taps]
  x = jnp.concatenate(patches, axis=-1) if len(patches) > 1 else patches[0]
  if len(taps) == kh * kw:
    k = rhs.reshape(kh * kw * c, o)        # no copy
  else:                                    # a copy (XLA has no views): tied to the input
    k = _tied(jnp.concatenate([rhs[i, j] for i, j in taps], axis=0) if len(taps) > 1
              else rhs[taps[0]], tie)
  return lax.dot_general(x, k, _IM2COL_DIMS, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _im2col(x, rhs, geometry, precision):
  """_im2col_dot whose backward pass builds the patches (taps x the input) and the
  kernel's taps again from the input and the kernel instead of saving the forward pass's:
  saved, every such copy in the network is live at once (the SD-1.5 LoRA step at 4x4
  latents: 194 MB of its 220 MB of XLA temporaries were kernel copies, frozen ones too)."""
  return _im2col_dot(x, rhs, geometry, precision, x)


def _im2col_fwd(x, rhs, geometry, precision):
  return _im2col(x, rhs, geometry, precision), (x, rhs)


def _im2col_bwd(geometry, precision, residuals, g):
  x, rhs = residuals
  _, vjp = jax.vjp(lambda x, rhs: _im2col_dot(_tied(x, g), rhs, geometry, precision, g), x, rhs)
  return vjp(g)


_im2col.defvjp(_im2col_fwd, _im2col_bwd)
