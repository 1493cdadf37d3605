#!/usr/bin/env python
"""Benchmark: where a training run's resident memory goes over a long run, phase by phase.

    python scripts/bench_train_memory.py --data-dir ../shared/data --minutes 20
    python scripts/bench_train_memory.py --data-dir ../shared/data --minutes 3 --eval-every 100 --png mem.png
    python scripts/bench_train_memory.py --data-dir ../shared/data --minutes 2 -- --amp off

Runs the recipe of the shipped `multi30k-de-en` model (seqgen/zoo/registry.py) as a real `seqgen train`
command with `--time-budget MINUTES` (training minutes; validations come on top) into --out (default: a new
temporary folder, removed afterwards), samples the command's /proc/PID/status every 0.25 s (VmRSS, and its split
into RssAnon, the process's own memory, and RssFile, mapped files: shared libraries and memory-mapped data), and
prints one table: RSS when training starts, at the first step, before and at the peak of each validation
(which also writes the checkpoints), at the end and the peak of the whole run; then the steps done and the
median training tokens/s. --png draws the curve with the validations marked.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from seqgen.bench import MemorySampler, print_rows
from seqgen.zoo.registry import ENTRIES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", "../shared/data"),
                   help="the folder holding multi30k/")
    p.add_argument("--minutes", type=float, default=20.0, help="training minutes (--time-budget)")
    p.add_argument("--eval-every", type=int, default=0, help="validate every this many steps (0: the recipe's)")
    p.add_argument("--out", default="", help="the run folder (default: a temporary folder, removed afterwards)")
    p.add_argument("--png", default="", help="also draw RSS over time into this PNG")
    p.add_argument("--seed", type=int, default=1, help="the run's --seed")
    p.add_argument("extra", nargs="*", help="more `seqgen train` options, after --: `-- --amp off`")
    args = p.parse_args(argv)
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    if not os.path.isfile(os.path.join(args.data_dir, "multi30k", "train.de")):
        p.error(f"--data-dir {args.data_dir}: no multi30k/train.de there")
    return args


def recipe(data_dir: str, out: str, minutes: float, eval_every: int, seed: int) -> list[str]:
    argv = [a.replace("{data}", data_dir) for a in ENTRIES["multi30k-de-en"].recipe]
    if eval_every:
        i = argv.index("--eval-every")
        argv[i + 1] = str(eval_every)
    i = argv.index("--seed")
    argv[i + 1] = str(seed)
    return argv + ["--time-budget", str(minutes), "--device", "cpu", "--log-every", "25", "--out", out]


class RunLog:
    """The memory samples of a run (a `MemorySampler`) and the log lines it printed, with their times."""

    def __init__(self, pid: int, period: float = 0.25):
        self.memory = MemorySampler(pid, period)
        self.events: list[tuple[float, str]] = []       # (time, log line)

    @property
    def samples(self) -> list[tuple[float, dict[str, float]]]:
        return [(t, mem) for t, mem, _ in self.memory.samples]

    def note(self, line: str) -> None:
        self.events.append((time.perf_counter() - self.memory.t0, line))

    def stop(self) -> None:
        self.memory.stop()

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[float, dict[str, float]] | None:
        inside = [s for s in self.samples if start <= s[0] <= end]
        return max(inside, key=lambda s: s[1]["rss"]) if inside else None

    def at(self, t: float) -> tuple[float, dict[str, float]] | None:
        samples = self.samples
        before = [s for s in samples if s[0] <= t]
        return before[-1] if before else (samples[0] if samples else None)


def phases(sampler: RunLog) -> list[tuple[str, tuple[float, dict[str, float]] | None]]:
    """(label, sample) rows: training starts (the first log line of the run), the first step, and for each
    validation the last sample before it and its peak (from the training line of its step to its "eval" line)."""
    rows = []
    steps = [(t, line) for t, line in sampler.events if line.startswith("step ")]
    evals = [(t, line) for t, line in sampler.events if line.startswith("eval step ")]
    if sampler.events:
        rows.append(("run set up (first log line)", sampler.at(sampler.events[0][0])))
    if steps:
        rows.append(("first step logged", sampler.at(steps[0][0])))
    for t_eval, line in evals:
        step = line.split()[2].rstrip(":")
        start = max((t for t, s in steps if s.split()[1] == step), default=None)
        if start is None:
            continue
        rows.append((f"step {step}, before validating", sampler.at(start)))
        rows.append((f"step {step}, validation + checkpoints (peak)", sampler.peak(start, t_eval + 2.0)))
    rows.append(("end", sampler.samples[-1] if sampler.samples else None))
    rows.append(("peak of the whole run", sampler.peak()))
    return rows


def draw(sampler: RunLog, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [s[0] / 60 for s in sampler.samples]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for key, label in (("rss", "RSS"), ("anon", "anonymous"), ("file", "mapped files")):
        ax.plot(t, [s[1][key] for s in sampler.samples], label=label)
    for when, line in sampler.events:
        if line.startswith("eval step "):
            ax.axvline(when / 60, color="grey", lw=0.5)
    ax.set_xlabel("minutes since the command started (grey: a validation ended)")
    ax.set_ylabel("MiB")
    ax.legend(loc="lower right")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="seqgen-bench-mem-")
    if args.out and os.path.exists(os.path.join(out, "last.pt")):
        sys.exit(f"--out {out} holds a run already; give a new folder")
    cmd = [sys.executable, "-m", "seqgen.cli", *recipe(args.data_dir, out, args.minutes, args.eval_every, args.seed),
           *args.extra]
    print("seqgen " + " ".join(cmd[3:]), flush=True)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        sampler = RunLog(proc.pid)
        tail = []
        for line in proc.stdout:
            line = line.rstrip("\n")
            sampler.note(line)
            tail = (tail + [line])[-20:]
        proc.wait()
        sampler.stop()
        if proc.returncode:
            sys.exit(f"the run failed ({proc.returncode}):\n" + "\n".join(tail))
        rows = []
        for label, sample in phases(sampler):
            if sample is not None:
                t, m = sample
                rows.append((label, f"{m['rss']:,.0f} MiB ({m['anon']:,.0f} anonymous + {m['file']:,.0f} mapped "
                                    f"files) at {t:,.0f} s"))
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        steps = max((r.get("step", 0) for r in records), default=0)
        rows.append(("steps; median training tokens/s", f"{steps:,}; "
                     + (f"{statistics.median(speeds[1:] or speeds):,.0f}" if speeds else "n/a")))
        print_rows(rows)
        if args.png:
            draw(sampler, args.png)
            print(f"curve: {args.png}")
    finally:
        if not args.out:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
