"""What every command line shares: the error wrapper, the argument parser (`make_parser`:
defaults shown, --version, a bad argument is one line), the `--config.KEY=VALUE` parser
and `parse`, which every command's arguments go through: it adds --quiet/--verbose (and
sets them up: `result` prints what --quiet keeps) and the compilation-cache flags, and
switches JAX's persistent compilation cache on before anything is compiled."""
import argparse
import dataclasses
import functools
import logging
import os
import sys
import warnings

import ddm_jax
from ddm_jax.config import apply_overrides, load_config_file, shipped_configs, validate
from ddm_jax.errors import ConfigError, DDMError


class _HelpFormatter(argparse.HelpFormatter):
  """Each flag's default after its help, unless the help already says it or there is none
  to show (None, False)."""

  def _get_help_string(self, action):
    text = action.help or ''
    if (action.option_strings and 'default' not in text
        and not any(action.default is v for v in (None, False, argparse.SUPPRESS))):
      text += ' (default: %(default)s)'
    return text


class _Parser(argparse.ArgumentParser):
  """A bad argument is one `error:` line (DDMError, through `cli`), not the usage."""

  def error(self, message):
    raise DDMError(f'{message} (see {self.prog} --help)')


def make_parser(name, description, epilog=None):
  """The argument parser of command `name` (train, sample, ...): its program name as the
  user typed it (train.py, ddm-train or python -m ddm_jax.cli.train), defaults in the
  help, --version."""
  argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ''
  typed = os.path.basename(argv0)
  module = os.path.join('ddm_jax', 'cli', f'{name}.py')  # python -m sets argv[0] to the file
  prog = (typed if typed in (f'{name}.py', f'ddm-{name.replace("_", "-")}')
          and not argv0.endswith(module) else f'python -m ddm_jax.cli.{name}')
  p = _Parser(prog=prog, description=description, epilog=epilog,
              formatter_class=_HelpFormatter)
  p.add_argument('--version', action='version', version=f'%(prog)s (ddm_jax) {ddm_jax.__version__}')
  return p


CONFIG_HELP = ('a config file (.py defining get_config()) or the name of a shipped config: '
               + ', '.join(shipped_configs()))
OVERRIDES_EPILOG = ('Any config value can be overridden on the command line: '
                    '--config.SECTION.KEY=VALUE, e.g. --config.train.num_steps=2000 '
                    "--config.loss.w_ind=0.0 --config.model.block_out_channels='(32,64)' "
                    '(values are Python literals; unknown keys and wrong types are errors; '
                    'README.md lists the keys).')


def os_error_line(e):
  """An OSError as one line naming the path: 'runs/x/sub: Not a directory'."""
  paths = [p for p in (e.filename, e.filename2) if p is not None]
  reason = e.strerror or str(e)
  return f'{" -> ".join(os.fsdecode(p) for p in paths)}: {reason}' if paths else reason


def split_overrides(argv, flag='config'):
  """`--config.a.b=V` (or `--config.a.b V`) -> ({'a.b': 'V'}, remaining argv); `flag`
  names another config flag (regime's base_config)."""
  overrides, rest, i, prefix = {}, [], 0, f'--{flag}.'
  while i < len(argv):
    arg = argv[i]
    if arg.startswith(prefix):
      key, eq, value = arg[len(prefix):].partition('=')
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


CACHE_ENV = 'DDM_JAX_CACHE_DIR'   # a folder for the compilation cache, or 'off'


def default_cache_dir():
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'ddm_jax', 'jax_cache')


def parse(parser, argv, known=False, compilation_cache=True):
  """`parser.parse_args(argv)` (`parse_known_args` with `known`) with --quiet/--verbose
  and (unless not `compilation_cache`: a command that compiles nothing) --jax_cache_dir and
  --no_jax_cache added, then `set_verbosity` and `use_compilation_cache`: every command
  line parses through this, so each has the same switches and the cache is on before its
  first compile."""
  output = parser.add_argument_group('output').add_mutually_exclusive_group()
  output.add_argument('--quiet', '-q', action='store_true',
                      help='print only errors and the final result line(s): no progress '
                      'bars, notes, warnings or log lines')
  output.add_argument('--verbose', '-v', action='store_true',
                      help="also print the libraries' INFO log lines (absl, JAX, orbax, TFDS)")
  if compilation_cache:
    group = parser.add_argument_group('compilation cache')
    group.add_argument('--jax_cache_dir', default=None,
                       help=f'persistent XLA compilation cache (default ${CACHE_ENV}, else '
                            f'{default_cache_dir()}): a second run starts in seconds')
    group.add_argument('--no_jax_cache', action='store_true',
                       help='compile everything afresh, without the persistent cache')
  parsed = parser.parse_known_args(argv) if known else parser.parse_args(argv)
  args = parsed[0] if known else parsed
  set_verbosity(args)
  if compilation_cache:
    use_compilation_cache(args.jax_cache_dir, enabled=not args.no_jax_cache)
  return parsed


# What set_verbosity changed, undone by `cli` when its command returns: 'result' is the
# stream `result` prints to (stdout as it was), 'undo' the changes in reverse order.
_OUTPUT = {'result': None, 'quiet': False, 'undo': []}


def set_verbosity(args):
  """--quiet: stdout swallowed (all but `result`'s lines), progress bars off (implies
  --no_progress), Python warnings and every log line below ERROR dropped. --verbose: log
  lines from INFO up (absl's, JAX's, orbax's, TFDS's) to stderr. Neither: as it was."""
  undo = _OUTPUT['undo']
  _OUTPUT['result'], _OUTPUT['quiet'] = sys.stdout, bool(getattr(args, 'quiet', False))
  if not (getattr(args, 'quiet', False) or getattr(args, 'verbose', False)):
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  root = logging.getLogger()
  old_level, old_absl = root.level, absl_logging.get_verbosity()
  undo.append(lambda: (root.setLevel(old_level), absl_logging.set_verbosity(old_absl)))
  if args.quiet:
    root.setLevel(logging.ERROR)
    absl_logging.set_verbosity(absl_logging.ERROR)
    filters = warnings.filters[:]
    warnings.simplefilter('ignore')
    undo.append(lambda: warnings.filters.__setitem__(slice(None), filters))
    stdout = sys.stdout
    devnull = open(os.devnull, 'w', encoding='utf-8')  # pylint: disable=consider-using-with
    sys.stdout = devnull
    undo.append(lambda: (setattr(sys, 'stdout', stdout), devnull.close()))
    if hasattr(args, 'no_progress'):
      args.no_progress = True
  else:
    root.setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.INFO)
    # Python's last-resort handler shows WARNING and up only; a library's basicConfig
    # (one plain StreamHandler) shows every level the loggers pass
    # pylint: disable-next=unidiomatic-typecheck
    if not any(type(h) is logging.StreamHandler for h in root.handlers):
      handler = logging.StreamHandler(sys.stderr)
      handler.setFormatter(logging.Formatter('%(levelname)s:%(name)s:%(message)s'))
      root.addHandler(handler)
      undo.append(lambda: root.removeHandler(handler))


def restore_verbosity():
  while _OUTPUT['undo']:
    _OUTPUT['undo'].pop()()
  _OUTPUT['result'], _OUTPUT['quiet'] = None, False


def quiet():
  """True while a command runs with --quiet."""
  return _OUTPUT['quiet']


def result(*lines):
  """A command's final result line(s): printed with --quiet too."""
  stream = _OUTPUT['result'] or sys.stdout
  print(*lines, sep='\n', file=stream, flush=True)


def use_compilation_cache(cache_dir=None, enabled=True):
  """Switch on JAX's persistent compilation cache in `cache_dir` (default $DDM_JAX_CACHE_DIR,
  else the user cache folder) and ddm_jax's trace cache in its `traces` subfolder, and
  return the folder in use (None: no cache). A cache the caller has already set
  (jax_compilation_cache_dir, e.g. from $JAX_COMPILATION_CACHE_DIR, as the tests do) is left
  alone unless `cache_dir` names one. `enabled=False` or DDM_JAX_CACHE_DIR=off: neither.

  Every program is cached (minimum compile time 0): a command's many sub-second programs
  add up to seconds. The trace cache keeps its least recently used entries under 4 GiB;
  XLA's is left unbounded: JAX's own eviction (jax_compilation_cache_max_size) fails on
  every write in a folder that holds entries written without it (it reads an `-atime`
  file per entry), e.g. any cache an earlier version filled. A damaged or stale entry
  makes JAX warn and compile again (tests/test_compile_cache.py); the trace cache traces
  again (tests/test_trace_cache.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  from ddm_jax import trace_cache  # pylint: disable=import-outside-toplevel
  trace_cache.configure(None)
  env = os.environ.get(CACHE_ENV, '')
  if not enabled or (cache_dir is None and env.lower() in ('off', '0', 'none')):
    jax.config.update('jax_enable_compilation_cache', False)
    return None
  if cache_dir is None and jax.config.jax_compilation_cache_dir:
    cache_dir = jax.config.jax_compilation_cache_dir
  else:
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir or env or default_cache_dir()))
    try:
      os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
      if not quiet():
        print(f'note: no compilation cache ({cache_dir}: {e.strerror})', file=sys.stderr)
      return None
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  trace_cache.configure(os.path.join(cache_dir, 'traces'))
  return cache_dir


def cli(fn):
  """Run `fn(argv)`; turn known errors into one clear line and a non-zero exit."""
  @functools.wraps(fn)
  def wrapper(argv=None):
    try:
      return fn(sys.argv[1:] if argv is None else argv) or 0
    except DDMError as e:
      print(f'error: {e}', file=sys.stderr)
      return 2
    except OSError as e:  # no such folder, not a folder, permission, read-only, disk full
      print(f'error: {os_error_line(e)}', file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print('interrupted', file=sys.stderr)
      return 130
    finally:
      restore_verbosity()
  return wrapper


def experiment_plan(argv, parse_args, presets):
  """An experiment command line -> (args, plan, --config.KEY=VALUE overrides): the preset
  (`--quick` or 'full') with every plan field given on the command line replaced."""
  overrides, rest = split_overrides(argv)
  args, unknown = parse_args(rest)
  if unknown:
    raise ConfigError(f'unknown arguments: {unknown}')
  preset = presets['quick' if args.quick else 'full']
  fields = {f.name for f in dataclasses.fields(preset)}
  plan = dataclasses.replace(preset, **{k: v for k, v in vars(args).items()
                                        if v is not None and k in fields})
  return args, plan, overrides


def add_guidance_flags(p):
  """Indicator guidance, the same flags and defaults for sample.py and evaluate.py."""
  from ddm_jax.generation.guidance import VARIANTS  # pylint: disable=import-outside-toplevel
  g = p.add_argument_group('indicator guidance')
  g.add_argument('--guidance', default='none', choices=('none', 'indicator'),
                 help='indicator: steer each sample to a target group with the trained indicator')
  g.add_argument('--guidance_scale', type=float, default=None,
                 help='S, the strength of the indicator\'s pull (default 1 with '
                 '--guidance=indicator; needs it)')
  g.add_argument('--grad_clip', type=float, default=None,
                 help='cap the per-sample norm of the guidance gradient (default: no cap)')
  g.add_argument('--guidance_path', default='unet', choices=('unet', 'x0'),
                 help='gradient through the whole UNet (unet) or only its x0 estimate (x0)')
  g.add_argument('--guidance_variant', default='plain', choices=VARIANTS,
                 help='plain: classifier guidance; norm: unit-RMS gradient; early: guide the '
                 'first half of the steps only; stop: stop pushing a sample while the guide '
                 'puts it in its group (p >= 0.9)')


def guidance_scale(args):
  """--guidance_scale with its default: 1 when guided, 0 (unused) when not."""
  if args.guidance != 'indicator':
    if args.guidance_scale is not None:
      raise DDMError('--guidance_scale needs --guidance=indicator')
    return 0.0
  return 1.0 if args.guidance_scale is None else args.guidance_scale


def add_progress_flag(p):
  p.add_argument('--no_progress', action='store_true',
                 help='no progress bar (for logs and non-interactive runs)')


def list_flag(conv, sep=','):
  """The `type` of a `sep`-separated list flag: '4,8' -> (4.0, 8.0) for `float`; a bad item
  is one line naming the flag and its text."""
  def parse_list(text):
    try:
      return tuple(conv(v.strip()) for v in text.split(sep) if v.strip())
    except ValueError:
      kind = {int: 'integers', float: 'numbers'}.get(conv, 'values')
      raise argparse.ArgumentTypeError(f'expected {sep!r}-separated {kind}, got {text!r}') from None
  return parse_list
