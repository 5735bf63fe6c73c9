"""DDM in the paper's own regime on the embedded digits, against the baselines that
isolate what it contributes.

    python -m ddm_jax.cli.regime [--quick] [--out=DIR] [--publish=results]

A base UNet pretrained once on all ten digits; short, constant-lr fine-tunes of it on
biased digit groups (pairs, or K >= 3 groups) per method, ratio and seed; every method
evaluated with the same evaluator (trained on images no generator saw), quality at an equal
number of samples per group, and guidance scales chosen on dev seeds and reported on test
seeds. Every finished evaluation is one JSON line in ``DIR/results.jsonl``; a rerun skips
finished evaluations and trained models (a killed training resumes from its checkpoint).

Modules: ``plan`` (grid, model configs, the selection rule), ``runner`` (train and
evaluate), ``summary`` (tables, plots, publishing; recomputed from the rows alone).
"""
from ddm_jax.experiments.regime.plan import PRESETS, RegimePlan, select_scale
from ddm_jax.experiments.regime.runner import Runner, select_lr
from ddm_jax.experiments.regime.summary import selected_scales, summarize, write_summary

__all__ = ['PRESETS', 'RegimePlan', 'Runner', 'select_lr', 'select_scale', 'selected_scales',
           'summarize', 'write_summary']
