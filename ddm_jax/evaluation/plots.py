"""Figures for evaluation reports (matplotlib Agg, PIL for image grids).

Figures are built with ``matplotlib.figure.Figure`` and the Agg canvas, not
pyplot, so the library neither switches the process-wide backend nor leaks
figures in long sweeps.
"""
import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ddm_jax.errors import DataError


def _save(fig, path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  FigureCanvasAgg(fig)
  fig.savefig(path, format='png', dpi=120, bbox_inches='tight')


def _vec(v, n, name):
  v = np.asarray(v, dtype=np.float64)
  if v.shape != (n,):
    raise DataError(f'{name} must have shape ({n},), got {v.shape}')
  return v


def plot_group_proportions(path, p_hat, ci_lo, ci_hi, p_target, p_train=None,
                           group_names=None, title='Predicted group proportions'):
  """Bar chart of ``p_hat`` with CI error bars, the target per group and,
  if given, the training-set proportions."""
  p_hat = np.asarray(p_hat, dtype=np.float64)
  if p_hat.ndim != 1 or p_hat.size == 0:
    raise DataError(f'p_hat must be a non-empty 1-D vector, got shape {p_hat.shape}')
  n = p_hat.size
  lo, hi = _vec(ci_lo, n, 'ci_lo'), _vec(ci_hi, n, 'ci_hi')
  target = _vec(p_target, n, 'p_target')
  names = list(group_names) if group_names is not None else [f'group {i}' for i in range(n)]
  if len(names) != n:
    raise DataError(f'{len(names)} group_names for {n} groups')
  fig = Figure(figsize=(1.2 * n + 2.5, 3.2))
  ax = fig.add_subplot()
  xs = np.arange(n)
  # Clip: a percentile CI always contains p_hat, but a user-supplied one might not.
  yerr = np.stack([np.maximum(p_hat - lo, 0), np.maximum(hi - p_hat, 0)])
  ax.bar(xs, p_hat, width=0.6, color='tab:blue', yerr=yerr, capsize=4,
         label='generated (bootstrap CI)')
  ax.hlines(target, xs - 0.4, xs + 0.4, colors='black', linestyles='--', label='target')
  if p_train is not None:
    ax.plot(xs, _vec(p_train, n, 'p_train'), 'x', color='tab:red', markersize=9,
            markeredgewidth=2, label='training data', linestyle='none')
  ax.set_xticks(xs)
  ax.set_xticklabels(names)
  ax.set_ylim(0, max(1.0, float(np.max(hi)) + 0.05))
  ax.set_ylabel('proportion')
  ax.set_title(title)
  ax.legend(fontsize='small', loc='upper right')
  _save(fig, path)


def _to_uint8(images):
  x = np.asarray(images, dtype=np.float32)
  if x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise DataError(f'images must be NHWC with 1 or 3 channels, got shape {x.shape}')
  return np.round((np.clip(x, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_grid_sorted_by_group(path, images, pred_labels, num_groups=None, cols=16,
                              pad=2, upscale=None):
  """PNG grid with the images of each predicted group in its own rows.

  Groups appear in order 0, 1, ...; a group fills as many rows of ``cols``
  images as it needs (an empty group keeps one blank row, so row bands always
  map to groups) and bands are separated by a white line. Images are NHWC in
  [-1, 1]; small images are upscaled (nearest) to about 32 px unless
  ``upscale`` is given.
  """
  x = _to_uint8(images)
  y = np.asarray(pred_labels)
  if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
    raise DataError(f'pred_labels must be {x.shape[0]} integer ids, got {y.dtype} {y.shape}')
  if y.size and y.min() < 0:
    raise DataError('pred_labels must be >= 0')
  num_groups = num_groups or (int(y.max()) + 1 if y.size else 1)
  if y.size and y.max() >= num_groups:
    raise DataError(f'pred_labels must lie in [0, {num_groups})')
  n, h, w, c = x.shape
  s = upscale or max(1, 32 // max(h, w))
  h, w = h * s, w * s
  x = x.repeat(s, axis=1).repeat(s, axis=2)
  cols = max(1, min(cols, max([np.sum(y == g) for g in range(num_groups)] + [1])))
  bands = [np.flatnonzero(y == g) for g in range(num_groups)]
  rows_per = [max(1, -(-b.size // cols)) for b in bands]
  sep = 2 * pad  # wider gap between groups than between images
  height = sum(r * (h + pad) + pad for r in rows_per) + sep * (num_groups - 1)
  width = cols * (w + pad) + pad
  grid = np.zeros((height, width, c), np.uint8)
  top = 0
  for g, (idx, rows) in enumerate(zip(bands, rows_per)):
    for j, i in enumerate(idx):
      r, col = divmod(j, cols)
      y0, x0 = top + pad + r * (h + pad), pad + col * (w + pad)
      grid[y0:y0 + h, x0:x0 + w] = x[i]
    top += rows * (h + pad) + pad
    if g < num_groups - 1:
      grid[top:top + sep] = 255
      top += sep
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img = Image.fromarray(grid[..., 0], 'L') if c == 1 else Image.fromarray(grid, 'RGB')
  img.save(path, format='PNG')


def plot_xy(path, xs, series, xlabel, ylabel, title=''):
  """Line plot of several series over ``xs`` (e.g. a metric over guidance scale).

  ``series`` maps a label to ``ys`` or to ``(ys, lo, hi)``; the latter draws a
  shaded band (e.g. a CI). A NaN marks an x that series was not measured at: its line
  joins the points it has.
  """
  xs = np.asarray(xs, dtype=np.float64)
  if xs.ndim != 1 or xs.size == 0:
    raise DataError(f'xs must be a non-empty 1-D vector, got shape {xs.shape}')
  if not series:
    raise DataError('series is empty')
  fig = Figure(figsize=(5, 3.4))
  ax = fig.add_subplot()
  for name, v in series.items():
    band = isinstance(v, tuple) and len(v) == 3
    ys = _vec(v[0] if band else v, xs.size, f'series {name!r}')
    ok = np.isfinite(ys)
    (line,) = ax.plot(xs[ok], ys[ok], marker='o', label=str(name))
    if band:
      lo, hi = (_vec(a, xs.size, f'band of series {name!r}')[ok] for a in v[1:])
      ax.fill_between(xs[ok], lo, hi, alpha=0.2, color=line.get_color())
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  _save(fig, path)


def plot_frontier(path, curves, points, xlabel, ylabel, title=''):
  """Trade-off plot: ``curves`` maps a label to ``(xs, ys)`` drawn as a line (e.g. one
  method over its guidance scales), ``points`` maps a label to one ``(x, y)`` marker."""
  if not curves and not points:
    raise DataError('nothing to plot: no curves and no points')
  # the legend beside the axes: with a dozen methods it would hide points inside them
  fig = Figure(figsize=(10.5, 4.6), layout='constrained')
  ax = fig.add_subplot()
  for name, (xs, ys) in curves.items():
    ax.plot(np.asarray(xs, np.float64), np.asarray(ys, np.float64), marker='o', alpha=0.7,
            label=str(name))
  markers = 's^vD*PXh<>'
  for i, (name, (x, y)) in enumerate(points.items()):
    ax.plot([x], [y], linestyle='none', marker=markers[i % len(markers)], markersize=8,
            markeredgecolor='black', label=str(name))
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize='x-small', loc='upper left', bbox_to_anchor=(1.01, 1.0))
  _save(fig, path)


def save_side_by_side(path, grids, titles, upscale=6):
  """Image grids (uint8 [H, W, C] each, e.g. images.make_grid) next to each other, each
  under its title: the before/after picture of the demo."""
  if len(grids) != len(titles) or not grids:
    raise DataError(f'need one title per grid, got {len(grids)} grids and {len(titles)} titles')
  fig = Figure(figsize=(3.2 * len(grids), 3.6))
  for i, (grid, title) in enumerate(zip(grids, titles)):
    ax = fig.add_subplot(1, len(grids), i + 1)
    g = np.repeat(np.repeat(np.asarray(grid), upscale, 0), upscale, 1)
    ax.imshow(g[..., 0] if g.shape[-1] == 1 else g, cmap='gray', vmin=0, vmax=255,
              interpolation='nearest')
    ax.set_title(title, fontsize=9)
    ax.axis('off')
  _save(fig, path)
