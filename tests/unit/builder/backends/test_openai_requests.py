"""The request plumbing of the openai backends, without a server: Retry-After,
excerpts of untrusted bodies, the chat completion check, limits."""

from __future__ import annotations

import email.utils
import json
import time

import pytest

from builder.backends.openai_api import parse_candidate_list, validate_candidates
from builder.backends.openai_requests import (
    Limits,
    _AnswerTooLong,
    _deepest_message,
    _NotACompletion,
    completion_answer,
    excerpt,
    retry_after,
)
from builder.errors import BackendError


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "100000"}, 100000.0),
        ({"retry-after": "1.5", "retry-after-ms": "nonsense"}, 1.5),
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "inf"}, None),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_reads_milliseconds_seconds_and_nothing_else(headers, expected):
    assert retry_after(headers) == expected


def test_retry_after_as_an_http_date():
    when = email.utils.formatdate(time.time() + 3600, usegmt=True)
    assert 3590 < retry_after({"retry-after": when}) <= 3600
    past = email.utils.formatdate(time.time() - 60, usegmt=True)
    assert retry_after({"retry-after": past}) == 0.0


def test_excerpt_is_short_printable_and_one_line():
    assert excerpt(b"<html>\n\t\x1b[31mred\x00</html>") == "'<html> [31mred </html>'"
    long = excerpt("x" * 10_000_000)
    assert len(long) == 62 and long.endswith("...'")
    assert excerpt(b"\xff\xfe broken utf-8") == "'\ufffd\ufffd broken utf-8'"


def _completion(content, **extra) -> bytes:
    return json.dumps({"choices": [{"message": {"content": content}}], **extra}).encode()


def test_a_chat_completion_gives_its_text_and_usage():
    body = _completion('["red"]', usage={"prompt_tokens": 12, "completion_tokens": 3})
    got = completion_answer(200, "application/json", body, 100)
    assert (got.text, got.prompt_tokens, got.completion_tokens) == ('["red"]', 12, 3)
    assert completion_answer(200, "application/json", _completion(None), 100).text == ""
    bad_usage = _completion("x", usage={"prompt_tokens": "lots", "completion_tokens": -1})
    assert completion_answer(200, "", bad_usage, 100).prompt_tokens == 0


@pytest.mark.parametrize(
    "body, words",
    [
        (b"<html>", "HTTP 200 body is not JSON (content type 'text/html', 6 bytes, starting '<html>')"),
        (b"[1, 2]", "HTTP 200 JSON body is not a chat completion"),
        (b'{"choices": []}', "no choices[0].message.content"),
        (_completion(7), "no choices[0].message.content"),
        (b"[" * 100_000, "HTTP 200 body is not JSON"),
    ],
)
def test_anything_else_is_not_a_completion(body, words):
    with pytest.raises(_NotACompletion) as e:
        completion_answer(200, "text/html", body, 100)
    assert words in str(e.value)


def test_an_answer_over_the_limit_is_refused_with_its_length():
    with pytest.raises(_AnswerTooLong, match="the answer is 101 characters, over the 100 limit"):
        completion_answer(200, "application/json", _completion("a" * 101), 100)
    assert completion_answer(200, "application/json", _completion("a" * 100), 100).text == "a" * 100


def test_limits_validate_themselves_and_size_the_body_cap():
    assert Limits(2, 0, 20_000).max_body_bytes == (1 << 20) + 12 * 20_000
    for bad in ({"timeout": 0}, {"timeout": float("nan")}, {"max_retries": -1}, {"max_answer_chars": 0},
                {"attempt_timeout": 0.0}):
        with pytest.raises(BackendError):
            Limits(**{"timeout": 2, "max_retries": 1, "max_answer_chars": 10, **bad})


def test_deep_brackets_and_giant_items_do_not_break_parsing():
    t0 = time.perf_counter()
    assert parse_candidate_list("[" * 20_000) is None
    assert parse_candidate_list("{" * 20_000 + '["red circles"]') is None  # past the first 256 brackets
    assert parse_candidate_list('prose ["red circles"] more') == ["red circles"]
    assert time.perf_counter() - t0 < 2.0
    with pytest.raises(ValueError, match="at most 80 characters"):
        validate_candidates(["x" * 20_000_000, "word " * 3 + "y" * 80], [], 5)
    assert validate_candidates(["x" * 81, "red circles"], [], 5) == ["red circles"]


def _raise_wrapped() -> None:
    """A reset socket raised while an unrelated RuntimeError was being
    handled, wrapped by a message-less error ``from None`` and then by one
    with a generic message ``from`` it: the chain an HTTP client builds."""
    try:
        try:
            try:
                raise RuntimeError("no running event loop")
            except RuntimeError:
                raise ConnectionResetError(104, "Connection reset by peer")  # implicit context, on purpose
        except ConnectionResetError:
            raise OSError() from None
    except OSError as wrapped:
        raise ValueError("Connection error.") from wrapped


def test_the_deepest_message_is_the_real_error_not_an_earlier_one_it_was_raised_during():
    with pytest.raises(ValueError) as info:
        _raise_wrapped()
    root = _deepest_message(info.value)
    assert isinstance(root, ConnectionResetError) and "Connection reset by peer" in str(root)
    plain = ValueError("just this")
    assert _deepest_message(plain) is plain
