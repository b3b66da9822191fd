"""What the command-line entry points share: bad input ends in one line on stderr, not a traceback.

A user who points a run at a missing file or a table without the configured columns needs the
message (which names the key or the path), not 30 lines of stack. ``--debug`` or
``VARS_FAST_DEBUG=1`` re-raises instead, for developers. A config key under its old name
(``DeprecatedKeyWarning``) is one ``warning: <message>`` line, not Python's two-line format.
"""
from __future__ import annotations

import functools
import os
import sys
import warnings
from typing import Callable, Optional

from vars_fast.config import ConfigError
from vars_fast.errors import DeprecatedKeyWarning

# bad input or a missing earlier result; anything else is a bug and keeps its traceback
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)
EXIT_USER_ERROR = 2


def add_debug_flag(parser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a configuration or input error (or VARS_FAST_DEBUG=1)")


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (Arrow, YAML and OS messages may span several)."""
    return " ".join(str(e).split()) or type(e).__name__


def debug_enabled(argv: Optional[list[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get("VARS_FAST_DEBUG", "") not in ("", "0") or "--debug" in argv


def one_line_warnings() -> None:
    """Show ``DeprecatedKeyWarning`` as ``warning: <message>`` on stderr (once per message);
    other warnings keep Python's format."""
    show = warnings.showwarning
    if getattr(show, "_vars_fast", False):
        return

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, DeprecatedKeyWarning):
            print(f"warning: {one_line(message)}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    showwarning._vars_fast = True
    warnings.showwarning = showwarning


def user_errors_exit(errors: tuple[type[BaseException], ...] = USER_ERRORS) -> Callable:
    """Decorate ``main(argv=None) -> int``: an exception in ``errors`` prints ``error: <message>``
    on one line on stderr and returns 2, unless debugging is on (then it propagates)."""
    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv: Optional[list[str]] = None) -> int:
            one_line_warnings()
            try:
                return main(argv)
            except errors as e:
                if debug_enabled(argv):
                    raise
                print(f"error: {one_line(e)}", file=sys.stderr)
                return EXIT_USER_ERROR
        return run
    return wrap
