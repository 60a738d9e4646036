"""Compress: negotiation table in-process, then real bodies through a real proxy, decoded."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import pytest
import urllib3

from oxypy import Compress, ConfigurationError, Forward
from oxypy._core.codecs import negotiate

from _servers import raw_request

HTTP = urllib3.PoolManager(retries=False, timeout=30)
_rng = random.Random(15)
WORDS = [bytes(_rng.choice(b"abcdefghij") for _ in range(_rng.randint(2, 9))) for _ in range(300)]
TEXT = b" ".join(_rng.choice(WORDS) for _ in range(4000))  # about 25 KiB, compressible


def decoder(coding: str) -> Callable[[bytes], bytes]:
    if coding == "gzip":
        return lambda data: zlib.decompress(data, 31)
    if coding == "br":
        brotli = pytest.importorskip("brotli")
        return lambda data: bytes(brotli.decompress(data))
    zstandard = pytest.importorskip("zstandard")

    def zstd(data: bytes) -> bytes:
        return bytes(zstandard.ZstdDecompressor().decompressobj().decompress(data))

    return zstd


@pytest.mark.parametrize(
    ("accept", "offered", "chosen"),
    [
        pytest.param("gzip", ("zstd", "br", "gzip"), "gzip", id="only-gzip"),
        pytest.param("gzip, br, zstd", ("zstd", "br", "gzip"), "zstd", id="tie-server-order"),
        pytest.param("gzip, br", ("gzip", "br"), "gzip", id="tie-other-order"),
        pytest.param("br;q=0.5, gzip;q=0.8", ("zstd", "br", "gzip"), "gzip", id="q-wins"),
        pytest.param("gzip;q=0, br", ("gzip", "br"), "br", id="q0-refuses"),
        pytest.param("gzip;q=0", ("gzip",), None, id="only-refused"),
        pytest.param("*", ("zstd", "gzip"), "zstd", id="star"),
        pytest.param("*;q=0.1, gzip;q=0", ("gzip", "br"), "br", id="star-minus-named"),
        pytest.param("*;q=0", ("gzip",), None, id="star-refuses-all"),
        pytest.param("identity", ("gzip",), None, id="identity-only"),
        pytest.param("", ("gzip",), None, id="empty"),
        pytest.param("identity;q=1, gzip;q=0.5", ("gzip",), None, id="identity-preferred"),
        pytest.param("identity;q=0.5, gzip", ("gzip",), "gzip", id="identity-lower"),
        pytest.param("gzip;q=0.3", ("gzip",), "gzip", id="identity-unnamed-not-preferred"),
        pytest.param("GZIP;Q=0.5", ("gzip",), "gzip", id="case"),
        pytest.param("x-gzip", ("gzip",), "gzip", id="x-gzip"),
        pytest.param("gzip;q=abc, br", ("gzip", "br"), "br", id="bad-q-drops-entry"),
        pytest.param("gzip;q=2", ("gzip",), None, id="q-out-of-range"),
        pytest.param("deflate, compress", ("gzip",), None, id="unoffered"),
        pytest.param("gzip ; q=0.9 , br;q=1.0", ("gzip", "br"), "br", id="spaces"),
    ],
)
def test_negotiation_table(accept: str, offered: tuple[str, ...], chosen: str | None) -> None:
    assert negotiate(accept, offered) == chosen


def make_app(
    body: bytes = TEXT,
    *,
    status: str = "200 OK",
    headers: list[tuple[str, str]] | None = None,
    length: bool = True,
) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        out = [("Content-Type", "text/plain; charset=utf-8")] + list(headers or [])
        if length:
            out.append(("Content-Length", str(len(body))))
        start_response(status, out)
        if environ["REQUEST_METHOD"] != "HEAD":
            # three chunks, as an upstream would send them
            third = len(body) // 3
            yield body[:third]
            yield body[third : 2 * third]
            yield body[2 * third :]

    return app


def get(url: str, accept: str | None, method: str = "GET", **kw: Any) -> Any:
    headers = dict(kw.pop("headers", {}))
    if accept is not None:
        headers["Accept-Encoding"] = accept
    return HTTP.request(method, url, headers=headers, decode_content=False, **kw)


@pytest.mark.parametrize("coding", ["gzip", "br", "zstd"])
def test_each_coding_round_trips_through_forward(proxy: Any, pywsgi: Any, coding: str) -> None:
    decode = decoder(coding)
    up = pywsgi(make_app(headers=[("ETag", '"v1"'), ("Vary", "Cookie")]))
    url = proxy(Compress(Forward(up)))
    resp = get(url + "/", f"{coding}, identity;q=0.1")
    assert resp.status == 200
    assert resp.headers["Content-Encoding"] == coding
    assert "Content-Length" not in resp.headers
    assert resp.headers["ETag"] == 'W/"v1"'
    assert resp.headers["Vary"] == "Cookie, Accept-Encoding"
    assert len(resp.data) < len(TEXT) // 2
    assert hashlib.sha256(decode(resp.data)).digest() == hashlib.sha256(TEXT).digest()


def test_no_accept_encoding_is_identity_and_untouched(proxy: Any, pywsgi: Any) -> None:
    up = pywsgi(make_app(headers=[("ETag", '"v1"')]))
    url = proxy(Compress(Forward(up)))
    # raw bytes: http.client would add "Accept-Encoding: identity" on its own
    raw = raw_request(url, b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert b"content-length: %d" % len(TEXT) in lines
    assert b'etag: "v1"' in lines
    assert not any(line.startswith((b"vary", b"content-encoding")) for line in lines)
    assert body == TEXT
    # identity asked for explicitly: still identity, and Vary says it depended on it
    resp = get(url + "/", "identity")
    assert "Content-Encoding" not in resp.headers
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert resp.data == TEXT


def test_refused_codings_get_identity_with_vary(proxy: Any, pywsgi: Any) -> None:
    up = pywsgi(make_app())
    url = proxy(Compress(Forward(up)))
    resp = get(url + "/", "gzip;q=0, br;q=0, zstd;q=0")
    assert "Content-Encoding" not in resp.headers
    assert resp.headers["Vary"] == "Accept-Encoding"
    assert resp.data == TEXT


@pytest.mark.parametrize(
    ("size", "compressed"),
    [
        pytest.param(1023, False, id="under"),
        pytest.param(1024, True, id="inclusive"),
        pytest.param(1025, True, id="over"),
    ],
)
def test_min_size_is_inclusive(proxy: Any, pywsgi: Any, size: int, compressed: bool) -> None:
    body = TEXT[:size]
    url = proxy(Compress(Forward(pywsgi(make_app(body)))))
    resp = get(url + "/", "gzip")
    assert ("Content-Encoding" in resp.headers) is compressed
    data = zlib.decompress(resp.data, 31) if compressed else resp.data
    assert data == body


def test_unknown_length_is_compressed(proxy: Any, pywsgi: Any) -> None:
    url = proxy(Compress(Forward(pywsgi(make_app(TEXT[:100], length=False)))))
    resp = get(url + "/", "gzip")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert zlib.decompress(resp.data, 31) == TEXT[:100]


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        pytest.param("200 OK", [("Content-Encoding", "br")], id="already-encoded"),
        pytest.param("200 OK", [("Cache-Control", "public, no-transform")], id="no-transform"),
        pytest.param(
            "206 Partial Content", [("Content-Range", "bytes 0-24999/99999")], id="partial"
        ),
        pytest.param("200 OK", [("Content-Range", "bytes 0-24999/99999")], id="content-range"),
    ],
)
def test_responses_never_touched(
    proxy: Any, pywsgi: Any, status: str, headers: list[tuple[str, str]]
) -> None:
    url = proxy(Compress(Forward(pywsgi(make_app(status=status, headers=headers)))))
    resp = get(url + "/", "gzip, br, zstd")
    assert resp.status == int(status[:3])
    assert resp.headers.get("Content-Encoding") == dict(headers).get("Content-Encoding")
    assert resp.headers["Content-Length"] == str(len(TEXT))
    assert "Vary" not in resp.headers
    assert resp.data == TEXT


def test_event_stream_is_never_touched(proxy: Any, pywsgi: Any) -> None:
    app = make_app(headers=[], length=False)

    def sse(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        def sr(status: str, headers: list[tuple[str, str]]) -> Any:
            headers = [(n, v) for n, v in headers if n != "Content-Type"]
            return start_response(status, headers + [("Content-Type", "text/event-stream")])

        return app(environ, sr)  # type: ignore[no-any-return]

    url = proxy(Compress(Forward(pywsgi(sse))))
    resp = get(url + "/", "gzip")
    assert "Content-Encoding" not in resp.headers
    assert resp.data == TEXT


@pytest.mark.parametrize(
    "status", ["204 No Content", "304 Not Modified"], ids=["no-content", "not-modified"]
)
def test_bodiless_statuses_untouched(proxy: Any, status: str) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(status, [("ETag", '"v1"')])
        return []

    url = proxy(Compress(app))
    raw = raw_request(url, b"GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n\r\n")
    head = raw.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 " + status[:3].encode())
    assert b"content-encoding" not in head
    assert b'etag: "v1"' in head
    assert b"vary" not in head


def test_head_is_untouched(proxy: Any, pywsgi: Any) -> None:
    url = proxy(Compress(Forward(pywsgi(make_app()))))
    resp = get(url + "/", "gzip", method="HEAD")
    assert "Content-Encoding" not in resp.headers
    assert resp.headers["Content-Length"] == str(len(TEXT))


def test_upgrade_requests_are_untouched(proxy: Any) -> None:
    url = proxy(Compress(make_app()))
    raw = raw_request(
        url,
        b"GET / HTTP/1.1\r\nHost: t\r\nAccept-Encoding: gzip\r\n"
        b"Connection: keep-alive, Upgrade\r\nUpgrade: example/1\r\n\r\n",
    )
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"content-encoding" not in head.lower()
    assert body == TEXT


def test_each_chunk_is_flushed_while_the_upstream_waits(proxy: Any, pywsgi: Any) -> None:
    got_first = gevent.event.Event()
    first, second = TEXT[:3000], TEXT[3000:9000]

    def slow(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        yield first
        # The second part is only sent once the client decoded the first: a
        # block that buffered would deadlock here (and time out the test).
        assert got_first.wait(timeout=10)
        yield second

    url = proxy(Compress(Forward(pywsgi(slow))))
    resp = HTTP.request(
        "GET",
        url + "/",
        headers={"Accept-Encoding": "gzip"},
        preload_content=False,
        decode_content=False,
    )
    assert resp.headers["Content-Encoding"] == "gzip"
    inflate = zlib.decompressobj(31)
    seen = b""
    with gevent.Timeout(15):
        for chunk in resp.read_chunked(decode_content=False):
            seen += inflate.decompress(chunk)
            if seen == first:
                got_first.set()
    resp.release_conn()
    assert got_first.is_set()
    assert seen == first + second


def test_large_body_round_trips_in_slices(proxy: Any, pywsgi: Any) -> None:
    big = (TEXT * 420)[: 10 * 1024 * 1024]  # 10 MiB in one chunk from the app
    digest = hashlib.sha256(big).digest()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response(
            "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(big)))]
        )
        return [big]

    url = proxy(Compress(app, encodings=["gzip"]))
    resp = get(url + "/", "gzip")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert hashlib.sha256(zlib.decompress(resp.data, 31)).digest() == digest


def test_write_callable_output_is_compressed(proxy: Any) -> None:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(TEXT[:5000])
        return [TEXT[5000:10000]]

    url = proxy(Compress(app, encodings=["gzip"]), lint=False)  # Lint forbids write()
    resp = get(url + "/", "gzip")
    assert resp.headers["Content-Encoding"] == "gzip"
    assert zlib.decompress(resp.data, 31) == TEXT[:10000]


def test_skip_passes_unchanged(proxy: Any, pywsgi: Any) -> None:
    url = proxy(Compress(Forward(pywsgi(make_app())), skip=lambda e: True))
    resp = get(url + "/", "gzip")
    assert "Content-Encoding" not in resp.headers
    assert resp.data == TEXT


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"min_size": -1}, "min_size", id="negative"),
        pytest.param({"min_size": 1.5}, "min_size", id="float"),
        pytest.param({"encodings": ["gzip", "deflate"]}, "unknown coding 'deflate'", id="unknown"),
        pytest.param({"encodings": "gzip"}, "encodings must be a list", id="string"),
        pytest.param({"encodings": []}, "at least one", id="empty"),
        pytest.param({"encodings": ["gzip", "gzip"]}, "'gzip' given twice", id="dup"),
    ],
)
def test_bad_configuration_is_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Compress(Forward("http://127.0.0.1:1"), **kwargs)
    assert message in str(info.value)


def test_missing_libraries_are_left_out_of_negotiation() -> None:
    code = (
        "import sys\n"
        "for name in ('brotli', 'brotlicffi', 'zstandard', 'compression.zstd'):\n"
        "    sys.modules[name] = None\n"
        "from oxypy import Compress\n"
        "c = Compress(lambda e, s: [], encodings=['zstd', 'br', 'gzip'])\n"
        "print(','.join(c.encodings))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "gzip"
