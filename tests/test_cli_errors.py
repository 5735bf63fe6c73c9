"""The command lines as a new user meets them: every command runs as `python -m
ddm_jax.cli.X` from any folder, answers --version and --help, documents every flag, names
shipped configs; and every failure (a bad argument, a file that is not a config, an OS
error, a half that cannot run) is one `error:` line and exit 2, with nothing written.

Cases that need a trained model use the smallest one (tests/helpers.train_tiny) once per
module; the rest fail before any model is built."""
import contextlib
import errno
import importlib
import io
import os
import shutil
import signal
import subprocess
import sys

import pytest

from ddm_jax import files
from ddm_jax.cli import common
from ddm_jax.config import load_config_file, shipped_configs
from ddm_jax.errors import DDMError
from tests.helpers import DIGITS, REPO, subprocess_env, train_tiny

COMMANDS = ('train', 'sample', 'evaluate', 'export', 'compare', 'regime', 'sweep',
            'prepare_sd_digits')


def _module(name):
  return importlib.import_module(f'ddm_jax.cli.{name}')


def one_line_error(main, argv, *needles):
  """`main(argv)` in-process: exit 2, exactly one stderr line, `error: ...` naming `needles`."""
  err, out = io.StringIO(), io.StringIO()
  handler = signal.getsignal(signal.SIGTERM)  # train's main installs its own; keep pytest's
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      code = main(list(argv))
  finally:
    signal.signal(signal.SIGTERM, handler)
  lines = err.getvalue().strip().splitlines()
  assert code == 2, (code, out.getvalue(), err.getvalue())
  assert len(lines) == 1 and lines[0].startswith('error: '), err.getvalue()
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


# ----------------------------------------------------------------------------- installable

def test_every_command_runs_as_python_m_from_any_folder(tmp_path):
  """`python -m ddm_jax.cli.X --help` prints the usage and exits 0 for every command, run
  from a folder that is not the checkout (the default configs are found from there too)."""
  for name in COMMANDS:
    proc = subprocess.run([sys.executable, '-m', f'ddm_jax.cli.{name}', '--help'], cwd=tmp_path,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, (name, proc.stderr)
    assert proc.stdout.startswith(f'usage: python -m ddm_jax.cli.{name}'), (name, proc.stdout)
    assert '--version' in proc.stdout


@pytest.mark.parametrize('name', COMMANDS)
def test_version(name, capsys):
  import ddm_jax  # pylint: disable=import-outside-toplevel
  with pytest.raises(SystemExit) as e:
    _module(name).main(['--version'])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip().endswith(f'(ddm_jax) {ddm_jax.__version__}')


def test_console_scripts_name_every_command():
  """setup.cfg's console scripts: one `ddm-X` per command, pointing at its main."""
  import configparser  # pylint: disable=import-outside-toplevel
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, 'setup.cfg'))
  scripts = dict(line.split(' = ') for line in
                 cfg['options.entry_points']['console_scripts'].strip().splitlines())
  assert scripts == {f'ddm-{n.replace("_", "-")}': f'ddm_jax.cli.{n}:main' for n in COMMANDS}


def test_setup_cfg_lists_every_package_and_maps_the_configs():
  """setup.cfg names its packages one by one (the configs are mapped in from the top-level
  configs/): a new subpackage missing from the list would be missing from the wheel."""
  import configparser  # pylint: disable=import-outside-toplevel
  cfg = configparser.ConfigParser()
  cfg.read(os.path.join(REPO, 'setup.cfg'))
  listed = set(cfg['options']['packages'].split())
  on_disk = {os.path.relpath(d, REPO).replace(os.sep, '.')
             for d, _, names in os.walk(os.path.join(REPO, 'ddm_jax')) if '__init__.py' in names}
  assert listed == on_disk | {'ddm_jax.configs'}
  assert cfg['options']['package_dir'].split() == ['ddm_jax.configs', '=', 'configs']


def test_shipped_configs_by_name_and_path():
  assert {'digits', 'digits_base', 'sd15_digits', 'sd15_lora'} <= set(shipped_configs())
  by_name, by_path = load_config_file('digits_base'), load_config_file(
      os.path.join(REPO, 'configs', 'digits_base.py'))
  assert by_name.to_dict() == by_path.to_dict() and by_name.data.num_groups == 10
  assert load_config_file('sd15_digits.py').data.resolution == 32  # imports sd15_lora, digits


# ----------------------------------------------------------------------------- help

def test_every_flag_has_help_and_choice_flags_list_their_choices():
  missing = []
  for name in COMMANDS:
    parser = _module(name).build_parser()
    for action in parser._actions:  # pylint: disable=protected-access
      if action.option_strings and not (action.help or '').strip():
        missing.append(f'{name} {action.option_strings[0]}')
  assert not missing, f'flags without help: {missing}'
  from ddm_jax.experiments.regime.plan import GUIDED, UNGUIDED  # pylint: disable=import-outside-toplevel
  methods = _module('regime').build_parser()._option_string_actions['--methods'].help  # pylint: disable=protected-access
  assert all(m in methods for m in UNGUIDED + GUIDED), methods
  for name in ('sample', 'evaluate'):
    sampler = _module(name).build_parser()._option_string_actions['--sampler']  # pylint: disable=protected-access
    assert set(sampler.choices) == {'ddim', 'ddpm', 'dpm++2m', 'pndm'}


def test_help_shows_defaults_and_the_config_overrides(capsys):
  for name in ('train', 'regime', 'sweep'):
    with pytest.raises(SystemExit):
      _module(name).main(['--help'])
    text = ' '.join(capsys.readouterr().out.split())
    assert '--config.SECTION.KEY=VALUE' in text, name
  with pytest.raises(SystemExit):
    _module('sample').main(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  assert '(default: 64)' in text and '(default: 0)' in text   # --num_samples, --seed
  assert '--no_progress' in text


# ----------------------------------------------------------------------------- one line

def test_a_bad_argument_is_one_line_not_the_usage():
  regime, sweep = _module('regime').main, _module('sweep').main
  one_line_error(regime, ['--alphas', '0,abc'], '--alphas', "'0,abc'")
  one_line_error(regime, ['--test_seeds', '1,x'], '--test_seeds')
  one_line_error(sweep, ['--seeds', '0,1.5'], '--seeds')
  one_line_error(_module('sample').main, ['--workdir=x', '--sampler=euler'], '--sampler', 'pndm')
  one_line_error(_module('train').main, ['--workdir=x'], '--config')  # a required flag


@pytest.mark.parametrize('make, needles', [
    (lambda tmp: os.path.join(REPO, 'README.md'), ['README.md', 'is not a config file']),
    (lambda tmp: _write(tmp / 'config.json', '{"train": {}}'), ['config.json', 'not a config file',
                                                                'saved config.json']),
    (lambda tmp: str(tmp), ['is a folder']),
    (lambda tmp: _write(tmp / 'none.py', 'def get_config():\n  return None\n'),
     ['none.py', 'get_config() returned NoneType']),
    (lambda tmp: 'no_such_config', ['config file not found: no_such_config', 'digits']),
])
def test_a_config_that_is_not_an_ml_collections_file(tmp_path, make, needles):
  workdir = tmp_path / 'w'
  one_line_error(_module('train').main, [f'--config={make(tmp_path)}', f'--workdir={workdir}'],
                 *needles)
  assert not workdir.exists()


def _write(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize('code, reason', [
    (errno.ENOENT, 'No such file or directory'), (errno.ENOTDIR, 'Not a directory'),
    (errno.EACCES, 'Permission denied'), (errno.EROFS, 'Read-only file system'),
    (errno.ENOSPC, 'No space left on device')])
def test_os_errors_are_one_line_naming_the_path(code, reason):
  """What the wrapper makes of each OS error (the machine's tests run as root, where a
  permission or a read-only folder cannot be staged, so the errors are raised here)."""
  @common.cli
  def command(argv):
    raise OSError(code, os.strerror(code), '/data/runs/x')
  line = one_line_error(command, [], '/data/runs/x')
  assert line == f'error: /data/runs/x: {reason}'


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
  """A write that fails unnamed (ENOSPC from write()) is raised again naming the file it
  was for, and its temporary is removed: /dev/full stands in for a full disk."""
  if not os.path.exists('/dev/full'):
    pytest.skip('no /dev/full here')
  real_open = open
  monkeypatch.setattr(files, 'open', lambda p, mode, **kw: real_open('/dev/full', mode),
                      raising=False)
  target = tmp_path / 'report.json'
  with pytest.raises(OSError) as e:
    files.write_json(str(target), {'a': 1})
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
  assert os.listdir(tmp_path) == []


def test_train_into_a_path_under_a_file(tmp_path):
  """A real NotADirectoryError from train.py's workdir: one line naming it, through the
  real script (exit status), before any data or model work."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  proc = subprocess.run([sys.executable, 'train.py', f'--config={DIGITS}',
                         f'--workdir={blocker}/sub'], cwd=REPO, env=subprocess_env(),
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr
  assert proc.stderr.strip() == f'error: {blocker}/sub: Not a directory'


def test_guidance_defaults_agree_between_sample_and_evaluate():
  sample, evaluate = _module('sample'), _module('evaluate')
  for mod in (sample, evaluate):
    assert common.guidance_scale(mod.parse_args(['--workdir=w', '--guidance=indicator'])) == 1.0
    assert common.guidance_scale(mod.parse_args(['--workdir=w'])) == 0.0
    assert common.guidance_scale(
        mod.parse_args(['--workdir=w', '--guidance=indicator', '--guidance_scale=3'])) == 3.0
    with pytest.raises(DDMError, match='--guidance_scale needs --guidance=indicator'):
      common.guidance_scale(mod.parse_args(['--workdir=w', '--guidance_scale=2']))


# ----------------------------------------------------------------------------- trained model

@pytest.fixture(scope='module')
def plain_model(data_dir, tmp_path_factory):
  """A tiny model trained with w_ind = 0: its indicator never learned."""
  return str(train_tiny(tmp_path_factory.mktemp('plain') / 'run', data_dir,
                        **{'loss.w_ind': 0.0, 'loss.w_rec': 1.0, 'train.num_steps': 2,
                           'train.checkpoint_every': 2}))


def test_compare_checks_both_halves_before_writing_either(plain_model):
  one_line_error(_module('compare').main, ['--workdir', plain_model, '--num_samples=8',
                                           '--steps=2'], 'w_ind = 0')
  assert not os.path.exists(os.path.join(plain_model, 'eval'))
  assert not os.path.exists(os.path.join(plain_model, 'before_after.png'))


def test_sample_into_a_path_under_a_file(plain_model, tmp_path):
  """After loading the model: one line naming the output, nothing written."""
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  one_line_error(_module('sample').main, ['--workdir', plain_model, '--num_samples=2',
                                          '--steps=2', f'--output={blocker}/sub', '--no_progress'],
                 f'{blocker}/sub', 'Not a directory')
  assert blocker.read_text() == 'x' and os.listdir(tmp_path) == ['a_file']


@contextlib.contextmanager
def refusing_writes(folder):
  """`folder` (made) refusing new files while inside: read-only, or immutable as root
  (root ignores modes)."""
  folder.mkdir(parents=True, exist_ok=True)
  if os.geteuid() != 0:
    os.chmod(folder, 0o555)
    undo = lambda: os.chmod(folder, 0o755)  # pylint: disable=unnecessary-lambda-assignment
  elif shutil.which('chattr') and subprocess.run(['chattr', '+i', str(folder)],
                                                  capture_output=True, check=False).returncode == 0:
    undo = lambda: subprocess.run(['chattr', '-i', str(folder)], check=True)  # pylint: disable=unnecessary-lambda-assignment
  else:
    pytest.skip('running as root without chattr +i: cannot make a folder refuse writes')
  try:
    yield folder
  finally:
    undo()


def refused(line):
  return 'not permitted' in line or 'Permission denied' in line


def test_sample_into_a_folder_that_refuses_writes(plain_model, tmp_path):
  """A real refusal (an immutable folder: root ignores modes): one line, nothing written."""
  with refusing_writes(tmp_path / 'locked') as locked:
    line = one_line_error(_module('sample').main,
                          ['--workdir', plain_model, '--num_samples=2', '--steps=2',
                           f'--output={locked}/out', '--no_progress'], f'{locked}/out')
  assert refused(line), line
  assert os.listdir(locked) == []


def _never(*args, **kwargs):
  raise AssertionError('the long work started before the output was checked')


@pytest.mark.parametrize('name, work, argv', [
    ('evaluate', 'evaluate_workdir', ['--out_dir={out}']),
    ('sample', 'load_trained', ['--output={out}']),
    ('export', 'load_trained', ['--output={out}']),
    ('compare', 'before_after', ['--out={out}/pic.png']),
])
def test_an_output_under_a_file_fails_before_the_work(name, work, argv, tmp_path, monkeypatch):
  """The output location is checked first: one line naming it, before the model loads,
  the evaluator trains or a sample is drawn, and nothing written."""
  monkeypatch.setattr(_module(name), work, _never)
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  out = f'{blocker}/sub'
  one_line_error(_module(name).main, [f'--workdir={tmp_path / "w"}'] +
                 [a.format(out=out) for a in argv], out, 'Not a directory')
  assert os.listdir(tmp_path) == ['a_file']


@pytest.mark.parametrize('sub', ['', 'checkpoints', 'tensorboard'])
def test_train_into_a_workdir_that_refuses_writes(sub, tmp_path, monkeypatch):
  """A workdir, or its checkpoints/ (orbax) or tensorboard/ (tensorboardX) folder, that
  refuses writes: one line naming it before any data or model work (tensorboardX would
  only fail after the first steps), nothing written."""
  monkeypatch.setattr(_module('train'), 'train', _never)
  workdir = tmp_path / 'run'
  with refusing_writes(workdir / sub) as locked:
    line = one_line_error(_module('train').main, [f'--config={DIGITS}', f'--workdir={workdir}'],
                          f'{locked if sub else workdir}: ')
  assert refused(line), line
  assert sorted(os.listdir(workdir)) == ([sub] if sub else [])


def test_regime_base_and_finetunes_must_share_the_unet(tmp_path, monkeypatch):
  """A UNet changed for the fine-tunes only fails before the base trains, saying how."""
  monkeypatch.setattr(_module('regime'), 'Runner', _never)
  one_line_error(_module('regime').main, [f'--out={tmp_path / "r"}', '--quick',
                                          '--config.model.layers_per_block=2'],
                 'model.layers_per_block', '--base_config.model.layers_per_block')
  assert not (tmp_path / 'r').exists()


# ----------------------------------------------------------------------------- quiet, verbose

def test_quiet_leaves_only_the_result_line(plain_model, tmp_path, capsys):
  """A tiny sampling job: its progress bar and notes without --quiet, only its final line
  with it (the bar goes even without --no_progress); stdout is the caller's again after."""
  sample = _module('sample').main
  argv = ['--workdir', plain_model, '--num_samples=2', '--steps=2']
  assert sample(argv + [f'--output={tmp_path / "loud"}']) == 0
  loud = capsys.readouterr()
  assert 'sampling' in loud.err or '%' in loud.err, loud   # the bar
  stdout = sys.stdout
  assert sample(argv + [f'--output={tmp_path / "quiet"}', '--quiet']) == 0
  quiet = capsys.readouterr()
  assert quiet.err == '' and quiet.out.splitlines() == [
      f'wrote 2 PNGs, samples.npz and grid.png to {tmp_path / "quiet"}'], quiet
  assert sys.stdout is stdout and not common.quiet()


def test_verbose_shows_info_logs_and_is_undone(capsys):
  """--verbose: absl INFO lines reach stderr while the command runs, not after it."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel

  @common.cli
  def command(argv):
    common.parse(common.make_parser('train', 'x'), argv, compilation_cache=False)
    absl_logging.info('detail for --verbose')
    common.result('the result')
  assert command(['--verbose']) == 0
  out = capsys.readouterr()
  assert 'detail for --verbose' in out.err and out.out == 'the result\n'
  assert command(['--quiet']) == 0
  assert capsys.readouterr() == ('the result\n', '')
  absl_logging.info('after the command')
  assert 'after the command' not in capsys.readouterr().err
  one_line_error(command, ['--quiet', '--verbose'], 'not allowed with')


# ----------------------------------------------------------------------------- docs

def _readme_config_rows():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  table = text[text.index('### Config keys'):text.index('### Other data sets')]
  return [line for line in table.splitlines() if line.startswith('| `')]


def _leaf_keys(config, prefix=''):
  for key, value in config.items():
    if hasattr(value, 'items'):
      yield from _leaf_keys(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def test_readme_config_table_names_every_key_of_the_digits_config():
  """Each key of configs/digits.py is in README's table: by its dotted name, or in a row
  whose key cell starts with its section (`optim.lr`, `schedule`, ...; `model.*`)."""
  rows = _readme_config_rows()
  missing = []
  for dotted in _leaf_keys(load_config_file('digits')):
    section, key = dotted.rsplit('.', 1)
    if not any(f'`{dotted}`' in row or (row.split('|')[1].strip().startswith(f'`{section}.')
                                        and (f'`{key}`' in row or f'`{section}.*`' in row))
               for row in rows):
      missing.append(dotted)
  assert not missing, f'README.md "Config keys" lacks {missing}'


def test_prepare_sd_digits_spells_a_pair_as_regime_does():
  from ddm_jax.cli.prepare_sd_digits import parse_pair  # pylint: disable=import-outside-toplevel
  assert parse_pair('0/1') == parse_pair('0,1') == (0, 1)
  with pytest.raises(DDMError, match='such as 0/1'):
    parse_pair('0/1/2')
