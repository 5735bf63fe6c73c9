"""What every command line shares: the error wrapper and the `--config.KEY=VALUE` parser."""
import functools
import os
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


def host_split(host_index=None, num_hosts=None):
  """(this host's index, host count) of a job the hosts split without talking: flags, else
  JAX_PROCESS_ID / JAX_NUM_PROCESSES, else SLURM_PROCID / SLURM_NTASKS, else (0, 1)."""
  env = os.environ
  def first(flag, *names, default):
    if flag is not None:
      return flag
    for name in names:
      if env.get(name):
        try:
          return int(env[name])
        except ValueError:
          raise DDMError(f'${name} must be an integer, got {env[name]!r}') from None
    return default
  num_hosts = first(num_hosts, 'JAX_NUM_PROCESSES', 'SLURM_NTASKS', default=1)
  host_index = first(host_index, 'JAX_PROCESS_ID', 'SLURM_PROCID', default=0)
  if num_hosts < 1 or not 0 <= host_index < num_hosts:
    raise DDMError(f'host index {host_index} must be in [0, {num_hosts}) (--host_index, '
                   '--num_hosts)')
  return host_index, num_hosts


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
