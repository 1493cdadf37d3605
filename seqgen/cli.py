"""`seqgen` command line: train, prepare, generate, translate, evaluate, caption, plot, bench, demo, models,
serve, average.

It is over 500 lines because it holds every command's parser and its thin handler side by side (a reader finds a
command's flags and what it does in one place); the work itself is in seqgen.tasks, .inference and .serve.

Flags come from the same dataclasses as the YAML configs (seqgen.config), so every config key is also a
flag, documented once in its dataclass's docstring. Library errors (`SeqgenError`) become one line
`seqgen: error: ...` and exit status 2; Ctrl-C and SIGTERM one line (how to continue, where a command can) and
exit status 130 and 143 (128 + the signal's number, as shells report it).

Modules that import torch (and the two that pull in tempfile or importlib.resources: seqgen.atomic,
seqgen.zoo) are imported inside the functions that need them, so that `import seqgen.cli` (the console
script, the scripts/ wrappers, the tests) stays cheap; everything else is imported here.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import traceback

from seqgen.allocator import tune_cpu_allocator
from seqgen.config import add_dataclass_flags, add_run_flags, build_run_config, flags_to_dict, from_dict
from seqgen.errors import SeqgenError, Terminated, sigterm_interrupts
from seqgen.log import printable, to_stderr
from seqgen.metrics import corpus_scores
from seqgen.outputs import acquire_output_lock, holding, output_lock, refuse_overwriting_inputs
from seqgen.plots import attention_heatmap, loss_curve, require_matplotlib


def _common_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="run folder: last.pt, best.pt, metrics.jsonl")
    p.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags (flags win)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--allow-data-change", action="store_true",
                   help="with --resume: continue although a data file differs from the one the run trained on")


def _add_generation_flags(p: argparse.ArgumentParser, defaults, skip: tuple[str, ...] = ()) -> None:
    """The GenerationConfig flags, showing `defaults`: what the command decodes with when none is given."""
    from seqgen.generation import GenerationConfig
    add_dataclass_flags(p, GenerationConfig, dest_prefix="gen", skip=skip, defaults=defaults)
    p.add_argument("--seed", type=int, default=1, metavar="N", help="random seed for sampling (default: 1)")
    p.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N (default: auto)")


def decoding_defaults(command: str):
    """What a decoding command uses when no generation flag is given (seqgen.inference.default_decoding)."""
    from seqgen.inference import default_decoding
    return default_decoding(command)


def build_parser() -> argparse.ArgumentParser:
    from seqgen.inference.translation import DEFAULT_MAX_SRC_LEN
    from seqgen.tasks.captioning import CaptionRunConfig
    from seqgen.tasks.lm import LMRunConfig
    from seqgen.tasks.translation import TranslationDataConfig, TranslationRunConfig

    parser = argparse.ArgumentParser(prog="seqgen", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    lm = train.add_parser("lm", help="char/word/subword language model on a text file")
    _common_train_flags(lm)
    add_run_flags(lm, LMRunConfig)

    gen = sub.add_parser("generate", help="continue a prompt with a language model",
                         description="Samples at --temperature 0.8 unless --greedy, --beam N or --temperature T "
                                     "is given.")
    gen.add_argument("checkpoint", metavar="MODEL", help="a language-model checkpoint (best.pt) or a shipped "
                                                         "model's name (e.g. shakespeare-char)")
    gen.add_argument("--prompt", default="", metavar="TEXT", help="text to continue (default: empty)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N",
                     help="how many continuations to generate, at most 1,000 (with --beam N, --n-best says how "
                          "many) (default: 1)")
    gen.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token")
    gen.add_argument("--stream", action="store_true",
                     help="print the text as it is produced (beam search: the part every beam agrees on)")
    gen.add_argument("--line-buffered", action="store_true",
                     help="read prompts from stdin, one per line, and answer each as soon as it arrives "
                          "(the default when --prompt is not given and stdin is a terminal)")
    _add_generation_flags(gen, decoding_defaults("generate"))

    tr = train.add_parser("translation", help="RNN encoder-decoder with attention on parallel text",
                          description="Encoder flags are --enc-*, decoder and training flags are unprefixed, "
                                      "the decoding used for validation BLEU is --eval-* (greedy by default).")
    _common_train_flags(tr)
    add_run_flags(tr, TranslationRunConfig, prefixes={"encoder": "enc-", "eval": "eval-"})

    prep = sub.add_parser("prepare", help="prepare training data ahead of training: the vocabulary and the "
                                          "tokenized corpus").add_subparsers(dest="task", required=True)
    pt = prep.add_parser("translation", help="fit the vocabulary and tokenize the training pairs into "
                                             "--prepared-dir (then train with the same --prepared-dir)")
    pt.add_argument("--config", metavar="FILE", help="YAML file with the same keys as the flags (flags win)")
    add_dataclass_flags(pt, TranslationDataConfig, dest_prefix="data", defaults=TranslationDataConfig())

    for name, help_text in (("translate", "translate text with a translation model (files or stdin/stdout)"),
                            ("evaluate", "score a model on a test set: a translation model's sacreBLEU BLEU and "
                                         "chrF (--src, --ref), a captioning model's BLEU-1..4, ROUGE-L and CIDEr-D "
                                         "(--images, --captions)")):
        p = sub.add_parser(name, help=help_text,
                           description="Beam search with --beam 5 unless --greedy, --beam N or --temperature T "
                                       "(sampling) is given." + (
                                           " A captioning model decodes as `seqgen caption` does (at most 30 "
                                           "tokens, no repeated trigram) unless told otherwise. METEOR and SPICE "
                                           "are not computed: their reference implementations need Java."
                                           if name == "evaluate" else ""))
        p.add_argument("checkpoint", metavar="MODEL",
                       help="a translation checkpoint (best.pt) or a shipped model's name (e.g. multi30k-de-en)"
                       + ("; or a captioning one (flickr8k-captioner)" if name == "evaluate" else ""))
        if name == "translate":
            p.add_argument("input", nargs="?", default="-", metavar="FILE",
                           help="source file, one sentence per line (default: stdin)")
            p.add_argument("--out", default="-", metavar="FILE",
                           help="write translations here (default: stdout); with --n-best N, N lines per "
                                "sentence: line<TAB>score<TAB>translation")
            p.add_argument("--line-buffered", action="store_true",
                           help="answer each input line as soon as it arrives, flushing each answer (the default "
                                "when stdin is a terminal): for pipes and co-processes")
            p.add_argument("--overwrite", action="store_true",
                           help="with --out FILE: start the output over instead of continuing an interrupted run")
            p.add_argument("--attention-png", metavar="DIR", help="save an attention heatmap per sentence in DIR")
        else:
            p.add_argument("--src", metavar="FILE", help="translation: source file, one sentence per line")
            p.add_argument("--ref", metavar="FILE", help="translation: reference translations, aligned with --src")
            p.add_argument("--images", metavar="DIR", help="captioning: the folder the image names are relative to")
            p.add_argument("--captions", metavar="FILE",
                           help="captioning: the references (captions.tsv, a Karpathy dataset_*.json, COCO captions "
                                "json or the Flickr8k token file); every caption of an image is a reference")
            p.add_argument("--split", metavar="FILE",
                           help="captioning: evaluate on the images this file names, one per line (default: every "
                                "image of --captions)")
            p.add_argument("--num-workers", type=int, default=None, metavar="N",
                           help="captioning: image-decoding worker processes (default: by the device)")
            p.add_argument("--out", metavar="FILE",
                           help="also save the translations to this file; captioning: the captions, as .jsonl "
                                "records or .tsv/.txt lines (image<TAB>caption)")
            p.add_argument("--json", action="store_true", help="print one JSON object instead of sacreBLEU lines")
        p.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
        p.add_argument("--batch-size", type=int, default=64, metavar="N",
                       help="sentences decoded at once (default: 64)")
        p.add_argument("--max-src-len", type=int, default=DEFAULT_MAX_SRC_LEN, metavar="N",
                       help=f"longer sources (in tokens) are truncated with a warning (default: {DEFAULT_MAX_SRC_LEN})")
        _add_generation_flags(p, decoding_defaults(name), skip=("n_best",) if name == "evaluate" else ())

    cap = train.add_parser("captioning", help="CNN image encoder + attentional decoder on an image folder and captions",
                           description="Data flags name the images, captions and splits; --backbone/--weights/--freeze "
                                       "choose the CNN (--weights auto = ImageNet weights where available); decoder "
                                       "and training flags are unprefixed; the decoding used for validation "
                                       "CIDEr-D/BLEU is --eval-* (greedy by default).")
    _common_train_flags(cap)
    add_run_flags(cap, CaptionRunConfig, prefixes={"eval": "eval-"}, skip={"encoder": ("weights_file",)})
    cap.add_argument("--backbone-weights", metavar="FILE", dest="encoder.weights_file", default=argparse.SUPPRESS,
                     help="load the backbone from this local state_dict file instead of --weights")

    c = sub.add_parser("caption", help="caption images or whole folders with a captioning model",
                       description="Writes one record per image to --out (JSONL or CSV by extension), flushed per "
                                   "batch; rerunning skips images already there. Beam search with --beam 5 unless "
                                   "--greedy, --beam N or --temperature T is given. Under torchrun "
                                   "--nproc_per_node N each process captions every N-th batch into a part file "
                                   "next to --out, and process 0 merges the parts into --out in listing order.")
    c.add_argument("checkpoint", metavar="MODEL",
                   help="a captioning checkpoint (best.pt) or a shipped model's name (e.g. flickr8k-captioner)")
    c.add_argument("inputs", nargs="+", metavar="FOLDER_OR_FILE", help="image folders and/or image files")
    c.add_argument("--out", required=True, metavar="FILE",
                   help="captions.jsonl ({image, caption, score} per line) or captions.csv")
    c.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images per CNN + beam search batch (default: 64)")
    c.add_argument("--num-workers", type=int, default=None, metavar="N",
                   help="image decoding processes (default: 0 on a CPU with up to 2 cores: the main process "
                        "decodes; 1 with up to 4 cores, 2 above; on a GPU half the cores, up to 8)")
    c.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    c.add_argument("--follow-symlinks", action="store_true", help="follow symlinks that leave the input folder")
    c.add_argument("--overwrite", action="store_true", help="start --out over instead of continuing it")
    c.add_argument("--skipped", metavar="FILE", help="also write the unreadable images here (path<TAB>reason)")
    c.add_argument("--attention-png", metavar="DIR", help="save a PNG per image: each word's attention over the image")
    c.add_argument("--greedy", action="store_true", help="greedy decoding instead of beam search")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_generation_flags(c, decoding_defaults("caption"), skip=("n_best",))

    plot = sub.add_parser("plot", help="save a run's loss and validation curves as a PNG (needs matplotlib)")
    plot.add_argument("run", metavar="RUN", help="a run folder (with metrics.jsonl) or a metrics.jsonl file")
    plot.add_argument("--out", default=None, metavar="FILE", help="PNG path (default: RUN/curves.png)")

    bench = sub.add_parser("bench", help="this machine's training, decoding, captioning and generation rates and "
                                         "their model FLOPs utilisation (synthetic inputs, offline)",
                           description="Prints one table: train tokens/s, decode sentences/s (greedy and beam 5), "
                                       "caption images/s, char generation chars/s, each with its model FLOP/s and "
                                       "MFU against the matmul rate measured in the same run (see seqgen.bench).")
    bench.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N (default: auto)")
    bench.add_argument("--seconds", type=float, default=5.0, metavar="X",
                       help="timed seconds per measurement (default: 5)")
    bench.add_argument("--seed", type=int, default=1, metavar="N",
                       help="random seed of the synthetic models and inputs (default: 1)")
    bench.add_argument("--threads", type=int, default=0, metavar="N", help="torch threads (default: torch's choice)")
    bench.add_argument("--json", metavar="FILE", help="also write the results here")
    bench.add_argument("--tiny", action="store_true", help="toy model sizes: a smoke test in seconds")

    demo = sub.add_parser("demo", help="caption a photo, translate German and continue a prompt with the shipped "
                                       "models (offline, < 1 min); --train: train a small model first")
    demo.add_argument("--train", action="store_true",
                      help="instead: train a small character model on generated text, then generate from it")
    demo.add_argument("--seconds", type=float, default=40.0, metavar="X",
                      help="with --train: training budget (default: 40)")
    demo.add_argument("--out", default=None, metavar="DIR", help="folder for the attention map (default: runs/demo); "
                                                                 "with --train: keep the run here (default: a temp "
                                                                 "folder)")
    demo.add_argument("--seed", type=int, default=1, metavar="N", help="random seed (default: 1)")

    serve = sub.add_parser("serve", help="serve models over HTTP: a JSON API with request batching, and a web page",
                           description="Starts an HTTP server (FastAPI on uvicorn) for the given models: POST "
                                       "/v1/translate, /v1/caption, /v1/generate; GET /v1/models, /health, / (a web "
                                       "page) and /docs (the OpenAPI schema). Concurrent requests for one model are "
                                       "decoded together in one batched search.")
    serve.add_argument("models", nargs="+", metavar="MODEL",
                       help="shipped model names, checkpoint paths, or NAME=PATH (the name requests use)")
    from seqgen.serve.config import ServeConfig
    add_dataclass_flags(serve, ServeConfig, dest_prefix="serve")
    serve.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda, cuda:N (default: auto)")
    serve.add_argument("--seed", type=int, default=1, metavar="N", help="torch seed at start-up (default: 1)")

    avg = sub.add_parser("average", help="average the weights of compatible checkpoints into one checkpoint",
                         description="Checkpoints of one config and vocabularies (e.g. several best.pt/last.pt of "
                                     "a run, or runs with other seeds); anything else is refused naming what "
                                     "differs.")
    avg.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT", help="two or more checkpoints")
    avg.add_argument("--out", required=True, metavar="FILE", help="the averaged checkpoint to write")

    sub.add_parser("models", help="list the models that ship with seqgen: task, size, data, quality, speed",
                   description="Each name works wherever a checkpoint path does (a path that exists wins).")
    return parser


def _print_once(message: str) -> None:
    """Print in a single process, or in process 0 alone of a torchrun run (every process trains)."""
    from seqgen.distributed import is_main_process
    if is_main_process():
        print(printable(message))


# -- decoding settings -----------------------------------------------------------------------------------
def _search_gen(args: argparse.Namespace, defaults):
    """The decoding the flags ask for (seqgen.generation.decoding_config): --greedy | --beam N | --temperature T,
    else `defaults` (`decoding_defaults(command)`), which also fills the generation flags the user did not type."""
    from seqgen.generation import decoding_config
    return decoding_config(flags_to_dict(args).get("gen", {}), defaults, greedy=args.greedy)


# -- language models -------------------------------------------------------------------------------------
def cmd_train_lm(args: argparse.Namespace) -> int:
    from seqgen.tasks.lm import LMRunConfig, train_lm
    run, flags = build_run_config(LMRunConfig, args)
    state = train_lm(run, args.out, resume=args.resume, overrides=flags, allow_data_change=args.allow_data_change)
    _print_once(f"done: {state.step} steps, best validation loss {state.best:.4f}; model in {args.out}/best.pt")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from seqgen.distributed import resolve_device
    from seqgen.model import load_model
    gen = _search_gen(args, decoding_defaults("generate"))
    if args.stream and args.num_samples > 1 and gen.beam == 1:
        raise SeqgenError("--stream shows one text: use it with --num-samples 1")
    model = load_model(args.checkpoint, device=resolve_device(args.device), task="lm")
    if args.line_buffered or (args.prompt == "" and "--prompt" not in sys.argv
                              and getattr(sys.stdin, "isatty", lambda: False)()):
        for line in sys.stdin:
            _generate_one(model, line.rstrip("\r\n"), gen, args)
        return 0
    _generate_one(model, args.prompt, gen, args)
    return 0


def _generate_one(model, prompt: str, gen, args: argparse.Namespace) -> None:
    """Print the continuations of one prompt (streamed with --stream), flushed."""
    from seqgen.inference.lm import generate_text
    if args.stream:
        def show(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()
        generate_text(model, prompt, gen, num_samples=1, seed=args.seed, on_text=show)
        sys.stdout.write("\n")
    else:
        for i, text in enumerate(generate_text(model, prompt, gen, num_samples=args.num_samples, seed=args.seed)):
            if i:
                print("\n" + "-" * 40)
            print(text)
    sys.stdout.flush()


# -- translation -----------------------------------------------------------------------------------------
def cmd_train_translation(args: argparse.Namespace) -> int:
    from seqgen.tasks.translation import TranslationRunConfig, train_translation
    run, overrides = build_run_config(TranslationRunConfig, args)
    state = train_translation(run, args.out, resume=args.resume, overrides=overrides,
                              allow_data_change=args.allow_data_change)
    best = f"{state.best:.2f}" if state.best is not None else "n/a"
    _print_once(f"done: {state.step} steps, best validation BLEU {best}; model in {args.out}/best.pt")
    return 0


def cmd_prepare_translation(args: argparse.Namespace) -> int:
    from seqgen.tasks.translation import TranslationRunConfig, prepare_translation
    run, _ = build_run_config(TranslationRunConfig, args)
    prepared = prepare_translation(run.data)
    _print_once(f"prepared: {len(prepared):,} pairs in {prepared.folder}")
    return 0


def _write_text(path: str, text: str) -> None:
    """stdout for '-', else an atomic write (a failed run never leaves half a file)."""
    from seqgen.atomic import atomic_write
    if path == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    try:
        atomic_write(path, lambda f: f.write(text), mode="w", encoding="utf-8")
    except OSError as e:
        raise SeqgenError(f"{path}: cannot write ({e.strerror or e})") from None


def _locks_out(command):
    """`command` holds the lock of its --out file while it runs (seqgen.outputs): a second seqgen writing the
    same file is refused with one line naming the holder."""
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        if not args.out or args.out == "-":
            return command(args)
        with holding(acquire_output_lock(args.out)):
            return command(args)
    return run


def _load_translation_model(args: argparse.Namespace):
    from seqgen.distributed import resolve_device
    from seqgen.model import load_model
    return load_model(args.checkpoint, device=resolve_device(args.device), task="translation")


def cmd_translate(args: argparse.Namespace) -> int:
    from seqgen.distributed import entry_point
    return entry_point(_translate)(args)   # under torchrun: closes the process group _translate opens


def _translate(args: argparse.Namespace) -> int:
    from seqgen.distributed import setup, share_cpu_cores
    gen = _search_gen(args, decoding_defaults("translate"))
    refuse_overwriting_inputs({"--out": args.out, "--attention-png": args.attention_png},
                              {"MODEL": args.checkpoint, "the input": args.input})
    if args.input != "-" and not os.path.exists(args.input):
        raise SeqgenError(f"{args.input}: no such file")
    if os.path.isdir(args.input):
        raise SeqgenError(f"{args.input}: is a directory, not a text file")
    dist = setup(args.device)      # under torchrun: this process's chunks of the file and its device
    if dist.world > 1 and (args.input == "-" or args.out == "-"):
        raise SeqgenError("under torchrun, seqgen translate shares an input file: give INPUT and --out FILE "
                          "(stdin and stdout are one process's)")
    share_cpu_cores(dist)
    if args.out == "-":
        return _translate_locked(args, dist, gen)
    with output_lock(args.out, dist):   # one writer per --out; under torchrun process 0 holds it for all
        return _translate_locked(args, dist, gen)


def _translate_locked(args: argparse.Namespace, dist, gen) -> int:
    from seqgen.model import load_model
    from seqgen.tasks.translate_file import CHUNK_LINES as CHUNK
    from seqgen.tasks.translate_file import format_result, read_chunks, translate_file, translate_stream
    model = load_model(args.checkpoint, device=dist.device, task="translation")
    draw = _attention_drawer(args, model)
    interactive = args.input == "-" and (args.line_buffered or getattr(sys.stdin, "isatty", lambda: False)())
    try:
        if interactive:
            out = sys.stdout if args.out == "-" else open(args.out, "a", encoding="utf-8")
            try:
                translate_stream(model, sys.stdin, out, gen, max_src_len=args.max_src_len, seed=args.seed)
            finally:
                if out is not sys.stdout:
                    out.close()
        elif args.out != "-" and args.input != "-" and os.path.isfile(args.input):
            summary = translate_file(model, args.input, args.out, gen, model_name=args.checkpoint,
                                     batch_size=args.batch_size, max_src_len=args.max_src_len, seed=args.seed,
                                     overwrite=args.overwrite, dist=dist, progress=False, on_chunk=draw)
            if dist.is_main:
                to_stderr(f"seqgen: translated {summary.lines:,} line(s) into {args.out}"
                          + (f"; {summary.already_done:,} already there from an earlier run"
                             if summary.already_done else ""))
        else:
            # stdout (or stdin to a file): chunk by chunk, bounded memory, nothing to resume
            from seqgen.inference.translation import translate_nbest
            out = sys.stdout if args.out == "-" else None      # a file is opened once there is something to write
            try:
                for c, chunk in enumerate(read_chunks(args.input)):
                    first = c * CHUNK + 1
                    results = translate_nbest(model, chunk, gen, batch_size=args.batch_size,
                                              max_src_len=args.max_src_len, seed=args.seed + c, warn=to_stderr)
                    out = out or open(args.out, "w", encoding="utf-8")
                    out.write("".join(format_result(first + j, h, gen.n_best) for j, h in enumerate(results)))
                    out.flush()
                    if draw is not None:
                        draw(first, chunk, results)
            finally:
                if out is not None and out is not sys.stdout:
                    out.close()
    except KeyboardInterrupt as e:
        if interactive or args.out == "-" or args.input == "-" or not os.path.isfile(args.input):
            raise                                   # nothing to continue: main says "interrupted"
        to_stderr(f"seqgen: {'terminated' if isinstance(e, Terminated) else 'interrupted'} (the finished chunks "
                  f"are kept in {args.out}: run the same command again to continue)")
        return 143 if isinstance(e, Terminated) else 130
    if draw is not None and dist.is_main:
        to_stderr(f"seqgen: {draw.count} attention map(s) in {args.attention_png}")
    return 0


def _attention_drawer(args: argparse.Namespace, model):
    """on_chunk(first line number, sources, results) drawing one heatmap per sentence, or None."""
    if not args.attention_png:
        return None
    require_matplotlib()
    if model.decoder.attention is None:
        raise SeqgenError(f"{args.checkpoint}: this model has no attention (--attention none); "
                          f"there are no attention maps to draw")

    def draw(first: int, sources: list[str], results) -> None:
        try:          # made with the first answers: a rejected input leaves no folder behind
            os.makedirs(args.attention_png, exist_ok=True)
        except OSError as e:
            raise SeqgenError(f"--attention-png {args.attention_png}: cannot create the folder "
                              f"({e.strerror or e})") from None
        for i, (source, hyps) in enumerate(zip(sources, results), first):
            best = hyps[0]
            if best.attention is None or not best.target_tokens:
                continue
            title = source if len(source) <= 80 else source[:77] + "..."
            attention_heatmap(best.attention, best.source_tokens, best.target_tokens,
                              os.path.join(args.attention_png, f"{i:05d}.png"), title=title)
            draw.count += 1
    draw.count = 0
    return draw


@_locks_out
def cmd_evaluate(args: argparse.Namespace) -> int:
    from seqgen.data.text import read_lines
    from seqgen.inference.translation import translate
    captioning = [f for f, v in (("--images", args.images), ("--captions", args.captions), ("--split", args.split))
                  if v]
    if captioning:
        if args.src or args.ref:
            raise SeqgenError(f"{captioning[0]} evaluates a captioning model, --src/--ref a translation model: give "
                              f"one set")
        return _evaluate_captions(args)
    if not args.src or not args.ref:
        raise SeqgenError("--src and --ref are required to evaluate a translation model (--images and --captions "
                          "for a captioning model)")
    gen = _search_gen(args, decoding_defaults("evaluate"))
    refuse_overwriting_inputs({"--out": args.out}, {"MODEL": args.checkpoint, "--src": args.src, "--ref": args.ref})
    src, ref = read_lines(args.src), read_lines(args.ref)
    if len(src) != len(ref):
        raise SeqgenError(f"{args.src} has {len(src)} lines but {args.ref} has {len(ref)} "
                          f"— the files must be aligned line by line")
    model = _load_translation_model(args)
    hyps = translate(model, src, gen, batch_size=args.batch_size, max_src_len=args.max_src_len, seed=args.seed,
                     warn=to_stderr)
    if args.out:
        _write_text(args.out, "".join(h + "\n" for h in hyps))
    scores = corpus_scores(hyps, ref)
    if args.json:
        print(json.dumps({"bleu": scores["bleu"], "chrf": scores["chrf"], "sentences": len(src),
                          "bleu_signature": scores["bleu_signature"], "chrf_signature": scores["chrf_signature"],
                          "beam": gen.beam, "temperature": gen.temperature}))
    else:
        print(scores["bleu_line"])
        print(scores["chrf_line"])
    return 0


def _evaluate_captions(args: argparse.Namespace) -> int:
    from seqgen.distributed import resolve_device
    from seqgen.model import load_model
    from seqgen.tasks.caption_eval import check_output, evaluate_captions, score_line, write_captions
    gen = _search_gen(args, decoding_defaults("caption"))
    if not args.images or not args.captions:
        raise SeqgenError("--images and --captions are both required to evaluate a captioning model")
    check_output(args.out)
    refuse_overwriting_inputs({"--out": args.out}, {"MODEL": args.checkpoint, "--captions": args.captions,
                                                    "--split": args.split})
    model = load_model(args.checkpoint, device=resolve_device(args.device), task="captioning")
    names, hyps, scores = evaluate_captions(model, args.images, args.captions, args.split or "", gen,
                                            batch_size=args.batch_size, num_workers=args.num_workers)
    if args.out:
        write_captions(args.out, names, hyps)
    if args.json:
        print(json.dumps({**scores, "images": len(names), "beam": gen.beam, "temperature": gen.temperature}))
    else:
        print(score_line(scores, len(names), gen))
    return 0


# -- captioning ------------------------------------------------------------------------------------------
def cmd_train_captioning(args: argparse.Namespace) -> int:
    from seqgen.tasks.captioning import CaptionRunConfig, train_captioning
    run, overrides = build_run_config(CaptionRunConfig, args)
    state = train_captioning(run, args.out, resume=args.resume, overrides=overrides,
                             allow_data_change=args.allow_data_change)
    best = f"{state.best:.3f}" if state.best is not None else "n/a"
    _print_once(f"done: {state.step} steps, best validation CIDEr-D {best}; model in {args.out}/best.pt")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from seqgen.distributed import entry_point
    return entry_point(_caption)(args)   # under torchrun: closes the process group _caption opens


def _caption(args: argparse.Namespace) -> int:
    from seqgen.distributed import setup, share_cpu_cores
    from seqgen.model import load_model
    from seqgen.tasks.caption_folder import caption_folder, output_format
    # the same --greedy | --beam N | --temperature T rules as translate, and the caption defaults (no loops)
    gen = _search_gen(args, decoding_defaults("caption"))
    output_format(args.out)        # an unknown extension fails before the model is loaded
    dist = setup(args.device)      # under torchrun: this process's share of the folder and its device
    share_cpu_cores(dist)
    model = load_model(args.checkpoint, device=dist.device, task="captioning")
    try:
        summary = caption_folder(model, args.inputs, args.out, gen, batch_size=args.batch_size,
                                 num_workers=args.num_workers, recursive=args.recursive,
                                 follow_symlinks=args.follow_symlinks, resume=not args.overwrite,
                                 attention_png_dir=args.attention_png, skipped_path=args.skipped,
                                 progress=not args.quiet, dist=dist)
    except KeyboardInterrupt as e:
        kept = args.out if dist.world == 1 else f"{args.out} and its part files"
        to_stderr(f"seqgen: interrupted; every finished batch is kept in {kept}: run the same command again to "
                  f"continue")
        return 143 if isinstance(e, Terminated) else 130
    if not summary.ok:
        to_stderr(f"seqgen: error: no image could be captioned ({len(summary.skipped)} skipped)")
        return 1
    return 0


# -- the rest --------------------------------------------------------------------------------------------
def cmd_plot(args: argparse.Namespace) -> int:
    metrics = os.path.join(args.run, "metrics.jsonl") if os.path.isdir(args.run) else args.run
    if not os.path.isfile(metrics):
        raise SeqgenError(f"{metrics}: no such file (is {args.run} a run folder?)")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(metrics)), "curves.png")
    refuse_overwriting_inputs({"--out": out}, {"the metrics log": metrics})
    print(printable(loss_curve(metrics, out)))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import torch

    from seqgen.bench import BenchConfig, run_bench, tiny_config, write_json
    if args.threads < 0:
        raise SeqgenError(f"--threads must be >= 0, got {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"seconds": args.seconds, "device": args.device, "seed": args.seed}
    result = run_bench(tiny_config(**options) if args.tiny else BenchConfig(**options))
    if args.json:
        write_json(result, args.json)
    print(result.table())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from seqgen.tasks.demo import run_demo, run_training_demo
    if args.train:
        run_training_demo(seconds=args.seconds, out=args.out, seed=args.seed)
    else:
        run_demo(out=args.out or "runs/demo", seed=args.seed)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from seqgen.serve.app import create_app
    except ImportError as e:
        raise SeqgenError(f"seqgen serve needs FastAPI and uvicorn ({e.name} is missing): "
                          f"pip install 'seqgen[serve]'") from None
    import torch

    from seqgen.distributed import resolve_device
    from seqgen.serve.config import ServeConfig
    from seqgen.serve.models import load_served
    from seqgen.threads import use_threads_here
    cfg = from_dict(ServeConfig, flags_to_dict(args).get("serve", {}), where=None)
    _check_can_listen(cfg.host, cfg.port)      # before loading models: a taken port is one line, not a traceback
    torch.manual_seed(args.seed)
    # The decoding thread gets the cores; this thread (loading, then the event loop) and the request thread pool
    # one each, from before the first parallel op on: one OpenMP team in the process (seqgen/threads.py).
    cfg = dataclasses.replace(cfg, threads=cfg.threads or torch.get_num_threads())
    use_threads_here(1)
    served = load_served(args.models, device=resolve_device(args.device))
    app = create_app(served, cfg)
    where = f"http://{cfg.host}:{cfg.port}" if ":" not in cfg.host else f"http://[{cfg.host}]:{cfg.port}"
    to_stderr(f"seqgen: serving {', '.join(f'{n} ({m.task})' for n, m in served.items())} at {where} "
              f"(web page {where}/, API schema {where}/docs); Ctrl-C stops")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")
    return 0


def _check_can_listen(host: str, port: int) -> None:
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise SeqgenError(f"--host {host}: cannot resolve ({e.strerror or e})") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            raise SeqgenError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); "
                              f"choose another --port") from None


def cmd_average(args: argparse.Namespace) -> int:
    from seqgen.average import average_payload
    from seqgen.checkpoint import save_checkpoint
    out = os.path.realpath(args.out)
    if any(os.path.exists(c) and os.path.realpath(c) == out for c in args.checkpoints):
        raise SeqgenError(f"--out {args.out} is one of the checkpoints to average; choose another file "
                          f"(nothing was written)")
    payload = average_payload(args.checkpoints)
    try:
        save_checkpoint(args.out, payload)
    except OSError as e:
        raise SeqgenError(f"{args.out}: cannot write ({e.strerror or e})") from None
    to_stderr(f"seqgen: averaged {len(args.checkpoints)} checkpoints into {args.out}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from seqgen.zoo import table
    print(table())
    return 0


COMMANDS = {("train", "lm"): cmd_train_lm, ("generate", None): cmd_generate,
            ("train", "translation"): cmd_train_translation, ("translate", None): cmd_translate,
            ("prepare", "translation"): cmd_prepare_translation,
            ("evaluate", None): cmd_evaluate,
            ("train", "captioning"): cmd_train_captioning, ("caption", None): cmd_caption,
            ("plot", None): cmd_plot, ("bench", None): cmd_bench, ("demo", None): cmd_demo,
            ("models", None): cmd_models, ("serve", None): cmd_serve, ("average", None): cmd_average}


# What an interrupted command can do next (the others just stop).
_AFTER_INTERRUPT = {"train": "the last checkpoint is intact; continue with --resume",
                    "caption": "every finished batch is kept in --out: run the same command again to continue"}


def interrupted(command: str, error: KeyboardInterrupt) -> int:
    """Say that `command` stopped on Ctrl-C or SIGTERM, and how to continue where it can; the exit status."""
    after = _AFTER_INTERRUPT.get(command)
    to_stderr(f"seqgen: {'terminated' if isinstance(error, Terminated) else 'interrupted'}"
              + (f" ({after})" if after else ""))
    return 143 if isinstance(error, Terminated) else 130


def main(argv: list[str] | None = None) -> int:
    tune_cpu_allocator()   # process-wide, so the entry point decides it, not the library (see seqgen/allocator.py)
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "task", None))]
    try:
        with sigterm_interrupts():
            return handler(args)
    except SeqgenError as e:
        if args.debug:
            traceback.print_exc()
        to_stderr(f"seqgen: error: {e}")   # a file name's line breaks and control characters escaped
        return 2
    except KeyboardInterrupt as e:
        return interrupted(args.command, e)


if __name__ == "__main__":
    sys.exit(main())
