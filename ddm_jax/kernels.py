"""Which kernels a traced program uses: the attention implementation and where XLA:CPU's
convolutions run as im2col + matmul (models/cpu_conv.py).

These are read while a program is traced, so they live in one frozen `Kernels` value held
by a jax user context (`jax.make_user_context`): jax's own jit cache is keyed on it, and
the trace cache (trace_cache.py) puts the whole value in every entry's key. A new knob is
a new field here, in both keys by construction; `using(...)` changes fields for a block
(a context, not a module global: it is undone on leaving, and a program traced inside it
is another program).
"""
import contextlib
import dataclasses
import os

import jax

ATTENTIONS = ('xla', 'cudnn', 'auto')


@dataclasses.dataclass(frozen=True)
class Kernels:
  # 'xla' (the default), 'cudnn' (cuDNN flash attention; GPU, bf16/fp16 only) or 'auto'
  # (cuDNN where jax accepts the shapes and dtypes, else XLA). The default is read from
  # $DDM_JAX_ATTENTION once, at import; the GPU benchmark (benchmarks/gpu.sh) compares them.
  attention: str = 'xla'
  # On CPU, 3x3 convolutions on at most this many pixels (4x4) run as im2col + matmul.
  im2col_max_pixels: int = 16
  # ... and up to 8x8 where a gradient is taken inside a loop (guided sampling's scan,
  # generation/guidance.py): there XLA:CPU lays out an input-gradient convolution's kernel
  # as 01oi, which its fast (YNNPACK) convolution does not take, and guided sampling at 8x8
  # ran 4x slower (benchmarks/guided.py). Not everywhere: a train step at 8x8 is 15-25 %
  # slower as im2col.
  im2col_max_pixels_loop_grad: int = 64

  def __post_init__(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f'attention kernel must be one of {ATTENTIONS}, got {self.attention!r} '
                       '(DDM_JAX_ATTENTION)')


_CONTEXT = jax.make_user_context(Kernels(attention=os.environ.get('DDM_JAX_ATTENTION', 'xla')))


def current():
  """The kernels in force where this is called (e.g. while a program is traced)."""
  return _CONTEXT.value


@contextlib.contextmanager
def using(**changes):
  """`current()` with `changes` (field=value) for the block."""
  with _CONTEXT(dataclasses.replace(current(), **changes)):
    yield
