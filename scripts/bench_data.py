#!/usr/bin/env python
"""Benchmark: how soon `seqgen train translation` starts training on a large corpus, and its memory.

    python scripts/bench_data.py --data-dir ../shared/data --pairs 2000000
    python scripts/bench_data.py --data-dir ../shared/data --pairs 50000 --max-steps 2     # a smoke test

Builds the corpus by repeating Multi30k's training pairs (DATA_DIR/multi30k/train.de, train.en) until it has
--pairs pairs, in --work (default: a new temporary folder, removed afterwards unless --keep; never inside the
repository), then runs the real command line three times on it with the task's default model on the CPU:

    first    a new run: fits the vocabulary and tokenizes the corpus into the prepared-data cache (--prepared-dir)
    later    another new run on the same files and cache: opens the cache memory-mapped
    resume   --resume of the first run, for --max-steps more steps

and prints one table: seconds from the start of the command to its first training step (the first line of
metrics.jsonl, written with --log-every 1), the peak resident memory of the largest single process (the
command's or one of its tokenizing workers': wait4's ru_maxrss) and the median training target tokens/s
after the first step. Validation uses 16 sentences (only the start and the training count).
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


def repeat_corpus(data_dir: str, pairs: int, work: str) -> dict[str, str]:
    """train.de/train.en of `pairs` lines (Multi30k repeated) and 16 validation pairs, written to `work`."""
    src_dir = os.path.join(data_dir, "multi30k")
    files = {}
    for side in ("de", "en"):
        with open(os.path.join(src_dir, f"train.{side}"), encoding="utf-8") as f:
            lines = [line.rstrip("\n") + "\n" for line in f]
        path = files[side] = os.path.join(work, f"train.{side}")
        with open(path, "w", encoding="utf-8") as out:
            left = pairs
            while left > 0:
                out.writelines(lines[:left])
                left -= len(lines)
        with open(os.path.join(src_dir, f"val.{side}"), encoding="utf-8") as f:
            valid = [next(f) for _ in range(16)]
        files[f"v{side}"] = os.path.join(work, f"val.{side}")
        with open(files[f"v{side}"], "w", encoding="utf-8") as out:
            out.writelines(valid)
    return files


def run(args: list[str], out: str) -> dict:
    """Run `seqgen ARGS` into --out `out`; seconds to the first logged step, peak RSS, median tokens/s."""
    metrics = os.path.join(out, "metrics.jsonl")
    seen = os.path.getsize(metrics) if os.path.exists(metrics) else 0      # a resume appends
    log_path = out.rstrip("/") + ".log"
    t0 = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen([sys.executable, "-m", "seqgen.cli", *args], stdout=subprocess.DEVNULL, stderr=log)
        first = None
        while True:   # wait4, not poll: it also gives the child's peak memory
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if first is None and os.path.exists(metrics) and os.path.getsize(metrics) > seen:
                first = time.perf_counter() - t0
            if pid:
                break
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        with open(log_path, encoding="utf-8") as f:
            sys.exit(f"seqgen {' '.join(args)} failed ({proc.returncode}):\n{f.read()[-3000:]}")
    speeds = []
    with open(metrics, encoding="utf-8") as f:
        f.seek(seen)
        speeds = [rec["tokens_per_s"] for rec in map(json.loads, f) if "tokens_per_s" in rec]
    return {"first_step_s": first if first is not None else float("nan"),
            "rss_mib": usage.ru_maxrss / 1024,
            "tokens_per_s": statistics.median(speeds[1:] or speeds) if speeds else float("nan")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("SEQGEN_DATA", "../shared/data"),
                   help="the folder holding multi30k/train.de, train.en, val.de, val.en")
    p.add_argument("--pairs", type=int, default=2_000_000, help="training pairs of the repeated corpus")
    p.add_argument("--max-steps", type=int, default=30, help="training steps of each run")
    p.add_argument("--work", default="", help="folder for the corpus, the cache and the runs (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="seqgen-bench-data-")
    os.makedirs(work, exist_ok=True)
    try:
        files = repeat_corpus(args.data_dir, args.pairs, work)
        prepared = os.path.join(work, "prepared")
        common = ["--src-train", files["de"], "--tgt-train", files["en"], "--src-valid", files["vde"],
                  "--tgt-valid", files["ven"], "--prepared-dir", prepared, "--device", "cpu", "--log-every", "1",
                  "--eval-every", str(10 * args.max_steps), "--progress", "false"]
        rows = []
        for name, out, extra in (("first", "run1", ["--max-steps", str(args.max_steps)]),
                                 ("later", "run2", ["--max-steps", str(args.max_steps)]),
                                 ("resume", "run1", ["--resume", "--max-steps", str(2 * args.max_steps)])):
            path = os.path.join(work, out)
            rows.append((name, run(["train", "translation", *common, *extra, "--out", path], path)))
        print(f"{args.pairs:,} pairs (Multi30k repeated), {os.cpu_count()} cores")
        print(f"{'run':<8} {'first step s':>12} {'peak RSS MiB':>13} {'tokens/s':>10}")
        for name, r in rows:
            print(f"{name:<8} {r['first_step_s']:>12.1f} {r['rss_mib']:>13.0f} {r['tokens_per_s']:>10.0f}")
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
