"""One error type per domain; the CLIs turn each into a single line and exit 2."""


class DDMError(Exception):
  """Base of every error a user can cause (bad config, data, checkpoint, weights)."""


class ConfigError(DDMError):
  pass


class DataError(DDMError):
  pass


class CheckpointError(DDMError):
  pass


class WeightsError(DDMError):
  pass
