"""Where a benchmark process's memory goes: RSS over time, bytes per kind of buffer.

Pure helpers for benchmarks/worker.py: the process's resident set (Linux /proc, else
`ru_maxrss`), a background sampler of it, pytree byte counts, the residuals JAX keeps for
the backward pass, the tensors PyTorch's autograd saves, and XLA's memory analysis of a
compiled program. No framework is imported at module level.
"""
import resource
import threading
import time

MIB = 2.0 ** 20


def rss_mib():
  """(current, peak) resident set size of this process in MiB."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      fields = dict(line.split(':', 1) for line in f if line.startswith(('VmRSS', 'VmHWM')))
    return int(fields['VmRSS'].split()[0]) / 1024, int(fields['VmHWM'].split()[0]) / 1024
  except (OSError, KeyError, ValueError):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
    return peak, peak


class RssTimeline:
  """Samples the RSS every `period_s` on a daemon thread; `mark(label)` records a phase.
  `result()` -> {'phases': {label: {'t', 'rss', 'peak'}}, 'samples': [[t, rss], ...]}
  (samples kept only when the RSS moved by >= `min_step_mib`)."""

  def __init__(self, period_s=0.1, min_step_mib=16.0):
    self.t0 = time.perf_counter()
    self.period_s, self.min_step = period_s, min_step_mib
    self.samples, self.phases = [], {}
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _now(self):
    return round(time.perf_counter() - self.t0, 2)

  def _run(self):
    while not self._stop.wait(self.period_s):
      rss = rss_mib()[0]
      if not self.samples or abs(rss - self.samples[-1][1]) >= self.min_step:
        self.samples.append([self._now(), round(rss)])

  def mark(self, label):
    rss, peak = rss_mib()
    self.phases[label] = {'t': self._now(), 'rss': round(rss), 'peak': round(peak)}

  def result(self):
    self._stop.set()
    self._thread.join()
    return {'phases': self.phases, 'samples': self.samples}


def tree_mib(tree):
  """MiB of the array leaves of a pytree (jax, numpy or ShapeDtypeStruct), each buffer
  once (a state and its donated successor may share one)."""
  import jax  # pylint: disable=import-outside-toplevel
  seen, total = set(), 0
  for leaf in jax.tree_util.tree_leaves(tree):
    key = id(leaf)
    try:
      key = leaf.unsafe_buffer_pointer()
    except (AttributeError, RuntimeError, ValueError):
      pass
    if key not in seen and hasattr(leaf, 'dtype'):
      seen.add(key)
      total += leaf.size * leaf.dtype.itemsize
  return total / MIB


def xla_memory_mib(compiled):
  """XLA's buffer assignment of a compiled program: arguments, outputs, aliased (donated)
  bytes, temporaries (activations kept for the backward pass, gradients, scratch)."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  keys = ('argument', 'output', 'alias', 'temp', 'generated_code')
  return {k: round(getattr(m, f'{k}_size_in_bytes', 0) / MIB, 1) for k in keys}


def jax_residuals_mib(loss, params, *consts):
  """MiB of the residuals `jax.vjp(loss, params)` keeps for the backward pass, before
  XLA's optimisations, not counting inputs (`params`, `consts`) that are saved as they
  are: the activations and anything computed from the weights."""
  import jax  # pylint: disable=import-outside-toplevel
  n_in = len(jax.tree_util.tree_leaves((params, consts)))
  closed, (_, vjp_fn) = jax.make_jaxpr(
      lambda p, c: jax.vjp(lambda q: loss(q, *c), p), return_shape=True)(params, consts)
  jaxpr = closed.jaxpr
  residuals = jaxpr.outvars[len(jaxpr.outvars) - len(jax.tree_util.tree_leaves(vjp_fn)):]
  inputs = set(jaxpr.invars[:n_in])
  saved = {v for v in residuals if type(v).__name__ != 'Literal' and v not in inputs}
  return sum(v.aval.size * v.aval.dtype.itemsize for v in saved) / MIB


def torch_saved_mib(run, exclude=()):
  """MiB of the tensors autograd saves for the backward pass during `run()` (each storage
  once), not counting the storages of `exclude` (the parameters, saved as they are)."""
  import torch  # pylint: disable=import-outside-toplevel
  skip = {t.untyped_storage().data_ptr() for t in exclude}
  seen = {}

  def pack(t):
    storage = t.untyped_storage()
    if storage.data_ptr() not in skip:
      seen[storage.data_ptr()] = storage.nbytes()
    return t

  with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
    run()
  return sum(seen.values()) / MIB


def torch_tensors_mib(tensors):
  seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
  return sum(seen.values()) / MIB


def train_residuals_mib(ddm, config, params, frozen, batch):
  """`jax_residuals_mib` of the DDM train step's loss (training/step.py's wiring, fixed
  keys): what the backward pass of `ddm` keeps, from shapes alone."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddm_jax.objective import ddm_loss  # pylint: disable=import-outside-toplevel

  def loss(params, frozen, batch):
    rng = jax.random.key(0)
    x0, labels, cond = ddm.prepare_batch(frozen, batch, rng)
    model_fn = lambda p, x_t, t: ddm.model_fn(p, frozen, x_t, t, **cond)
    return ddm_loss(model_fn, ddm.indicator_fn, params, x0, labels, rng, ddm.sched,
                    config.loss.w_rec, config.loss.w_ind)[0]
  return jax_residuals_mib(loss, params, frozen, batch)
