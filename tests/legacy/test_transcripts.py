"""Golden transcripts of the legacy wire protocol (legacy/transcripts/*.json), replayed and compared.

Replay (the default): every recorded request is sent again to the ``legacy_server`` fixture and
the response is compared: status, content type and texts/ids exactly; logits through their
recorded summary (length and argmax exactly, probe values within 1e-4).

Record: ``LMQL_BACKENDS_RECORD=1 python -m pytest tests/legacy/test_transcripts.py`` runs the
scenarios below against ``builtin:tiny`` and rewrites the files (do this only when the protocol
or the embedded model changes on purpose, and review the diff).

Replay against another server (for example an original LMQL 0.0.6.x server serving
``builtin:tiny``'s files): ``LMQL_BACKENDS_LEGACY_ENDPOINT=host:port``; exchanges marked
``"extension": true`` are then skipped.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import pytest
import requests
import torch

pytestmark = pytest.mark.timeout(120)

TRANSCRIPT_DIR = pathlib.Path(__file__).resolve().parents[2] / "legacy" / "transcripts"
RECORD = os.environ.get("LMQL_BACKENDS_RECORD") == "1"
EXTERNAL_ENDPOINT = os.environ.get("LMQL_BACKENDS_LEGACY_ENDPOINT")
MODEL = "builtin:tiny"
LOGITS_KEY = "$logits"
PROBE_INDICES = (0, 1, 2, 10, 100, 257, 1000)
LOGITS_TOLERANCE = 1e-4
HTTP_TIMEOUT = 30
COLLECT_SECONDS = 20.0


# ---- scenarios (used only when recording) ------------------------------------------------------------


def post(body, note: str, extension: bool = False) -> dict:
    request = {"method": "POST", "path": "/queue"}
    request["body_text" if isinstance(body, str) else "body"] = body
    return {"note": note, "extension": extension, "request": request}


def get(path: str, note: str, collect: int | None = None, extension: bool = False) -> dict:
    exchange = {"note": note, "extension": extension, "request": {"method": "GET", "path": path}}
    if collect is not None:
        exchange["collect"] = collect
    return exchange


def forward(client_id, sample_id, input_ids, attention_mask=None, model=MODEL) -> dict:
    return {"action": "forward", "client_id": client_id, "sample_id": sample_id, "input_ids": input_ids,
            "attention_mask": attention_mask, "model_identifier": model}


def scenario_forward(tokenizer) -> list[dict]:
    cid, bos = "golden-forward", tokenizer.bos_token_id
    ids = [bos, *tokenizer("It is a truth universally acknowledged")["input_ids"]]
    short = [bos, *tokenizer("Emma")["input_ids"]]
    width = len(ids)
    padded = [[0] * (width - len(short)) + short, short + [0] * (width - len(short))]
    mask = [[0] * (width - len(short)) + [1] * len(short), [1] * len(short) + [0] * (width - len(short))]
    return [
        post(forward(cid, 1, [ids]), "the real client's request: [[bos, ...ids]], attention_mask null"),
        get(f"/results/{cid}", "poll until the result is there", collect=1),
        post(forward(cid, 2, [ids + [100]]), "the next step re-sends the whole sequence plus one token"),
        get(f"/results/{cid}", "its logits", collect=1),
        post(forward(cid, "one-d", ids), "1-D input_ids: one flat vector of logits", extension=True),
        get(f"/results/{cid}", "a flat [V] answer", collect=1, extension=True),
        post(forward(cid, {"batch": [1, 2]}, padded, mask), "B=2, left and right padding", extension=True),
        get(f"/results/{cid}", "one row of logits per input row", collect=1, extension=True),
        post(forward(cid, 10, [short]), "the same ids twice under two sample ids (sample(n=2))"),
        post(forward(cid, 11, [short]), "the second one"),
        get(f"/results/{cid}", "both results, in any order (sorted here)", collect=2),
        get(f"/results/{cid}", "results are delivered once: nothing is left"),
    ]


def scenario_tokenize(tokenizer) -> list[dict]:
    cid = "golden:tokenize:1"
    eos_text = tokenizer.decode([tokenizer.eos_token_id])
    texts = ["<BOS>", "<EOS>", "Hello, Mr. Knightley!", "caf\u00e9 \u2014 na\u00efve", "", f"a{eos_text}b"]
    exchanges = []
    for i, text in enumerate(texts):
        body = {"action": "tokenize", "client_id": cid, "sample_id": f"t{i}", "text": text}
        exchanges += [post(body, f"tokenize {text!r}"), get(f"/results/{cid}", "its ids", collect=1)]
    ids = [tokenizer.bos_token_id, *tokenizer(" a fine morning")["input_ids"], tokenizer.eos_token_id]
    for i, input_ids in enumerate([ids, [], tokenizer("caf\u00e9")["input_ids"]]):
        body = {"action": "detokenize", "client_id": cid, "sample_id": f"d{i}", "input_ids": input_ids}
        exchanges += [post(body, "detokenize (special tokens kept)"), get(f"/results/{cid}", "its text", collect=1)]
    return exchanges


def scenario_errors(tokenizer, context_length: int, vocab_size: int) -> list[dict]:
    cid = "golden-errors"
    return [
        post(forward(cid, 1, [[0]], model="gpt2"), "wrong model_identifier"),
        post({"action": "embed", "client_id": cid, "sample_id": 1}, "unknown action"),
        post({"client_id": cid, "sample_id": 1, "action": None}, "unknown action: null"),
        post("{not json", "invalid JSON (the original closed the connection)", extension=True),
        post({"action": "forward", "client_id": cid}, "no sample_id (the original closed the connection)",
             extension=True),
        post({"client_id": cid, "sample_id": 1}, "no action (the original closed the connection)", extension=True),
        post({"action": "forward", "client_id": cid, "sample_id": 1, "input_ids": [[0]]}, "no model_identifier"),
        post({"action": "forward", "sample_id": 1, "input_ids": [[0]], "model_identifier": MODEL}, "no client_id"),
        post(forward(cid, 1, "0 1 2"), "input_ids not a list"),
        post({"action": "tokenize", "client_id": cid, "sample_id": 1, "text": 3}, "text not a string"),
        post({"action": "detokenize", "client_id": cid, "sample_id": 1, "input_ids": ["a"]}, "ids not ints"),
        post(forward(cid, 1, [[0] * (context_length + 1)]), "longer than the context: names the limit",
             extension=True),
        post(forward(cid, 1, [[]]), "empty input: names the minimum", extension=True),
        post(forward(cid, 1, [[0, vocab_size]]), "token id outside the vocabulary", extension=True),
        post(forward(cid, 1, [[0]], [[0]]), "every position masked out: empty", extension=True),
        get("/results/" + cid, "nothing was accepted, so nothing arrives"),
        post(forward(cid, "after", [[0]]), "the server keeps serving after bad requests"),
        get("/results/" + cid, "its result", collect=1),
        get("/nothing", "unknown path"),
        get("/queue", "GET on /queue is an unknown path too"),
    ]


def scenario_long_poll(tokenizer) -> list[dict]:
    cid = "golden-long-poll"
    return [
        get(f"/results/{cid}?wait=0.1", "nothing ready: an empty list after the wait", extension=True),
        post(forward(cid, "lp", [[tokenizer.bos_token_id]]), "a forward"),
        get(f"/results/{cid}?wait=10", "returns as soon as a result is ready", collect=1, extension=True),
        get(f"/results/{cid}?wait=soon", "a wait that is not a number", extension=True),
    ]


def make_scenarios(loaded) -> dict[str, list[dict]]:
    tokenizer = loaded.tokenizer
    return {
        "forward": scenario_forward(tokenizer),
        "tokenize": scenario_tokenize(tokenizer),
        "errors": scenario_errors(tokenizer, loaded.context_length, loaded.vocab_size),
        "long_poll": scenario_long_poll(tokenizer),
    }


TRANSCRIPT_NAMES = ("forward", "tokenize", "errors", "long_poll")


# ---- sending one exchange ------------------------------------------------------------------------------


def send(base_url: str, request: dict) -> requests.Response:
    url = base_url + request["path"]
    if request["method"] == "GET":
        return requests.get(url, timeout=HTTP_TIMEOUT)
    data = request["body_text"] if "body_text" in request else json.dumps(request["body"])
    return requests.post(url, data=data.encode(), timeout=HTTP_TIMEOUT)


def perform(base_url: str, exchange: dict) -> tuple[requests.Response, object]:
    """Send the request; for ``collect: N`` repeat the GET until N results came (sorted by sample_id)."""
    response = send(base_url, exchange["request"])
    if "collect" not in exchange:
        return response, parse_body(response)
    results, deadline = [], time.monotonic() + COLLECT_SECONDS
    while True:
        results += response.json()
        if len(results) >= exchange["collect"] or time.monotonic() > deadline:
            return response, sorted(results, key=lambda r: json.dumps(r.get("sample_id"), sort_keys=True))
        time.sleep(0.02)
        response = send(base_url, exchange["request"])


def parse_body(response: requests.Response):
    if mime_type(response) == "application/json":
        return response.json()
    return response.text


def mime_type(response: requests.Response) -> str:
    return response.headers.get("Content-Type", "").split(";")[0].strip()


# ---- recording --------------------------------------------------------------------------------------


def summarize_logits(values: list) -> dict | list:
    """Length, argmax and a few probes of a logits vector (rows of a 2-D answer each)."""
    if values and isinstance(values[0], list):
        return [summarize_logits(row) for row in values]
    tensor = torch.tensor(values, dtype=torch.float32)
    argmax = int(tensor.argmax())
    indices = sorted({i for i in PROBE_INDICES if i < len(values)} | {argmax, len(values) - 1})
    return {LOGITS_KEY: {"length": len(values), "argmax": argmax, "probes": [[i, values[i]] for i in indices]}}


def summarize(body):
    if isinstance(body, list):
        return [summarize(item) for item in body]
    if isinstance(body, dict):
        return {k: summarize_logits(v) if k == "next_token_logits" else summarize(v) for k, v in body.items()}
    return body


def record_response(response: requests.Response, body, extension: bool) -> dict:
    recorded = {"status": response.status_code, "content_type": mime_type(response)}
    if response.status_code == 404:
        recorded["body_ignored"] = True  # the original sent an HTML error page
    elif isinstance(body, str):
        recorded["body_text"] = body
    else:
        recorded["body"] = summarize(body)
    if extension and "X-Long-Poll" in response.headers:
        recorded["headers"] = {"X-Long-Poll": response.headers["X-Long-Poll"]}
    return recorded


def record_transcript(base_url: str, name: str, exchanges: list[dict]) -> dict:
    for exchange in exchanges:
        response, body = perform(base_url, exchange)
        exchange["response"] = record_response(response, body, exchange["extension"])
    return {
        "name": name,
        "model": MODEL,
        "description": f"legacy protocol transcript '{name}', recorded against {MODEL} on loopback "
                       f"(see legacy/README.md)",
        "exchanges": exchanges,
    }


def to_readable_json(value, indent: str = "") -> str:
    """Indented JSON where lists of scalars and small objects stay on one line (short diffs)."""
    flat = json.dumps(value, ensure_ascii=False)
    if not isinstance(value, (dict, list)) or is_flat(value) or len(flat) <= 100:
        return flat
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(k)}: {to_readable_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    items = [inner + to_readable_json(v, inner) for v in value]
    return "[\n" + ",\n".join(items) + f"\n{indent}]"


def is_flat(value) -> bool:
    return isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value)


# ---- comparing -----------------------------------------------------------------------------------------


def compare(expected, actual, where: str) -> None:
    if isinstance(expected, dict) and LOGITS_KEY in expected:
        return compare_logits(expected[LOGITS_KEY], actual, where)
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and sorted(actual) == sorted(expected), f"{where}: {actual!r}"
        for key in expected:
            compare(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: {str(actual)[:200]}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            compare(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: expected {expected!r}, got {actual!r}"


def compare_logits(summary: dict, values, where: str) -> None:
    assert isinstance(values, list) and len(values) == summary["length"], f"{where}: logits length"
    assert int(torch.tensor(values).argmax()) == summary["argmax"], f"{where}: argmax"
    for index, value in summary["probes"]:
        assert abs(values[index] - value) <= LOGITS_TOLERANCE, f"{where}[{index}]: {values[index]} != {value}"


def replay_exchange(base_url: str, exchange: dict, where: str) -> None:
    response, body = perform(base_url, exchange)
    expected = exchange["response"]
    assert response.status_code == expected["status"], f"{where}: {response.status_code} {response.text[:200]}"
    assert mime_type(response) == expected["content_type"], where
    for header, value in expected.get("headers", {}).items():
        assert response.headers.get(header) == value, f"{where}: header {header}"
    if "body_text" in expected:
        assert body == expected["body_text"], where
    elif "body" in expected:
        compare(expected["body"], body, where)


# ---- the tests -------------------------------------------------------------------------------------------


@pytest.fixture
def legacy_base_url(request):
    if EXTERNAL_ENDPOINT:
        endpoint = EXTERNAL_ENDPOINT
        return endpoint if "://" in endpoint else "http://" + endpoint
    return "http://" + request.getfixturevalue("legacy_server").endpoint


@pytest.mark.parametrize("name", TRANSCRIPT_NAMES)
def test_transcript(name, legacy_base_url, request):
    path = TRANSCRIPT_DIR / f"{name}.json"
    if RECORD:
        loaded = request.getfixturevalue("legacy_server").state.loaded
        transcript = record_transcript(legacy_base_url, name, make_scenarios(loaded)[name])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(to_readable_json(transcript) + "\n")
        pytest.skip(f"recorded {path}")
    transcript = json.loads(path.read_text())
    for i, exchange in enumerate(transcript["exchanges"]):
        if EXTERNAL_ENDPOINT and exchange["extension"]:
            continue
        replay_exchange(legacy_base_url, exchange, f"{name}.json exchange {i} ({exchange['note']})")


def test_every_transcript_file_is_replayed():
    assert sorted(p.stem for p in TRANSCRIPT_DIR.glob("*.json")) == sorted(TRANSCRIPT_NAMES)
