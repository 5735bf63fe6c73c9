"""Helpers that several data modules share, kept in one place so they cannot drift."""


def get(cfg, key, default=None):
  """`cfg[key]`, with None read as unset: ConfigDict fields default to None."""
  value = cfg.get(key, default)
  return default if value is None else value


def first_line(error):
  """The first line of an error's message: tfds errors run to many lines of advice."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
