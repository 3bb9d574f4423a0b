"""How train.py, evaluate.py and the dataset check end on an error.

A user-facing error (USER_ERRORS) prints its message alone on stderr and exits with status
EXIT_USER_ERROR, without a traceback: errors.UserError (data.nifti.DataError, errors.ConfigError,
checkpointing.CorruptCheckpointError) and OSError (a missing file or workdir, a permission, a full
disk; raised here with a message naming the file or folder). Any other exception is a bug and keeps its
traceback. With OSSNET_TRACEBACK=1 in the environment, or absl's --verbosity=1 (or higher), user-facing
errors show their traceback as well, above the message.
"""

import functools
import os
import sys
import traceback
from typing import Any, Callable

from absl import flags
from absl import logging as absl_logging  # noqa: F401  (defines the --verbosity flag read here)

from ossnet_jax import errors

USER_ERRORS = (errors.UserError, OSError)
EXIT_USER_ERROR = 2
TRACEBACK_ENV = "OSSNET_TRACEBACK"


def wants_traceback() -> bool:
    """Whether user-facing errors show their traceback: OSSNET_TRACEBACK is set to anything but ''
    or '0', or --verbosity is 1 or more."""
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return True
    return flags.FLAGS["verbosity"].value >= 1


def message(error: BaseException) -> str:
    """What is printed for a user-facing error: its message, or its type's name if it has none."""
    return str(error) or type(error).__name__


def guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """`main` of an absl app.run entry point with USER_ERRORS printed as their message alone on stderr
    and turned into sys.exit(EXIT_USER_ERROR); other exceptions propagate unchanged.

    Whether to show tracebacks is decided before `main` runs: the entry points lower the logging
    verbosity themselves, which rewrites the --verbosity flag.
    """

    @functools.wraps(main)
    def run(argv: list[str]) -> Any:
        show = wants_traceback()
        try:
            return main(argv)
        except USER_ERRORS as error:
            if show:
                traceback.print_exc()
            print(message(error), file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return run
