"""Run folders: refuse to overwrite a trained run, and resume one from its last.pt.

Every task's train_* function holds the run folder's lock while it runs (`holds_run_folder`: a second run into
the same --out is refused before it reads or writes anything), starts with `check_out_dir` and, for --resume,
`load_resume_run`: the run config saved in the checkpoint with the user's overrides applied, refusing the
changes a checkpoint cannot take (its vocabulary, the shapes of its weights, and, unless allowed, its data:
`data_fingerprint`). The Trainer then restores its own state (`Trainer.resume`).

A new run with `train.init_from` (`--init-from MODEL`) starts from another model instead (`load_init_model`):
its weights, vocabularies and architecture, with the Trainer's state fresh; a setting that would change the
architecture or the vocabulary is refused, one line naming each.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, TypeVar

from seqgen.checkpoint import load_checkpoint, payload_json
from seqgen.config import file_fields, from_dict, merge
from seqgen.data.text import file_digest
from seqgen.distributed import launch_info
from seqgen.errors import SeqgenError, cut_repr
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
        _check_writable(out_dir)      # before the lock makes the folder: a read-only place fails with nothing made
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
    _check_writable(out_dir)
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


def _check_writable(out_dir: str) -> None:
    """--out can be made and written: the nearest folder that exists on its path is one this process may write
    in (checked before any data is read, so that a read-only file system fails at once, with nothing written)."""
    path = os.path.abspath(out_dir)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise SeqgenError(f"--out {out_dir}: {path} is a file, not a folder; choose another --out")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SeqgenError(f"--out {out_dir}: cannot write in {path} (a read-only file system, or no permission); "
                          f"choose another --out")


def data_fingerprint(data_cfg: object) -> dict[str, dict]:
    """What identifies the data files of a run config's data section (its `File` fields that are set and name a
    regular file): {field: seqgen.data.text.file_digest(path)}. Saved in every checkpoint (Trainer(data_fingerprint=...))."""
    out = {}
    for name in file_fields(type(data_cfg)):
        digest = file_digest(getattr(data_cfg, name))
        if digest is not None:      # unreadable: the task's readers say why
            out[name] = digest
    return out


def check_data_unchanged(payload: dict, data_cfg: object, path: str, *, skip: tuple[str, ...] = ()) -> None:
    """Refuse to resume from `path` on other data than its run trained on: a data file whose size or content
    differs from the fingerprint in the checkpoint (a moved or touched file is the same data). A checkpoint
    without a fingerprint (written before seqgen recorded them) resumes. skip: fields checked otherwise (the
    sentencepiece models, against the vocabulary inside the checkpoint)."""
    if "data_fingerprint" not in payload:
        return
    saved = payload_json(payload, "data_fingerprint", path)
    if not isinstance(saved, dict):
        raise SeqgenError(f"{path}: the checkpoint's data_fingerprint entry is not the mapping seqgen writes")
    now = data_fingerprint(data_cfg)
    for name in sorted((set(saved) | set(now)) - set(skip), key=str):
        old, new = saved.get(name), now.get(name)
        same = (isinstance(old, dict) and new is not None
                and (old.get("size"), old.get("sha256")) == (new["size"], new["sha256"]))
        if same:
            continue
        flag = "--" + str(name).replace("_", "-")
        old_path = cut_repr(old.get("path")) if isinstance(old, dict) else "none"
        if new is None:
            what = f"the run trained on {old_path}, now none is given"
        elif old is None:
            what = f"{new['path']} was not part of the run"
        else:
            what = f"{new['path']} is not the file the run trained on ({old_path}: size or content differ)"
        raise SeqgenError(f"{path}: {flag}: {what}; the checkpoint's vocabulary and best score belong to the old "
                          f"data. Pass --allow-data-change to resume anyway, or start a new run in another --out "
                          f"(nothing was changed)")


def check_resume_overrides(saved: dict, overrides: dict, path: str, *, vocab_keys: tuple[str, ...],
                           model_sections: tuple[str, ...] = ("encoder", "decoder")) -> None:
    """Refuse settings that cannot change when resuming from `path`.

    saved: the run config stored in the checkpoint; overrides: what the user gave now (YAML + flags).
    vocab_keys: data keys the vocabulary was built from; model_sections: config sections that shape the weights.
    """
    init = overrides.get("train", {}).get("init_from")
    if init is not None and init != saved.get("train", {}).get("init_from", ""):
        raise SeqgenError(f"{path}: --init-from cannot change on --resume (the run already started from "
                          f"{cut_repr(saved.get('train', {}).get('init_from') or 'scratch')}); drop --init-from to "
                          f"continue it, or start a new run in another --out (nothing was changed)")
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


# Settings of a model section that change how it trains, not what its weights are: a warm start may set them anew.
TRAINING_ONLY = frozenset({"dropout", "memory_dropout", "freeze", "finetune_from"})


def load_init_model(run, overrides: dict | None, task: str, *, sections: dict[str, str], vocab_keys: tuple[str, ...]
                    ) -> tuple[object, Seq2Seq]:
    """For a new run with `run.train.init_from`: the run config with the model's architecture, and the model.

    sections: run-config section -> the ModelConfig field it describes ({"decoder": "decoder", "encoder":
    "text_encoder"}); the run's sections become the model's, with the run's own training-only settings
    (`TRAINING_ONLY`: dropout, freezing): the architecture is the model's, how it trains the run's. Refuses, in one line, a model of another task, a list of models, and every setting the
    user gave (YAML or flag) that differs from the model's architecture or would rebuild its vocabulary.
    """
    from seqgen.model import load_model
    name = run.train.init_from
    if "," in name:
        raise SeqgenError(f"--init-from {cut_repr(name)}: one model starts a run (average several first: "
                          f"seqgen average A B --out avg.pt)")
    try:
        model = load_model(name, task=task)
    except SeqgenError as e:
        raise SeqgenError(f"--init-from: {e}") from None
    overrides = overrides or {}
    replaced, differ = {}, []
    for section, field_name in sections.items():
        have = getattr(model.config, field_name)
        given = overrides.get(section, {})
        for key, value in given.items():
            if key not in TRAINING_ONLY and value != getattr(have, key, value):
                differ.append(f"{section}.{key} {cut_repr(value)} (the model's: {cut_repr(getattr(have, key))})")
        ours = getattr(run, section)
        keep = {k: getattr(ours, k) for k in TRAINING_ONLY if hasattr(have, k) and hasattr(ours, k)}
        replaced[section] = dataclasses.replace(have, **keep)
    data = overrides.get("data", {})
    differ += [f"data.{k} (the vocabulary is the model's)" for k in vocab_keys if k in data and data[k] not in ("", None)
               and not k.endswith("_spm")]
    if differ:
        raise SeqgenError(f"--init-from {cut_repr(name)}: a warm start keeps the model's architecture and "
                          f"vocabulary, but these settings change them: {'; '.join(differ)}; drop them, or train "
                          f"from scratch (nothing was written)")
    # Rebuilt with the new training-only settings (a dropout module or a frozen block is made with them), then
    # given the model's weights: every tensor, buffers included, so the two differ in nothing else.
    config = dataclasses.replace(model.config, **{sections[s]: cfg for s, cfg in replaced.items()})
    fresh = Seq2Seq(config, tgt=model.tgt, src=model.src)
    fresh.load_state_dict(model.state_dict())
    return dataclasses.replace(run, **replaced), fresh


def load_resume_run(path: str, task: str, run_cls: type, overrides: dict | None, *, vocab_keys: tuple[str, ...],
                    model_sections: tuple[str, ...] = ("encoder", "decoder"), allow_data_change: bool = False
                    ) -> tuple[object, Seq2Seq]:
    """For --resume: the run config saved in `path` with the user's `overrides` applied, and the model.

    Refuses a checkpoint of another task, overrides that would change the vocabulary or the weights' shapes, a
    saved config that does not validate, and (unless `allow_data_change`) data files that changed.
    """
    payload = load_checkpoint(path)
    if payload.get("task") != task:
        raise SeqgenError(f"{path}: is a {cut_repr(payload.get('task'))} checkpoint, cannot resume a {task!r} run "
                          f"from it")
    saved = payload_json(payload, "run_config", path)
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise SeqgenError(f"{path}: the checkpoint's run_config entry is not the mapping of sections seqgen writes")
    check_resume_overrides(saved, overrides or {}, path, vocab_keys=vocab_keys, model_sections=model_sections)
    run = from_dict(run_cls, merge(saved, overrides or {}), where=f"{path} run config")
    model = Seq2Seq.from_payload(payload, where=path)
    if not allow_data_change:
        check_data_unchanged(payload, run.data, path, skip=vocab_keys)
    return run, model


__all__ = ["load_init_model", "check_out_dir", "check_resume_overrides", "check_data_unchanged", "data_fingerprint", "holds_run_folder",
           "load_resume_run"]
