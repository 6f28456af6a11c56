"""What the command line shows its user: results on stdout, errors on stderr.

Separate from logging (structlog events, for operators and machines) on
purpose: a command's answer is not a log line.
"""

from __future__ import annotations

import sys


def emit(text: str = "", *, error: bool = False) -> None:
    stream = sys.stderr if error else sys.stdout
    stream.write(f"{text}\n")
    stream.flush()
