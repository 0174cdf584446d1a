"""The one way a command ends: the project's own errors become one line on stderr and exit status 2.

Library code raises; each `__main__` calls its work through `run_command`. Imports nothing heavy.
"""

from __future__ import annotations

import gc
import sys
from collections.abc import Callable
from typing import NoReturn


def run_command(work: Callable[[], int | None], errors: tuple[type[BaseException], ...],
                interrupted: str = "") -> int:
    """Run `work`; an error of the given types prints `error: ...` and returns 2, Ctrl-C returns 130."""
    try:
        return work() or 0
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted:
            print(interrupted, file=sys.stderr)
        return 130


def leave(code: int) -> NoReturn:
    """sys.exit(code) for a command run as a program, its objects frozen first: the interpreter's exit
    then skips a last garbage collection over all of them (about 1 s once torch is loaded)."""
    gc.freeze()
    sys.exit(code)
