"""The JAX-vs-PyTorch benchmark harness (see BENCHMARKS.md; entry point: benchmarks/run.py)."""
