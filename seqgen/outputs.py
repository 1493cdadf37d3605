"""What guards the files seqgen writes: one writer at a time, never over an input, nothing a spreadsheet runs.

    with holding(acquire_output_lock("captions.jsonl")):     # another seqgen writing it: SeqgenError, one line
        ...
    refuse_overwriting_inputs({"--out": out}, {"--ref": ref, "MODEL": checkpoint})

- `acquire_lock`, `acquire_output_lock`: an exclusive `fcntl.flock` on a lock file: `.NAME.lock` next to an output
  file (`output_lock_path`), `.seqgen.lock` inside a run folder (`run_folder_lock_path`). The holder writes its
  PID, host, start time and command into it, so that a second process is refused with one line saying who holds it,
  before it reads or writes anything. The file is removed on release (and so are the folders that taking the lock
  created, when nothing else was written there); a killed holder leaves a stale file that the next run takes over
  (the kernel drops the lock with the process). Where no lock file can be made or the filesystem has no flock (a
  read-only folder, some network filesystems, Windows), the command runs unlocked.
- `output_lock(out, dist)`: the same lock for a run of several processes (torchrun): process 0 takes it, all
  share the refusal.
- `refuse_overwriting_inputs`: an output that is one of the inputs, or another output, resolved (the same
  file through a symlink or a hard link, `./a` and `a`), is refused before anything is written.
- `spreadsheet_cell`: a text cell of a CSV/TSV file that begins like a formula gets a leading quote (OWASP's
  rule against CSV injection); `unspreadsheet_cell` undoes it when seqgen reads its own file back.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

from seqgen.errors import SeqgenError

try:
    import fcntl
except ImportError:   # Windows: no flock; commands run unlocked
    fcntl = None

RUN_FOLDER_LOCK = ".seqgen.lock"


def output_lock_path(path: str) -> str:
    """The lock file of output file `path`: captions.jsonl -> .captions.jsonl.lock, in the same folder."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lock")


def run_folder_lock_path(folder: str) -> str:
    """The lock file of a run folder: FOLDER/.seqgen.lock."""
    return os.path.join(folder, RUN_FOLDER_LOCK)


def _holder(lock_path: str) -> str:
    """Who holds `lock_path`, from what it wrote there: "pid 12 on host, since 10:42:07: seqgen train ..."."""
    try:
        with open(lock_path, encoding="utf-8", errors="replace") as f:
            info = json.loads(f.read(4096))
        return (f"pid {int(info['pid'])} on {str(info['host'])[:100]}, since {str(info['started'])[:40]}: "
                f"{str(info['command'])[:300]}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _make_folders(folder: str) -> list[str]:
    """Create `folder` and its missing parents; returns the ones created, deepest first."""
    created = []
    while folder and not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    made = []
    for path in reversed(created):
        try:
            os.mkdir(path)
        except FileExistsError:   # another process made it meanwhile: not ours to remove
            continue
        made.append(path)
    return made[::-1]


class Lock:
    """A lock from `acquire_lock` (`fd` None: none could be taken here); `release()` unlocks it and removes what
    taking it created."""

    def __init__(self, path: str, fd: int | None, created: list[str]):
        self.path, self.fd, self.created = path, fd, created

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path)     # while still holding it: a process that opens it later makes a new file
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        for folder in self.created:  # deepest first; a folder the command wrote into is not empty and stays
            try:
                os.rmdir(folder)
            except OSError:
                break


def acquire_lock(lock_path: str, what: str) -> Lock:
    """Take the exclusive lock `lock_path` (creating it and its folder), or raise SeqgenError saying that `what`
    (e.g. "the run folder runs/lm") is in use and by whom. Where no lock can be taken (no lock file can be made,
    no flock on the filesystem) the `Lock` returned holds nothing and the command runs unlocked."""
    lock_path = os.path.abspath(lock_path)
    for _ in range(20):   # retried when the holder removed the file between our open and our flock
        try:
            created = _make_folders(os.path.dirname(lock_path))
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            return Lock(lock_path, None, [])   # no lock file can be made here: the command itself will say why
        try:
            if fcntl is None:
                raise OSError("no flock")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SeqgenError(f"{what} is in use by another seqgen ({_holder(lock_path)}); wait for it to finish "
                              f"or stop it (lock file {lock_path}); nothing was changed") from None
        except OSError:        # no flock on this filesystem
            os.close(fd)
            return Lock(lock_path, None, [])
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except OSError:
            same = False
        if not same:           # locked a file its holder had just removed: take the new one
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "host": os.uname().nodename, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(["seqgen" if i == 0 else a for i, a in enumerate(sys.argv)])[:300]}
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(info).encode("utf-8", "backslashreplace"))
        except OSError:
            pass
        return Lock(lock_path, fd, created)
    raise SeqgenError(f"{what}: cannot take the lock {lock_path} (it keeps being replaced); try again")


def acquire_output_lock(path: str) -> Lock:
    """The lock of output file `path` (`output_lock_path`), named "--out PATH" in the refusal; none for an output
    that exists and is no regular file (a device such as /dev/stdout, a FIFO): there is no work there to protect."""
    if os.path.exists(path) and not os.path.isfile(path):
        return Lock(output_lock_path(path), None, [])
    return acquire_lock(output_lock_path(path), f"--out {path}")


@contextmanager
def holding(lock: Lock) -> Iterator[Lock]:
    """Release `lock` when the block ends: `with holding(acquire_output_lock(out)): ...`."""
    try:
        yield lock
    finally:
        lock.release()


@contextmanager
def output_lock(out_path: str, dist) -> Iterator[None]:
    """Under torchrun, process 0 holds the lock of `out_path` for the block and the others share its answer:
    when another seqgen holds it, every process of this run raises the same one-line error before reading or
    writing anything. `dist` is a seqgen.distributed.Distributed (a world of one: just this process)."""
    lock, refusal = None, None
    if dist.is_main:
        try:
            lock = acquire_output_lock(out_path)
        except SeqgenError as e:
            refusal = str(e)
    refusal = dist.broadcast(refusal)
    if refusal:
        raise SeqgenError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def same_file(a: str, b: str) -> bool:
    """True when paths `a` and `b` name one file: the same inode when both exist, else the same resolved path."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwriting_inputs(outputs: Mapping[str, str | None],
                              inputs: Mapping[str, str | None] | Iterable[tuple[str, str | None]]) -> None:
    """Raise SeqgenError when an output (flag -> path) is an input (name -> path, or such pairs) that exists, or
    another output. None, "" and "-" (stdin/stdout) are no files. Call it before anything is written.
    """
    outs = [(flag, path) for flag, path in outputs.items() if path and path != "-"]
    ins = list(inputs.items() if isinstance(inputs, Mapping) else inputs)
    for i, (flag, path) in enumerate(outs):
        for other, other_path in outs[:i]:
            if same_file(path, other_path):
                raise SeqgenError(f"{flag} {path} is the same file as {other} {other_path}; choose another "
                                  f"(nothing was written)")
        for name, source in ins:
            if source and source != "-" and os.path.lexists(source) and same_file(path, source):
                raise SeqgenError(f"{flag} {path} is {name} {source}; choose another {flag}: seqgen never writes "
                                  f"over its inputs (nothing was written)")


# OWASP (CSV injection): a cell beginning with one of these is a formula to a spreadsheet; the quote is ours too,
# so that a name that really begins with a quote reads back as itself.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_cell(text: str) -> str:
    """A text cell for a CSV/TSV file: a leading quote when `text` begins like a formula: "=cmd|..." -> "'=cmd|..."."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def unspreadsheet_cell(cell: str) -> str:
    """The text `spreadsheet_cell` made `cell` from."""
    return cell[1:] if cell.startswith("'") and cell[1:].startswith(_FORMULA_STARTS) else cell


__all__ = ["Lock", "acquire_lock", "acquire_output_lock", "holding", "output_lock_path", "refuse_overwriting_inputs",
           "run_folder_lock_path", "same_file", "spreadsheet_cell", "unspreadsheet_cell"]
