"""Data layer: TFDS builders (array_record, no TensorFlow), safe label readers, grain pipeline."""
from ddm_jax.data.labels import read_labels
from ddm_jax.data.labels import read_prompts
from ddm_jax.data.pipeline import group_counts
from ddm_jax.data.pipeline import load_arrays
from ddm_jax.data.pipeline import make_dataset
from ddm_jax.data.pipeline import make_iterator
from ddm_jax.data.pipeline import make_source
from ddm_jax.data.pipeline import prepare
from ddm_jax.data.pipeline import preprocess
from ddm_jax.data.pipeline import resolve_data_dir

__all__ = ['group_counts', 'load_arrays', 'make_dataset', 'make_iterator', 'make_source', 'prepare',
           'preprocess', 'read_labels', 'read_prompts', 'resolve_data_dir']
