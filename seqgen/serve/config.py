"""ServeConfig: where `seqgen serve` listens and the limits every request is held to."""
from __future__ import annotations

from dataclasses import dataclass

from seqgen.errors import SeqgenError


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"          # address to listen on; 0.0.0.0 opens the server to the network
    port: int = 8000                 # TCP port
    api_key: str = ""                # if set, /v1/* requests need `Authorization: Bearer KEY` or `X-API-Key: KEY`
    max_batch: int = 32              # requests decoded together in one search, at most
    max_wait_ms: float = 5.0         # how long the oldest request waits for others to batch with
    max_queue: int = 256             # requests waiting at once; more are refused with 503 and Retry-After
    max_body_bytes: int = 10_000_000  # request body size limit (an upload included)
    max_text_chars: int = 1000       # characters per text (a source sentence, a prompt)
    max_texts: int = 64              # texts per translate request
    max_image_pixels: int = 40_000_000  # decoded image size limit (width x height); larger is a bomb
    max_len: int = 500               # the largest max_len a request may ask for
    max_samples: int = 16            # num_samples / n_best / beam limit per request
    amp: str = "auto"                # decoding precision, as the CLI's --amp (off = float32, batch-independent)

    def validate(self) -> None:
        for name in ("port", "max_batch", "max_queue", "max_body_bytes", "max_text_chars", "max_texts",
                     "max_image_pixels", "max_len", "max_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SeqgenError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.port > 65535:
            raise SeqgenError(f"--port must be at most 65535, got {self.port}")
        from seqgen.precision import AMP_CHOICES
        if self.amp not in AMP_CHOICES:
            raise SeqgenError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {self.amp!r}")
        if not (0 <= self.max_wait_ms <= 1000):
            raise SeqgenError(f"--max-wait-ms must be between 0 and 1000, got {self.max_wait_ms}")
