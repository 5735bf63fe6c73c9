"""Experiments that reproduce and extend the DDM paper (run as modules, e.g.
``python -m ddm_jax.experiments.fairness_sweep --quick``)."""
