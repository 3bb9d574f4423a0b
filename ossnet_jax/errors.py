"""Errors whose message is all a user needs; the entry points print them without a traceback (cli.py).

Existing error types subclass UserError as well as the builtin they always were (data.nifti.DataError
is a ValueError, checkpointing.CorruptCheckpointError a RuntimeError), so code catching the builtin
keeps working.
"""


class UserError(Exception):
    """A problem with what the user supplied (data, configuration, a checkpoint), not a bug: the
    message names the file or key and what to change."""


class ConfigError(UserError, ValueError):
    """A configuration value that cannot work; the message names the key (e.g. train.prepare)."""
