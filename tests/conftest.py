"""Puts the repository root on sys.path so `pytest` works without installing the package;
holds the fixtures that several test files share."""
import os
import re
import shutil
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_configure(config):  # pylint: disable=unused-argument
  """The session's programs (and its subprocesses', by the environment they get) share one
  persistent compilation cache (tests.helpers.compile_cache_dir)."""
  from tests.helpers import enable_compile_cache  # pylint: disable=import-outside-toplevel
  enable_compile_cache()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The biased digits, prepared once per session (tests.helpers.shared_data_dir)."""
  from tests.helpers import shared_data_dir  # pylint: disable=import-outside-toplevel
  return shared_data_dir(tmp_path_factory.getbasetemp())


@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
  """A tiny diffusers Stable Diffusion folder written from our own params (tests/sd_folder.py)."""
  from tests.sd_folder import write_tiny_pipeline  # pylint: disable=import-outside-toplevel
  return write_tiny_pipeline(str(tmp_path_factory.mktemp('sd') / 'pipe'))


@pytest.fixture
def pipe(tiny_sd, tmp_path):
  """A private copy of the tiny pipeline to break."""
  return shutil.copytree(tiny_sd, tmp_path / 'pipe')


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the network fails the test instead of hanging in retries."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args[1:]!r}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


# Markers (registered in setup.cfg), put on every test of a file by what the file does, so a
# new test file is marked without a list to keep: `subprocess` (it starts interpreters),
# `torch` (it imports PyTorch), `sd` (it builds a Stable Diffusion pipeline or folder; also
# any test using the tiny_sd fixture); `slow`, any of these. `make test-fast` runs the rest
# (-m 'not slow').
_FILE_MARKS = {
    'subprocess': re.compile(r'\bsubprocess\b|\brun_python\(|\bPopen\('),
    'torch': re.compile(r'^\s*(import torch|from torch\b)|importorskip\([\'"]torch', re.M),
    'sd': re.compile(r'\bsd_helpers\b|\bsd_folder\b'),
}
_marks_of = {}


def pytest_collection_modifyitems(items):
  for item in items:
    path = str(item.fspath)
    if path not in _marks_of:
      with open(path, encoding='utf-8') as f:
        text = f.read()
      _marks_of[path] = {m for m, sign in _FILE_MARKS.items() if sign.search(text)}
    marks = set(_marks_of[path])
    if 'tiny_sd' in getattr(item, 'fixturenames', ()):
      marks.add('sd')
    marks |= {m.name for m in item.iter_markers()} & set(_FILE_MARKS)
    for name in sorted(marks) + (['slow'] if marks else []):
      item.add_marker(name)
