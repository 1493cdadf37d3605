"""Trainer: the one training loop for every task.

The task supplies a model, a `BatchSource` (its data loader) and an `evaluate` function returning
metrics; everything else — optimiser, LR schedule, clipping, label smoothing, weight averaging, mixed precision,
torch.compile, gradient accumulation, data parallelism under torchrun, early stopping, checkpoints,
exact resume, progress and the metrics log — lives here once.

Data parallelism (seqgen/distributed.py). One optimizer step trains on a *global batch*: the next
world x accumulate batches of the epoch's (deterministic) batch list, process r taking every world-th of
them from the step's first position + r. Each process backpropagates its batches' share of the mean loss
over all the step's target tokens (weight n_batch * world / n_step: DDP averages gradients over the
processes), so a step equals one single-process step over the union of those batches, and a run with
world W and accumulate A trains exactly like one with world 1 and accumulate W x A. The data position in
the checkpoint counts batches of the global list, so a checkpoint resumes with any number of processes.
Dropout masks come from a seed per (seed, step, batch slot in the step), never from saved RNG state, so
resumed and uninterrupted runs, and runs with the same global batch on any world size, draw the same masks.

The module is over 500 lines because the loop's parts (the step, evaluation, checkpoints, resume, the
data-parallel bookkeeping) all read and write one TrainState and rely on each other's invariants, and its
TrainConfig documents each of its 25 fields (the text of their --help); what does not need the loop's state
(run folders, resuming a run's config) is in seqgen/runs.py.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterable, Iterator, Literal, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from seqgen.atomic import atomic_write, remove_partial_writes
from seqgen.checkpoint import load_checkpoint, payload_json, save_checkpoint
from seqgen.config import Bounds, Count, Device, Model, NonNegative, Positive, Rate, Seed, from_dict, to_dict, validate
from seqgen.data.batch import Batch
from seqgen.data.batching import shard_positions
from seqgen.distributed import Distributed, setup
from seqgen.ema import WeightEMA
from seqgen.errors import SeqgenError, is_out_of_memory, report_out_of_memory
from seqgen.log import Log, printable, quiet, warning
from seqgen.model import Seq2Seq
from seqgen.precision import autocast_dtype


@dataclass
class TrainConfig:
    """How the Trainer trains: optimiser, learning-rate schedule, stopping, checkpoints, precision, device.

    lr:               peak learning rate (AdamW), reached at the end of the warmup
    weight_decay:     AdamW weight decay (biases, norms and embeddings are not decayed)
    clip_norm:        clip the gradients' global norm to this; 0 = no clipping
    schedule:         the learning rate after the warmup: constant; cosine decay over max_steps, max_epochs or
                      the time budget, whichever ends first; or lowered on plateaus of the validation metric
    warmup_steps:     steps of linear warmup to lr
    min_lr_ratio:     cosine: the schedule ends at lr x this
    plateau_factor:   plateau: lr is multiplied by this after plateau_patience evaluations without improvement
    plateau_patience: plateau: evaluations without improvement before lr is lowered
    label_smoothing:  label smoothing of the training loss
    ema:              decay of a moving average of the weights that validation and best.pt use (e.g. 0.999);
                      0 = validate the training weights themselves
    max_steps:        stop after this many optimizer steps
    max_epochs:       stop after this many passes over the training data
    time_budget:      stop after this many minutes of training (evaluation excluded); 0 = no limit
    eval_every:       validate, and keep best.pt, every this many steps
    log_every:        log the training loss and speed every this many steps
    checkpoint_every: save last.pt every this many steps (and at every evaluation)
    keep_checkpoints: keep the weights of the last N validations as step-STEP.pt (for seqgen average); 0 = none
    init_from:        start a new run from this model's weights and vocabularies (a checkpoint or a shipped name),
                      with a fresh optimizer, schedule, step count and best score; its architecture is kept
    patience:         early stopping: evaluations without improvement before training stops; 0 = never
    max_bad_steps:    consecutive non-finite losses (skipped steps) before training stops
    accumulate:       batches per process per optimizer step (a step trains on processes x accumulate batches)
    amp:              autocast: auto = bfloat16 where the hardware has it natively, else float32; fp16 (with
                      loss scaling) for GPUs without bf16; off = float32
    compile:          torch.compile the training forward (falls back to eager with a warning)
    seed:             random seed of initialisation, data order and dropout
    device:           auto (the first GPU if there is one, else the CPU), cpu, cuda or cuda:N; under torchrun
                      auto and cuda mean the GPU of each process's LOCAL_RANK
    progress:         show a progress bar
    """

    lr: Annotated[float, Bounds(0.0, low_open=True)] = 2e-3
    weight_decay: NonNegative = 0.01
    clip_norm: NonNegative = 1.0
    schedule: Literal["constant", "cosine", "plateau"] = "cosine"
    warmup_steps: Count = 100
    min_lr_ratio: Annotated[float, Bounds(0.0, 1.0)] = 0.1
    plateau_factor: Annotated[float, Bounds(0.0, 1.0, low_open=True)] = 0.5
    plateau_patience: Positive = 2
    label_smoothing: Rate = 0.0
    ema: Rate = 0.0
    max_steps: Positive = 5000
    max_epochs: Positive = 1000
    time_budget: NonNegative = 0.0
    eval_every: Positive = 500
    log_every: Positive = 50
    checkpoint_every: Positive = 500
    keep_checkpoints: Count = 0
    init_from: Model = ""
    patience: Count = 0
    max_bad_steps: Positive = 5
    accumulate: Positive = 1
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    compile: bool = False
    seed: Seed = 1
    device: Device = "auto"
    progress: bool = True


class BatchSource(Protocol):
    """A task's training data: a deterministic list of batches per epoch; any slice of it can be iterated
    (a resumed run starts at its position, each data-parallel process takes every world-th batch)."""

    def num_batches(self, epoch: int) -> int: ...

    def iter_batches(self, epoch: int, start: int = 0, stop: int | None = None, step: int = 1
                     ) -> Iterator[Batch]: ...


Evaluate = Callable[[Seq2Seq], dict[str, float]]


@dataclass
class TrainState:
    """Where training is; saved in every checkpoint so that --resume continues exactly.

    batch_in_epoch counts the batches of the epoch's list consumed by all processes together (world x
    accumulate per step), so the position means the same with any number of processes.
    """

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    best: float | None = None
    bad_evals: int = 0
    lr_scale: float = 1.0            # plateau schedule's current factor
    bad_plateau: int = 0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)  # (step, metric) of every evaluation


def dropout_seed(seed: int, step: int, slot: int) -> int:
    """Seed of torch's global RNG (dropout) for batch `slot` of optimizer step `step`.

    slot = position of the batch in the step's global batch (micro-batch j of process r: j * world + r),
    so the masks depend on what is trained, not on which process trains it or on restarts.
    """
    # Large odd multipliers keep nearby (seed, step, slot) triples far apart.
    return (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + slot * 0x94D049BB133111EB) % (1 << 63)


def lr_factor(cfg: TrainConfig, state: TrainState, batches_per_epoch: int | None = None) -> float:
    """LR multiplier at `state.step`: linear warmup, then the chosen schedule.

    The cosine decays over whichever horizon ends first: max_steps, max_epochs (when `batches_per_epoch`,
    the length of the current epoch's batch list, is given) or the time budget.
    """
    step = state.step
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if batches_per_epoch:
            epochs_done = state.epoch + min(1.0, state.batch_in_epoch / batches_per_epoch)
            progress = max(progress, min(1.0, epochs_done / cfg.max_epochs))
        if cfg.time_budget > 0:
            progress = max(progress, min(1.0, state.train_seconds / (cfg.time_budget * 60)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "plateau":
        return state.lr_scale
    return 1.0


class _TrainingLoss(nn.Module):
    """`model.loss` as a module's forward: what DistributedDataParallel wraps and torch.compile compiles."""

    def __init__(self, model: Seq2Seq, label_smoothing: float):
        super().__init__()
        self.model, self.label_smoothing = model, label_smoothing

    def forward(self, batch: Batch) -> Tensor:
        """Mean cross-entropy (scalar) over the batch's target tokens."""
        return self.model.loss(batch, self.label_smoothing)[0]


def _steps_of(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """Consecutive groups of `size` batches (one optimizer step's share of this process)."""
    it = iter(batches)
    while group := list(itertools.islice(it, size)):
        yield group


_KEPT = re.compile(r"step-(\d+)\.pt")   # keep_checkpoints' files in the run folder


def kept_checkpoints(out_dir: str) -> list[str]:
    """The step-STEP.pt files that `keep_checkpoints` left in run folder `out_dir`, oldest first (what
    `seqgen average` is given)."""
    try:
        names = os.listdir(out_dir)
    except OSError:
        return []
    steps = sorted(int(m.group(1)) for m in map(_KEPT.fullmatch, names) if m)
    return [os.path.join(out_dir, f"step-{s}.pt") for s in steps]


class Trainer:
    """Trains `model` on `data`, evaluating with `evaluate` and keeping checkpoints in `out_dir`.

    metric: the key of `evaluate`'s result used for best-checkpoint keeping and early stopping;
    mode: "min" (loss) or "max" (BLEU, CIDEr).  dist: this process's place in a torchrun run (default:
    `seqgen.distributed.setup(cfg.device)`); process 0 alone logs, writes files and validates.
    """

    def __init__(self, model: Seq2Seq, data: BatchSource, evaluate: Evaluate, cfg: TrainConfig,
                 out_dir: str, *, metric: str = "loss", mode: Literal["min", "max"] = "min",
                 run_config: dict | None = None, log: Log | None = None,
                 dist: Distributed | None = None, objective: nn.Module | None = None,
                 data_fingerprint: dict | None = None):
        validate(cfg)
        self.cfg, self.data, self.evaluate = cfg, data, evaluate
        self.out_dir, self.metric, self.mode = out_dir, metric, mode
        self.run_config = run_config or {}
        self.data_fingerprint = data_fingerprint   # seqgen.runs.data_fingerprint: --resume checks the data
        self.dist = dist or setup(cfg.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.pad = model.tgt.vocab.pad
        params = [p for p in model.parameters() if p.requires_grad]
        # no weight decay on biases, norms and embeddings (standard AdamW practice)
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.dim() >= 2 and "embed" not in n]
        no_decay = [p for p in params if all(p is not q for q in decay)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.98))
        self.ema = WeightEMA(self.model, cfg.ema) if cfg.ema else None
        self._batches_per_epoch: int | None = None   # of the current epoch: the cosine's epoch horizon
        self.amp_dtype = autocast_dtype(cfg.amp, self.device)
        # fp16 gradients underflow without loss scaling; with anything else the scaler is a no-op
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.state = TrainState()
        self._wall0 = time.perf_counter()
        self._mark = self._wall0           # end of the last step's bookkeeping: train_seconds counts from it
        # tqdm.write, not stderr, by default: lines between progress-bar updates (see seqgen.log)
        self.log = (log or (lambda msg: tqdm.write(printable(msg)))) if self.dist.is_main else quiet
        self.last_path = os.path.join(out_dir, "last.pt")
        self.best_path = os.path.join(out_dir, "best.pt")
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self._saved_step: int | None = None   # step of the last.pt on disk, for the out-of-memory advice
        if self.dist.is_main:
            try:
                os.makedirs(out_dir, exist_ok=True)
            except OSError as e:
                raise SeqgenError(f"--out {out_dir}: cannot create the run folder ({e.strerror or e})") from None
            for path in (self.last_path, self.best_path, *self.kept_checkpoints()):  # what a run killed
                remove_partial_writes(path)                                                # mid-save left behind
        # the loss a step minimises: cross-entropy, or a task's own objective (a module: Batch -> scalar loss,
        # optionally with stats() -> {name: value} for the training log), e.g. self-critical captioning
        training_loss = objective if objective is not None else _TrainingLoss(self.model, cfg.label_smoothing)
        self._objective = training_loss
        self._ddp: nn.parallel.DistributedDataParallel | None = None
        if self.dist.world > 1:
            self._check_same_vocabularies()   # also makes every process finish check_out_dir before 0 writes
            # device_ids=None: batches are already on the device (DDP would also move the source lengths,
            # which packing wants on the CPU); its construction copies process 0's weights to the others.
            self._ddp = nn.parallel.DistributedDataParallel(training_loss, device_ids=None)
        self._eager = self._ddp or training_loss
        self._forward = torch.compile(self._eager) if cfg.compile else self._eager

    def _check_same_vocabularies(self) -> None:
        """Every process built its vocabulary itself (from the same data); refuse to train if they differ."""
        h = hashlib.sha256()
        for codec in (self.model.tgt, self.model.src):
            if codec is not None:
                h.update("\n".join(codec.vocab.to_list()).encode("utf-8", "surrogatepass"))
                h.update(getattr(codec.tokenizer, "model_proto", b"") or b"")
        digests = self.dist.all_gather(h.hexdigest())
        if len(set(digests)) > 1:
            raise SeqgenError(f"the {self.dist.world} processes built different vocabularies from the training "
                              f"data; pass fixed sentencepiece models (--src-spm/--tgt-spm) or resume from a "
                              f"checkpoint made by one process")

    # -- checkpoints -----------------------------------------------------------------------------------
    def _payload(self, with_trainer: bool) -> dict:
        payload = self.model.to_payload()
        payload["run_config"] = json.dumps(self.run_config)
        payload["metrics"] = json.dumps({"step": self.state.step, "best": self.state.best})
        if self.data_fingerprint is not None:
            payload["data_fingerprint"] = json.dumps(self.data_fingerprint)
        if with_trainer:
            # No RNG state: dropout is reseeded from (seed, step, slot) every step (see dropout_seed).
            payload["trainer"] = {"state": json.dumps(to_dict(self.state)), "optimizer": self.optimizer.state_dict()}
            if self.scaler.is_enabled():
                payload["trainer"]["grad_scaler"] = self.scaler.state_dict()
            if self.ema is not None:
                payload["trainer"]["ema"] = self.ema.state_dict()
        return payload

    def kept_checkpoints(self) -> list[str]:
        """The step-STEP.pt files of `keep_checkpoints` in the run folder, oldest first."""
        return kept_checkpoints(self.out_dir)

    def _keep_checkpoint(self) -> None:
        """Save the weights just validated as step-STEP.pt and delete all but the newest keep_checkpoints.

        A resumed run first drops files of steps after the one it resumes from: they came from the part of
        the run that is being redone.
        """
        self._save(os.path.join(self.out_dir, f"step-{self.state.step}.pt"), with_trainer=False)
        kept = self.kept_checkpoints()
        for path in kept[:max(0, len(kept) - self.cfg.keep_checkpoints)]:
            try:
                os.remove(path)
            except OSError as e:   # keeping one too many loses nothing: say so and go on
                warning(f"{path}: cannot delete an old kept checkpoint ({e.strerror or e})")

    def save(self) -> None:
        """Write last.pt (process 0; the others only note the step)."""
        if self.dist.is_main:
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
        """Restore model, optimiser, data position and schedule from `path` (default: last.pt).

        Every process reads the file; it may have been written by a run with another number of processes.
        """
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
        if not isinstance(tr, dict):
            raise SeqgenError(f"{path}: the checkpoint's trainer entry is not the mapping seqgen writes")
        state = payload_json(tr, "state", path)
        if isinstance(state, dict) and isinstance(state.get("best"), float) and not math.isfinite(state["best"]):
            state["best"] = None    # a NaN validation score marked best before seqgen refused them: none is best
        self.state = from_dict(TrainState, state, where=path)
        try:
            self.optimizer.load_state_dict(tr["optimizer"])
            if self.scaler.is_enabled() and "grad_scaler" in tr:
                self.scaler.load_state_dict(tr["grad_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise SeqgenError(f"{path}: the checkpoint's optimizer state does not fit this run's model "
                              f"({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})") from None
        if self.ema is not None:
            self.ema = WeightEMA(self.model, self.cfg.ema)   # a run that had no average starts one here
            if "ema" in tr:
                self.ema.load_state_dict(tr["ema"], where=path)
        self._saved_step = self.state.step
        if self.dist.is_main:
            for kept in self.kept_checkpoints():
                if int(_KEPT.fullmatch(os.path.basename(kept)).group(1)) > self.state.step:
                    os.remove(kept)
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
        atomic_write(self.metrics_path, lambda f: f.writelines(kept), mode="w", encoding="utf-8")

    def _write_metrics(self, record: dict) -> None:
        if not self.dist.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    # -- evaluation ------------------------------------------------------------------------------------
    def _improved(self, value: float) -> bool:
        """A finite score better than the best so far (a NaN validation loss is never best)."""
        best = self.state.best
        if not math.isfinite(value):
            return False
        return best is None or (value < best if self.mode == "min" else value > best)

    def run_eval(self) -> bool:
        """Evaluate (the weight average with --ema), keep best.pt, update plateau/early stopping.
        Returns True to stop training."""
        with self.ema.applied() if self.ema is not None else nullcontext():
            return self._run_eval()

    def _run_eval(self) -> bool:
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
        if self.cfg.keep_checkpoints:
            self._keep_checkpoint()
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

    def _eval_and_share(self) -> bool:
        """`run_eval` on process 0 while the others wait; then every process holds its TrainState (best,
        plateau LR factor, early-stopping count) and its decision to stop."""
        stop = self.run_eval() if self.dist.is_main else False
        if self.dist.world > 1:
            state, stop = self.dist.broadcast((to_dict(self.state), stop))
            for key, value in state.items():
                setattr(self.state, key, value)
        return stop

    def _objective_stop(self) -> bool:
        """Whether the training objective asks to stop (its `stop_reason()`, e.g. a self-critical collapse), as
        process 0 sees it, shared with every process; logged once."""
        ask = getattr(self._objective, "stop_reason", None)
        if ask is None:
            return False
        reason = ask() if self.dist.is_main else None
        if self.dist.world > 1:
            reason = self.dist.broadcast(reason)
        if reason:
            self.log(f"step {self.state.step}: training stopped: {reason}")
            self._write_metrics({"step": self.state.step, "stopped": reason})
        return bool(reason)

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

    # -- one step --------------------------------------------------------------------------------------
    def _loss(self, batch: Batch) -> Tensor:
        """The training forward (DDP-wrapped, compiled); a compilation failure falls back to eager once."""
        if self._forward is self._eager:
            return self._eager(batch)
        try:
            return self._forward(batch)
        except Exception as e:  # no C++ compiler, an unsupported op...: train without it
            if isinstance(e, SeqgenError) or is_out_of_memory(e):
                raise
            first = (str(e).strip().splitlines() or [""])[0][:160]
            self.log(warning(f"--compile failed ({type(e).__name__}: {first}); training without it"))
            self._forward = self._eager
            return self._eager(batch)

    def _step(self, batches: list[Batch]) -> tuple[float, int, bool]:
        """One optimizer step; `batches`: this process's share of the global batch (`accumulate` batches).

        Returns the step's mean loss per target token and its token count over all processes, and whether
        the loss was finite everywhere (when not, no process updates: the step is skipped).
        """
        cfg, st, dist = self.cfg, self.state, self.dist
        counts = [b.num_target_tokens(self.pad) for b in batches]
        total = sum(counts) if dist.world == 1 else int(dist.all_sum([sum(counts)])[0])
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg, st, self._batches_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device)
        for j, (batch, n) in enumerate(zip(batches, counts)):
            shape = f"{batch.target.size(0)} sequences x {batch.target.size(1) - 1} tokens"
            with report_out_of_memory(f"at step {st.step + 1} on a batch of {shape}",
                                      self._batch_advice("batch_size")):
                torch.manual_seed(dropout_seed(cfg.seed, st.step, j * dist.world + dist.rank))
                batch = batch.to(self.device)
                # gradients are all-reduced once per step, after the last batch's backward
                last = j == len(batches) - 1
                with self._ddp.no_sync() if self._ddp is not None and not last else nullcontext():
                    with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                        enabled=self.amp_dtype is not None):
                        loss = self._loss(batch)
                    # this batch's share of the mean over all the step's tokens (DDP averages over processes)
                    weight = n * dist.world / total
                    self.scaler.scale(loss if weight == 1.0 else loss * weight).backward()
                loss_sum += loss.detach().float() * n
        local = float(loss_sum)
        # one all-reduce: the step's loss, whether any process saw a non-finite one, and the time spent, so
        # that every process takes the same skip / time-budget decisions
        loss_total, bad, seconds = dist.all_sum([local, 0.0 if math.isfinite(local) else 1.0,
                                                 time.perf_counter() - self._mark])
        self._mark = time.perf_counter()
        st.train_seconds += seconds / dist.world
        if bad:
            return loss_total / total, total, False
        with report_out_of_memory(f"at step {st.step + 1} in the optimizer update", self._batch_advice("batch_size")):
            if cfg.clip_norm > 0:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        if self.ema is not None:
            self.ema.update()
        return loss_total / total, total, True

    # -- the loop --------------------------------------------------------------------------------------
    def train(self) -> TrainState:
        """Train until max_steps, max_epochs, the time budget or early stopping; returns the final state."""
        cfg, st, dist = self.cfg, self.state, self.dist
        self.model.train()
        if dist.is_main:
            self._truncate_metrics_log()
        if st.step == 0:  # a run killed before its first step checkpoint resumes from here (and best.pt
            self.save()   # never exists without a last.pt)
        bar = tqdm(total=cfg.max_steps, initial=st.step, disable=not (cfg.progress and dist.is_main),
                   desc="train", unit="step", dynamic_ncols=True)
        per_step = dist.world * cfg.accumulate          # batches of the global list per optimizer step
        window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
        self._mark = time.perf_counter()
        bad_steps, stop, halt = 0, st.step >= cfg.max_steps, False
        while not stop and st.epoch < cfg.max_epochs:
            n_batches = self._batches_per_epoch = self.data.num_batches(st.epoch)
            mine = shard_positions(n_batches, dist.rank, dist.world, start=st.batch_in_epoch, group=per_step)
            if not mine:   # the epoch has no whole step left
                if st.batch_in_epoch == 0:
                    raise SeqgenError(f"epoch {st.epoch} has {n_batches} batches, fewer than one step needs "
                                      f"({dist.world} process(es) x --accumulate {cfg.accumulate}); use smaller "
                                      f"batches, fewer processes or a lower --accumulate")
                st.epoch, st.batch_in_epoch = st.epoch + 1, 0
                continue
            for batches in _steps_of(self.data.iter_batches(st.epoch, mine.start, mine.stop, mine.step),
                                     cfg.accumulate):
                loss, n_tok, finite = self._step(batches)
                st.batch_in_epoch += per_step
                if not finite:
                    bad_steps += 1
                    self.log(f"step {st.step}: non-finite loss ({loss}), batch skipped "
                              f"({bad_steps}/{cfg.max_bad_steps})")
                    self._write_metrics({"step": st.step, "skipped": "non-finite loss"})
                    if bad_steps >= cfg.max_bad_steps:
                        raise SeqgenError(
                            f"training stopped: {bad_steps} consecutive non-finite losses at step {st.step}; "
                            f"lower --lr or check the data (last good checkpoint: {self.last_path})")
                    continue
                bad_steps = 0
                st.step += 1
                window_tokens += n_tok
                window_loss += loss
                window_steps += 1
                bar.update(1)
                if st.step % cfg.log_every == 0 or st.step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    rec = {"step": st.step, "epoch": st.epoch, "loss": window_loss / window_steps,
                           "tokens_per_s": window_tokens / elapsed, "lr": self.optimizer.param_groups[0]["lr"]}
                    extra = self._objective.stats() if hasattr(self._objective, "stats") else {}
                    bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec['tokens_per_s']:.0f}")
                    self.log(f"step {st.step} | epoch {st.epoch} | loss {rec['loss']:.4f} | "
                              f"{rec['tokens_per_s']:,.0f} tok/s | lr {rec['lr']:.2e}"
                              + "".join(f" | {k} {v:.4g}" for k, v in extra.items()))
                    self._write_metrics({**rec, **extra})
                    window_tokens, window_loss, window_steps, window_start = 0, 0.0, 0, time.perf_counter()
                    halt = self._objective_stop()
                out_of_time = cfg.time_budget > 0 and st.train_seconds >= cfg.time_budget * 60
                stop = st.step >= cfg.max_steps or out_of_time or halt
                if st.step % cfg.eval_every == 0 or stop:
                    stop = self._eval_and_share() or stop
                    window_start = self._mark = time.perf_counter()   # evaluation is not training time
                if st.step % cfg.checkpoint_every == 0 or st.step % cfg.eval_every == 0 or stop:
                    self.save()
                    self._mark = time.perf_counter()
                if stop:
                    break
        bar.close()
        if st.step % cfg.eval_every != 0 and not stop:  # ran out of epochs between evaluations
            self._eval_and_share()
            self.save()
        return st


def seed_everything(seed: int) -> None:
    """Seed torch's CPU (and CUDA) generators: dropout and initialisation are the only global randomness."""
    torch.manual_seed(seed)
