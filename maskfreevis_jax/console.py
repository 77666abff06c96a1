"""What a command-line run shows a person: progress lines and results, apart from the log.

The library reports through `report`; it logs at INFO (silent at the CLI's default WARNING
verbosity) unless a command-line entry point (`main.py`, `two_stage`) has called
`enable_echo()`, which prints the lines to stdout instead. Used as a library, the package
prints nothing.
"""

from __future__ import annotations

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
