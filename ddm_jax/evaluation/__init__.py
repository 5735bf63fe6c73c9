"""Evaluation: fairness metrics, sample quality, the evaluator classifier, plots.

``fairness`` and ``quality`` need only numpy/scipy and are imported eagerly;
``classifier`` (JAX/Flax) and ``plots`` (matplotlib) load on first use, so a
metrics-only import stays light.
"""
import importlib

from ddm_jax.evaluation.fairness import (bootstrap_ci, entropy, entropy_stats,
                                         fairness_discrepancy, fd_paper_form,
                                         kl_divergence, proportions,
                                         statistical_parity_difference)
from ddm_jax.evaluation.quality import (feature_stats, frechet_distance,
                                        frechet_distance_from_features, noise_floor,
                                        precision_recall)

_LAZY = {
    'Evaluator': 'classifier', 'CachedEvaluator': 'classifier', 'train_evaluator': 'classifier',
    'predict': 'classifier', 'features': 'classifier', 'accuracy': 'classifier',
    'load_or_train_evaluator': 'classifier', 'check_accuracy_floor': 'classifier',
    'plot_group_proportions': 'plots', 'save_grid_sorted_by_group': 'plots',
    'plot_xy': 'plots',
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
  if name in ('classifier', 'plots'):
    return importlib.import_module(f'{__name__}.{name}')
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = [
    'proportions', 'bootstrap_ci', 'fairness_discrepancy', 'fd_paper_form', 'kl_divergence',
    'statistical_parity_difference', 'entropy', 'entropy_stats', 'feature_stats',
    'frechet_distance', 'frechet_distance_from_features', 'precision_recall', 'noise_floor',
    *_LAZY,
]
