"""Hostile configs, checkpoints and inputs (issue #21, second hostile review): every number a config holds is
checked in one place (seqgen.config: the bounds in each field's annotation, `cross_check` rules) whether it came
from a flag, a YAML file or a checkpoint; a crafted checkpoint or a YAML alias bomb is one short error line; a
resumed run refuses other data; input that never ends stops at a stated limit; Ctrl-C and SIGTERM say the right
thing for each command. Each case: exit status 2 (130/143 for signals), one line, no traceback, nothing written.
"""
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Annotated, get_args, get_origin

import pytest
import torch
from test_hostile_text import TINY_LM, cli, mt_checkpoint  # noqa: F401 (a fixture)

import seqgen.cli as seqgen_cli
import seqgen.data.text as text_module
from seqgen.checkpoint import load_checkpoint, save_checkpoint
from seqgen.config import Bounds, from_dict, validate
from seqgen.data.captions import CaptionDataConfig
from seqgen.data.text import read_stream
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.cnn import CNNEncoderConfig
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.errors import SeqgenError, cut_repr
from seqgen.generation import GenerationConfig
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.objectives.scst import SCSTConfig
from seqgen.serve.config import ServeConfig
from seqgen.tasks.lm import LMDataConfig, LMRunConfig
from seqgen.tasks.translation import TranslationDataConfig
from seqgen.tokenizers import TextCodec
from seqgen.train import TrainConfig, Trainer, TrainState

CONFIGS = [LMDataConfig, TranslationDataConfig, CaptionDataConfig, RNNEncoderConfig, CNNEncoderConfig, DecoderConfig,
           TrainConfig, GenerationConfig, ServeConfig, SCSTConfig]
TEXT = "to be or not to be, that is the question.\n" * 40


def one_error_line(capsys, args, *names, status=2):
    """Run `seqgen ARGS` in this process: `status`, and stderr is one `seqgen: error:` line naming each of `names`."""
    code, _, err = cli(capsys, *args)
    assert code == status and err.count("\n") == 1 and err.startswith("seqgen: error: "), err
    assert "Traceback" not in err and all(str(n) in err for n in names), err
    return err.strip()


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """A 2-step char LM run (last.pt, best.pt) and its text file."""
    d = tmp_path_factory.mktemp("lm")
    (d / "input.txt").write_text(TEXT, encoding="utf-8")
    assert seqgen_cli.main(["train", "lm", "--text", str(d / "input.txt"), "--out", str(d / "run"),
                            *map(str, TINY_LM)]) == 0
    return d


# ------------------------------------------------------------- item 12/13: numbers, validated in one place

def test_every_number_of_every_config_declares_its_bounds():
    """Validation lives in the dataclasses: an int or float field without Bounds would go unchecked."""
    import typing
    missing = []
    for cls in CONFIGS:
        for name, tp in typing.get_type_hints(cls, include_extras=True).items():
            parts = get_args(tp) if get_origin(tp) is not Annotated and get_args(tp) else (tp,)
            for part in parts:
                plain = part.__origin__ if get_origin(part) is Annotated else part
                if plain in (int, float) and not (get_origin(part) is Annotated
                                                  and any(isinstance(m, Bounds) for m in part.__metadata__)):
                    missing.append(f"{cls.__name__}.{name}")
    assert not missing, missing


@pytest.mark.parametrize("flags, message", [
    (["--hidden", 0], "--hidden must be between 1 and 65,536, got 0"),
    (["--emb", 0], "--emb must be between 1 and 65,536, got 0"),
    (["--layers", 0], "--layers must be between 1 and 64, got 0"),
    (["--seq-len", 0], "--seq-len must be between 1 and 1,000,000, got 0"),
    (["--batch-size", 0], "--batch-size must be >= 1, got 0"),
    (["--lr", -1], "--lr must be > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--dropout", 2], "--dropout must be >= 0 and < 1, got 2.0"),
    (["--max-steps", 0], "--max-steps must be >= 1, got 0"),
    (["--max-steps", -1], "--max-steps must be >= 1, got -1"),
    (["--eval-every", 0], "--eval-every must be >= 1, got 0"),
    (["--log-every", 0], "--log-every must be >= 1, got 0"),
    (["--checkpoint-every", 0], "--checkpoint-every must be >= 1, got 0"),
    (["--label-smoothing", 2], "--label-smoothing must be >= 0 and < 1, got 2.0"),
    (["--attention-size", -5], "--attention-size must be between 0 and 65,536, got -5"),
    (["--min-lr-ratio", -1], "--min-lr-ratio must be between 0 and 1, got -1.0"),
    (["--valid-fraction", 0], "--valid-fraction must be > 0 and < 1, got 0.0"),
    (["--seed", -1], "--seed must be between 0 and 4,294,967,295, got -1"),
    (["--ema", 1], "--ema must be >= 0 and < 1, got 1.0"),
    (["--hidden", 2**20], "--hidden must be between 1 and 65,536, got 1048576"),
])
def test_train_lm_refuses_each_bad_number_in_one_line_and_writes_nothing(capsys, tmp_path, text, flags, message):
    out = tmp_path / "run"
    assert one_error_line(capsys, ["train", "lm", "--text", text, "--out", out, *TINY_LM, *flags]) == \
        f"seqgen: error: {message}"
    assert not out.exists()                 # so the corrected command is not refused as "already holds a run"


@pytest.mark.parametrize("yaml_text, message", [
    ("train:\n  lr: .nan\n", "cfg.yaml: train.lr must be a finite number, got nan"),
    ("train:\n  lr: -.inf\n", "cfg.yaml: train.lr must be a finite number, got -inf"),
    ("decoder:\n  hidden: 0\n", "cfg.yaml: decoder.hidden must be between 1 and 65,536, got 0"),
    ("train:\n  lr: " + "9" * 400 + "\n", "cfg.yaml: train.lr must be a finite number, got inf"),
    ("decoder:\n  layers: " + "9" * 4000 + "\n", "decoder.layers must be between 1 and 64, got an integer of about "
                                                 "4,001 digits"),
    ("decoder:\n  layers: " + "9" * 5000 + "\n", "cfg.yaml: a value cannot be read (Exceeds the limit (4300 digits)"),
    ("data:\n  valid_fraction: 0\n", "cfg.yaml: data.valid_fraction must be > 0 and < 1, got 0.0"),
    ("1: 5\n", "cfg.yaml: 1 is not a known key; known: data, decoder, train"),                     # item 16
    ("decoder:\n  7: 5\n  8: 6\n", "cfg.yaml: decoder.7 is not a known key (nor are 1 other key(s)); known: cell,"),
    ("data: 5\n", "cfg.yaml: data must be a mapping of keys to values, got 5"),                    # item 16
])
def test_a_bad_yaml_value_is_named_by_its_key(capsys, tmp_path, text, yaml_text, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml_text, encoding="utf-8")
    out = tmp_path / "run"
    small = ["--seq-len", 16, "--batch-size", 4, "--max-steps", 2, "--progress", "false"]   # none of the keys above
    err = one_error_line(capsys, ["train", "lm", "--config", cfg, "--text", text, "--out", out, *small])
    assert message in err and len(err) < 300
    assert not out.exists()


def test_flags_with_a_prefix_and_cross_field_rules_are_named_as_typed(capsys, tmp_path, mt_checkpoint):  # noqa: F811
    base = ["train", "translation", "--train-tsv", tmp_path / "none.tsv", "--out", tmp_path / "run"]
    one_error_line(capsys, [*base, "--enc-hidden", 0], "--enc-hidden must be between 1 and 65,536, got 0")
    one_error_line(capsys, [*base, "--eval-beam", 0], "--eval-beam must be between 1 and 1,000, got 0")
    one_error_line(capsys, [*base, "--eval-min-len", 500], "--eval-min-len cannot exceed max_len (100), got 500")
    one_error_line(capsys, [*base, "--max-len", 10**9], "--max-len must be between 1 and 10,000, got 1000000000")
    assert not (tmp_path / "run").exists()
    decode = ["translate", mt_checkpoint, os.devnull]
    for flags, message in [(["--temperature", "nan"], "--temperature must be a finite number, got nan"),
                           (["--min-len", 50, "--max-len", 10], "--min-len cannot exceed max_len (10), got 50"),
                           (["--length-penalty", "nan"], "--length-penalty must be a finite number, got nan"),
                           (["--top-k", -1, "--temperature", 1], "--top-k must be between 0 and 1,000,000, got -1"),
                           (["--max-len", 10**9], "--max-len must be between 1 and 10,000, got 1000000000")]:
        one_error_line(capsys, [*decode, *flags], message)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", -1], "--num-samples must be between 1 and 1,000, got -1"),
    (["--num-samples", 0], "--num-samples must be between 1 and 1,000, got 0"),
    (["--temperature", "nan"], "--temperature must be a finite number, got nan"),
    (["--max-len", 10**9], "--max-len must be between 1 and 10,000, got 1000000000"),
])
def test_generate_refuses_nonsense(capsys, lm_run, flags, message):
    one_error_line(capsys, ["generate", lm_run / "run" / "best.pt", *flags], message)


def test_configs_built_in_code_are_checked_the_same_way():
    with pytest.raises(SeqgenError, match="--dropout must be >= 0 and < 1, got 1.5"):
        validate(LMRunConfig(decoder=DecoderConfig(dropout=1.5)))
    with pytest.raises(SeqgenError, match="--min-len cannot exceed max_len"):
        GenerationConfig(min_len=50, max_len=10).validate()
    with pytest.raises(SeqgenError, match="--port must be between 1 and 65,535"):
        ServeConfig(port=0).validate()
    with pytest.raises(SeqgenError, match="--threads must be >= 0, got -1"):
        ServeConfig(threads=-1).validate()
    with pytest.raises(SeqgenError, match="--scst-samples must be >= 2 with the mean baseline"):
        SCSTConfig(scst_samples=1).validate()
    with pytest.raises(SeqgenError, match="ckpt: decoder.emb must be between 1 and 65,536, got -5"):
        from_dict(ModelConfig, {"decoder": {"emb": -5}}, where="ckpt")
    with pytest.raises(SeqgenError, match="--hidden must be between"):
        Seq2Seq(ModelConfig(decoder=DecoderConfig(hidden=0)), tgt=TextCodec.build("char", ["ab"]))


def test_a_nan_validation_score_is_never_best():
    trainer = SimpleNamespace(state=TrainState(), mode="min")
    assert not Trainer._improved(trainer, math.nan) and Trainer._improved(trainer, 3.0)
    trainer.state.best = 3.0
    assert not Trainer._improved(trainer, math.nan) and Trainer._improved(trainer, 2.0)


# ------------------------------------------------------------- item 2: alias bombs and unbounded reprs

def test_cut_repr_is_short_and_says_how_long_the_value_was():
    assert cut_repr("x" * 1_000_000).endswith("... (1,000,000 characters)") and len(cut_repr("x" * 10**6)) < 120
    assert cut_repr(list(range(500))).endswith("(a list of 500 item(s))")
    assert cut_repr(10**5000) == "an integer of about 5,001 digits"
    nested = []
    for _ in range(100_000):
        nested = [nested]
    assert len(cut_repr(nested)) < 120                      # no RecursionError, no expansion
    assert cut_repr("ok") == "'ok'" and cut_repr(2.5) == "2.5"


def test_a_yaml_alias_bomb_is_one_short_line(capsys, tmp_path, text):
    # 9 levels of 9 aliases each: 9**9 (387 million) values from a few hundred bytes, inside a checked value
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\ntrain:\n  lr: *a8\n", encoding="utf-8")
    assert len(bomb.read_bytes()) < 500
    out = tmp_path / "run"
    err = one_error_line(capsys, ["train", "lm", "--config", bomb, "--text", text, "--out", out],
                         "expands to more than 10,000 values")
    assert len(err) < 300 and not out.exists()
    small = tmp_path / "small.yaml"      # within the limit, but its value's repr would be long: cut, with its size
    small.write_text(f"train:\n  lr: {'z' * 100_000}\n", encoding="utf-8")
    err = one_error_line(capsys, ["train", "lm", "--config", small, "--text", text, "--out", out],
                         "train.lr must be a number, got 'zzz", "(100,000 characters)")
    assert len(err) < 300


@pytest.mark.parametrize("content, message", [
    ("a: &a [*a]\n", "a YAML alias refers to the value that contains it"),
    ("train: " + "[" * 20_000 + "]" * 20_000 + "\n", "nested too deeply for a config file"),
    ("# " + "x" * (1 << 20) + "\n", "larger than 1 MiB, the most seqgen reads from a config file"),
])
def test_recursive_deep_and_huge_config_files_are_one_line(capsys, tmp_path, text, content, message):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(content, encoding="utf-8")
    one_error_line(capsys, ["train", "lm", "--config", cfg, "--text", text, "--out", tmp_path / "run"], message)


# ------------------------------------------------------------- item 14: crafted checkpoints

def tiny_lm_payload():
    torch.manual_seed(0)
    model = Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(emb=8, hidden=8)), tgt=TextCodec.build("char", [TEXT]))
    return model.to_payload()


def with_config(payload, **decoder):
    config = json.loads(payload["config"])
    config["decoder"].update(decoder)
    return {**payload, "config": json.dumps(config)}


def with_nan_weight(payload):
    model = dict(payload["model"])
    model["decoder.output.bias"] = torch.full_like(model["decoder.output.bias"], math.nan)
    return {**payload, "model": model}


CRAFTED = {
    "hidden 2**20": (lambda p: with_config(p, hidden=2**20), "decoder.hidden must be between 1 and 65,536"),
    "negative size": (lambda p: with_config(p, emb=-3), "decoder.emb must be between 1 and 65,536, got -3"),
    "too many parameters": (lambda p: with_config(p, hidden=65_536, emb=65_536, layers=8),
                            "parameters (", "more than the 1,073,741,824 seqgen builds"),
    "attention without an encoder": (lambda p: with_config(p, attention="bahdanau"), "needs an encoder with memory"),
    "model a list": (lambda p: {**p, "model": [1, 2]}, "weights are not a mapping of names to tensors"),
    "a tensor as the payload": (lambda p: torch.zeros(3), "the checkpoint's payload is a Tensor"),
    "NaN weights": (with_nan_weight, "weight 'decoder.output.bias' holds non-finite values (NaN or inf)"),
    "deeply nested config": (lambda p: {**p, "config": "[" * 100_000 + "]" * 100_000}, "nested too deeply"),
    "config not text": (lambda p: {**p, "config": 5}, "config entry is not the JSON text seqgen writes"),
    "config a list": (lambda p: {**p, "config": "[1]"}, "must be a mapping of keys to values, got [1]"),
    "nested value": (lambda p: with_config(p, hidden=json.loads("[" * 500 + "]" * 500)),
                     "decoder.hidden must be an integer, got [[[[...]]]]"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_generate_refuses_a_crafted_checkpoint_in_one_line(capsys, tmp_path, case):
    craft, *messages = CRAFTED[case]
    path = tmp_path / "crafted.pt"
    save_checkpoint(str(path), craft(tiny_lm_payload()))
    one_error_line(capsys, ["generate", path], path, *messages)


@pytest.mark.parametrize("case, craft, message", [
    ("hidden 2**20 in the run config", lambda p: {**p, "run_config": json.dumps(
        {**json.loads(p["run_config"]), "decoder": {"hidden": 2**20}})}, "decoder.hidden must be between"),
    ("deeply nested run config", lambda p: {**p, "run_config": "{" + '"a":{' * 50_000 + "}" * 50_001},
     "run_config entry is nested too deeply"),
    ("run config sections not mappings", lambda p: {**p, "run_config": json.dumps({"data": 5})},
     "run_config entry is not the mapping of sections seqgen writes"),
    ("NaN weights", with_nan_weight, "holds non-finite values"),
    ("model a list", lambda p: {**p, "model": [1]}, "weights are not a mapping of names to tensors"),
    ("trainer state missing", lambda p: {**p, "trainer": {"optimizer": {}}}, "has no state entry"),
    ("optimizer state of another model", lambda p: {**p, "trainer": {**p["trainer"], "optimizer": {"state": {}}}},
     "the checkpoint's optimizer state does not fit this run's model"),
])
def test_resume_refuses_a_crafted_checkpoint_in_one_line(capsys, tmp_path, lm_run, case, craft, message):
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(str(run / "last.pt"), craft(load_checkpoint(str(lm_run / "run" / "last.pt"))))
    before = sorted(os.listdir(run))
    one_error_line(capsys, ["train", "lm", "--resume", "--out", run, "--progress", "false"], message)
    assert sorted(os.listdir(run)) == before


def test_a_run_whose_nan_score_was_marked_best_still_resumes(capsys, tmp_path, lm_run):
    run = tmp_path / "run"
    run.mkdir()
    payload = load_checkpoint(str(lm_run / "run" / "last.pt"))
    state = {**json.loads(payload["trainer"]["state"]), "best": math.nan}
    save_checkpoint(str(run / "last.pt"), {**payload, "trainer": {**payload["trainer"], "state": json.dumps(state)}})
    code, out, err = cli(capsys, "train", "lm", "--resume", "--out", run, "--max-steps", 3, "--progress", "false")
    assert code == 0 and "done: 3 steps" in out, err


# ------------------------------------------------------------- item 16: run folders that cannot be written

def test_out_under_a_file_or_on_a_read_only_file_system_is_one_line(capsys, tmp_path, text, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    one_error_line(capsys, ["train", "lm", "--text", text, "--out", blocker / "run", *TINY_LM],
                   f"--out {blocker / 'run'}: {blocker} is a file, not a folder")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path) else real_access(p, mode))
    one_error_line(capsys, ["train", "lm", "--text", text, "--out", tmp_path / "run", *TINY_LM],
                   f"cannot write in {tmp_path} (a read-only file system, or no permission)")
    monkeypatch.setattr(os, "access", real_access)

    def read_only(path, *args, **kwargs):         # what mkdir says on a read-only mount, whatever access() said
        raise OSError(30, "Read-only file system", str(path))
    monkeypatch.setattr(os, "makedirs", read_only)
    one_error_line(capsys, ["train", "lm", "--text", text, "--out", tmp_path / "run", *TINY_LM],
                   f"--out {tmp_path / 'run'}: cannot create the run folder (Read-only file system)")


def test_data_section_that_is_not_a_mapping_next_to_a_data_flag(capsys, tmp_path, text):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: 5\n", encoding="utf-8")
    one_error_line(capsys, ["train", "lm", "--config", cfg, "--text", text, "--out", tmp_path / "run"],
                   f"{cfg}: data must be a mapping of keys to values, got 5")


# ------------------------------------------------------------- item 11: --resume on other data

def copy_run(lm_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("last.pt", "best.pt"):
        (run / name).write_bytes((lm_run / "run" / name).read_bytes())
    return run


def test_resume_refuses_changed_data_unless_allowed(capsys, tmp_path, lm_run):
    run = copy_run(lm_run, tmp_path)
    resume = ["train", "lm", "--resume", "--out", run, "--max-steps", 3, "--progress", "false"]
    other = tmp_path / "other.txt"
    other.write_text(TEXT.replace("question", "answer!!"), encoding="utf-8")
    one_error_line(capsys, [*resume, "--text", other], f"--text: {other} is not the file the run trained on",
                   "--allow-data-change")
    before = (run / "last.pt").read_bytes()
    original = lm_run / "input.txt"
    saved = original.read_bytes()
    try:                                        # the same path, another content
        original.write_text(TEXT.upper(), encoding="utf-8")
        one_error_line(capsys, resume, f"--text: {original} is not the file the run trained on")
    finally:
        original.write_bytes(saved)
    assert (run / "last.pt").read_bytes() == before
    same = tmp_path / "moved.txt"               # the same content elsewhere: the same data
    same.write_bytes(saved)
    code, out, err = cli(capsys, *resume, "--text", same)
    assert code == 0 and "done: 3 steps" in out, err
    code, out, err = cli(capsys, "train", "lm", "--resume", "--out", run, "--max-steps", 4, "--progress", "false",
                         "--text", other, "--allow-data-change")
    assert code == 0 and "done: 4 steps" in out, err


def test_a_checkpoint_without_a_fingerprint_still_resumes(capsys, tmp_path, lm_run):
    run = copy_run(lm_run, tmp_path)
    payload = load_checkpoint(str(run / "last.pt"))
    assert "data_fingerprint" in payload
    del payload["data_fingerprint"]
    save_checkpoint(str(run / "last.pt"), payload)
    code, out, err = cli(capsys, "train", "lm", "--resume", "--out", run, "--max-steps", 3, "--progress", "false")
    assert code == 0 and "done: 3 steps" in out, err


# ------------------------------------------------------------- item 15: input that never ends

def test_read_stream_stops_at_the_size_and_line_limits():
    assert read_stream(io.BytesIO(b"ab\ncd\n"), "x", limit=6, line_limit=2) == b"ab\ncd\n"
    with pytest.raises(SeqgenError, match=r"^x: larger than 6 bytes, the most seqgen reads from one file"):
        read_stream(io.BytesIO(b"ab\ncd\ne"), "x", limit=6)
    for data, line in [(b"abc\n", 1), (b"ab\nabc", 2), (b"a\n\nab\n" + b"z" * 10, 4), (b"ab\n" * 5 + b"abc\n", 6)]:
        with pytest.raises(SeqgenError, match=rf"^x:{line}: a line longer than 2 bytes"):
            read_stream(io.BytesIO(data), "x", line_limit=2)


def test_dev_zero_and_endless_stdin_stop_with_one_line(capsys, tmp_path, monkeypatch, mt_checkpoint):  # noqa: F811
    one_error_line(capsys, ["evaluate", mt_checkpoint, "--src", "/dev/zero", "--ref", "/dev/zero"],
                   "/dev/zero:1: a line longer than 16 MiB, the longest line seqgen reads")
    monkeypatch.setattr(text_module, "MAX_FILE_BYTES", 4 << 20)
    one_error_line(capsys, ["train", "lm", "--text", "/dev/zero", "--out", tmp_path / "run"],
                   "/dev/zero: larger than 4 MiB, the most seqgen reads from one file")
    assert not (tmp_path / "run").exists()

    class Yes(io.RawIOBase):                     # `yes |`: lines that never end
        def readable(self):
            return True

        def readinto(self, buffer):
            buffer[:] = b"y\n" * (len(buffer) // 2) + b"y" * (len(buffer) % 2)
            return len(buffer)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=io.BufferedReader(Yes())))
    # translate streams a pipe chunk by chunk (the answers so far are written) and stops at the stated limit
    monkeypatch.setattr(text_module, "MAX_FILE_BYTES", 8 << 10)
    one_error_line(capsys, ["translate", mt_checkpoint, "--greedy", "--out", tmp_path / "hyp.txt"],
                   "<stdin>: larger than 8 KiB, the most seqgen reads from one input")


# ------------------------------------------------------------- item 7: Ctrl-C and SIGTERM

@pytest.mark.parametrize("argv, after", [
    (["train", "lm", "--out", "r"], " (the last checkpoint is intact; continue with --resume)"),
    (["caption", "m", "x", "--out", "c.jsonl"], " (every finished batch is kept in --out: run the same command "
                                                "again to continue)"),
    (["translate", "m"], ""), (["evaluate", "m", "--src", "a", "--ref", "b"], ""), (["generate", "m"], ""),
    (["plot", "r"], ""), (["bench"], ""),
])
def test_each_command_says_the_right_thing_when_interrupted(capsys, monkeypatch, argv, after):
    def interrupted(args):
        raise KeyboardInterrupt
    key = (argv[0], argv[1] if argv[0] == "train" else None)
    monkeypatch.setitem(seqgen_cli.COMMANDS, key, interrupted)
    assert seqgen_cli.main(argv) == 130
    assert capsys.readouterr().err == f"seqgen: interrupted{after}\n"


def test_sigterm_stops_training_like_ctrl_c_and_the_run_resumes(tmp_path, text):
    """A real signal to a real run: the handler raises where training is; last.pt is intact and resumes."""
    out = tmp_path / "run"
    base = [sys.executable, "-m", "seqgen.cli", "train", "lm", "--text", str(text), "--out", str(out),
            *map(str, TINY_LM), "--eval-every", "100000"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*base, "--max-steps", "100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / "last.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "seqgen: terminated (the last checkpoint is intact; continue with --resume)"
    assert "Traceback" not in err
    step = json.loads(load_checkpoint(str(out / "last.pt"))["metrics"])["step"]
    resumed = subprocess.run([*base, "--max-steps", str(step + 1), "--resume"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert resumed.returncode == 0 and f"done: {step + 1} steps" in resumed.stdout, resumed.stderr


READ_SYSCALL = {"x86_64": "0", "aarch64": "63"}.get(os.uname().machine)


@pytest.mark.skipif(READ_SYSCALL is None or not os.access("/proc/self/syscall", os.R_OK),
                    reason="needs Linux's /proc/PID/syscall to see the process wait on stdin")
@pytest.mark.parametrize("sig, status, line", [(signal.SIGTERM, 143, "seqgen: terminated"),
                                               (signal.SIGINT, 130, "seqgen: interrupted")])
def test_a_signal_while_translating_stops_it_without_resume_advice(tmp_path, mt_checkpoint, sig, status,  # noqa: F811
                                                                    line):
    """`seqgen translate` waiting on a stdin that never closes: the signal ends it with one plain line."""
    # SIGINT's default action in the child: a suite started in the background (`make test &`) passes SIGINT on
    # ignored, and Python then rightly leaves it ignored.
    proc = subprocess.Popen([sys.executable, "-m", "seqgen.cli", "translate", str(mt_checkpoint), "--greedy"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write("lorem ipsum\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 120       # until it blocks reading stdin, past start-up and model loading
        while time.monotonic() < deadline and not _waiting_to_read(proc.pid):
            time.sleep(0.1)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == status and err == line + "\n", err


def _waiting_to_read(pid: int) -> bool:
    """True when the process sleeps in read(2) on its stdin (fd 0), which `seqgen translate` does after loading
    the model."""
    try:
        with open(f"/proc/{pid}/syscall") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields[:2] == [READ_SYSCALL, "0x0"]
