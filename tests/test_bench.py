"""`seqgen bench` / scripts/bench_all.py: the FLOP counters against hand-computed values and against torch's
FlopCounterMode on real modules, and one tiny run that prints every row and writes the JSON (no timing
assertions: the numbers depend on the machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from seqgen.cli import main
from seqgen.data.batch import Batch
from seqgen.decoders.rnn import DecoderConfig
from seqgen.encoders.cnn import CNNEncoderConfig, CNNImageEncoder
from seqgen.encoders.rnn import RNNEncoderConfig
from seqgen.flops import cnn_flops, decoder_flops, forward_flops, rnn_flops, text_encoder_flops
from seqgen.model import ModelConfig, Seq2Seq
from seqgen.tokenizers import TextCodec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rnn_and_decoder_flops_by_hand():
    assert rnn_flops("gru", 4, 8) == 2 * 3 * 8 * (4 + 8) == 576      # 3 gates x (input + recurrent) matmuls
    assert rnn_flops("lstm", 4, 8) == 2 * 4 * 8 * (4 + 8)
    # bi-GRU, 2 layers: layer 2 reads both directions (2 x 3 wide)
    enc = RNNEncoderConfig(cell="gru", emb=4, hidden=3, layers=2, bidirectional=True)
    assert text_encoder_flops(enc) == 2 * (2 * 3 * 3 * (4 + 3) + 2 * 3 * 3 * (6 + 3)) == 576
    # one step of a GRU 8 decoder with Luong-general attention over 5 positions of width 6, tied output (emb 4)
    dec = DecoderConfig(cell="gru", emb=4, hidden=8, attention="luong_general", tie_embeddings=True)
    step = decoder_flops(dec, vocab=10, memory_size=6, attended=5)
    assert step == {"decoder_rnn": 576,
                    "attention": 2 * 8 * 6 + 2 * 5 * 6 + 2 * 5 * 6,   # query projection 8 -> 6, scores, context
                    "pre_output": 2 * (8 + 6) * 4,                     # [h; context] -> emb
                    "output_layer": 2 * 4 * 10,
                    "total": 576 + 216 + 112 + 80}
    lm = decoder_flops(DecoderConfig(cell="lstm", emb=8, hidden=8, layers=2), vocab=10)
    assert lm["total"] == 2 * rnn_flops("lstm", 8, 8) + 2 * 8 * 10 and lm["attention"] == lm["pre_output"] == 0


def test_forward_flops_equal_what_the_model_multiplies():
    """On a batch without padding, the analytic count of a translation model's forward is exactly the matmul
    FLOPs torch's FlopCounterMode sees (bridge off: a per-sentence cost the per-token count leaves out; GRUs:
    the counter does not see inside CPU LSTM kernels, whose 4-gate count is checked by hand above)."""
    torch.manual_seed(0)
    codec = TextCodec.build("word", [" ".join(f"w{i}" for i in range(20))])
    for attention in ("luong_general", "bahdanau", "luong_dot"):
        enc = RNNEncoderConfig(cell="gru", emb=8, hidden=6, layers=2, bidirectional=True)
        dec = DecoderConfig(cell="gru", emb=8, hidden=12, attention=attention, bridge=False, dropout=0.0)
        model = Seq2Seq(ModelConfig(task="translation", text_encoder=enc, decoder=dec), tgt=codec, src=codec)
        B, S, T = 3, 7, 5
        batch = Batch(target=torch.randint(4, len(codec.vocab), (B, T + 1)),
                      source=torch.randint(4, len(codec.vocab), (B, S)), source_lengths=torch.full((B,), S))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(batch)
        per_token = forward_flops(enc, dec, len(codec.vocab), src_per_tgt=S / T, attended=S)["total"]
        assert counter.get_total_flops() == round(per_token * B * T), attention


def test_cnn_flops_by_hand():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 5)

        def forward(self, x):
            return self.fc(self.conv(x.float()).mean(dim=(2, 3)))

    assert cnn_flops(Toy(), 8) == 2 * (4 * 8 * 8) * (3 * 3 * 3) + 2 * 4 * 5
    # the tiny backbone at 32px: 3x3 convs 3->32 /2, 32->64 /2, 64->128 /2, 128->128 on grids 16, 8, 4, 4
    tiny = CNNImageEncoder(CNNEncoderConfig(backbone="tiny", image_size=32))
    assert cnn_flops(tiny, 32) == 2 * 9 * (32 * 16 * 16 * 3 + 64 * 8 * 8 * 32 + 128 * 4 * 4 * 64 + 128 * 4 * 4 * 128)


def test_bench_all_prints_every_row_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "bench_all.py"), "--tiny", "--seconds", "0.2",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout
    names = ["train", "decode, greedy", "decode, beam 2", "caption, beam 2", "char generation, batch 1"]
    for name, unit in zip(names, ["tokens/s", "sentences/s", "sentences/s", "images/s", "chars/s"]):
        assert any(line.startswith(f"| {name} (") and unit in line for line in table.splitlines()), table
    assert "matmul peak (measured): fp32" in table and "MFU fp32" in table
    result = json.loads(out.read_text())
    assert [r["name"] for r in result["rows"]] == names
    assert result["matmul_flops_per_s"]["float32"] > 0
    for row in result["rows"]:
        assert row["rate"] > 0 and row["flops_per_unit"] > 0 and row["flops_per_s"] > 0
        assert row["mfu"]["float32"] > 0


def test_bench_refuses_bad_flags(capsys):
    assert main(["bench", "--seconds", "0"]) == 2
    assert "--seconds must be > 0" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_process_memory_reads_this_process_and_nothing_for_a_gone_one():
    from seqgen.bench import process_memory
    mem = process_memory(os.getpid())
    assert set(mem) == {"rss", "anon", "file"} and mem["rss"] > 10
    assert abs(mem["rss"] - mem["anon"] - mem["file"]) < 0.05 * mem["rss"] + 16   # RssShmem is the rest
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert process_memory(int(done.stdout)) == {}


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads Linux's /proc")
def test_memory_sampler_reads_a_process_and_its_children():
    from seqgen.bench import MemorySampler
    child = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(64 << 20); time.sleep(30)"])
    try:
        import time
        time.sleep(1.0)                     # the child has its 64 MiB
        sampler = MemorySampler(os.getpid(), 0.05, children=True)
        time.sleep(0.3)
        sampler.stop()
    finally:
        child.kill()
        child.wait()
    assert len(sampler.samples) >= 3
    t, mem, kids = sampler.samples[-1]
    assert t > 0 and mem["rss"] > 10 and kids > 60
    assert [s[0] for s in sampler.samples] == sorted(s[0] for s in sampler.samples)


def test_train_memory_phases_from_log_lines():
    """scripts/bench_train_memory.py: the rows it reports come from the samples around each log line."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_train_memory",
                                                  os.path.join(ROOT, "scripts", "bench_train_memory.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    run = mod.RunLog(os.getpid(), 1000.0)       # one sample at start; the rest set by hand below
    run.stop()
    run.memory.samples[:] = [(float(t), {"rss": r, "anon": r - 100.0, "file": 100.0}, 0.0)
                             for t, r in ((0, 500), (1, 900), (2, 950), (3, 1200), (4, 1000), (5, 990))]
    run.events[:] = [(0.5, "corpus: 10 pairs"), (1.5, "step 25 | loss 3"), (2.5, "step 50 | loss 2"),
                     (3.5, "eval step 50: bleu 1.0"), (4.5, "done")]
    rows = dict(mod.phases(run))
    assert rows["first step logged"][1]["rss"] == 900
    assert rows["step 50, before validating"][1]["rss"] == 950
    assert rows["step 50, validation + checkpoints (peak)"][1]["rss"] == 1200
    assert rows["end"][1]["rss"] == 990 and rows["peak of the whole run"][1]["rss"] == 1200
