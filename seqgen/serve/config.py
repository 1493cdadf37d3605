"""ServeConfig: where `seqgen serve` listens and the limits every request is held to."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from seqgen.config import Name
from seqgen.errors import SeqgenError
from seqgen.precision import AMP_CHOICES


@dataclass
class ServeConfig:
    """Where `seqgen serve` listens, how it batches, and the limits of a request.

    host:             address to listen on; 0.0.0.0 opens the server to the network
    port:             TCP port
    api_key:          if set, /v1/* requests need the header `Authorization: Bearer KEY` or `X-API-Key: KEY`
    max_batch:        requests decoded together in one search, at most
    max_wait_ms:      the longest the oldest waiting request waits for others to batch with
    quiet_ms:         a batch starts once no request joined it for this long (a lone request waits no longer)
    max_queue:        requests waiting at once; more are refused with 503 and Retry-After
    max_body_bytes:   request body size limit, an upload included (413 beyond)
    max_text_chars:   characters per text (a source sentence, a prompt)
    max_texts:        sentences per translate request
    max_image_pixels: decoded image size limit (width x height); a larger image is refused as a decompression bomb
    max_len:          the largest max_len a request may ask for
    max_samples:      the largest beam, n_best or num_samples a request may ask for
    amp:              decoding precision, as the CLI's --amp (off = float32, results independent of the batch)
    """

    host: Name = "127.0.0.1"
    port: int = 8000
    api_key: Name = ""
    max_batch: int = 32
    max_wait_ms: float = 50.0
    quiet_ms: float = 10.0
    max_queue: int = 256
    max_body_bytes: int = 10_000_000
    max_text_chars: int = 1000
    max_texts: int = 64
    max_image_pixels: int = 40_000_000
    max_len: int = 500
    max_samples: int = 16
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"

    def validate(self) -> None:
        for name in ("port", "max_batch", "max_queue", "max_body_bytes", "max_text_chars", "max_texts",
                     "max_image_pixels", "max_len", "max_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SeqgenError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.port > 65535:
            raise SeqgenError(f"--port must be at most 65535, got {self.port}")
        if not (0 <= self.max_wait_ms <= 1000):
            raise SeqgenError(f"--max-wait-ms must be between 0 and 1000, got {self.max_wait_ms}")
        if not (0 <= self.quiet_ms <= 1000):
            raise SeqgenError(f"--quiet-ms must be between 0 and 1000, got {self.quiet_ms}")
        if self.amp not in AMP_CHOICES:
            raise SeqgenError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
