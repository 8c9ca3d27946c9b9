"""User-facing errors.

Every problem a user can cause (a bad config key, a missing data file, a corrupt
checkpoint) is raised as a `DsjaxError` subclass whose message names the problem and
the fix. The CLI prints such errors as one line and exits non-zero; anything else is a
bug and keeps its traceback.
"""


class DsjaxError(Exception):
  """Base class of errors caused by user input rather than by a bug."""


class ConfigError(DsjaxError):
  """The configuration is invalid: unknown key, wrong type or impossible value."""


class DataError(DsjaxError):
  """Input data is missing or malformed."""


class CheckpointError(DsjaxError):
  """A checkpoint cannot be restored: corrupt, incomplete or incompatible."""


class ExportError(DsjaxError):
  """A model cannot be written in a format: the converter cannot express one of its ops."""
