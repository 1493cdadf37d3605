"""The shared decoder and the search algorithms that drive it (or any object with `step()`)."""
from seqgen.decoders.attention import Attention
from seqgen.decoders.rnn import DecoderConfig, RNNDecoder
from seqgen.decoders.search import Hypothesis, beam_search, greedy, sample
from seqgen.decoders.state import DecoderState

__all__ = ["Attention", "DecoderConfig", "DecoderState", "Hypothesis", "RNNDecoder", "beam_search", "greedy", "sample"]
