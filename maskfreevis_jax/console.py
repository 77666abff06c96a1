"""What a command-line run shows a person: progress lines and results, apart from the log.

The library reports through `report`; it logs at INFO (silent at the CLI's default WARNING
verbosity) unless a command-line entry point (`main.py`, `two_stage`) has called
`enable_echo()`, which prints the lines to stdout instead. Used as a library, the package
prints nothing.
"""

from __future__ import annotations

import pathlib

from absl import logging

_echo = False


def enable_echo(echo: bool = True) -> None:
  """Print reported lines to stdout (command-line runs) instead of logging them."""
  global _echo
  _echo = echo


def echo_enabled() -> bool:
  return _echo


def report(message: str) -> None:
  """One line for the person running the command (progress, a result, where outputs went)."""
  if _echo:
    print(message, flush=True)
  else:
    logging.info("%s", message)


# Exceptions the library raises for a person's mistake: a bad flag or config field, a missing or
# malformed file. Raised by this package's own code they get one line; anything else (and these
# types raised inside a dependency, e.g. a JAX shape error) is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, NotImplementedError)
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def raised_here(error: BaseException) -> bool:
  """Whether the innermost frame of `error`'s traceback is this package's code."""
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  return pathlib.Path(tb.tb_frame.f_code.co_filename).resolve().is_relative_to(_PACKAGE_DIR)


def user_error_line(error: BaseException, expected: tuple[type, ...] = ()) -> str | None:
  """'error: <message>' for an expected user error raised by this package, else None.

  Args:
    error: the exception a command caught.
    expected: further exception types that are user errors wherever this package raised them
      (e.g. `checkpointing.CheckpointError`).
  """
  if isinstance(error, EXPECTED_ERRORS + tuple(expected)) and raised_here(error):
    return f"error: {error}"
  return None
