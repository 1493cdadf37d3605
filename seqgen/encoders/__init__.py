"""Encoders: map an input (text, image, nothing) to an `EncoderOutput` the decoder attends to."""
from seqgen.encoders.base import Encoder, EncoderOutput

__all__ = ["Encoder", "EncoderOutput"]
