"""How seqgen tells the person running it what is happening: one convention, whole lines.

A library function that reports progress or a problem takes a `log` callable (`Log`; translation's is named
`warn`) and calls it with finished lines; None means `to_stderr`. Under torchrun only process 0 reports
(`main_process_log`). A warning is a line built by `warning(...)`, "seqgen: warning: ...", whoever prints it.
The Trainer's default is `tqdm.write` instead, so that its lines do not tear the progress bar.

Everything else has its own channel: results (translations, captions, generated text, tables) are printed to
stdout or written to files; errors are `SeqgenError`s, which the CLI prints as one `seqgen: error:` line.
Neither the `logging` nor the `warnings` module is used.
"""
from __future__ import annotations

import sys
from typing import Callable

Log = Callable[[str], None]


def to_stderr(line: str) -> None:
    """The default `log`: the line on stderr."""
    print(line, file=sys.stderr)


def quiet(line: str) -> None:
    """A `log` that drops every line (processes other than 0, validation runs)."""


def warning(message: str) -> str:
    """The line a warning is reported as: "seqgen: warning: {message}"."""
    return f"seqgen: warning: {message}"


def main_process_log(log: Log | None, is_main: bool) -> Log:
    """`log` (default `to_stderr`) in process 0 of a run, `quiet` in the others."""
    return (log or to_stderr) if is_main else quiet
