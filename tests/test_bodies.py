"""Request bodies from the second hostile pass: a body is authenticated before it is read, a document is
bounded in depth, nodes and expanded size before it is built (JSON and YAML alike, the CLI's files too),
every route answers an unreadable body with the same code, each route states and enforces its own size
limit, and a body that stops half way is dropped."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from serve.documents import DocumentLimits, DocumentTooDeep, DocumentTooLarge, load_mapping
from serve.http.app import app
from serve.http.limits import BodyPolicy, body_limit
from tests.support.api_app import TINY, LocalApi, http_server, local_api, send_raw
from tests.support.cli_run import previz

# 363 bytes that a YAML reader without limits expands to 9**9 (387 million) strings
ALIAS_BOMB = """\
title: lol
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
shots: *i
"""
DEEP_YAML = "shots: " + "[" * 1000 + "]" * 1000 + "\n"
DEEP_JSON = '{"shots": ' + "[" * 1000 + "]" * 1000 + "}"
YAML = {"Content-Type": "application/yaml"}
JSON = {"Content-Type": "application/json"}
BOARD = {"shots": [{"prompt": "a lighthouse in a storm", **TINY}]}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[LocalApi]:
    with local_api(tmp_path) as running:
        yield running


def refusal(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def peak_bytes_of(call: object) -> tuple[object, int]:
    """What `call()` returns and the most Python memory it held at once."""
    tracemalloc.start()
    try:
        result = call()  # type: ignore[operator]
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_the_alias_bomb_is_refused_before_it_is_read_without_a_key(api: LocalApi) -> None:
    anonymous = api.client_with(None)
    started = time.perf_counter()
    response, peak = peak_bytes_of(
        lambda: anonymous.post("/v1/storyboards", content=ALIAS_BOMB, headers=YAML)
    )
    print(f"alias bomb without a key: {time.perf_counter() - started:.3f} s, peak {peak / 1e6:.1f} MB")
    assert refusal(response) == (401, "missing_api_key")  # type: ignore[arg-type]
    assert peak < 20e6 and api.store.list(limit=5) == []


def test_the_alias_bomb_is_refused_in_bounded_memory_with_a_key(api: LocalApi) -> None:
    started = time.perf_counter()
    response, peak = peak_bytes_of(
        lambda: api.client.post("/v1/storyboards", content=ALIAS_BOMB, headers=YAML)
    )
    print(f"alias bomb with a key: {time.perf_counter() - started:.3f} s, peak {peak / 1e6:.1f} MB")
    assert refusal(response) == (413, "document_too_large")  # type: ignore[arg-type]
    assert "aliases count as what they repeat" in response.json()["error"]["message"]  # type: ignore[attr-defined]
    assert peak < 20e6 and api.store.list(limit=5) == []


def test_a_bad_key_is_refused_before_the_body_is_read(api: LocalApi) -> None:
    """50 MB announced, 12 bytes sent: the 401 comes at once, the rest never read."""
    head = (
        "POST /v1/storyboards HTTP/1.1\r\nHost: previz\r\nContent-Type: application/yaml\r\n"
        f"Authorization: Bearer pvz_nope_nope\r\nContent-Length: {50 << 20}\r\n\r\n"
    )
    with http_server() as url:
        answer, _ = send_raw(url, head.encode() + b"shots: [1, 2")
    assert answer.startswith("HTTP/1.1 401"), answer
    assert '"invalid_api_key"' in answer and "connection: close" in answer.lower()


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/storyboards", DEEP_YAML, YAML),
        ("/v1/storyboards", DEEP_JSON, JSON),
        ("/v1/videos", DEEP_JSON, JSON),
        ("/v1/prompts/compile", DEEP_JSON, JSON),
        ("/v1/admin/projects", DEEP_JSON, JSON),
    ],
    ids=["board-yaml", "board-json", "video", "compile", "admin"],
)
def test_deep_nesting_is_the_same_4xx_on_every_route(
    api: LocalApi, path: str, body: str, headers: dict[str, str]
) -> None:
    response = api.client.post(path, content=body, headers=headers)
    assert refusal(response) == (400, "document_too_deep"), response.text
    assert "nested deeper than 32 levels" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/videos"),
        ("POST", "/v1/storyboards"),
        ("PATCH", "/v1/storyboards/sb_unknown"),
        ("POST", "/v1/prompts/compile"),
        ("POST", "/v1/admin/projects"),
        ("PATCH", "/v1/admin/projects/default"),
    ],
)
@pytest.mark.parametrize("body", [b'{"prompt": ', b"\xff\xfe{}"], ids=["truncated", "not-utf8"])
def test_an_unreadable_body_is_invalid_json_on_every_route(
    api: LocalApi, method: str, path: str, body: bytes
) -> None:
    response = api.client.request(method, path, content=body, headers=JSON)
    assert refusal(response) == (400, "invalid_json"), response.text


def test_each_route_enforces_its_own_limit_and_publishes_it(api: LocalApi) -> None:
    padding = "x" * (300 << 10)
    small = api.client.post("/v1/prompts/compile", json={"prompt": padding})
    assert refusal(small) == (413, "request_too_large")
    assert "at most 262,144 bytes" in small.json()["error"]["message"]
    create = api.client.post("/v1/videos", json={"prompt": "x" * (25 << 20), **TINY})
    assert refusal(create) == (413, "request_too_large")
    assert "at most 25,165,824 bytes" in create.json()["error"]["message"]
    # 2 MiB passes the storyboard route's 4 MiB limit and is judged on its fields instead
    board = api.client.post("/v1/storyboards", json={**BOARD, "title": "x" * (2 << 20)})
    assert board.status_code == 400 and refusal(board)[1] != "request_too_large"
    paths = api.client.get("/openapi.json").json()["paths"]
    board_body = paths["/v1/storyboards"]["post"]["requestBody"]
    assert board_body["content"]["application/yaml"]["x-max-body-bytes"] == 4 << 20
    assert paths["/v1/videos"]["post"]["requestBody"]["content"]["application/json"]["x-max-body-bytes"] == (
        24 << 20
    )
    compile_body = paths["/v1/prompts/compile"]["post"]["requestBody"]
    assert compile_body["content"]["application/json"]["x-max-body-bytes"] == 256 << 10
    assert "At most 262,144 bytes as application/json" in compile_body["description"]
    assert body_limit("PUT", "/v1/admin/projects/p/luts/warm", "application/json") == 4 << 20


def test_a_body_that_stops_half_way_is_dropped(api: LocalApi) -> None:
    impatient = BodyPolicy(app, idle_timeout_s=0.5, total_timeout_s=5.0)
    head = (
        "POST /v1/videos HTTP/1.1\r\nHost: previz\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api.admin_key}\r\nContent-Length: 100\r\n\r\n"
    )
    with http_server(impatient) as url:
        answer, closed = send_raw(url, head.encode() + b'{"prompt": "a li')  # then nothing more
    assert answer.startswith("HTTP/1.1 408"), answer
    assert '"body_timeout"' in answer and "stopped arriving after 16 bytes" in answer
    assert closed and api.store.list(limit=5) == []


def test_a_yaml_board_within_the_limits_still_reads(api: LocalApi) -> None:
    text = "shots:\n  - &shot {prompt: a storm, size: 96x64, seconds: '0.5', steps: 4}\n  - *shot\n"
    response = api.client.post("/v1/storyboards", content=text, headers=YAML)
    assert response.status_code == 201, response.text
    assert response.json()["num_videos"] == 2


def test_the_document_reader_counts_aliases_as_what_they_expand_to() -> None:
    limits = DocumentLimits(max_depth=4, max_nodes=30, max_chars=1000)
    assert load_mapping("a: &x [1, 2, 3]\nb: *x\n", "yaml", limits) == {"a": [1, 2, 3], "b": [1, 2, 3]}
    with pytest.raises(DocumentTooLarge):
        load_mapping("a: &x [1, 2, 3, 4, 5, 6, 7, 8, 9]\nb: [*x, *x, *x]\n", "yaml", limits)
    with pytest.raises(DocumentTooLarge):
        load_mapping("a: &x " + "y" * 600 + "\nb: *x\n", "yaml", limits)
    with pytest.raises(DocumentTooDeep):
        load_mapping("a: [[[[1]]]]\n", "yaml", limits)
    with pytest.raises(DocumentTooDeep):
        load_mapping(json.dumps({"a": [[[[1]]]]}), "json", limits)


def test_the_cli_reads_board_files_with_the_same_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bomb = tmp_path / "board.yaml"
    bomb.write_text(ALIAS_BOMB)
    monkeypatch.setenv("PREVIZ_API_KEY", "pvz_unused_unused")
    monkeypatch.setenv("PREVIZ_SERVER", "http://127.0.0.1:9")
    code, _, err = previz(["submit", "--storyboard", str(bomb)], monkeypatch, capsys)
    assert code != 0 and "expands past 200,000 values" in " ".join(err.split())
