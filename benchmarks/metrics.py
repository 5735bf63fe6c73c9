"""FLOP accounting, summaries and ratios. Pure Python (no jax, no torch import)."""
import statistics


def xla_flops(compiled):
  """FLOPs of one execution from XLA's cost analysis (`compiled.cost_analysis()`: a dict,
  or a one-element list of dicts in older jax). None when the backend gives none."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def scan_flops(program_flops, trip_count):
  """XLA's HloCostAnalysis counts a while-loop body once, whatever its trip count (checked
  by tests/test_benchmarks.py), so a sampler compiled as one `lax.scan` of `trip_count`
  steps costs about trip_count x the program's count (the code outside the loop, a few
  elementwise ops, is over-counted by the same factor: negligible next to a UNet)."""
  return None if program_flops is None else program_flops * trip_count


def summary(values):
  """{'median', 'min', 'max', 'n'} of a list of numbers."""
  values = [float(v) for v in values]
  if not values:
    return None
  return {'median': statistics.median(values), 'min': min(values), 'max': max(values),
          'n': len(values)}


def ratio(jax_seconds, torch_seconds):
  """JAX / PyTorch in throughput (images/s): PyTorch's time over JAX's. > 1: JAX is faster."""
  if not jax_seconds or not torch_seconds:
    return None
  return torch_seconds / jax_seconds


def images_per_s(batch, seconds):
  return batch / seconds if seconds else None


def gflops(flops, seconds):
  """Achieved GFLOP/s of `flops` done in `seconds`."""
  if flops is None or not seconds:
    return None
  return flops / seconds / 1e9


def peak_fraction(achieved_gflops, peak_gflops):
  if achieved_gflops is None or not peak_gflops:
    return None
  return achieved_gflops / peak_gflops


def matmul_flops(m, k, n):
  """A [m,k] x [k,n] matmul: m*n dot products of length k, 2 FLOPs per multiply-add."""
  return 2 * m * k * n


def rounded(obj, digits=4):
  """Round floats in a nested structure to `digits` significant digits (for the JSON lines)."""
  if isinstance(obj, float):
    return float(f'{obj:.{digits}g}')
  if isinstance(obj, dict):
    return {k: rounded(v, digits) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [rounded(v, digits) for v in obj]
  return obj
