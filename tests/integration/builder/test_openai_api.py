"""The OpenAI-compatible backends over real HTTP on 127.0.0.1.

Most tests use the scripted server (``tests/openai_server.py``): answers,
garbage, 429/500 statuses and hangs are scripted per request, and the
server records what it got. One test (marked ``slow``) talks to a real
``transformers serve`` process serving a tiny random model built here.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from builder.backends.interfaces import CaptionItem
from builder.backends.openai_api import (
    PLACEHOLDER_API_KEY,
    OpenAISummarizer,
    OpenAIVisionCaptioner,
    parse_candidate_list,
)
from builder.data_files import data_path
from builder.errors import BackendError
from testkit.openai_server import Drip, Hang, RawBody, Reply, Reset, ScriptedServer, Status

# what a deadline may overrun by on a busy 2-core machine: scheduling, and
# the openai client's first-request setup (imports, platform detection)
SLACK_S = 2.0
CAPTIONS = [
    "a red striped circle on grass",
    "a red dotted circle above a blue square",
    "a large red circle on a brick wall",
    "two objects: a red circle and a green star",
]


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch):
    """No test may reach anything but the loopback server: drop endpoint and
    proxy variables from the environment."""
    for var in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
def srv():
    with ScriptedServer() as s:
        yield s


@pytest.fixture(scope="module", autouse=True)
def _warm_client():
    """One request first, so wall-time asserts measure requests, not the
    openai client's one-time setup."""
    with ScriptedServer() as s:
        OpenAISummarizer(model="m", base_url=s.base_url).summarize(CAPTIONS, 1)


@pytest.fixture
def quick_backoff(monkeypatch):
    """Backoff without Retry-After of 0.05 s, 0.1 s, ... (0.5 s, 1 s, ... by default)."""
    from builder.backends import openai_requests

    monkeypatch.setattr(openai_requests, "BACKOFF_BASE_S", 0.05)


def summarizer(srv: ScriptedServer, **kw) -> OpenAISummarizer:
    opts = {
        "model": "stub-model",
        "base_url": srv.base_url,
        "api_key": "test-key",
        "timeout": 2.0,
        "max_retries": 2,
        **kw,
    }
    return OpenAISummarizer(**opts)


# ----------------------------------------------------------------------------- answers
def test_valid_json_answer_gives_normalized_distinct_candidates(srv):
    srv.script(
        Reply(
            '["Red Circles!", "round red shapes", "circles", "red", "red  circles", "extra"]',
            prompt_tokens=120,
            completion_tokens=30,
        )
    )
    s = summarizer(srv)
    assert s.summarize_many([CAPTIONS], 4) == [
        ["red circles", "round red shapes", "circles", "red"]
    ]

    (req,) = srv.chat_requests
    assert req.body["model"] == "stub-model"
    assert req.body["temperature"] == 0.7 and req.body["max_tokens"] == 200
    roles = [m["role"] for m in req.messages]
    assert roles == ["system", "user"]
    assert "1 to 5 words" in req.messages[0]["content"]
    user = req.messages[1]["content"]
    assert "1. a red striped circle on grass" in user and "4. two objects" in user
    assert "exactly 4 distinct" in user and "{" not in user
    assert s.usage["prompt_tokens"] == 120 and s.usage["completion_tokens"] == 30
    assert s.usage["requests"] == 1 and s.usage["reasks"] == 0


@pytest.mark.parametrize(
    "answer, expected",
    [
        (
            'Sure! Here you go:\n```json\n["red circles", "Round Shapes"]\n```\nHope it helps.',
            ["red circles", "round shapes"],
        ),
        ('```\n["red circles"]\n```', ["red circles"]),
        ('1. Red circles\n2) round shapes\n3. "red"', ["red circles", "round shapes", "red"]),
        ("- red circles\n* round shapes", ["red circles", "round shapes"]),
        ('The concepts are ["red circles", "circles"] in my view.', ["red circles", "circles"]),
        ('{"concepts": ["red circles", "circles"]}', ["red circles", "circles"]),
    ],
    ids=["fenced-json", "fenced-bare", "numbered", "bulleted", "in-prose", "object"],
)
def test_fenced_numbered_and_embedded_answers_are_parsed(srv, answer, expected):
    srv.script(Reply(answer))
    assert summarizer(srv).summarize(CAPTIONS, 5) == expected
    assert len(srv.chat_requests) == 1


def test_parser_finds_no_list_in_prose():
    assert parse_candidate_list("I think it is about red things.") is None
    assert parse_candidate_list("") is None
    assert parse_candidate_list("[1, 2, 3]") is None


def test_garbage_is_reasked_once_then_the_neuron_fails_with_a_reason(srv):
    srv.script(Reply("an red 4 a the 5, the 5"), Reply("the the the"))
    s = summarizer(srv)
    (out,) = s.summarize_many([CAPTIONS], 5)
    assert isinstance(out, BackendError)
    assert str(out).startswith("LLM answer was not a list of 1-5 word concepts: ")
    assert "the the the" in str(out) and "\n" not in str(out)

    first, second = srv.chat_requests
    assert [m["role"] for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[2]["content"] == "an red 4 a the 5, the 5"
    assert "JSON list of exactly 5" in second.messages[3]["content"]
    assert second.messages[:2] == first.messages
    assert s.usage["reasks"] == 1 and s.usage["failed_neurons"] == 1


def test_a_good_second_answer_after_a_reask_is_used(srv):
    srv.script(Reply("I cannot decide."), Reply('["red circles"]'))
    assert summarizer(srv).summarize(CAPTIONS, 5) == ["red circles"]
    assert len(srv.chat_requests) == 2


def test_too_long_items_and_copied_captions_are_dropped(srv):
    srv.script(
        Reply(
            json.dumps(
                ["A red striped circle on grass.", "one two three four five six", "red circle"]
            )
        )
    )
    assert summarizer(srv).summarize(CAPTIONS, 5) == ["red circle"]

    # nothing usable at all -> re-ask, and the reason names the bad items
    srv.script(
        Reply(json.dumps(["a large red circle on a brick wall"])), Reply(json.dumps(["", "  "]))
    )
    with pytest.raises(BackendError, match="not a list of 1-5 word concepts"):
        summarizer(srv).summarize(CAPTIONS, 5)


def test_an_answer_that_is_not_a_chat_completion_fails_cleanly(srv):
    srv.script(RawBody(), RawBody())
    (out,) = summarizer(srv).summarize_many([CAPTIONS], 5)
    assert isinstance(out, BackendError)
    assert len(srv.chat_requests) <= 2


# ----------------------------------------------------------------------------- failures and retries
def test_429_twice_then_success_is_retried_by_the_client(srv):
    srv.script(Status(429, "rate limited"), Status(429, "rate limited"), Reply('["red circles"]'))
    assert summarizer(srv).summarize(CAPTIONS, 5) == ["red circles"]
    reqs = srv.chat_requests
    assert len(reqs) == 3
    assert [r.headers.get("x-stainless-retry-count") for r in reqs] == ["0", "1", "2"]


def test_429_past_the_retries_fails_with_a_one_line_reason(srv):
    srv.script(*[Status(429, "rate limited")] * 3)
    (out,) = summarizer(srv, max_retries=2).summarize_many([CAPTIONS], 5)
    assert isinstance(out, BackendError)
    assert str(out) == (
        "LLM request failed: HTTP 429, after 2 retries sent (max_retries = 2): rate limited"
    )
    assert len(srv.chat_requests) == 3


def test_500_is_retried(srv):
    srv.script(Status(500, "boom"), Reply('["red circles"]'))
    assert summarizer(srv).summarize(CAPTIONS, 5) == ["red circles"]
    assert len(srv.chat_requests) == 2


def test_400_is_not_retried(srv):
    srv.script(Status(400, "bad model"))
    (out,) = summarizer(srv).summarize_many([CAPTIONS], 5)
    assert str(out) == "LLM request failed: HTTP 400, not retried: bad model"
    assert len(srv.chat_requests) == 1


def test_a_hanging_server_is_cut_at_the_deadline_and_not_retried_past_it(srv):
    """``timeout`` is the whole request's budget: a hang uses it up, so no
    retry is sent even though ``max_retries`` allows one."""
    srv.script(Hang(5), Hang(5))
    s = summarizer(srv, timeout=0.6, max_retries=1)
    t0 = time.perf_counter()
    (out,) = s.summarize_many([CAPTIONS], 5)
    elapsed = time.perf_counter() - t0
    assert str(out) == (
        "LLM request failed: no complete answer within 0.6 s, then the 0.6 s deadline "
        "left no time for a retry (0 retries sent)"
    )
    assert len(srv.chat_requests) == 1
    assert 0.6 <= elapsed < 0.6 + SLACK_S


def test_attempt_timeout_lets_a_hung_attempt_be_retried_within_the_deadline(srv):
    # 0.4 s + a 0.5 s backoff + 0.4 s fit the 3 s deadline with room for a busy machine
    srv.script(Hang(5), Hang(5), Reply('["red circles"]'))
    s = summarizer(srv, timeout=3.0, attempt_timeout=0.4, max_retries=1)
    t0 = time.perf_counter()
    (out,) = s.summarize_many([CAPTIONS], 5)
    elapsed = time.perf_counter() - t0
    assert str(out) == (
        "LLM request failed: no complete answer within 0.4 s, after 1 retry sent (max_retries = 1)"
    )
    assert len(srv.chat_requests) == 2
    assert 0.8 <= elapsed < 3.0 + SLACK_S
    assert s.usage["requests"] == 2 and s.usage["retries"] == 1

    srv.reset()
    srv.script(Hang(5), Reply('["red circles"]'))
    assert summarizer(srv, timeout=3.0, attempt_timeout=0.4).summarize(CAPTIONS, 5) == ["red circles"]
    assert [r.headers["x-stainless-retry-count"] for r in srv.chat_requests] == ["0", "1"]


def test_failures_stay_per_neuron(srv):
    def responder(rec):
        return Status(400, "nope") if "blue square" in rec.text() else Reply('["red circles"]')

    srv.responder = responder
    out = summarizer(srv).summarize_many([CAPTIONS[:1], CAPTIONS[1:2], [" "], CAPTIONS[2:]], 3)
    assert out[0] == ["red circles"] and out[3] == ["red circles"]
    assert isinstance(out[1], BackendError) and "HTTP 400" in str(out[1])
    assert isinstance(out[2], BackendError) and "no captions" in str(out[2])


# ----------------------------------------------------------------------------- a hostile world
LIMIT = "1,288,576"  # the body cap of the default max_answer_chars (20,000)
GOOD = '["red circles"]'
GZIP = gzip.compress(json.dumps({"choices": [{"message": {"content": GOOD}}]}).encode())
# case -> (what the server does, request by request; the exact reason, or the answer; requests it gets)
HOSTILE = {
    "slow drip, 1 byte/s": (
        [Drip(GOOD, interval=1.0, max_seconds=20)],
        ("LLM request failed: no complete answer within 2 s, then the 2 s deadline left no time "
        "for a retry (0 retries sent)"), 1),
    "a 20 MB word": (
        [Reply(json.dumps(["x" * 20_000_000]))],
        r"LLM request failed: HTTP 200 body of 20,000,\d{3} bytes \(Content-Length\) is over the "
        + LIMIT + "-byte limit; not read, not retried", 1),
    "a 20 MB list": (
        [Reply(json.dumps(["red circles"] * 1_400_000))],
        r"LLM request failed: HTTP 200 body of 2\d,\d{3},\d{3} bytes \(Content-Length\) is over the "
        + LIMIT + "-byte limit; not read, not retried", 1),
    "3 MB, no Content-Length": (
        [RawBody(b'{"choices": "' + b"x" * 3_000_000, "application/json", content_length=False)],
        "LLM request failed: HTTP 200 body passed the " + LIMIT
        + "-byte limit; reading stopped, not retried", 1),
    "a 30,000-character answer": (
        [Reply("a" * 30_000)],
        ("LLM request failed: the answer is 30,000 characters, over the 20,000 limit "
        "(max_answer_chars); not parsed, not retried"), 1),
    "a 5,000-character item, twice": (
        [Reply(json.dumps(["x" * 5_000])), Reply(json.dumps(["y" * 5_000, "z" * 90]))],
        (r"LLM answer was not a list of 1-5 word concepts: no item was a 1-5 word concept of at most "
        r"80 characters that is not a copied caption \('y{37}\.\.\.'; 'z{37}\.\.\.'\)"), 2),
    "429, Retry-After 100000": (
        [Status(429, "rate limited", retry_after_ms=None, retry_after="100000")],
        ("LLM request failed: HTTP 429, not retried: the server asked to wait 100,000 s "
        "(Retry-After), past the 2 s deadline (0 retries sent): rate limited"), 1),
    "503, Retry-After a date in 2099": (
        [Status(503, "down", retry_after_ms=None, retry_after="Wed, 21 Oct 2099 07:28:00 GMT")],
        (r"LLM request failed: HTTP 503, not retried: the server asked to wait [\d,]+ s "
        r"\(Retry-After\), past the 2 s deadline \(0 retries sent\): down"), 1),
    "500, 500, then an answer": (
        [Status(500, "boom"), Status(500, "boom"), Reply(GOOD)], ["red circles"], 3),
    "500 every time": (
        [Status(500, "boom")] * 3,
        r"LLM request failed: HTTP 500, after 2 retries sent \(max_retries = 2\): boom", 3),
    "an HTML 502 page": (
        [RawBody(b"<html><body>\n502 Bad Gateway\n</body></html>", code=502)] * 3,
        (r"LLM request failed: HTTP 502, after 2 retries sent \(max_retries = 2\): "
        r"<html><body> 502 Bad Gateway </body></html>"), 3),
    "HTML with status 200": (
        [RawBody(b"<html>\x1b[31mcertainly not json")],
        (r"LLM request failed: HTTP 200 body is not JSON \(content type 'text/html', 29 bytes, "
        r"starting '<html> \[31mcertainly not json'\), not retried"), 1),
    "JSON of the wrong shape": (
        [RawBody(b'{"result": "ok"}', "application/json")],
        (r"""LLM request failed: HTTP 200 JSON body is not a chat completion: no """
        r"""choices\[0\]\.message\.content \(content type 'application/json', 16 bytes, """
        r"""starting '\{"result": "ok"\}'\), not retried"""), 1),
    "a gzip body": (
        [RawBody(GZIP, "application/json", headers=(("Content-Encoding", "gzip"),))],
        ("LLM request failed: HTTP 200 body is compressed (Content-Encoding 'gzip') though "
        "identity was asked for; not read, not retried"), 1),
    "connection reset every time": (
        [Reset()] * 3,
        (r"LLM request failed: connection failed \((ConnectionResetError|ConnectionAbortedError"
        r"|BrokenPipeError|RemoteProtocolError|ReadError): .+\), after 2 retries sent "
        r"\(max_retries = 2\)"), 3),
    "connection reset, then an answer": ([Reset(), Reply(GOOD)], ["red circles"], 2),
    "15,000 nested brackets, then prose": (
        [Reply("[" * 15_000), Reply("no idea")],
        ("LLM answer was not a list of 1-5 word concepts: no JSON or numbered list in the answer "
        "'no idea'"), 2),
    "a good answer": ([Reply(GOOD)], ["red circles"], 1),
}


def _hostile_responder(cases: dict[str, list]):
    """Each neuron's requests get its case's behaviours in order, then a good answer."""
    queues = {name: list(behaviours) for name, behaviours in cases.items()}

    def respond(rec):
        name = re.search(r"case <(.+?)>", rec.text()).group(1)
        return queues[name].pop(0) if queues[name] else Reply(GOOD)

    return respond


def test_a_hostile_world_fails_each_neuron_alone_with_a_truthful_reason(srv, quick_backoff):
    """Every hostile behaviour at once, one neuron each, concurrently, with
    ``timeout = 2``: each neuron fails (or succeeds) on its own, with the
    reason of what its server did, within the deadline."""
    srv.responder = _hostile_responder({k: v[0] for k, v in HOSTILE.items()})
    names = list(HOSTILE)
    batches = [[f"case <{name}> a red circle", "a red circle on grass"] for name in names]
    s = summarizer(srv, timeout=2.0, max_retries=2, concurrency=len(names))
    t0 = time.perf_counter()
    out = s.summarize_many(batches, 5)
    elapsed = time.perf_counter() - t0

    got = {name: o if isinstance(o, list) else str(o) for name, o in zip(names, out)}
    for name, (_, expected, _) in HOSTILE.items():
        if isinstance(expected, list):
            assert got[name] == expected, name
        else:
            assert isinstance(out[names.index(name)], BackendError), name
            assert re.fullmatch(expected, got[name]) or got[name] == expected, (name, got[name])
    requests = {name: sum(f"case <{name}>" in r.text() for r in srv.chat_requests) for name in names}
    assert requests == {name: v[2] for name, v in HOSTILE.items()}
    assert elapsed < 2.0 + SLACK_S  # every request within its 2 s deadline, all at once
    assert s.usage["failed_neurons"] == sum(not isinstance(v[1], list) for v in HOSTILE.values())


def test_the_slow_drip_alone_ends_at_the_deadline(srv):
    srv.script(Drip(GOOD, interval=1.0, max_seconds=20))
    t0 = time.perf_counter()
    (out,) = summarizer(srv, timeout=2.0).summarize_many([CAPTIONS], 5)
    elapsed = time.perf_counter() - t0
    assert str(out).startswith("LLM request failed: no complete answer within 2 s")
    assert 2.0 <= elapsed < 2.0 + SLACK_S


def test_a_retry_after_that_fits_the_deadline_is_waited_and_counted(srv):
    srv.script(Status(429, "slow down", retry_after_ms=None, retry_after="1"), Reply(GOOD))
    s = summarizer(srv, timeout=3.0)
    t0 = time.perf_counter()
    assert s.summarize(CAPTIONS, 5) == ["red circles"]
    first, second = srv.chat_requests
    assert second.started - first.started >= 1.0  # the server's wait, not the client's backoff
    assert time.perf_counter() - t0 < 3.0 + SLACK_S
    assert s.usage["requests"] == 2 and s.usage["retries"] == 1 and s.last_item_usage[0]["requests"] == 2


def test_max_answer_chars_is_an_option(srv):
    answer = '["red circles", "' + "r" * 60 + '"]'
    srv.script(Reply(answer))
    (out,) = summarizer(srv, max_answer_chars=40).summarize_many([CAPTIONS], 5)
    assert str(out) == (
        f"LLM request failed: the answer is {len(answer)} characters, over the 40 limit "
        "(max_answer_chars); not parsed, not retried"
    )
    with pytest.raises(BackendError, match="max_answer_chars >= 1"):
        summarizer(srv, max_answer_chars=0)
    with pytest.raises(BackendError, match="timeout and attempt_timeout must be > 0"):
        summarizer(srv, timeout=float("inf"))


def test_vision_captioner_has_the_same_deadline_and_a_caption_limit(srv):
    item = CaptionItem(Image.new("RGB", (8, 8)), "x.png")
    srv.script(Drip("a red square", interval=1.0, max_seconds=20))
    cap = OpenAIVisionCaptioner(model="stub-vlm", base_url=srv.base_url, timeout=1.5)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"captioning x\.png: LLM request failed: no complete answer within 1\.5 s"):
        cap.caption([item])
    assert time.perf_counter() - t0 < 1.5 + SLACK_S
    srv.script(Reply("a red square " * 100))
    with pytest.raises(BackendError, match=r"over the 1,000 limit \(max_caption_chars\)"):
        OpenAIVisionCaptioner(model="stub-vlm", base_url=srv.base_url).caption([item])


# ----------------------------------------------------------------------------- concurrency
def test_concurrency_is_bounded_and_answers_keep_their_neuron(srv):
    def responder(rec):
        unit = re.search(r"unit (\d+)", rec.text()).group(1)
        return Reply(json.dumps([f"concept {unit}"]), delay=0.1)

    srv.responder = responder
    batches = [[f"a picture of unit {i}", f"another view of unit {i}"] for i in range(20)]
    s = summarizer(srv, concurrency=4)
    t0 = time.perf_counter()
    out = s.summarize_many(batches, 3)
    elapsed = time.perf_counter() - t0
    assert out == [[f"concept {i}"] for i in range(20)]
    assert len(srv.chat_requests) == 20
    assert srv.max_in_flight == 4  # bounded, and actually concurrent
    assert elapsed < 20 * 0.1  # faster than one at a time


def test_summarize_works_when_called_inside_a_running_event_loop(srv):
    """A notebook runs an event loop; the sync API must still work there."""
    import asyncio

    async def inside():
        return summarizer(srv).summarize(CAPTIONS, 2)

    assert asyncio.run(inside()) == ["scripted concept"]


# ----------------------------------------------------------------------------- configuration
def test_api_key_and_base_url_come_from_the_environment(srv, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env-123")
    monkeypatch.setenv("OPENAI_BASE_URL", srv.base_url)
    s = OpenAISummarizer(model="stub-model")
    assert s.summarize(CAPTIONS, 2) == ["scripted concept"]
    assert srv.chat_requests[0].headers["authorization"] == "Bearer sk-from-env-123"
    assert "sk-from-env" not in json.dumps(s.config_key())


def test_local_servers_get_a_placeholder_key_and_openai_needs_a_real_one(srv):
    s = OpenAISummarizer(model="stub-model", base_url=srv.base_url)
    s.summarize(CAPTIONS, 2)
    assert srv.chat_requests[0].headers["authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"
    with pytest.raises(BackendError, match="OPENAI_API_KEY"):
        OpenAISummarizer(model="gpt-4o-mini")
    with pytest.raises(BackendError, match="`model` option"):
        OpenAISummarizer(base_url=srv.base_url)


def test_registered_lazily_under_openai_and_openai_vision(srv):
    from builder.backends.registry import captioners, summarizers

    s = summarizers.create("openai", model="stub-model", base_url=srv.base_url, concurrency=2)
    assert isinstance(s, OpenAISummarizer) and s.concurrency == 2
    c = captioners.create("openai-vision", model="stub-vlm", base_url=srv.base_url)
    assert isinstance(c, OpenAIVisionCaptioner)
    with pytest.raises(BackendError, match="bad options"):
        summarizers.create("openai", model="m", base_url=srv.base_url, no_such_option=1)


def test_reasoning_model_options_change_the_request_fields(srv):
    s = summarizer(srv, temperature=None, max_tokens_param="max_completion_tokens", max_tokens=99)
    s.summarize(CAPTIONS, 2)
    body = srv.chat_requests[0].body
    assert "temperature" not in body and "max_tokens" not in body
    assert body["max_completion_tokens"] == 99
    with pytest.raises(BackendError, match="max_tokens_param"):
        summarizer(srv, max_tokens_param="tokens")


def test_config_key_changes_with_the_prompt_text_and_answer_relevant_options(srv, tmp_path):
    prompt = tmp_path / "my_user.txt"
    prompt.write_text(data_path("prompts", "summarize_user.txt").read_text())
    base = summarizer(srv, user_prompt=str(prompt)).config_key()
    assert base == summarizer(srv).config_key()  # same text as the shipped file
    assert (
        base
        == summarizer(
            srv, user_prompt=str(prompt), concurrency=1, timeout=9, max_retries=0
        ).config_key()
    )

    prompt.write_text(prompt.read_text() + "Prefer colors.\n")
    assert summarizer(srv, user_prompt=str(prompt)).config_key() != base
    assert summarizer(srv, model="other").config_key() != base
    assert summarizer(srv, temperature=0.0).config_key() != base
    assert summarizer(srv, max_tokens=50).config_key() != base
    assert summarizer(srv, base_url=srv.base_url + "/x").config_key() != base


def test_a_missing_prompt_or_placeholder_is_a_clear_error(srv, tmp_path):
    with pytest.raises(BackendError, match="no_such.txt"):
        summarizer(srv, system_prompt="no_such.txt")
    bad = tmp_path / "bad.txt"
    bad.write_text("Name the concept.")
    with pytest.raises(BackendError, match="captions"):
        summarizer(srv, user_prompt=str(bad))


# ----------------------------------------------------------------------------- vision captioner
def _color_of(data_url: str) -> tuple[int, int, int]:
    assert data_url.startswith("data:image/png;base64,")
    img = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    assert img.format == "PNG"
    return img.convert("RGB").getpixel((0, 0))


def test_vision_captioner_sends_png_data_urls_and_returns_captions_in_order(srv):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30), (200, 100, 0)]

    def responder(rec):
        (msg,) = rec.messages
        text_part, image_part = msg["content"]
        assert text_part["type"] == "text" and "one short sentence" in text_part["text"]
        r, g, b = _color_of(image_part["image_url"]["url"])
        return Reply(f' "a square of color {r} {g} {b}." \n', delay=0.05)

    srv.responder = responder
    items = [
        CaptionItem(Image.new("RGB", (32, 24), c), f"img{i}.png") for i, c in enumerate(colors)
    ]
    cap = OpenAIVisionCaptioner(model="stub-vlm", base_url=srv.base_url, concurrency=2, timeout=2)
    out = cap.caption(items)
    assert out == [f"a square of color {r} {g} {b}." for r, g, b in colors]
    assert srv.max_in_flight == 2
    req = srv.chat_requests[0]
    assert req.body["model"] == "stub-vlm" and req.body["max_tokens"] == 40
    assert cap.usage["requests"] == 5


def test_vision_captioner_failure_raises_a_backend_error(srv):
    srv.script(Status(400, "model does not accept images"))
    cap = OpenAIVisionCaptioner(model="stub-vlm", base_url=srv.base_url, max_retries=0)
    with pytest.raises(BackendError, match=r"captioning x\.png: LLM request failed: HTTP 400"):
        cap.caption([CaptionItem(Image.new("RGB", (8, 8)), "x.png")])


# ----------------------------------------------------------------------------- a real server
def _tiny_chat_model(folder: Path) -> None:
    """A random 2-layer Llama with a word-level tokenizer built here (no
    downloads). Its vocabulary has no brackets and no digits, so it can never
    produce a JSON or numbered list: every answer is garbage, deterministically."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted(
        {"a", "the", "of", "on", "with", "and", "red", "blue", "green", "circle", "square", "star"}
        | {"grass", "wall", "striped", "dotted", "large", "two", "objects", "above", "picture"}
        | {",", ":"}
    )
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    ftok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    ftok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<|assistant|> {% endif %}"
    )
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    ftok.save_pretrained(folder)


@pytest.fixture(scope="module")
def transformers_server(tmp_path_factory):
    """``transformers serve`` on a free 127.0.0.1 port with the tiny model preloaded."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which(
        "transformers"
    )
    if exe is None:
        pytest.skip("the transformers CLI is not installed")
    folder = tmp_path_factory.mktemp("tiny-chat-model")
    _tiny_chat_model(folder)
    with ScriptedServer() as probe:  # borrow a free port, then release it
        port = probe.port
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "NO_PROXY": "127.0.0.1",
    }
    log = (folder / "serve.log").open("w")
    proc = subprocess.Popen(
        [
            exe,
            "serve",
            str(folder),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    t0 = time.perf_counter()
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.perf_counter() - t0 > 120:
                    pytest.fail(
                        "transformers serve did not start:\n"
                        + (folder / "serve.log").read_text()[-2000:]
                    )
                time.sleep(0.25)
        yield {
            "base_url": f"http://127.0.0.1:{port}/v1",
            "model": str(folder),
            "startup_s": time.perf_counter() - t0,
        }
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_a_real_transformers_server_answers_and_garbage_is_handled(transformers_server):
    s = OpenAISummarizer(
        model=transformers_server["model"],
        base_url=transformers_server["base_url"],
        max_tokens=24,
        timeout=60,
        max_retries=1,
        concurrency=2,
    )
    out = s.summarize_many([CAPTIONS, CAPTIONS[:2]], 5)
    assert len(out) == 2
    for o in out:  # a random model never writes a list: re-asked once, then a clear failure
        assert isinstance(o, BackendError), o
        assert str(o).startswith("LLM answer was not a list of 1-5 word concepts")
    assert s.usage["requests"] == 4 and s.usage["reasks"] == 2
    assert s.usage["completion_tokens"] > 0 and s.usage["prompt_tokens"] > 0


# ----------------------------------------------------------------------------- a whole build
def test_a_build_with_the_openai_summarizer_records_a_failed_neuron_and_goes_on(srv, tmp_path):
    """The planted model's 18 units through the builder: the first neuron's
    answers are unusable twice (it is recorded as failed, with the reason),
    every other neuron gets concepts the stub extracts from its captions."""
    from builder.backends.extractive import extract_concepts
    from builder.config import BuildConfig
    from builder.pipeline.run import build
    from builder.synthetic.probe import write_probe_set
    from query import Atlas

    def responder(rec):
        user = rec.messages[1]["content"]
        caps = re.findall(r"^\d+\. (.*)$", user, re.MULTILINE)
        n = int(re.search(r"exactly (\d+) distinct", user).group(1))
        if len(srv.chat_requests) <= 2:  # concurrency 1: the first neuron's ask and re-ask
            return Reply("no idea")
        return Reply(json.dumps(extract_concepts(caps, n)))

    srv.responder = responder
    probe = write_probe_set(tmp_path / "probe", n=160, seed=3, progress=False)
    cfg = BuildConfig.from_dict(
        {
            "out": str(tmp_path / "atlas"),
            "chunk_size": 4,
            "models": [
                {
                    "name": "planted",
                    "target": "planted",
                    "probe": str(probe),
                    "layers": ["detectors"],
                }
            ],
            "describe": {
                "summarizer": "openai",
                "summarizer_options": {
                    "model": "stub-model",
                    "base_url": srv.base_url,
                    "concurrency": 1,
                },
            },
            "dissect": {"similarity_options": {"target": "demo-cnn"}},
        }
    )
    (summary,) = build(cfg).models
    assert (summary.neurons, summary.ok, summary.failed) == (18, 17, 1)
    assert len(srv.chat_requests) == 19  # one request per neuron and one re-ask
    with Atlas.open(tmp_path / "atlas") as atlas:
        records = [atlas.neuron("planted", "detectors", u) for u in range(18)]
    failed = [r for r in records if r.status == "failed"]
    assert len(failed) == 1
    assert failed[0].reason.startswith(
        "summarizer failed: LLM answer was not a list of 1-5 word concepts"
    )
    for r in records:
        if r.status == "ok":
            # the LLM's answer gives 1-5 candidates; the fidelity step may add caption phrases and complements
            asked = [c for c in r.candidates if c.source == "summarizer"]
            assert r.labels and 1 <= len(asked) <= 5
            assert all(1 <= len(c.concept.split()) <= 5 for c in r.candidates)


def _stub_concepts(rec) -> Reply:
    """A good answer for a summarize request: the extractive concepts of its captions."""
    from builder.backends.extractive import extract_concepts

    user = rec.messages[1]["content"]
    caps = re.findall(r"^\d+\. (.*)$", user, re.MULTILINE)
    n = int(re.search(r"exactly (\d+) distinct", user).group(1))
    return Reply(json.dumps(extract_concepts(caps, n)))


def _build_json(config: Path, *flags: str) -> dict:
    """``dnd-atlas build --config FILE --json [flags]``, in process (the
    scripted server runs in this process); the model's summary."""
    from query import cli

    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert cli.main(["build", "--config", str(config), "--json", *flags]) == 0
    (model,) = json.loads(out.getvalue())["models"]
    return model


def _statuses(atlas: Path) -> dict[int, tuple[str, str | None]]:
    import duckdb

    con = duckdb.connect(str(atlas / "atlas.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT unit, status, reason FROM neurons ORDER BY unit").fetchall()
    finally:
        con.close()
    return {u: (status, reason) for u, status, reason in rows}


def _cached_answers(atlas: Path) -> int:
    import sqlite3

    con = sqlite3.connect(str(atlas / "cache" / "cache.sqlite"))
    try:
        return con.execute("SELECT count(*) FROM cache WHERE ns = 'summarize'").fetchone()[0]
    finally:
        con.close()


def test_neurons_failed_while_the_llm_was_down_are_retried_by_the_same_command(srv, tmp_path):
    """The LLM is down (503) for a whole build: every neuron is recorded as
    failed, with the reason, and nothing is cached. It comes back for half the
    neurons: the same command with --no-cache retries all 18, labels 9 and
    keeps the latest reason of the other 9. Up for all: the same command
    (cache on) retries those 9 and labels them."""
    import tomli_w

    from builder.synthetic.probe import write_probe_set

    state = {"up": lambda rec: False}

    def responder(rec):
        if not state["up"](rec):
            return Status(503, "model is loading")
        return _stub_concepts(rec)

    srv.responder = responder
    probe = write_probe_set(tmp_path / "probe", n=60, seed=3, progress=False)
    atlas = tmp_path / "atlas"
    config = tmp_path / "build.toml"
    config.write_text(tomli_w.dumps({
        "out": str(atlas),
        "chunk_size": 6,
        "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]}],
        "crop": {"enabled": False},
        "describe": {"summarizer": "openai", "summarizer_options": {
            "model": "stub-model", "base_url": srv.base_url, "timeout": 2.0, "max_retries": 1}},
        "dissect": {"enabled": False, "similarity_options": {"target": "demo-cnn"}},
    }))

    first = _build_json(config)
    assert (first["neurons"], first["ok"], first["failed"], first["retried_failed"]) == (18, 0, 18, 0)
    down = "summarizer failed: LLM request failed: HTTP 503, after 1 retry sent (max_retries = 1): model is loading"
    assert _statuses(atlas) == {u: ("failed", down) for u in range(18)}
    assert _cached_answers(atlas) == 0  # a failure is never cached
    assert len(srv.chat_requests) == 36  # 18 neurons, each the first attempt and 1 retry

    # back for the first half of the layer's neurons (the planted units' captions differ)
    half = {u for u, _ in enumerate(range(18)) if u < 9}
    asked: dict[str, int] = {}

    def up_for_half(rec):
        key = rec.messages[1]["content"]
        asked.setdefault(key, len(asked))
        return asked[key] in half

    state["up"] = up_for_half
    second = _build_json(config, "--no-cache")
    assert (second["neurons"], second["ok"], second["failed"]) == (18, 9, 9)
    assert (second["retried_failed"], second["still_failed"]) == (18, 9)
    after = _statuses(atlas)
    assert sorted(s for s, _ in after.values()) == ["failed"] * 9 + ["ok"] * 9
    assert {r for s, r in after.values() if s == "failed"} == {down}
    assert _cached_answers(atlas) == 9

    state["up"] = lambda rec: True
    third = _build_json(config)
    assert (third["neurons"], third["ok"], third["failed"]) == (9, 9, 0)
    assert (third["retried_failed"], third["still_failed"]) == (9, 0)
    assert all(s == "ok" and r is None for s, r in _statuses(atlas).values())
    assert _build_json(config)["neurons"] == 0  # nothing failed is left: a no-op
