"""`seqgen bench`: this machine's throughput on each task, and how much of its matmul rate the models use.

    seqgen bench                                   # --seconds 5 per measurement
    seqgen bench --device cuda --seconds 10 --json bench.json

Every measurement runs on synthetic inputs sized like the real tasks, so it needs no dataset and no network:
  train tokens/s         the default translation model (TranslationRunConfig), batches of 64 sentence pairs of
                         Multi30k-like length (~14 source, ~13 target tokens, 8k joint vocabulary): forward,
                         backward, clipping and the AdamW update (the Trainer's step without its logging and
                         checkpoints)
  decode sentences/s     the same model decoding batches of 64 sentences, greedy and beam 5
  caption images/s       uint8 224px images through the default captioning backbone (efficientnet_lite0 when
                         `seqgen[lite]` is installed, else resnet18; random weights: speed does not depend on
                         them) and the default captioning decoder with beam 5, batches of 64
  char generation chars/s  a 2x384 LSTM character model (the one of scripts/bench_charlm.py) sampling at batch 1
Untrained models rarely write <eos>, so decoding is made to generate exactly the task's typical length
(`min_len == max_len`): every row does the same work on every machine.

Model FLOPs utilisation (MFU) = model FLOPs per unit x units/s / the matmul FLOP/s measured in the same run
(float32; also bfloat16 where the hardware has it natively — GPUs, CPUs with AVX512-BF16/AMX — in which case
the training row runs under bf16 autocast, as `seqgen train --amp auto` does; decoding stays float32). Model FLOPs count the matmuls of the useful work only: padding, elementwise
ops, softmax, embedding lookups and the per-sequence bridge are left out (the usual MFU convention). The RNN
parts are counted analytically, the CNN by running it once under torch's FlopCounterMode (seqgen.flops).
Training counts 3x the forward FLOPs (the backward pass does twice the forward's matmuls).
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from seqgen.atomic import atomic_write
from seqgen.data.batch import Batch
from seqgen.decoders.rnn import DecoderConfig
from seqgen.distributed import resolve_device
from seqgen.encoders.cnn import CNNEncoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError
from seqgen.flops import cnn_flops, decoder_flops, forward_flops, memory_key_flops, text_encoder_flops
from seqgen.generation import GenerationConfig
from seqgen.log import Log, to_stderr
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.precision import autocast_dtype, native_bf16
from seqgen.tasks.captioning import CaptionRunConfig
from seqgen.tasks.translation import TranslationRunConfig
from seqgen.tokenizers import CharTokenizer, TextCodec, WordTokenizer
from seqgen.vocab import SPECIALS, Vocab

# -- configuration ---------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    seconds: float = 5.0           # timed seconds per measurement (after one untimed warm-up call)
    device: str = "auto"
    seed: int = 1
    batch_size: int = 64           # sentences (training, decoding) and images (captioning) per batch
    beam: int = 5
    # translation: the default model on Multi30k-like batches (8k joint BPE; mean lengths in BPE tokens)
    encoder: RNNEncoderConfig = field(default_factory=lambda: TranslationRunConfig().encoder)
    decoder: DecoderConfig = field(default_factory=lambda: TranslationRunConfig().decoder)
    vocab: int = 8000
    src_len: int = 14              # mean source tokens, <eos> included
    tgt_len: int = 13              # mean target tokens, <eos> included; decoding generates exactly this many
    # captioning: Flickr8k-like (words seen >= 5 times, ~11 words + <eos> per caption)
    caption_decoder: DecoderConfig = field(default_factory=lambda: CaptionRunConfig().decoder)
    backbone: str = "auto"         # auto = efficientnet_lite0 when installed (seqgen[lite]), else resnet18
    image_size: int = 224
    caption_vocab: int = 3000
    caption_len: int = 12
    # character LM: scripts/bench_charlm.py's model, Tiny Shakespeare's 65 characters
    lm_decoder: DecoderConfig = field(default_factory=lambda: DecoderConfig(
        cell="lstm", emb=384, hidden=384, layers=2, dropout=0.2))
    char_vocab: int = 65
    chars: int = 500               # characters per generation call
    temperature: float = 0.8
    matmul_sizes: tuple[int, ...] = ()   # square matmul sizes for the peak; () = by device


def tiny_config(**overrides) -> BenchConfig:
    """Toy sizes with the same measurements (tests, smoke runs): seconds, not a minute."""
    small = {
        "batch_size": 4, "beam": 2, "encoder": RNNEncoderConfig(cell="gru", emb=16, hidden=16),
        "decoder": DecoderConfig(cell="gru", emb=16, hidden=32, attention="luong_general"), "vocab": 100,
        "src_len": 6, "tgt_len": 5, "caption_decoder": DecoderConfig(cell="lstm", emb=16, hidden=32,
                                                                     attention="luong_general"),
        "backbone": "tiny", "image_size": 32, "caption_vocab": 50, "caption_len": 5,
        "lm_decoder": DecoderConfig(cell="lstm", emb=16, hidden=32, layers=2), "chars": 20,
        "matmul_sizes": (64, 128)}
    return BenchConfig(**{**small, **overrides})


def default_backbone() -> str:
    """efficientnet_lite0 (the captioning default) when its package is installed, else resnet18."""
    try:
        import efficientnet_lite_pytorch  # noqa: F401
    except ImportError:
        return "resnet18"
    return "efficientnet_lite0"


# -- the matmul peak -------------------------------------------------------------------------------

def matmul_flops(seconds: float = 4.0, sizes: tuple[int, ...] = (512, 1024, 2048), *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> float:
    """Best square-matmul FLOP/s over `sizes` on the current threads (`seconds` in all, after a warm-up each)."""
    device = torch.device(device)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        _sync(device)
        reps, t0 = 0, time.perf_counter()
        while True:
            torch.mm(a, b)
            reps += 1
            if reps % 4 == 0 or device.type == "cpu":   # on a GPU, check the clock without stalling every call
                _sync(device)
                elapsed = time.perf_counter() - t0
                if elapsed >= seconds / len(sizes):
                    break
        best = max(best, 2 * n ** 3 * reps / elapsed)
    return best


# -- timing ----------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_rate(work: Callable[[], float], seconds: float, device: torch.device) -> float:
    """Units per second of `work` (a call returns the units it did): one untimed warm-up call, then calls
    until `seconds` have passed (at least one)."""
    work()
    _sync(device)
    units, t0 = 0.0, time.perf_counter()
    while True:
        units += work()
        _sync(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return units / elapsed


def best_seconds(work: Callable[[], object], repeats: int, device: torch.device) -> float:
    """The shortest of `repeats` timed calls of `work` (synchronised on a GPU): on a shared machine single
    timings swing widely (docs/performance.md), and the best is the least disturbed."""
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        work()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def generation_rate(model: Seq2Seq, gen: GenerationConfig, *, prompt: str = "", seed: int = 1,
                    seconds: float = 0.0) -> float:
    """Tokens generated per second at batch 1 after `prompt` (the prompt itself not counted)."""
    ids = model.tgt.encode(prompt)
    prefix = torch.tensor(ids, dtype=torch.long, device=model.device) if ids else None
    generator = torch.Generator(device=model.device).manual_seed(seed)

    def work() -> float:
        hyps = model.generate(batch_size=1, gen=gen, prefix=prefix, generator=generator)
        return float(len(hyps[0][0].tokens))
    return timed_rate(work, seconds, model.device)


# -- synthetic inputs ------------------------------------------------------------------------------

def synthetic_codec(size: int, level: str = "word") -> TextCodec:
    """A codec of `size` ids (specials included) with made-up tokens: vocabulary size is all speed needs."""
    if level == "char":
        tokens = [chr(0x21 + i) for i in range(size - len(SPECIALS))]
        return TextCodec(CharTokenizer(), Vocab([*SPECIALS, *tokens]))
    return TextCodec(WordTokenizer(), Vocab([*SPECIALS, *(f"w{i}" for i in range(size - len(SPECIALS)))]))


def synthetic_lengths(n: int, mean: int, generator: torch.Generator) -> Tensor:
    """[n] lengths spread like sentence lengths around `mean`: uniform in [mean/2, 3*mean/2], at least 1."""
    low, high = max(1, mean - mean // 2), mean + mean // 2
    return torch.randint(low, high + 1, (n,), generator=generator)


def synthetic_ids(lengths: Tensor, vocab: int, generator: torch.Generator, *, eos: int | None = None,
                  bos: int | None = None, pad: int = 0) -> Tensor:
    """[B, T] random non-special ids padded with `pad`; each row `lengths[i]` long (bos/eos included)."""
    width = int(lengths.max())
    ids = torch.randint(len(SPECIALS), vocab, (len(lengths), width), generator=generator)
    positions = torch.arange(width)
    ids[positions >= lengths.unsqueeze(1)] = pad
    if bos is not None:
        ids[:, 0] = bos
    if eos is not None:
        ids[torch.arange(len(lengths)), lengths - 1] = eos
    return ids


# -- the measurements ------------------------------------------------------------------------------

@dataclass
class Row:
    """One line of the table: `rate` units per second, `flops_per_unit` model FLOPs per unit."""

    name: str
    unit: str
    rate: float
    flops_per_unit: float
    setup: str = ""

    @property
    def flops_per_s(self) -> float:
        return self.rate * self.flops_per_unit


def _describe_translation(cfg: BenchConfig) -> str:
    e, d = cfg.encoder, cfg.decoder
    return (f"{'bi-' if e.bidirectional else ''}{e.cell.upper()} {e.hidden}x{e.layers} / {d.cell.upper()} "
            f"{d.hidden}x{d.layers}, {d.attention}, vocab {cfg.vocab:,}")


def translation_rows(cfg: BenchConfig, device: torch.device) -> list[Row]:
    """Training tokens/s and decoding sentences/s (greedy, beam) of the translation model."""
    g = torch.Generator().manual_seed(cfg.seed)
    codec = synthetic_codec(cfg.vocab)
    v = codec.vocab
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(ModelConfig(task="translation", text_encoder=cfg.encoder, decoder=cfg.decoder),
                    tgt=codec, src=codec).to(device)
    src_lengths = synthetic_lengths(cfg.batch_size, cfg.src_len, g)
    tgt_lengths = synthetic_lengths(cfg.batch_size, cfg.tgt_len, g)
    source = synthetic_ids(src_lengths, cfg.vocab, g, eos=v.eos, pad=v.pad)
    target = synthetic_ids(tgt_lengths + 1, cfg.vocab, g, bos=v.bos, eos=v.eos, pad=v.pad)   # bos ... eos
    batch = Batch(target=target, source=source, source_lengths=src_lengths).to(device)
    setup = _describe_translation(cfg)
    rows = []

    # training: what one Trainer step does to the model (forward, backward, clipping, AdamW)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    # the precision `seqgen train` uses by default (--amp auto: bf16 autocast where the hardware is native)
    amp = autocast_dtype("auto", device)

    def train_step() -> float:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            loss, n_tokens = model.loss(batch, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return float(n_tokens)

    n_tgt = float(tgt_lengths.sum())          # predicted tokens: the target without bos, eos included
    attended = float((tgt_lengths * src_lengths).sum()) / n_tgt
    per_token = 3 * forward_flops(cfg.encoder, cfg.decoder, cfg.vocab, float(src_lengths.sum()) / n_tgt,
                                  attended)["total"]
    rows.append(Row("train", "tokens/s", timed_rate(train_step, cfg.seconds, device), per_token,
                    f"translation: {setup}, batch {cfg.batch_size}"
                    + (f", {str(amp).removeprefix('torch.')} autocast" if amp is not None else "")))

    # decoding: exactly tgt_len tokens per sentence
    model.eval()
    mem = model.encoder.memory_size
    src_mean = float(src_lengths.float().mean())
    encode = src_mean * (text_encoder_flops(cfg.encoder) + memory_key_flops(cfg.decoder, mem))
    step = decoder_flops(cfg.decoder, cfg.vocab, mem, src_mean)["total"]
    for name, beam in (("decode, greedy", 1), (f"decode, beam {cfg.beam}", cfg.beam)):
        gen = GenerationConfig(beam=beam, max_len=cfg.tgt_len, min_len=cfg.tgt_len, length_penalty=1.0)

        def decode(gen=gen) -> float:
            return float(len(model.generate(batch.source, batch.source_lengths, gen=gen)))
        rows.append(Row(name, "sentences/s", timed_rate(decode, cfg.seconds, device),
                        encode + cfg.tgt_len * beam * step, f"translation: {setup}, batch {cfg.batch_size}"))
    return rows


def caption_row(cfg: BenchConfig, device: torch.device) -> Row:
    """Images/s of the CNN + beam search on a batch of random uint8 images."""
    backbone = default_backbone() if cfg.backbone == "auto" else cfg.backbone
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(ModelConfig(task="captioning", decoder=cfg.caption_decoder,
                                image_encoder=CNNEncoderConfig(backbone=backbone, weights=None,
                                                               image_size=cfg.image_size)),
                    tgt=synthetic_codec(cfg.caption_vocab)).to(device).eval()
    g = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), generator=g,
                           dtype=torch.uint8).to(device)
    gen = GenerationConfig(beam=cfg.beam, max_len=cfg.caption_len, min_len=cfg.caption_len)

    def caption() -> float:
        return float(len(model.generate(images, gen=gen)))
    rate = timed_rate(caption, cfg.seconds, device)
    with torch.inference_mode():
        cells = model.encoder(images[:1]).memory.size(1)      # grid positions attended over
    mem = model.encoder.memory_size
    flops = (cnn_flops(model.encoder, cfg.image_size) + cells * memory_key_flops(cfg.caption_decoder, mem)
             + cfg.caption_len * cfg.beam * decoder_flops(cfg.caption_decoder, cfg.caption_vocab, mem, cells)["total"])
    d = cfg.caption_decoder
    return Row(f"caption, beam {cfg.beam}", "images/s", rate, flops,
               f"{backbone} {cfg.image_size}px + {d.cell.upper()} {d.hidden}, {d.attention}, "
               f"{cfg.caption_len} tokens, batch {cfg.batch_size}")


def char_generation_row(cfg: BenchConfig, device: torch.device) -> Row:
    """Characters/s sampled at batch 1 by the character LM."""
    torch.manual_seed(cfg.seed)
    model = Seq2Seq(ModelConfig(task="lm", decoder=cfg.lm_decoder),
                    tgt=synthetic_codec(cfg.char_vocab, "char")).to(device).eval()
    gen = GenerationConfig(temperature=cfg.temperature, max_len=cfg.chars, min_len=cfg.chars)
    rate = generation_rate(model, gen, seed=cfg.seed, seconds=cfg.seconds)
    d = cfg.lm_decoder
    return Row("char generation, batch 1", "chars/s", rate, decoder_flops(d, cfg.char_vocab)["total"],
               f"{d.cell.upper()} {d.layers}x{d.hidden}, {cfg.char_vocab} chars, T={cfg.temperature:g}")


# -- the report ------------------------------------------------------------------------------------

@dataclass
class BenchResult:
    machine: str
    device: str
    threads: int
    matmul: dict[str, float]       # dtype name -> measured FLOP/s
    rows: list[Row]
    config: BenchConfig

    def mfu(self, row: Row) -> dict[str, float]:
        return {dtype: row.flops_per_s / peak for dtype, peak in self.matmul.items() if peak > 0}

    def to_dict(self) -> dict:
        return {"machine": self.machine, "device": self.device, "threads": self.threads,
                "torch": torch.__version__, "matmul_flops_per_s": self.matmul,
                "rows": [{**dataclasses.asdict(r), "flops_per_s": r.flops_per_s, "mfu": self.mfu(r)}
                         for r in self.rows],
                "config": dataclasses.asdict(self.config)}

    def table(self) -> str:
        """The markdown table `seqgen bench` prints."""
        dtypes = list(self.matmul)
        head = ["measurement", "rate", "model FLOPs/unit", "model FLOP/s"] + [f"MFU {_short(d)}" for d in dtypes]
        lines = [[f"{r.name} ({r.setup})", f"{r.rate:,.1f} {r.unit}", _si(r.flops_per_unit),
                  _si(r.flops_per_s) + "/s"] + [f"{100 * self.mfu(r).get(d, 0.0):.1f}%" for d in dtypes]
                 for r in self.rows]
        widths = [max(len(x) for x in col) for col in zip(head, *lines)]

        def fmt(cells: list[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
        peaks = ", ".join(f"{_short(d)} {_si(p)}/s" for d, p in self.matmul.items())
        title = (f"seqgen bench: {self.machine}; {self.device}, {self.threads} threads, torch {torch.__version__}; "
                 f"{self.config.seconds:g} s per measurement")
        return "\n".join([title, f"matmul peak (measured): {peaks}", "", fmt(head),
                          "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(fmt, lines)])


def _short(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16"}.get(dtype, dtype)


def _si(x: float) -> str:
    """1.23e9 -> '1.23 GFLOP' (the unit's prefix chosen by size)."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}FLOP"
    return f"{x:.3g} FLOP"


def process_memory(pid: int) -> dict[str, float]:
    """Resident memory of process `pid` in MiB from Linux's /proc/PID/status: {"rss", "anon", "file"} (VmRSS,
    RssAnon: its own memory, RssFile: mapped files such as shared libraries and memory-mapped data); {} when the
    process has gone or /proc is not there. The one reader of it for the benchmark scripts."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                key = line.split(None, 1)[0] if line.strip() else ""
                if key in fields:
                    out[fields[key]] = int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return {}
    return out


def child_pids(pid: int) -> list[int]:
    """The direct children of process `pid` (Linux /proc); [] when it has gone or /proc is not there."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return []


class MemorySampler:
    """`process_memory(pid)` every `every` seconds on a background thread, from construction until `stop()`.

    samples: [(seconds since the start, {"rss", "anon", "file"} MiB, summed RSS MiB of pid's children)]; the
    children are read only with children=True (a DataLoader's or a pool's workers), else 0.0.
    """

    def __init__(self, pid: int, every: float = 0.25, *, children: bool = False):
        self.pid, self.every, self.children = pid, every, children
        self.samples: list[tuple[float, dict[str, float], float]] = []
        self.t0 = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            mem = process_memory(self.pid)
            if mem:
                kids = sum(process_memory(c).get("rss", 0.0) for c in child_pids(self.pid)) if self.children else 0.0
                self.samples.append((time.perf_counter() - self.t0, mem, kids))
            self._done.wait(self.every)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def machine_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def run_bench(cfg: BenchConfig, *, log: Log | None = None) -> BenchResult:
    """Measure the matmul peak(s) and every row of the table on `cfg.device`."""
    say = log or to_stderr
    if cfg.seconds <= 0:
        raise SeqgenError(f"--seconds must be > 0, got {cfg.seconds}")
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    sizes = cfg.matmul_sizes or ((2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048))
    dtypes = [torch.float32] + ([torch.bfloat16] if native_bf16(device) else [])
    matmul = {}
    for dtype in dtypes:
        say(f"bench: {str(dtype).removeprefix('torch.')} matmul rate ...")
        matmul[str(dtype).removeprefix("torch.")] = matmul_flops(cfg.seconds, sizes, dtype=dtype, device=device)
    rows: list[Row] = []
    for what, measure in (("translation training and decoding", lambda: translation_rows(cfg, device)),
                          ("captioning", lambda: [caption_row(cfg, device)]),
                          ("character generation", lambda: [char_generation_row(cfg, device)])):
        say(f"bench: {what} ...")
        rows += measure()
    return BenchResult(machine=machine_name(device), device=str(device), threads=torch.get_num_threads(),
                       matmul=matmul, rows=rows, config=cfg)


def print_rows(rows: list[tuple[str, str]]) -> None:
    """Print (name, value) rows as two aligned columns after a blank line (the bench_*.py scripts' summary)."""
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def write_json(result: BenchResult, path: str) -> None:
    """The result as JSON at `path` (written atomically)."""
    def write(f) -> None:
        json.dump(result.to_dict(), f, indent=2)
        f.write("\n")
    try:
        atomic_write(path, write, mode="w", encoding="utf-8")
    except OSError as e:
        raise SeqgenError(f"{path}: cannot write ({e.strerror or e})") from None


__all__ = ["BenchConfig", "BenchResult", "Row", "best_seconds", "generation_rate", "matmul_flops", "print_rows",
           "run_bench", "timed_rate", "tiny_config", "write_json"]
