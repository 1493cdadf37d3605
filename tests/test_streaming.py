"""Streaming decoding: what is streamed is exactly the final output, for greedy, sampling and beam search."""
import pytest
import torch

from seqgen.generation import GenerationConfig
from seqgen.inference.lm import generate_text
from test_serve import tiny_lm, tiny_translator


@pytest.mark.parametrize("gen", [GenerationConfig(max_len=60, amp="off"),
                                 GenerationConfig(temperature=0.9, top_k=10, max_len=60, amp="off"),
                                 GenerationConfig(beam=4, max_len=60, amp="off")])
def test_streamed_pieces_join_to_the_returned_text(gen):
    model = tiny_lm()
    pieces = []
    texts = generate_text(model, "ROMEO:", gen, seed=7, on_text=pieces.append)
    assert "".join(pieces) == texts[0]
    assert texts == generate_text(model, "ROMEO:", gen, seed=7)       # streaming changes nothing
    assert pieces[0].startswith("ROMEO:") and len(pieces) > 1


def test_beam_stream_reports_only_prefixes_of_the_final_best_for_every_input():
    model = tiny_translator()
    src = torch.tensor([[3, 4, 5, 6, 2], [7, 8, 9, 2, 0], [10, 11, 2, 0, 0]])
    lengths = torch.tensor([5, 4, 3])
    seen: dict[int, list[list[int]]] = {}
    gen = GenerationConfig(beam=5, n_best=3, max_len=12, amp="off")
    hyps = model.generate(src, lengths, gen=gen, stream=lambda i, t: seen.setdefault(i, []).append(list(t)))
    plain = model.generate(src, lengths, gen=gen)
    assert [[(h.tokens, h.score) for h in hs] for hs in hyps] == [[(h.tokens, h.score) for h in hs] for hs in plain]
    for i, prefixes in seen.items():
        best = hyps[i][0].tokens
        assert all(best[:len(p)] == p for p in prefixes), (i, prefixes, best)
        assert [len(p) for p in prefixes] == sorted({len(p) for p in prefixes})   # grows, never repeats
