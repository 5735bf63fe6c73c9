"""Puts the repository root on sys.path so `pytest` works without installing the package;
holds the fixtures that several test files share."""
import os
import socket
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The biased digits, prepared once per session (tests.helpers.shared_data_dir)."""
  # Imported here: tests.helpers turns on the persistent compile cache for whoever imports it.
  from tests.helpers import shared_data_dir  # pylint: disable=import-outside-toplevel
  return shared_data_dir(tmp_path_factory.getbasetemp())


@pytest.fixture
def no_network(monkeypatch):
  """Any attempt to reach the network fails the test instead of hanging in retries."""
  def refuse(*args, **kwargs):
    raise AssertionError(f'network access attempted: {args[1:]!r}')
  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)
