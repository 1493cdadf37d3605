"""The HTTP app of `seqgen serve`: JSON endpoints, request validation, the web page.

FastAPI on uvicorn (both maintained and widely deployed): request bodies are typed pydantic models, so the
OpenAPI schema (/openapi.json, /docs) comes from the same definitions that validate requests, and the app
can be tested in-process (`fastapi.testclient`). Every error is a 4xx/5xx with a one-line JSON body
`{"error": "..."}`; nothing in a request names a file on the server. Decoding happens in the Batcher's
worker thread (seqgen/serve/batcher.py) through the task functions (seqgen/serve/models.py).

    GET  /                 the web page (translate, caption with attention, generate)
    GET  /health           {"status": "ok", "models": [...], "waiting": N, "searches": N, "items": N,
                            "busy_s": seconds the decoding thread has spent in searches}
    GET  /v1/models        the models served, with their task
    POST /v1/translate     {"text": "..." | ["...", ...], "beam": 5, "n_best": 1, "attention": false, ...}
    POST /v1/caption       multipart (field "image" + option fields) or {"image_base64": "...", ...}
    POST /v1/generate      {"prompt": "ROMEO:", "temperature": 0.8, "num_samples": 1, ...}
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import re
from functools import partial
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from seqgen.errors import SeqgenError
from seqgen.generation import decoding_config
from seqgen.log import printable
from seqgen.inference import default_decoding
from seqgen.serve.batcher import Batcher, QueueFull
from seqgen.serve.config import ServeConfig
from seqgen.serve.models import ServedModel, gen_key, run_batch
from seqgen.threads import serial_except

_GEN_FIELDS = ("beam", "temperature", "top_k", "top_p", "max_len", "min_len", "length_penalty", "n_best",
               "no_repeat_ngram")
_FLAG = re.compile(r"--([a-z][a-z-]*)")


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


class _BodyTooLarge(Exception):
    pass


def one_line(message: str, limit: int = 300) -> str:
    text = printable(str(message))      # the CLI's escaping: one line, no control characters
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


# -- request bodies ------------------------------------------------------------------------------------

class Options(BaseModel):
    """Decoding options, as the CLI's flags; unset ones take the task's defaults."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str | None = Field(None, description="the served model's name (optional when one model does the job)")
    greedy: bool = Field(False, description="most likely token at each step instead of beam search / sampling")
    beam: int | None = Field(None, description="beam size (translate/caption default 5)")
    temperature: float | None = Field(None, description="> 0 samples at this temperature")
    top_k: int | None = Field(None, description="sampling: keep the k most likely tokens (0 = all)")
    top_p: float | None = Field(None, description="sampling: nucleus probability mass")
    max_len: int | None = Field(None, description="most tokens generated")
    min_len: int | None = Field(None, description="fewest tokens generated before the end")
    length_penalty: float | None = Field(None, description="beam: GNMT length penalty alpha")
    n_best: int | None = Field(None, description="beam: hypotheses returned per input")
    no_repeat_ngram: int | None = Field(None, description="never repeat an n-gram of this size (0 = off)")
    seed: int = Field(1, description="sampling seed")
    attention: bool = Field(False, description="also return attention weights")


class TranslateRequest(Options):
    text: str | list[str] = Field(..., description="a German sentence, or a list of them")


class GenerateRequest(Options):
    prompt: str = Field("", description="text to continue")
    num_samples: int = Field(1, description="samples to draw (sampling only)")


class CaptionRequest(Options):
    image_base64: str = Field(..., description="the image file's bytes, base64-encoded")


# -- the app ---------------------------------------------------------------------------------------------

def create_app(served: dict[str, ServedModel], cfg: ServeConfig | None = None) -> FastAPI:
    cfg = cfg or ServeConfig()
    cfg.validate()
    def start_batcher(on_start=None) -> Batcher:
        return Batcher(partial(run_batch, served), max_batch=cfg.max_batch, max_wait=cfg.max_wait_ms / 1000,
                       quiet=cfg.quiet_ms / 1000, max_queue=cfg.max_queue, on_start=on_start)

    # With threads set, the decoding thread gets them and every other thread of the process one (seqgen.threads).
    batcher = serial_except(start_batcher, cfg.threads) if cfg.threads else start_batcher()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="seqgen", summary="translate, caption and generate with seqgen models",
                  version="1", lifespan=lifespan)
    app.state.batcher, app.state.served, app.state.config = batcher, served, cfg
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return _error(e.status, e.message, e.headers)

    @app.exception_handler(SeqgenError)
    async def _seqgen_error(_request, e: SeqgenError):
        return _error(400, str(e))

    @app.exception_handler(QueueFull)
    async def _queue_full(_request, e: QueueFull):
        return _error(503, f"server busy: {e}; retry shortly", {"Retry-After": "1"})

    @app.exception_handler(_BodyTooLarge)
    async def _too_large(_request, _e):
        return _error(413, f"request body larger than {cfg.max_body_bytes:,} bytes")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        return _error(*_describe_validation(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request, e: StarletteHTTPException):
        detail = str(e.detail)
        if e.status_code == 400 and "parsing the body" in detail:   # FastAPI's words for undecodable JSON
            detail = "request body is not valid UTF-8 JSON"
        return _error(e.status_code, detail, getattr(e, "headers", None))

    def check_key(request: Request) -> None:
        if not cfg.api_key:
            return
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if auth.lower().startswith("bearer "):
            given = given or auth[7:].strip()
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY` or `X-API-Key: KEY`)")

    def pick(name: str | None, task: str) -> ServedModel:
        if name is not None:
            if name not in served:
                raise ApiError(404, f"unknown model {name!r}; served: {', '.join(served)}")
            m = served[name]
            if m.task != task:
                raise ApiError(400, f"model {name!r} is a {m.task} model, not a {task} model")
            return m
        fits = [m for m in served.values() if m.task == task]
        if not fits:
            raise ApiError(400, f"no {task} model is served (served: {', '.join(served)})")
        if len(fits) > 1:
            raise ApiError(400, f"several {task} models are served ({', '.join(m.name for m in fits)}): "
                                f"name one with \"model\"")
        return fits[0]

    def gen_for(req: Options, job: str):
        given = {k: getattr(req, k) for k in _GEN_FIELDS if getattr(req, k) is not None}
        for k in ("beam", "n_best"):
            if given.get(k, 1) > cfg.max_samples:
                raise ApiError(422, f"{k} must be at most {cfg.max_samples}, got {given[k]}")
        if given.get("max_len", 1) > cfg.max_len:
            raise ApiError(422, f"max_len must be at most {cfg.max_len}, got {given['max_len']}")
        try:
            return decoding_config({**given, "amp": cfg.amp}, default_decoding(job), greedy=req.greedy)
        except SeqgenError as e:
            # the CLI's messages name flags (--top-p); here the same options are JSON keys (top_p)
            raise ApiError(422, _FLAG.sub(lambda f: f.group(1).replace("-", "_"), str(e))) from None

    def check_text(text: str, what: str) -> str:
        if len(text) > cfg.max_text_chars:
            raise ApiError(413, f"{what} has {len(text):,} characters; the limit is {cfg.max_text_chars:,}")
        return text

    async def decode(request: Request, key: tuple, items: list) -> list:
        """Queue the items and wait for all of them; a client that disconnects cancels what has not started."""
        tasks = [asyncio.ensure_future(batcher.submit(key, item)) for item in items]
        gathered = asyncio.gather(*tasks)
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.25)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                gathered.cancel()
                raise ApiError(499, "client closed the request")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("seqgen.serve").joinpath("static", "index.html").read_text("utf-8"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "models": list(served), "waiting": batcher.waiting, "searches": batcher.searches,
                "items": batcher.items, "busy_s": round(batcher.busy, 3)}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"models": [m.describe() for m in served.values()],
                "limits": {k: getattr(cfg, k) for k in ("max_batch", "max_text_chars", "max_texts",
                                                         "max_body_bytes", "max_image_pixels", "max_len")}}

    @app.post("/v1/translate", dependencies=[Depends(check_key)])
    async def translate(req: TranslateRequest, request: Request) -> dict:
        m = pick(req.model, "translation")
        texts = [req.text] if isinstance(req.text, str) else list(req.text)
        if not texts:
            raise ApiError(422, "text: give a sentence or a non-empty list of sentences")
        if len(texts) > cfg.max_texts:
            raise ApiError(413, f"{len(texts)} texts in one request; the limit is {cfg.max_texts}")
        for i, t in enumerate(texts):
            if not t.strip():
                raise ApiError(422, f"text {i}: empty")
            check_text(t, f"text {i}")
        gen = gen_for(req, "translate")
        results = await decode(request, (m.name, "translate", gen_key(gen), req.seed), texts)
        return {"model": m.name, "translations": [_translation_json(hyps, req.attention) for hyps in results]}

    @app.post("/v1/generate", dependencies=[Depends(check_key)])
    async def generate(req: GenerateRequest, request: Request) -> dict:
        m = pick(req.model, "lm")
        check_text(req.prompt, "prompt")
        if not 1 <= req.num_samples <= cfg.max_samples:
            raise ApiError(422, f"num_samples must be between 1 and {cfg.max_samples}, got {req.num_samples}")
        gen = gen_for(req, "generate")
        unknown = m.model.tgt.unknown(req.prompt)
        if unknown:
            raise ApiError(422, f"prompt contains symbols the model never saw in training: "
                                f"{', '.join(repr(u) for u in unknown[:10])}")
        [texts] = await decode(request, (m.name, "generate", gen_key(gen), req.seed), [(req.prompt, req.num_samples)])
        return {"model": m.name, "texts": texts}

    @app.post("/v1/caption", dependencies=[Depends(check_key)],
              openapi_extra={"requestBody": {"content": {
                  "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                      "image": {"type": "string", "format": "binary"}, "model": {"type": "string"},
                      "beam": {"type": "integer"}, "attention": {"type": "boolean"}}}},
                  "application/json": {"schema": CaptionRequest.model_json_schema()}}}})
    async def caption(request: Request) -> dict:
        req, data = await _caption_input(request, cfg)
        m = pick(req.model, "captioning")
        gen = gen_for(req, "caption")
        image = await run_in_threadpool(_image_tensor, m, data, cfg.max_image_pixels)
        [c] = await decode(request, (m.name, "caption", gen_key(gen), req.seed), [image])
        out: dict[str, Any] = {"model": m.name, "caption": c.text, "score": round(c.score, 4), "words": c.words}
        if req.attention and c.attention is not None:
            out["attention"] = [[round(float(x), 4) for x in row] for row in c.attention.tolist()]
            out["grid"] = list(c.grid)
        return out

    return app


def _translation_json(hyps, attention: bool) -> dict:
    best = hyps[0]
    out: dict[str, Any] = {"text": best.text, "score": round(best.score, 4)}
    if len(hyps) > 1:
        out["nbest"] = [{"text": h.text, "score": round(h.score, 4)} for h in hyps]
    if attention and best.attention is not None:
        out["attention"] = {"source_tokens": best.source_tokens, "target_tokens": best.target_tokens,
                            "weights": [[round(float(x), 4) for x in row] for row in best.attention.tolist()]}
    return out


async def _caption_input(request: Request, cfg: ServeConfig) -> tuple[CaptionRequest | Options, bytes]:
    """(options, image bytes) from a multipart upload (field "image") or a JSON body with image_base64."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=20, max_part_size=cfg.max_body_bytes)
        except _BodyTooLarge:
            raise
        except Exception as e:  # noqa: BLE001 — python-multipart reports malformed bodies in several types
            raise ApiError(400, f"malformed multipart body ({type(e).__name__})") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(422, "multipart body needs a file field named \"image\"")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if k != "image"}
        try:
            req = Options.model_validate(fields)
        except Exception as e:  # pydantic.ValidationError
            raise ApiError(*_describe_validation(e.errors())) from None
        return req, data
    if ctype.startswith("application/json"):
        try:
            body = await request.json()
        except _BodyTooLarge:
            raise
        except Exception:  # noqa: BLE001 — JSONDecodeError, UnicodeDecodeError
            raise ApiError(400, "request body is not valid UTF-8 JSON") from None
        try:
            req = CaptionRequest.model_validate(body)
        except Exception as e:
            raise ApiError(*_describe_validation(e.errors())) from None
        try:
            data = base64.b64decode(req.image_base64, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(422, "image_base64 is not valid base64") from None
        return req, data
    raise ApiError(415, "send the image as multipart/form-data (field \"image\") or JSON with image_base64")


def _image_tensor(m: ServedModel, data: bytes, max_pixels: int):
    """Decode an upload into the model's input tensor [3, S, S] (uint8); ApiError 422 for a bad image."""
    from seqgen.data.images import ImageError, decode_image_bytes
    from seqgen.encoders.cnn import build_transform
    transform = build_transform(m.model.config.image_encoder)
    try:
        image = decode_image_bytes(data, "upload", max_pixels=max_pixels, draft_size=transform.image_size)
    except ImageError as e:
        raise ApiError(413 if e.reason == "decompression bomb" else 422, f"image: {e.reason}") from None
    return transform(image)


def _describe_validation(errors: list[dict]) -> tuple[int, str]:
    """pydantic/FastAPI validation errors as (status, one line)."""
    if not errors:
        return 422, "invalid request"
    e = errors[0]
    loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
    kind = e.get("type", "")
    if kind == "json_invalid":
        return 400, "request body is not valid UTF-8 JSON"
    if kind == "extra_forbidden":
        return 422, f"unknown option {loc!r}"
    if kind == "missing":
        return 422, f"{loc} is required"
    if kind in ("finite_number",):
        return 422, f"{loc} must be a finite number"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return 422, f"{loc or 'body'}: {e.get('msg', 'invalid')}{more}"


class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes is refused with 413, by Content-Length or while streaming."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.limit
            except ValueError:
                too_big = True
            if too_big:
                response = _error(413, f"request body larger than {self.limit:,} bytes")
                return await response(scope, receive, send)
        received = 0

        async def limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge()
            return message

        await self.app(scope, limited, send)

