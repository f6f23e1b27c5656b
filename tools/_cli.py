"""The one place where the command-line tools turn the project's errors into exit codes.

Every tool ends with::

    if __name__ == "__main__":
        from _cli import run_main

        run_main(main)

``run_main`` calls ``main()`` and exits 0; a :class:`tst.errors.TSTError` (the base of every
error the project raises on purpose: flags, files, inputs, checkpoints), or one of the extra
classes a tool names, is printed as ``<tool>: error: <message>`` on stderr and exits 1,
without a traceback: the message already names the file or flag and the fix. Anything else
is a bug and keeps its traceback. Usage errors stay argparse's (exit 2).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import NoReturn

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tst.errors import TSTError  # noqa: E402

__all__ = ["EXIT_ERROR", "run_main"]

EXIT_ERROR = 1


def run_main(main: Callable[[], object], *also: type[BaseException]) -> NoReturn:
    """Run a tool's ``main()`` and exit: 0 when it returns, :data:`EXIT_ERROR` with a one-line
    message when it raises a ``TSTError`` or one of ``also``."""
    try:
        main()
    except (TSTError, *also) as error:
        prog = os.path.basename(sys.argv[0]) or "tool"
        message = " ".join(str(error).split("\n")) or type(error).__name__
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_ERROR)
    sys.exit(0)
