"""Data layer: TFDS builders (array_record, no TensorFlow), safe label readers, group
selection, preprocessing and grain readers."""
from ddm_jax.data.labels import read_labels
from ddm_jax.data.labels import read_prompts
from ddm_jax.data.preparation import make_builder
from ddm_jax.data.preparation import prepare
from ddm_jax.data.preparation import resolve_data_dir
from ddm_jax.data.preparation import skipped_images
from ddm_jax.data.preprocessing import preprocess
from ddm_jax.data.readers import load_arrays
from ddm_jax.data.readers import make_dataset
from ddm_jax.data.readers import make_iterator
from ddm_jax.data.selection import group_counts
from ddm_jax.data.selection import make_source

__all__ = ['group_counts', 'load_arrays', 'make_builder', 'make_dataset', 'make_iterator',
           'make_source', 'prepare', 'preprocess', 'read_labels', 'read_prompts',
           'resolve_data_dir', 'skipped_images']
