"""Run folders: refuse to overwrite a trained run, and resume one from its last.pt.

Every task's train_* function holds the run folder's lock while it runs (`holds_run_folder`: a second run into
the same --out is refused before it reads or writes anything), starts with `check_out_dir` and, for --resume,
`load_resume_run`: the run config saved in the checkpoint with the user's overrides applied, refusing the
changes a checkpoint cannot take (its vocabulary, the shapes of its weights). The Trainer then restores its
own state (`Trainer.resume`).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable, TypeVar

from seqgen.checkpoint import load_checkpoint
from seqgen.config import from_dict, merge
from seqgen.distributed import launch_info
from seqgen.errors import SeqgenError
from seqgen.model import Seq2Seq
from seqgen.outputs import acquire_lock, holding, run_folder_lock_path

T = TypeVar("T")


def holds_run_folder(train_fn: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a task's `train_*(run, out_dir, *, resume=False, ...)`: the run folder is locked while it runs
    (seqgen.outputs; `out_dir/.seqgen.lock` names the holder), so that a second run into it, --resume or not, is
    refused with one line before it touches anything. Under torchrun process 0 alone takes the lock (the others
    write nothing, and torchrun stops them when process 0 exits). A folder that is not there yet is made for the
    lock and removed again if the run fails before writing into it; with --resume a missing folder is left for
    `check_out_dir` to report."""

    @functools.wraps(train_fn)
    def run(run_config, out_dir: str, *args, **kwargs) -> T:
        folder = os.path.isdir(out_dir)
        # not a folder, or nothing to resume: check_out_dir says so
        if launch_info().rank != 0 or (os.path.lexists(out_dir) or kwargs.get("resume")) and not folder:
            return train_fn(run_config, out_dir, *args, **kwargs)
        with holding(acquire_lock(run_folder_lock_path(out_dir), f"the run folder {out_dir}")):
            return train_fn(run_config, out_dir, *args, **kwargs)

    return run


def check_out_dir(out_dir: str, resume: bool) -> str | None:
    """Refuse to overwrite a previous run; with resume, return the checkpoint to continue from.

    With resume, a folder that exists but holds no checkpoint yet is a run killed before its first one
    (written before the first step): None, the run starts over, so that rerunning with --resume after a
    kill always works. A folder that does not exist is more likely a typo and stays an error.
    """
    last = os.path.join(out_dir, "last.pt")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SeqgenError(f"--out {out_dir}: exists and is not a folder; choose another --out")
    if resume:
        if os.path.exists(last):
            return last
        if not os.path.isdir(out_dir):
            raise SeqgenError(f"--resume: {out_dir} does not exist (nothing to resume); drop --resume to start")
        if os.path.exists(os.path.join(out_dir, "best.pt")):
            raise SeqgenError(f"--resume: {out_dir} has a best.pt but no last.pt (it holds the trainer state); "
                              f"start a new run in another --out (nothing was changed)")
        return None
    if os.path.exists(last) or os.path.exists(os.path.join(out_dir, "best.pt")):
        raise SeqgenError(f"{out_dir} already holds a trained model; pass --resume to continue it "
                          f"or choose another --out (nothing was overwritten)")
    return None


def check_resume_overrides(saved: dict, overrides: dict, path: str, *, vocab_keys: tuple[str, ...],
                           model_sections: tuple[str, ...] = ("encoder", "decoder")) -> None:
    """Refuse settings that cannot change when resuming from `path`.

    saved: the run config stored in the checkpoint; overrides: what the user gave now (YAML + flags).
    vocab_keys: data keys the vocabulary was built from; model_sections: config sections that shape the weights.
    """
    data = overrides.get("data", {})
    changed = [k for k in vocab_keys if k in data and data[k] != saved.get("data", {}).get(k)]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise SeqgenError(f"{path}: {flags} cannot change on --resume: the checkpoint's vocabulary was built with "
                          f"the old value(s); start a new run in another --out (nothing was changed)")
    for section in model_sections:
        diff = [k for k, v in overrides.get(section, {}).items() if v != saved.get(section, {}).get(k)]
        if diff:
            raise SeqgenError(f"{path}: the {section} ({', '.join(diff)}) cannot change on --resume; "
                              f"start a new run in another --out (nothing was changed)")


def load_resume_run(path: str, task: str, run_cls: type, overrides: dict | None, *, vocab_keys: tuple[str, ...],
                    model_sections: tuple[str, ...] = ("encoder", "decoder")) -> tuple[object, Seq2Seq]:
    """For --resume: the run config saved in `path` with the user's `overrides` applied, and the model.

    Refuses a checkpoint of another task and overrides that would change the vocabulary or the weights' shapes.
    """
    payload = load_checkpoint(path)
    if payload.get("task") != task:
        raise SeqgenError(f"{path}: is a {payload.get('task')!r} checkpoint, cannot resume a {task!r} run from it")
    saved = json.loads(payload["run_config"])
    check_resume_overrides(saved, overrides or {}, path, vocab_keys=vocab_keys, model_sections=model_sections)
    run = from_dict(run_cls, merge(saved, overrides or {}), where=f"{path} run config")
    return run, Seq2Seq.from_payload(payload, where=path)


__all__ = ["check_out_dir", "check_resume_overrides", "holds_run_folder", "load_resume_run"]
