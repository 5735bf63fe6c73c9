"""What every command line shares: the error wrapper and the `--config.KEY=VALUE` parser."""
import functools
import sys

from ddm_jax.config import apply_overrides, load_config_file, validate
from ddm_jax.errors import DDMError


def split_overrides(argv):
  """`--config.a.b=V` (or `--config.a.b V`) -> ({'a.b': 'V'}, remaining argv)."""
  overrides, rest, i = {}, [], 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key, eq, value = arg[len('--config.'):].partition('=')
      if not eq:
        if i + 1 >= len(argv):
          raise DDMError(f'{arg} needs a value')
        value, i = argv[i + 1], i + 1
      overrides[key] = value
    else:
      rest.append(arg)
    i += 1
  return overrides, rest


def load_config(path, overrides):
  """A config file with command-line overrides applied, validated."""
  return validate(apply_overrides(load_config_file(path), overrides))


def cli(fn):
  """Run `fn(argv)`; turn known errors into one clear line and a non-zero exit."""
  @functools.wraps(fn)
  def wrapper(argv=None):
    try:
      return fn(sys.argv[1:] if argv is None else argv) or 0
    except DDMError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      return 130
  return wrapper
