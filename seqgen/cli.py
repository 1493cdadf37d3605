"""`seqgen` command line: train, generate, translate, evaluate, caption, demo.

Flags come from the same dataclasses as the YAML configs (seqgen.config), so every config key is also a
flag. Library errors (`SeqgenError`) become one line `seqgen: error: ...` and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
import traceback

from seqgen.config import add_dataclass_flags, flags_to_dict, from_dict, load_yaml, merge
from seqgen.errors import SeqgenError


def _common_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="run folder: last.pt, best.pt, metrics.jsonl")
    p.add_argument("--config", help="YAML file with the same keys as the flags (flags win)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")


def _add_generation_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from seqgen.model import GenerationConfig
    add_dataclass_flags(p, GenerationConfig, dest_prefix="gen", skip=skip)
    p.add_argument("--seed", type=int, default=1, help="random seed for sampling (default: 1)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    from seqgen.decoders.rnn import DecoderConfig
    from seqgen.tasks.lm import LMDataConfig
    from seqgen.train import TrainConfig

    parser = argparse.ArgumentParser(prog="seqgen", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a model").add_subparsers(dest="task", required=True)
    lm = train.add_parser("lm", help="char/word/subword language model on a text file")
    _common_train_flags(lm)
    add_dataclass_flags(lm, LMDataConfig, dest_prefix="data")
    add_dataclass_flags(lm, DecoderConfig, dest_prefix="decoder")
    add_dataclass_flags(lm, TrainConfig, dest_prefix="train")

    gen = sub.add_parser("generate", help="continue a prompt with a language model")
    gen.add_argument("checkpoint")
    gen.add_argument("--prompt", default="", help="text to continue (default: empty)")
    gen.add_argument("--num-samples", type=int, default=1)
    gen.add_argument("--greedy", action="store_true", help="deterministic: always the most likely token")
    _add_generation_flags(gen)

    # -- translation commands (seqgen.tasks.translation) --
    # -- captioning commands (seqgen.tasks.captioning) --

    demo = sub.add_parser("demo", help="train a small model on bundled text and generate (offline, < 1 min)")
    demo.add_argument("--seconds", type=float, default=40.0, help="training budget (default: 40)")
    demo.add_argument("--out", default=None, help="keep the demo run here (default: a temp folder)")
    demo.add_argument("--seed", type=int, default=1)
    return parser


def _run_config(cls, args: argparse.Namespace):
    """defaults < --config YAML < typed flags."""
    data = load_yaml(args.config) if getattr(args, "config", None) else {}
    flags = flags_to_dict(args)
    return from_dict(cls, merge(data, flags), where=args.config or "flags"), flags


def cmd_train_lm(args: argparse.Namespace) -> int:
    from seqgen.tasks.lm import LMRunConfig, train_lm
    run, flags = _run_config(LMRunConfig, args)
    if not args.resume and not run.data.text:
        raise SeqgenError("--text is required: the UTF-8 text file to train on")
    state = train_lm(run, args.out, resume=args.resume, overrides=flags)
    print(f"done: {state.step} steps, best validation loss {state.best:.4f}; model in {args.out}/best.pt")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import dataclasses

    from seqgen.model import GenerationConfig, load_model
    from seqgen.tasks.lm import generate_text
    from seqgen.train import resolve_device

    gen = from_dict(GenerationConfig, flags_to_dict(args).get("gen", {}), where="flags")
    typed_temperature = "gen.temperature" in vars(args)
    if gen.beam > 1 or args.greedy:
        if typed_temperature and gen.temperature > 0:
            raise SeqgenError("--temperature samples; it cannot be combined with --beam or --greedy")
        gen = dataclasses.replace(gen, temperature=0.0)
    elif not typed_temperature:
        gen = dataclasses.replace(gen, temperature=0.8)
    elif gen.temperature <= 0:
        raise SeqgenError(f"--temperature must be > 0 when sampling (got {gen.temperature}); "
                          f"use --greedy for deterministic output")
    model = load_model(args.checkpoint, device=resolve_device(args.device), task="lm")
    for i, text in enumerate(generate_text(model, args.prompt, gen, num_samples=args.num_samples, seed=args.seed)):
        if i:
            print("\n" + "-" * 40)
        print(text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from seqgen.tasks.demo import run_demo
    run_demo(seconds=args.seconds, out=args.out, seed=args.seed)
    return 0


# -- translation handlers --
# -- captioning handlers --

COMMANDS = {("train", "lm"): cmd_train_lm, ("generate", None): cmd_generate, ("demo", None): cmd_demo}
# COMMANDS.update(...) lines for translation / captioning go here


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = COMMANDS[(args.command, getattr(args, "task", None))]
    try:
        return handler(args)
    except SeqgenError as e:
        if args.debug:
            traceback.print_exc()
        print(f"seqgen: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("seqgen: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
