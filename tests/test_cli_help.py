"""Every `seqgen` command's --help reads as documentation: every flag and argument has a sentence of help, its
value a plain name (N, X, FILE, DIR, ...; never a config path like DATA.SEQ_LEN), and the default shown is the
one the command really uses."""
import argparse
import dataclasses
import re

import pytest

from seqgen.cli import _search_gen, build_parser, decoding_defaults
from seqgen.config import field_docs
from seqgen.data.captions import CaptionDataConfig
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.cnn import CNNEncoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.generation import GenerationConfig
from seqgen.tasks.lm import LMDataConfig
from seqgen.tasks.translation import TranslationDataConfig
from seqgen.train import TrainConfig

CONFIGS = [LMDataConfig, TranslationDataConfig, CaptionDataConfig, RNNEncoderConfig, CNNEncoderConfig,
           DecoderConfig, TrainConfig, GenerationConfig]


def _commands(parser: argparse.ArgumentParser, name: str = "seqgen"):
    """(command name, its parser) for the top level and every subcommand, depth first."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _commands(sub, f"{name} {sub_name}")


def _options(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if not isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            yield action


def test_every_flag_has_help_and_a_plain_metavar():
    problems = []
    for command, parser in _commands(build_parser()):
        for action in _options(parser):
            name = "/".join(action.option_strings) or action.dest
            text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
            if not text or action.help == argparse.SUPPRESS:
                problems.append(f"{command} {name}: no help")
            if action.nargs == 0:             # a switch: no value to name
                continue
            if action.option_strings and action.metavar is None and action.choices is None:
                problems.append(f"{command} {name}: no metavar (argparse would show {action.dest.upper()})")
            shown = action.metavar or ("" if action.option_strings else action.dest)
            if "." in str(shown):
                problems.append(f"{command} {name}: dotted metavar {shown}")
    assert not problems, "\n".join(problems)


def test_every_help_renders_without_config_paths():
    for command, parser in _commands(build_parser()):
        text = parser.format_help()
        assert not re.search(r"\b[A-Z]+\.[A-Z_]+\b", text), (command, text)


def test_every_config_field_is_documented_once():
    """The dataclass docstrings are the one source of the flags' help and the YAML keys' meaning."""
    for cls in CONFIGS:
        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__}: fields without a `name: ...` line in the docstring: {missing}"


def test_field_docs_reads_continuation_lines():
    @dataclasses.dataclass
    class Example:
        """What it is.

        alpha: the first
               and more
        beta:  the second
        not_a_field: ignored
        """
        alpha: int = 1
        beta: int = 2

    assert field_docs(Example) == {"alpha": "the first and more", "beta": "the second"}


def _help_default(parser: argparse.ArgumentParser, dest: str) -> str:
    action = next(a for a in parser._actions if a.dest == dest)
    return re.search(r"\(default: ([^)]*)\)", action.help).group(1)


@pytest.mark.parametrize("argv", [["translate", "m"], ["evaluate", "m", "--src", "s", "--ref", "r"],
                                  ["caption", "m", "photos", "--out", "c.jsonl"], ["generate", "m"]])
def test_decoding_defaults_shown_are_the_ones_used(argv):
    """seqgen translate/evaluate/caption/generate decode with what their --help says when no flag is given."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = decoding_defaults(argv[0])
    used = _search_gen(args, defaults)
    assert used == defaults
    sub = next(p for name, p in _commands(parser) if name == f"seqgen {argv[0]}")
    for field in dataclasses.fields(GenerationConfig):
        if any(a.dest == f"gen.{field.name}" for a in sub._actions):
            assert _help_default(sub, f"gen.{field.name}") == str(getattr(used, field.name)), field.name


def test_the_documented_decoding_defaults():
    parser = build_parser()
    commands = dict(_commands(parser))
    assert _help_default(commands["seqgen translate"], "gen.beam") == "5"
    caption = commands["seqgen caption"]
    assert [_help_default(caption, f"gen.{k}") for k in ("beam", "max_len", "no_repeat_ngram")] == ["5", "30", "3"]
    assert _help_default(commands["seqgen generate"], "gen.temperature") == "0.8"
    assert _help_default(commands["seqgen train captioning"], "train.max_epochs") == "4"
