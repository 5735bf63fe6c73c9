"""Handing freed host memory back to the operating system."""
import ctypes


def release_host_memory():
  """Return the heap's free pages to the OS (glibc's malloc_trim); a no-op elsewhere.

  XLA's compiler and a model's loading free hundreds of MB in blocks that glibc keeps in
  its arenas; the arrays made next are often fresh blocks, so without this the process
  holds both. Called after compiling (training.setup.TrainSetup.compile) and loading
  weights (interop.diffusers)."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
