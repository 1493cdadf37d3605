"""`seqgen serve`: every endpoint in-process, request batching, and the hostile inputs of the issue."""
import base64
import io
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import write_tiny_captioner  # noqa: E402
from seqgen.decoders.rnn import DecoderConfig  # noqa: E402
from seqgen.encoders.rnn import RNNEncoderConfig  # noqa: E402
from seqgen.generation import GenerationConfig  # noqa: E402
from seqgen.model import ModelConfig, Seq2Seq, load_model  # noqa: E402
from seqgen.serve.app import create_app  # noqa: E402
from seqgen.serve.batcher import Batcher, QueueFull  # noqa: E402
from seqgen.serve.config import ServeConfig  # noqa: E402
from seqgen.serve.models import ServedModel, parse_model_arg  # noqa: E402
from seqgen.inference.translation import translate  # noqa: E402
from seqgen.tokenizers import TextCodec  # noqa: E402

WORDS = "ein mann eine frau hund fährt läuft rad im park schnee the a man woman dog rides runs bike in snow".split()


def tiny_translator():
    torch.manual_seed(0)
    codec = TextCodec.build("word", [" ".join(WORDS)])
    return Seq2Seq(ModelConfig(task="translation",
                               decoder=DecoderConfig(cell="gru", emb=16, hidden=32, attention="bahdanau", dropout=0.0),
                               text_encoder=RNNEncoderConfig(cell="gru", emb=16, hidden=16, dropout=0.0)),
                   tgt=codec, src=codec).eval()


def tiny_lm():
    torch.manual_seed(0)
    codec = TextCodec.build("char", ["ROMEO: what light through yonder window breaks.\n"])
    return Seq2Seq(ModelConfig(task="lm", decoder=DecoderConfig(cell="lstm", emb=16, hidden=32, dropout=0.0)),
                   tgt=codec).eval()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cap = write_tiny_captioner(tmp_path_factory.mktemp("cap") / "cap.pt")
    return {"mt": ServedModel("mt", "mt.pt", tiny_translator()),
            "cap": ServedModel("cap", str(cap), load_model(str(cap))),
            "lm": ServedModel("lm", "lm.pt", tiny_lm())}


def client(served, **limits):
    cfg = ServeConfig(**{"amp": "off", **limits})
    return TestClient(create_app(served, cfg))


def png_bytes(size=(40, 30), color=(200, 30, 30)):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response, status, *words):
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"], body
    for w in words:
        assert w in body["error"], body


# -- the endpoints ------------------------------------------------------------------------------------

def test_health_models_page_and_openapi(served):
    with client(served) as c:
        idle = c.get("/health").json()
        assert idle["models"] == ["mt", "cap", "lm"] and idle["busy_s"] == 0.0 and idle["searches"] == 0
        assert c.post("/v1/translate", json={"text": "ein mann", "beam": 2}).status_code == 200
        after = c.get("/health").json()   # the search's time is counted once it has answered
        assert after["searches"] == 1 and after["items"] == 1 and after["busy_s"] > 0.0
        models = c.get("/v1/models").json()["models"]
        assert [(m["name"], m["task"]) for m in models] == [("mt", "translation"), ("cap", "captioning"),
                                                            ("lm", "lm")]
        page = c.get("/")
        assert page.status_code == 200 and "German" in page.text and "/v1/caption" in page.text
        schema = c.get("/openapi.json").json()
        assert {"/v1/translate", "/v1/caption", "/v1/generate", "/v1/models", "/health"} <= set(schema["paths"])


def test_translate_matches_the_task_function_with_nbest_and_attention(served):
    model = served["mt"].model
    with client(served) as c:
        r = c.post("/v1/translate", json={"text": ["ein mann fährt rad", "eine frau"], "beam": 3, "n_best": 2,
                                          "attention": True})
        assert r.status_code == 200, r.text
        out = r.json()["translations"]
    expected = translate(model, ["ein mann fährt rad", "eine frau"], GenerationConfig(beam=3, amp="off"))
    assert [t["text"] for t in out] == expected
    assert len(out[0]["nbest"]) == 2
    att = out[0]["attention"]
    assert len(att["weights"]) == len(att["target_tokens"]) and len(att["weights"][0]) == len(att["source_tokens"])


def test_caption_multipart_and_base64_agree_and_carry_attention(served):
    data = png_bytes()
    with client(served) as c:
        a = c.post("/v1/caption", files={"image": ("x.png", data, "image/png")}, data={"attention": "true"})
        b = c.post("/v1/caption", json={"image_base64": base64.b64encode(data).decode(), "attention": True})
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    assert a.json()["caption"] == b.json()["caption"]
    body = a.json()
    assert len(body["attention"]) == len(body["words"]) and body["grid"][0] * body["grid"][1] == len(body["attention"][0])


def test_generate_samples_and_greedy(served):
    with client(served) as c:
        r = c.post("/v1/generate", json={"prompt": "ROMEO:", "num_samples": 2, "max_len": 20, "seed": 3})
        g1 = c.post("/v1/generate", json={"prompt": "RO", "greedy": True, "max_len": 20}).json()["texts"]
        g2 = c.post("/v1/generate", json={"prompt": "RO", "greedy": True, "max_len": 20}).json()["texts"]
    assert r.status_code == 200 and len(r.json()["texts"]) == 2
    assert all(t.startswith("ROMEO:") for t in r.json()["texts"])
    assert g1 == g2 and g1[0].startswith("RO")


def test_concurrent_requests_are_decoded_in_fewer_searches_with_equal_results(served):
    sentences = [" ".join(WORDS[i % 11:(i % 11) + 2 + i % 4]) for i in range(16)]
    alone = translate(served["mt"].model, sentences, GenerationConfig(beam=4, amp="off"), batch_size=1)
    app = create_app(served, ServeConfig(amp="off", max_wait_ms=200, max_batch=16))
    results = [None] * len(sentences)
    with TestClient(app) as c:
        before = app.state.batcher.searches

        def ask(i):
            results[i] = c.post("/v1/translate", json={"text": sentences[i], "beam": 4}).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(sentences))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        searches = app.state.batcher.searches - before
    assert [r["translations"][0]["text"] for r in results] == alone
    assert searches < len(sentences), searches


def test_batcher_serves_oldest_first_refuses_when_full_and_skips_cancelled():
    order, gate = [], threading.Event()

    def run(key, items):
        gate.wait(5)
        order.append((key, list(items)))
        return items

    b = Batcher(run, max_batch=2, max_wait=0.0, max_queue=3)
    try:
        first = b.submit_future("a", 1)            # taken at once; blocks in run() until the gate opens
        while b.waiting:
            pass
        f2, f3, f4 = b.submit_future("b", 2), b.submit_future("a", 3), b.submit_future("b", 4)
        with pytest.raises(QueueFull):
            b.submit_future("a", 5)
        f3.cancel()
        gate.set()
        assert first.result(5) == 1 and f2.result(5) == 2 and f4.result(5) == 4
    finally:
        b.close()
    assert order == [("a", [1]), ("b", [2, 4])]


def test_batcher_waits_for_the_clients_it_just_answered_but_not_on_an_idle_server():
    batches, gate = [], threading.Event()

    def run(key, items):
        if not batches:
            gate.wait(5)
        batches.append(list(items))
        return items

    b = Batcher(run, max_batch=4, max_wait=2.0, quiet=0.3)
    try:
        first = b.submit_future("k", 1)       # starts at once (lone), blocks in run()
        while b.waiting:
            pass
        second = b.submit_future("k", 2)      # waits through the first search, longer than `quiet`
        time.sleep(0.5)
        gate.set()
        assert first.result(5) == 1
        third = b.submit_future("k", 3)       # the answered client is back: joins the waiting request
        assert second.result(5) == 2 and third.result(5) == 3
        assert batches == [[1], [2, 3]]
        time.sleep(0.5)                       # idle for longer than quiet: a lone request goes after quiet
        started = time.monotonic()
        assert b.submit_future("k", 4).result(5) == 4
        assert time.monotonic() - started < 1.5   # not max_wait (2 s)
    finally:
        b.close()


def test_batcher_runs_on_start_in_its_thread_first_and_raises_its_error():
    where = []
    b = Batcher(lambda key, items: [threading.current_thread().name] * len(items),
                on_start=lambda: where.append(threading.current_thread().name))
    try:
        assert where == ["seqgen-batcher"]                 # run before the constructor returned
        assert b.submit_future("k", 1).result(5) == "seqgen-batcher"
    finally:
        b.close()

    def fail():
        raise RuntimeError("no threads for you")
    with pytest.raises(RuntimeError, match="no threads for you"):
        Batcher(lambda key, items: items, on_start=fail)


def test_model_arguments():
    assert parse_model_arg("de=runs/x/best.pt") == ("de", "runs/x/best.pt")
    assert parse_model_arg("multi30k-de-en") == ("multi30k-de-en", "multi30k-de-en")


# -- hostile inputs: each a 4xx (or 503) with a one-line JSON error, and the server keeps serving ---------

def test_bad_requests_are_one_line_json_errors_and_the_server_keeps_serving(served):
    bomb = png_bytes(size=(3000, 3000))
    with client(served, max_text_chars=50, max_body_bytes=200_000, max_image_pixels=1_000_000,
                api_key="") as c:
        cases = [
            (c.post("/v1/translate", json={"text": ""}), 422, "empty"),
            (c.post("/v1/translate", json={"text": []}), 422, "non-empty"),
            (c.post("/v1/translate", json={"text": "x" * 51}), 413, "limit is 50"),
            (c.post("/v1/translate", content=b'{"text": "\xff\xfe"}', headers={"content-type": "application/json"}),
             400, "UTF-8"),
            (c.post("/v1/translate", content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
            (c.post("/v1/translate", json={"text": "ein", "model": "nope"}), 404, "unknown model"),
            (c.post("/v1/translate", json={"text": "ein", "model": "lm"}), 400, "lm model"),
            (c.post("/v1/translate", json={"text": "ein", "colour": "blue"}), 422, "unknown option 'colour'"),
            (c.post("/v1/translate", json={"text": "ein", "beam": 0}), 422, "beam"),
            (c.post("/v1/translate", json={"text": "ein", "beam": 1000}), 422, "at most"),
            (c.post("/v1/translate", json={"text": "ein", "top_p": 2, "temperature": 1}), 422, "top_p"),
            (c.post("/v1/translate", json={"text": "ein", "beam": 3, "temperature": 1}), 422, "either"),
            (c.post("/v1/translate", json={"text": "ein", "beam": "five"}), 422, "beam"),
            (c.post("/v1/translate", content=b'{"text": "ein", "temperature": NaN}',
                    headers={"content-type": "application/json"}), 422, "temperature"),
            (c.post("/v1/translate", content=b"x" * 300_000, headers={"content-type": "application/json"}),
             413, "larger than"),
            (c.post("/v1/caption", files={"image": ("x.txt", b"hello, not an image", "text/plain")}), 422,
             "not an image"),
            (c.post("/v1/caption", files={"image": ("x.png", png_bytes()[:60], "image/png")}), 422, "image"),
            (c.post("/v1/caption", files={"image": ("x.png", b"", "image/png")}), 422, "empty"),
            (c.post("/v1/caption", files={"image": ("bomb.png", bomb, "image/png")}), 413, "decompression bomb"),
            (c.post("/v1/caption", json={"image_base64": "***"}), 422, "base64"),
            (c.post("/v1/caption", files={"photo": ("x.png", png_bytes(), "image/png")}), 422, "named \"image\""),
            (c.post("/v1/caption", data={"beam": "2"}), 415, "multipart"),
            (c.post("/v1/caption", content=b"raw", headers={"content-type": "image/png"}), 415, "multipart"),
            (c.post("/v1/generate", json={"prompt": "ZZZ~"}), 422, "never saw"),
            (c.post("/v1/generate", json={"prompt": "RO", "num_samples": -1}), 422, "num_samples"),
            (c.post("/v1/generate", json={"prompt": "RO", "max_len": 10 ** 9}), 422, "max_len"),
            (c.get("/v1/nothing"), 404, "Not Found"),
        ]
        for response, status, word in cases:
            assert_error(response, status, word)
        assert c.post("/v1/translate", json={"text": "ein mann"}).status_code == 200


def test_api_key_and_full_queue(served):
    with client(served, api_key="s3cret") as c:
        assert_error(c.post("/v1/translate", json={"text": "ein"}), 401, "API key")
        assert_error(c.post("/v1/translate", json={"text": "ein"}, headers={"X-API-Key": "wrong"}), 401, "API key")
        assert c.post("/v1/translate", json={"text": "ein"}, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200
    app = create_app(served, ServeConfig(amp="off", max_queue=1, max_wait_ms=0))
    gate = threading.Event()
    original = app.state.batcher.run
    app.state.batcher.run = lambda key, items: (gate.wait(5), original(key, items))[1]
    with TestClient(app) as c:
        first = threading.Thread(target=lambda: c.post("/v1/translate", json={"text": "ein"}))
        first.start()
        while app.state.batcher.searches == 0 and app.state.batcher.waiting == 0 and not first.is_alive():
            pass
        import time
        time.sleep(0.3)                    # the first request is in the search; one more fills the queue
        second = threading.Thread(target=lambda: c.post("/v1/translate", json={"text": "eine frau"}))
        second.start()
        time.sleep(0.3)
        r = c.post("/v1/translate", json={"text": "mann"})
        gate.set()
        first.join()
        second.join()
    assert_error(r, 503, "busy")
    assert r.headers["retry-after"] == "1"


def test_a_taken_port_is_one_line_before_any_model_loads(capsys):
    import socket

    from seqgen.cli import main
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "no-such-model", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}: cannot listen there" in err
