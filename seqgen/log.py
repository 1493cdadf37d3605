"""How seqgen tells the person running it what is happening: one convention, whole lines.

A library function that reports progress or a problem takes a `log` callable (`Log`; translation's is named
`warn`) and calls it with finished lines; None means `to_stderr`. Under torchrun only process 0 reports
(`main_process_log`). A warning is a line built by `warning(...)`, "seqgen: warning: ...", whoever prints it.
The Trainer's default is `tqdm.write` instead, so that its lines do not tear the progress bar.

A line that reaches the terminal shows every control character escaped (`printable`: ESC as \\x1b, a newline
as \\n), so that a file name can neither break a line nor retitle, recolour or clear the terminal: `to_stderr`,
`warning(...)` lines and the Trainer's default log escape what they print, and so does the CLI's error line.

Everything else has its own channel: results (translations, captions, generated text, tables) are printed to
stdout or written to files; errors are `SeqgenError`s, which the CLI prints as one `seqgen: error:` line.
Neither the `logging` nor the `warnings` module is used.
"""
from __future__ import annotations

import re
import sys
from typing import Callable

from seqgen.errors import LINE_BREAKS

Log = Callable[[str], None]

# What a terminal acts on or cannot print: C0 controls (tab included), DEL, C1 controls, the other line breaks
# (U+2028/9), and lone surrogates (the undecodable bytes of a file name, which no UTF-8 stream can hold).
_UNPRINTABLE = re.compile(f"[\x00-\x1f\x7f-\x9f{LINE_BREAKS}\ud800-\udfff]")


def printable(text: str) -> str:
    r"""`text` safe to show in one terminal line: each control character as its Python escape (ESC -> \x1b, a
    newline -> \n, the undecodable byte 0xff of a file name -> \udcff); printable text is unchanged. Idempotent."""
    return _UNPRINTABLE.sub(lambda m: repr(m[0])[1:-1], text)


def to_stderr(line: str) -> None:
    """The default `log`: the line on stderr, control characters escaped (`printable`)."""
    print(printable(line), file=sys.stderr)


def quiet(line: str) -> None:
    """A `log` that drops every line (processes other than 0, validation runs)."""


def warning(message: str) -> str:
    """The line a warning is reported as: "seqgen: warning: {message}" (control characters escaped)."""
    return f"seqgen: warning: {printable(message)}"


def main_process_log(log: Log | None, is_main: bool) -> Log:
    """`log` (default `to_stderr`) in process 0 of a run, `quiet` in the others."""
    return (log or to_stderr) if is_main else quiet
