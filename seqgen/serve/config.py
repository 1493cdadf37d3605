"""ServeConfig: where `seqgen serve` listens and the limits every request is held to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from seqgen.config import Bounds, Count, Name, Positive, Tokens, validate


@dataclass
class ServeConfig:
    """Where `seqgen serve` listens, how it batches, and the limits of a request.

    host:             address to listen on; 0.0.0.0 opens the server to the network
    port:             TCP port
    api_key:          if set, /v1/* requests need the header `Authorization: Bearer KEY` or `X-API-Key: KEY`
    max_batch:        requests decoded together in one search, at most
    max_wait_ms:      the longest a batch waits for more requests, from its oldest request's arrival or the
                      previous batch's answer, whichever is later
    quiet_ms:         a batch starts once no request joined it for this long, counted from the previous batch's
                      answer at the earliest (a lone request on an idle server waits no longer)
    max_queue:        requests waiting at once; more are refused with 503 and Retry-After
    max_body_bytes:   request body size limit, an upload included (413 beyond)
    max_text_chars:   characters per text (a source sentence, a prompt)
    max_texts:        sentences per translate request
    max_image_pixels: decoded image size limit (width x height); a larger image is refused as a decompression bomb
    max_len:          the largest max_len a request may ask for
    max_samples:      the largest beam, n_best or num_samples a request may ask for
    amp:              decoding precision, as the CLI's --amp (off = float32, results independent of the batch)
    threads:          torch threads of the decoding thread (the server's other threads get one each: see
                      seqgen/threads.py); 0 = torch's count (one per core)
    """

    host: Name = "127.0.0.1"
    port: Annotated[int, Bounds(1, 65535)] = 8000
    api_key: Name = ""
    max_batch: Positive = 32
    max_wait_ms: Annotated[float, Bounds(0.0, 1000.0)] = 50.0
    quiet_ms: Annotated[float, Bounds(0.0, 1000.0)] = 10.0
    max_queue: Positive = 256
    max_body_bytes: Positive = 10_000_000
    max_text_chars: Positive = 1000
    max_texts: Positive = 64
    max_image_pixels: Positive = 40_000_000
    max_len: Tokens = 500
    max_samples: Positive = 16
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    threads: Count = 0

    def validate(self) -> None:
        """Every field within its bounds (seqgen.config.validate)."""
        validate(self)
