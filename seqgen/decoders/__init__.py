"""The shared decoder and the search algorithms that drive it (or any object with `step()`)."""
from seqgen.decoders.attention import Attention
from seqgen.decoders.rnn import DecoderConfig, RNNDecoder
from seqgen.decoders.state import DecoderState

__all__ = ["Attention", "DecoderConfig", "DecoderState", "RNNDecoder"]
try:  # search.py is written alongside; the import becomes unconditional once it lands
    from seqgen.decoders.search import Hypothesis, beam_search, greedy, sample  # noqa: F401
    __all__ += ["Hypothesis", "beam_search", "greedy", "sample"]
except ImportError:  # pragma: no cover
    pass
