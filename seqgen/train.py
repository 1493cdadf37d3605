"""Trainer: the one training loop for every task.

The task supplies a model, a `BatchSource` (its data loader) and an `evaluate` function returning
metrics; everything else — optimiser, LR schedule, clipping, label smoothing, early stopping,
checkpoints, exact resume, progress and the metrics log — lives here once.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Protocol

import torch
from tqdm.auto import tqdm

from seqgen.checkpoint import load_checkpoint, remove_partial_writes, save_checkpoint
from seqgen.config import from_dict, merge, to_dict
from seqgen.data.batch import Batch
from seqgen.errors import SeqgenError, report_out_of_memory
from seqgen.model import Seq2Seq


@dataclass
class TrainConfig:
    lr: float = 2e-3
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1        # cosine ends at lr * min_lr_ratio
    plateau_factor: float = 0.5      # plateau: lr *= factor after `plateau_patience` evals without improvement
    plateau_patience: int = 2
    label_smoothing: float = 0.0
    max_steps: int = 5000
    max_epochs: int = 1000
    time_budget: float = 0.0         # minutes of training (evaluation excluded); 0 = no limit
    eval_every: int = 500
    log_every: int = 50
    checkpoint_every: int = 500
    patience: int = 0                # early stopping: evals without improvement before stopping; 0 = never
    max_bad_steps: int = 5           # consecutive non-finite losses before training stops
    seed: int = 1
    device: str = "auto"
    progress: bool = True


class BatchSource(Protocol):
    """A task's training data: deterministic batches per epoch, restartable at any batch index."""

    def num_batches(self, epoch: int) -> int: ...

    def iter_batches(self, epoch: int, start: int = 0) -> Iterator[Batch]: ...


Evaluate = Callable[[Seq2Seq], dict[str, float]]


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so that --resume continues exactly."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float | None = None
    bad_evals: int = 0
    lr_scale: float = 1.0            # plateau schedule's current factor
    bad_plateau: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)  # (step, metric) of every evaluation


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SeqgenError(f"--device: unknown device {name!r} (use auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SeqgenError("--device cuda: no CUDA GPU is available on this machine")
    return device


def lr_factor(cfg: TrainConfig, state: TrainState) -> float:
    """LR multiplier at `state.step`: linear warmup, then the chosen schedule."""
    step = state.step
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.time_budget > 0:  # a time-budgeted run decays over whichever horizon ends first
            progress = max(progress, min(1.0, state.train_seconds / (cfg.time_budget * 60)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "plateau":
        return state.lr_scale
    return 1.0


class Trainer:
    """Trains `model` on `data`, evaluating with `evaluate` and keeping checkpoints in `out_dir`.

    metric: the key of `evaluate`'s result used for best-checkpoint keeping and early stopping;
    mode: "min" (loss) or "max" (BLEU, CIDEr).
    """

    def __init__(self, model: Seq2Seq, data: BatchSource, evaluate: Evaluate, cfg: TrainConfig,
                 out_dir: str, *, metric: str = "loss", mode: Literal["min", "max"] = "min",
                 run_config: dict | None = None, log: Callable[[str], None] | None = None):
        self.cfg, self.data, self.evaluate = cfg, data, evaluate
        self.out_dir, self.metric, self.mode = out_dir, metric, mode
        self.run_config = run_config or {}
        self.device = resolve_device(cfg.device)
        self.model = model.to(self.device)
        self.pad = model.tgt.vocab.pad
        params = [p for p in model.parameters() if p.requires_grad]
        # no weight decay on biases, norms and embeddings (standard AdamW practice)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
        no_decay = [p for p in params if all(p is not q for q in decay)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98))
        self.state = TrainState()
        self._wall0 = time.perf_counter()
        self.log = log or (lambda msg: tqdm.write(msg))
        os.makedirs(out_dir, exist_ok=True)
        self.last_path = os.path.join(out_dir, "last.pt")
        self.best_path = os.path.join(out_dir, "best.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self._saved_step: int | None = None   # step of the last.pt on disk, for the out-of-memory advice
        for path in (self.last_path, self.best_path):  # what a run killed mid-save left behind
            remove_partial_writes(path)

    # -- checkpoints -----------------------------------------------------------------------------------
    def _payload(self, with_trainer: bool) -> dict:
        payload = self.model.to_payload()
        payload["run_config"] = json.dumps(self.run_config)
        payload["metrics"] = json.dumps({"step": self.state.step, "best": self.state.best})
        if with_trainer:
            payload["trainer"] = {
                "state": json.dumps(to_dict(self.state)),
                "optimizer": self.optimizer.state_dict(),
                "rng_cpu": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            }
        return payload

    def save(self) -> None:
        self._save(self.last_path, with_trainer=True)
        self._saved_step = self.state.step

    def _save(self, path: str, with_trainer: bool) -> None:
        try:
            save_checkpoint(path, self._payload(with_trainer))
        except OSError as e:  # disk full, quota, permissions: the atomic write kept the previous file
            raise SeqgenError(f"{path}: cannot save the checkpoint of step {self.state.step} "
                              f"({e.strerror or e}); the previous one is intact: free space and continue "
                              f"with --resume") from None

    def resume(self, path: str | None = None) -> None:
        """Restore model, optimiser, RNG, data position and schedule from `path` (default: last.pt)."""
        path = path or self.last_path
        payload = load_checkpoint(path)
        if "trainer" not in payload:
            raise SeqgenError(f"{path}: has no trainer state (a best.pt?); resume from last.pt")
        if payload.get("task") != self.model.config.task:
            raise SeqgenError(f"{path}: is a {payload.get('task')!r} checkpoint, cannot resume a "
                              f"{self.model.config.task!r} run from it")
        try:
            self.model.load_state_dict(payload["model"])
        except RuntimeError as e:
            raise SeqgenError(f"{path}: weights do not match this run's model config "
                              f"({str(e).splitlines()[0][:160]})") from None
        tr = payload["trainer"]
        self.optimizer.load_state_dict(tr["optimizer"])
        self.state = from_dict(TrainState, json.loads(tr["state"]), where=path)
        torch.set_rng_state(tr["rng_cpu"])
        if tr["rng_cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(tr["rng_cuda"])
        self._saved_step = self.state.step
        self.log(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch}, "
                  f"batch {self.state.batch_in_epoch})")

    def _truncate_metrics_log(self) -> None:
        """Drop log lines written after the checkpoint training starts from, so the log has no duplicates.

        At step k the log and eval lines are written before last.pt, a skipped batch's line after it; a last
        line without its newline is a write cut off by a crash.
        """
        if not os.path.exists(self.metrics_path):
            return
        step, kept = self.state.step, []
        with open(self.metrics_path, encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n") or not line.strip():
                    continue
                rec = json.loads(line)
                if rec.get("step", 0) < step or (rec.get("step", 0) == step and "skipped" not in rec):
                    kept.append(line)
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, self.metrics_path)

    def _write_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- evaluation ------------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        best = self.state.best
        return best is None or (value < best if self.mode == "min" else value > best)

    def run_eval(self) -> bool:
        """Evaluate, keep best.pt, update plateau/early stopping. Returns True to stop training."""
        self.model.eval()
        with torch.no_grad(), report_out_of_memory(f"validating at step {self.state.step}",
                                                   self._batch_advice("valid_batch_size")):
            metrics = self.evaluate(self.model)
        self.model.train()
        if self.metric not in metrics:
            raise SeqgenError(f"evaluation returned no {self.metric!r} (got {sorted(metrics)})")
        # minutes of training (evaluation excluded) and of wall time in this process: metric-vs-time curves
        metrics = {**metrics, "train_minutes": self.state.train_seconds / 60,
                   "wall_minutes": (time.perf_counter() - self._wall0) / 60}
        value = metrics[self.metric]
        st = self.state
        st.history.append([st.step, value])
        improved = self._improved(value)
        if improved:
            st.best, st.bad_evals, st.bad_plateau = value, 0, 0
            self._save(self.best_path, with_trainer=False)
        else:
            st.bad_evals += 1
            st.bad_plateau += 1
            if self.cfg.schedule == "plateau" and st.bad_plateau >= self.cfg.plateau_patience:
                st.lr_scale *= self.cfg.plateau_factor
                st.bad_plateau = 0
        shown = " | ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        self.log(f"eval step {st.step}: {shown}" + (" (best)" if improved else ""))
        self._write_metrics({"step": st.step, "eval": metrics, "best": st.best})
        return bool(self.cfg.patience and st.bad_evals >= self.cfg.patience)

    def _batch_advice(self, key: str) -> str:
        """What to lower after running out of memory: the run config's `data.<key>` (or its token budget)."""
        data = self.run_config.get("data", {})
        if key == "batch_size" and data.get("max_tokens"):
            flag = f"--max-tokens (now {data['max_tokens']})"
        elif key in data:
            flag = f"--{key.replace('_', '-')} (now {data[key]})"
        else:
            flag = "the batch size"
        if self._saved_step is None:
            return f"lower {flag}"
        return (f"lower {flag} and continue with --resume: {self.last_path} of step {self._saved_step} "
                f"is intact")

    # -- the loop --------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Train until max_steps, max_epochs, the time budget or early stopping; returns the final state."""
        cfg, st, model = self.cfg, self.state, self.model
        model.train()
        self._truncate_metrics_log()
        if st.step == 0:  # a run killed before its first step checkpoint resumes from here (and best.pt
            self.save()   # never exists without a last.pt)
        bar = tqdm(total=cfg.max_steps, initial=st.step, disable=not cfg.progress, desc="train",
                   unit="step", dynamic_ncols=True)
        window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
        bad_steps, stop = 0, st.step >= cfg.max_steps
        while not stop and st.epoch < cfg.max_epochs:
            if st.batch_in_epoch >= self.data.num_batches(st.epoch):
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                continue
            for batch in self.data.iter_batches(st.epoch, st.batch_in_epoch):
                t0 = time.perf_counter()
                shape = f"{batch.target.size(0)} sequences x {batch.target.size(1) - 1} tokens"
                with report_out_of_memory(f"at step {st.step + 1} on a batch of {shape}",
                                          self._batch_advice("batch_size")):
                    batch = batch.to(self.device)
                    for group in self.optimizer.param_groups:
                        group["lr"] = cfg.lr * lr_factor(cfg, st)
                    loss, n_tok = model.loss(batch, cfg.label_smoothing)
                    finite = bool(torch.isfinite(loss))
                    if finite:
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if cfg.clip_norm > 0:
                            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
                        self.optimizer.step()
                st.batch_in_epoch += 1
                if not finite:
                    bad_steps += 1
                    self.log(f"step {st.step}: non-finite loss ({loss.item()}), batch skipped "
                              f"({bad_steps}/{cfg.max_bad_steps})")
                    self._write_metrics({"step": st.step, "skipped": "non-finite loss"})
                    if bad_steps >= cfg.max_bad_steps:
                        raise SeqgenError(
                            f"training stopped: {bad_steps} consecutive non-finite losses at step {st.step}; "
                            f"lower --lr or check the data (last good checkpoint: {self.last_path})")
                    continue
                bad_steps = 0
                st.step += 1
                st.train_seconds += time.perf_counter() - t0
                window_tokens += n_tok
                window_loss += loss.item()
                window_steps += 1
                bar.update(1)
                if st.step % cfg.log_every == 0 or st.step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    rec = {"step": st.step, "epoch": st.epoch, "loss": window_loss / window_steps,
                           "tokens_per_s": window_tokens / elapsed, "lr": self.optimizer.param_groups[0]["lr"]}
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    self.log(f"step {st.step} | epoch {st.epoch} | loss {rec['loss']:.4f} | "
                              f"{rec['tokens_per_s']:,.0f} tok/s | lr {rec['lr']:.2e}")
                    self._write_metrics(rec)
                    window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
                out_of_time = cfg.time_budget > 0 and st.train_seconds >= cfg.time_budget * 60
                stop = st.step >= cfg.max_steps or out_of_time
                if st.step % cfg.eval_every == 0 or stop:
                    stop = self.run_eval() or stop
                    window_start = time.perf_counter()
                if st.step % cfg.checkpoint_every == 0 or st.step % cfg.eval_every == 0 or stop:
                    self.save()
                if stop:
                    break
        bar.close()
        if st.step % cfg.eval_every != 0 and not stop:  # ran out of epochs between evaluations
            self.run_eval()
            self.save()
        return st


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


def seed_everything(seed: int) -> None:
    """Seed torch's CPU (and CUDA) generators: dropout and initialisation are the only global randomness."""
    torch.manual_seed(seed)
