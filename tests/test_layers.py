"""The layers of ddm_jax: every import points down, and no library module imports the
command lines. A new module gets a rank in LAYERS; an import of a module at the same or a
higher rank (other than its own unit) fails this test, naming the file and the import."""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'ddm_jax')

# Lower rank = lower layer. A unit is a top-level module or subpackage of ddm_jax (interop
# is split: its loader sits under the models' users, its exporter above the trained model).
LAYERS = {
    'errors': 0, 'files': 0, 'hostmem': 0, 'kernels': 0,
    'models': 1, 'diffusion': 1, 'pseudo_labels': 1, 'images': 1, 'trace_cache': 1,
    'config': 2, 'interop.diffusers': 2, 'objective': 2, 'data': 2, 'parallel': 2,
    'interop': 2, 'ddm': 3,
    'generation': 4,
    'training': 5, 'interop.export': 5,
    'evaluation': 6,
    'experiments': 7,
    'cli': 8,
}


def unit(module):
  """'ddm_jax.training.loop' -> 'training'; 'ddm_jax.interop.export' -> 'interop.export'."""
  parts = module.split('.')[1:]
  if parts[:1] == ['interop'] and len(parts) > 1:
    return '.'.join(parts[:2])
  return parts[0] if parts else ''


def modules():
  for dirpath, _, files in os.walk(ROOT):
    for name in sorted(files):
      if name.endswith('.py'):
        path = os.path.join(dirpath, name)
        rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, '.')
        yield path, rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def imports(path):
  """(line, imported ddm_jax module) for every import in the file, nested ones included."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      # `from ddm_jax import data` imports the submodule ddm_jax.data
      names = ([f'{node.module}.{a.name}' for a in node.names] if node.module == 'ddm_jax'
               else [node.module])
    else:
      continue
    for name in names:
      if name.startswith('ddm_jax.'):
        yield node.lineno, name


def test_every_unit_has_a_rank():
  units = {unit(m) for _, m in modules()} - {''}
  assert units <= set(LAYERS), sorted(units - set(LAYERS))


def test_imports_point_down():
  bad = []
  for path, module in modules():
    src = unit(module)
    for line, name in imports(path):
      dst = unit(name)
      if src and dst != src and not LAYERS[dst] < LAYERS[src]:
        bad.append(f'{os.path.relpath(path, ROOT)}:{line} ({src}, rank {LAYERS[src]}) imports '
                   f'{name} ({dst}, rank {LAYERS[dst]})')
  assert not bad, '\n'.join(bad)


@pytest.mark.parametrize('bad_import, importer', [
    ('from ddm_jax.cli.common import cli', 'training'),
    ('from ddm_jax.training.loop import train', 'generation'),
])
def test_the_check_catches_an_upward_import(tmp_path, monkeypatch, bad_import, importer):
  path = tmp_path / 'mod.py'
  path.write_text(bad_import + '\n')
  (line, name), = imports(str(path))
  assert not LAYERS[unit(name)] < LAYERS[importer]
