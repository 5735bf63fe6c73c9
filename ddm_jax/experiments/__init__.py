"""Experiments that reproduce and extend the DDM paper (library code; their command lines
live in ddm_jax.cli, e.g. ``python -m ddm_jax.cli.sweep --quick``)."""
