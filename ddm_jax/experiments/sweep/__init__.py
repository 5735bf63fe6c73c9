"""Reproduce the DDM fairness table on the embedded digits, then go past it.

    python -m ddm_jax.cli.sweep [--quick] [--out=DIR] [--publish=results]

Three parts, each a list of cells; every finished evaluation is one JSON line
in ``DIR/results.jsonl`` and a rerun skips the cells already there (training
itself resumes from its last checkpoint), so a killed sweep continues where
it stopped:

1. ``ddm``: train at group ratios (group 0 : group 1) x indicator weights
   alpha (``w_ind = alpha``, ``w_rec = 1 - alpha`` as in the reference) x
   seeds, evaluate unguided sampling: FD (both forms), proportions, Fréchet
   classifier distance, precision/recall, indicator entropy.
2. ``guided``: on the alpha > 0 models at the guided ratios, indicator-guided
   sampling toward a uniform target at several scales S (same sampling seeds).
3. ``pseudo``: the same DDM + guidance with k-means pseudo-labels instead of
   the true groups; adjusted Rand index of the pseudo-groups.

``DIR/summary.md`` / ``summary.json`` hold mean ± std over seeds per cell and
``DIR/plots/`` the figures; ``--publish=results`` copies both for RESULTS.md.

Modules: ``plan`` (the grid and each cell's config), ``store`` (the results file),
``runner`` (train + evaluate the cells), ``summary`` (tables, plots, publishing).
"""
from ddm_jax.experiments.sweep.plan import PRESETS
from ddm_jax.experiments.sweep.plan import Plan
from ddm_jax.experiments.sweep.plan import cell_config
from ddm_jax.experiments.sweep.plan import cell_id
from ddm_jax.experiments.sweep.plan import parse_ratio
from ddm_jax.experiments.sweep.plan import run_name
from ddm_jax.experiments.sweep.runner import Runner
from ddm_jax.experiments.sweep.store import Results
from ddm_jax.experiments.sweep.summary import machine_description
from ddm_jax.experiments.sweep.summary import make_plots
from ddm_jax.experiments.sweep.summary import summarize
from ddm_jax.experiments.sweep.summary import summary_markdown
from ddm_jax.experiments.sweep.summary import write_summary

__all__ = ['PRESETS', 'Plan', 'Results', 'Runner', 'cell_config', 'cell_id',
           'machine_description', 'make_plots', 'parse_ratio', 'run_name', 'summarize',
           'summary_markdown', 'write_summary']
