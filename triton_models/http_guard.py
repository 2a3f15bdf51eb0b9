"""A small HTTP/1.1 guard in front of Triton's HTTP port: it refuses the requests that crash it.

Why: the HTTP frontend of the bundled Triton 2.51 is built on libevhtp, which parses the body of
any request sent as ``Content-Type: application/x-www-form-urlencoded`` as query arguments into
two stack buffers the size of the body (``evhtp_parse_query_wflags``). A body of about half the
thread stack (8 MiB) — ``curl --data-binary @big.bin`` sends that content type by default —
overflows the stack and the whole server dies with SIGSEGV. That Triton also has no request-size
limit (``--http-max-input-size`` came with later releases). The guard listens on the public HTTP
port, forwards every request to Triton's own port (bound to 127.0.0.1 beside it) and answers
itself, before reading the body:

* 413 to a body over ``max_body_bytes`` (default 64 MiB, the limit later Tritons default to);
* a form-encoded ``Content-Type`` is dropped before forwarding (Triton's API has no form
  parameters and reads its JSON or binary body whatever the type says, so ``curl -d '{...}'``
  keeps working, but libevhtp no longer parses the body);
* 411 to a chunked request body (the Triton clients never send one; its length is unknown);
* 431 to a request head over 1 MiB;
* 503 when Triton is not reachable (it is being restarted): clients see UNAVAILABLE;
* 400, not Triton's 500, when Triton's JSON parser refuses the request body (a client error);
* a client that hangs up before its answer has its request cancelled: Triton's HTTP frontend keeps running
  a request whose connection closed, so the guard names each inference request it forwards (the
  `core_wire.TOKEN_HEADER` header, which Triton forwards to the model as a request parameter) and, when the
  client leaves, asks the family's engine core to cancel the request of that name (with the repository's
  secret, `--repository`): its loop stops at its next step, or it leaves the queue;
* 503 to a request in flight in a model whose python-backend stub died (Triton 2.51 never answers it): the
  supervisor writes the model's name to the `--stub-deaths` file, which the guard reads while it waits.

Bytes are streamed through (no body is held whole); one upstream connection per client
connection keeps keep-alive and response order. Run as ``python -m ti2i.triton_models.http_guard
--listen HOST:PORT --upstream HOST:PORT``; :class:`ti2i.triton_models.server.TritonServer` starts
it as a child process so that it shares no interpreter lock with the caller.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

from ti2i.triton_models.core_wire import CANCEL, TOKEN_HEADER, core_of, generate_body, read_secret

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_HEAD_BYTES = 1024 * 1024  # also the streams' buffer size: larger reads, fewer copies
_COPY_CHUNK = 1024 * 1024
# Triton 2.51 answers a request body its JSON parser refuses (a number an INT64 cannot hold, say) with 500:
# the guard makes it the 400 it is.
_PARSE_ERROR = b'"error":"Unable to parse '
_SMALL_BODY = 64 * 1024
HEAD_TIMEOUT_S = 30.0  # a connection whose next request head has not come by then is closed (slow clients)
HANGUP_POLL_S = 0.05  # how often a request waiting for its answer looks whether its client is still there
_INFERENCE_PATH = re.compile(r"^/v2/models/([^/?]+)(?:/versions/[^/?]+)?/(?:infer|generate|generate_stream)(?:\?.*)?$")
_REASONS = {411: "Length Required", 413: "Content Too Large", 415: "Unsupported Media Type",
            431: "Request Header Fields Too Large", 400: "Bad Request", 502: "Bad Gateway",
            503: "Service Unavailable"}


class _HungUp(Exception):
    """The client left before its answer."""


class StubDeaths:
    """How many times each model's stub died, read from the supervisor's file (a model name a line)."""

    def __init__(self, path: Path | None):
        self.path = path
        self._counts: dict[str, int] = {}
        self._offset = 0

    def count(self, model: str) -> int:
        if self.path is not None:
            try:
                size = os.stat(self.path).st_size
                if size < self._offset:  # a new server start emptied it
                    self._counts, self._offset = {}, 0
                if size > self._offset:
                    with open(self.path, "rb") as deaths:
                        deaths.seek(self._offset)
                        lines = deaths.read(size - self._offset).split(b"\n")
                    for line in lines[:-1]:  # the last is empty, or a line still being written
                        name = line.decode(errors="replace")
                        self._counts[name] = self._counts.get(name, 0) + 1
                        self._offset += len(line) + 1
            except OSError:
                pass  # none yet
        return self._counts.get(model, 0)


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _parse_head(head: bytes) -> tuple[str, list[tuple[str, str]]]:
    """(start line, [(name, value)]) of an HTTP head ending in a blank line."""
    lines = head.decode("latin-1").split("\r\n")
    start, headers = lines[0], []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _Refused(400, f"malformed header line {line[:80]!r}")
        headers.append((name.lower(), value.strip()))
    return start, headers


def _one(headers: list[tuple[str, str]], name: str) -> str | None:
    values = [v for k, v in headers if k == name]
    if len(values) > 1:
        raise _Refused(400, f"more than one {name} header")
    return values[0] if values else None


def _is_form(name: str, value: str) -> bool:
    """The header that makes libevhtp parse a body as form fields (matched as it does: a prefix)."""
    return name == "content-type" and value.lower().startswith("application/x-www-form-urlencoded")


def _content_length(headers: list[tuple[str, str]]) -> int:
    value = _one(headers, "content-length")
    if value is None:
        return 0
    if not value.isdigit():
        raise _Refused(400, f"invalid Content-Length {value[:40]!r}")
    return int(value)


async def _read_head(reader: asyncio.StreamReader, timeout_s: float | None = None) -> bytes | None:
    """The next request/response head, or None at a clean end of stream (or, with `timeout_s`, when none has
    come by then: a client that holds a connection without a request is let go)."""
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout_s)
    except asyncio.TimeoutError:
        return None
    except asyncio.IncompleteReadError as err:
        if err.partial.strip():
            raise _Refused(400, "incomplete request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _Refused(431, f"request head over {MAX_HEAD_BYTES} bytes") from None


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, n: int) -> None:
    while n > 0:
        data = await reader.read(min(n, _COPY_CHUNK))
        if not data:
            raise ConnectionError("connection closed mid-body")
        writer.write(data)
        n -= len(data)
        await writer.drain()


async def _copy_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Relay a chunked response body as it is, up to and including its last chunk and trailers."""
    while True:
        line = await reader.readuntil(b"\r\n")
        writer.write(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the blank line
                trailer = await reader.readuntil(b"\r\n")
                writer.write(trailer)
                if trailer == b"\r\n":
                    await writer.drain()
                    return
        await _copy(reader, writer, size + 2)


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seconds: float = 5.0) -> None:
    """After refusing a request, discard what the client still sends (for a few seconds) before
    closing: a client still writing its body would otherwise get a reset instead of the reply."""
    with contextlib.suppress(Exception):
        if writer.can_write_eof():
            writer.write_eof()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    with contextlib.suppress(Exception):
        while (left := deadline - loop.time()) > 0:
            if not await asyncio.wait_for(reader.read(_COPY_CHUNK), left):
                return


def _reply(writer: asyncio.StreamWriter, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    writer.write(f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)


class HttpGuard:
    """The guard's server: ``await HttpGuard(...).serve()``."""

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int],
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, repository: Path | None = None,
                 openai: tuple[str, int] | None = None, head_timeout_s: float = HEAD_TIMEOUT_S,
                 stub_deaths: Path | None = None):
        self.listen = listen
        self.upstream = upstream
        self.max_body_bytes = int(max_body_bytes)
        self.repository = repository  # where the engine cores' secrets are (None: no cancelling)
        self.openai = openai  # the OpenAI-compatible API's address, for /v1 (None: not served)
        self.head_timeout_s = head_timeout_s
        self.stub_deaths = StubDeaths(stub_deaths)

    def _core_secret(self, model: str) -> str | None:
        if self.repository is None:
            return None
        try:
            return read_secret(self.repository / core_of(model))
        except OSError:
            return None  # not a model of a ti2i family: nothing to cancel in

    async def _await_reply(self, up_reader: asyncio.StreamReader, reader: asyncio.StreamReader,
                           cancel: tuple[str, str, str] | None, watch: bool, model: str | None) -> bytes | None:
        """The upstream's response head. If the client hangs up first (`watch`: looked for), its request is
        cancelled (`cancel`: the family's core, the request's token, the core's secret) and _HungUp raised;
        closing the upstream connection then tells the OpenAI API, which cancels its own calls. If the stub
        of `model` (an inference request's) dies meanwhile, _Refused(503)."""
        deaths = self.stub_deaths.count(model) if model else 0
        reply = asyncio.ensure_future(_read_head(up_reader))
        try:
            while True:
                done, _ = await asyncio.wait({reply}, timeout=HANGUP_POLL_S)
                if done:
                    return reply.result()
                if model and self.stub_deaths.count(model) > deaths:
                    raise _Refused(503, f"model {model!r} stopped while serving this request (its process died "
                                        f"and is being restarted): send it again")
                if watch and (reader.at_eof() or reader.exception() is not None):
                    if cancel is not None:
                        await self._cancel(*cancel)
                    raise _HungUp()
        finally:
            if not reply.done():
                reply.cancel()

    async def _cancel(self, core: str, token: str, secret: str) -> None:
        """Ask the engine core to cancel the request `token` names (Triton's generate endpoint, on loopback)."""
        body = generate_body(CANCEL, "", token, secret)
        head = (f"POST /v2/models/{core}/generate HTTP/1.1\r\nHost: {self.upstream[0]}\r\nContent-Type: "
                f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with contextlib.suppress(Exception):  # the server is going away: so are its loops
            r, w = await asyncio.wait_for(asyncio.open_connection(*self.upstream), 5)
            try:
                w.write(head + body)
                await w.drain()
                await asyncio.wait_for(r.read(), 5)
            finally:
                w.close()

    def _check(self, start: str, headers: list[tuple[str, str]]) -> int:
        """The body length of an acceptable request; raises _Refused otherwise."""
        if _one(headers, "transfer-encoding") is not None:
            raise _Refused(411, "chunked request bodies are not accepted: send a Content-Length")
        length = _content_length(headers)
        if length > self.max_body_bytes:
            raise _Refused(413, f"request body of {length} bytes is over the server's limit of "
                                f"{self.max_body_bytes} bytes")
        if len(start.split(" ")) != 3:
            raise _Refused(400, f"malformed request line {start[:80]!r}")
        return length

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader = up_writer = None
        up_address: tuple[str, int] | None = None
        try:
            while True:
                try:
                    head = await _read_head(reader, self.head_timeout_s)
                    if head is None:
                        return
                    start, headers = _parse_head(head[:-4])
                    length = self._check(start, headers)
                except _Refused as refused:
                    _reply(writer, refused.status, str(refused))
                    await writer.drain()
                    await _linger(reader, writer)
                    return
                method, path, version = start.split(" ")
                if (_one(headers, "expect") or "").lower() == "100-continue":
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                openai = self.openai is not None and (path == "/v1" or path.startswith(("/v1/", "/v1?")))
                address = self.openai if openai else self.upstream
                # libevhtp (Triton's) must never parse a form body; the OpenAI API reads forms itself
                kept = [(k, v) for k, v in headers
                        if k not in ("expect", TOKEN_HEADER) and (openai or not _is_form(k, v))]
                cancel = None
                target = _INFERENCE_PATH.match(start.split(" ")[1]) if method == "POST" else None
                secret = self._core_secret(target.group(1)) if target else None
                if target and secret:
                    cancel = (core_of(target.group(1)), uuid.uuid4().hex, secret)
                    kept.append((TOKEN_HEADER, cancel[1]))
                out_head = start + "\r\n" + "".join(f"{k}: {v}\r\n" for k, v in kept) + "\r\n"
                if up_writer is not None and up_address != address:  # the other upstream: its own connection
                    up_writer.close()
                    up_writer = None
                if up_writer is None:
                    try:
                        up_reader, up_writer = await asyncio.open_connection(*address, limit=MAX_HEAD_BYTES)
                        up_address = address
                    except OSError as err:
                        _reply(writer, 503, f"the {'OpenAI API' if openai else 'Triton server'} is not reachable "
                                            f"(restarting?): {err}")
                        await writer.drain()
                        return
                up_writer.write(out_head.encode("latin-1"))
                await _copy(reader, up_writer, length)
                close = version == "HTTP/1.0" or (_one(headers, "connection") or "").lower() == "close"
                try:
                    resp_head = await self._await_reply(up_reader, reader, cancel, cancel is not None or openai,
                                                        target.group(1) if target else None)
                except _Refused as refused:
                    if refused.status != 503:  # the upstream's head was unreadable
                        resp_head = None
                    else:  # the upstream connection is closed below, unanswered
                        _reply(writer, 503, str(refused))
                        await writer.drain()
                        return
                except ConnectionError:
                    resp_head = None
                if resp_head is None:
                    _reply(writer, 502, "the upstream server closed the connection without a reply")
                    await writer.drain()
                    return
                status, resp_headers = _parse_head(resp_head[:-4])
                length = _one(resp_headers, "content-length")
                if status.startswith("HTTP/1.1 500") and length is not None and int(length) <= _SMALL_BODY:
                    body = await up_reader.readexactly(int(length))
                    if _PARSE_ERROR in body:  # the request's JSON, not the server: a client error
                        resp_head = b"HTTP/1.1 400 Bad Request" + resp_head[resp_head.index(b"\r\n"):]
                    writer.write(resp_head + body)
                elif method == "HEAD" or resp_head.startswith((b"HTTP/1.1 204", b"HTTP/1.1 304")):
                    writer.write(resp_head)
                elif (_one(resp_headers, "transfer-encoding") or "").lower() == "chunked":
                    writer.write(resp_head)
                    await _copy_chunked(up_reader, writer)
                elif length is not None:
                    writer.write(resp_head)
                    await _copy(up_reader, writer, _content_length(resp_headers))
                else:  # delimited by the end of the connection
                    writer.write(resp_head)
                    while data := await up_reader.read(_COPY_CHUNK):
                        writer.write(data)
                    close = True
                await writer.drain()
                if close or (_one(resp_headers, "connection") or "").lower() == "close":
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, _Refused, _HungUp):
            return  # a peer went away or broke the protocol: drop this connection only
        finally:
            for w in (up_writer, writer):
                if w is not None:
                    w.close()
                    with contextlib.suppress(Exception):
                        await w.wait_closed()

    async def serve(self, started: asyncio.Event | None = None) -> None:
        server = await asyncio.start_server(self._handle, *self.listen, limit=MAX_HEAD_BYTES, reuse_address=True)
        if started is not None:
            started.set()
        async with server:
            await server.serve_forever()


OPENAI_KEY_ENV = "TI2I_OPENAI_API_KEY"


async def _serve_openai(repository: Path, grpc: tuple[str, int], port: int, started: asyncio.Event) -> None:
    import os

    from ti2i.triton_models.openai_api import create_app, serve

    app = create_app(repository, f"{grpc[0]}:{grpc[1]}", os.environ.get(OPENAI_KEY_ENV) or None)
    await serve(app, port, started)


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, type=_address, help="HOST:PORT clients connect to")
    parser.add_argument("--upstream", required=True, type=_address, help="Triton's own HTTP HOST:PORT")
    parser.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES)
    parser.add_argument("--repository", type=Path, default=None,
                        help="the model repository (its engine cores' secrets): cancel the requests of clients that "
                             "hang up")
    parser.add_argument("--openai-grpc", type=_address, default=None,
                        help="Triton's gRPC HOST:PORT: serve the OpenAI-compatible API under /v1 (needs --repository; "
                             f"its bearer key, if any, from ${OPENAI_KEY_ENV})")
    parser.add_argument("--metrics-listen", type=_address, default=None,
                        help="HOST:PORT of the published metrics port: guarded the same way (Triton's metrics "
                             "server dies of the same form-encoded body)")
    parser.add_argument("--metrics-upstream", type=_address, default=None, help="Triton's own metrics HOST:PORT")
    parser.add_argument("--stub-deaths", type=Path, default=None,
                        help="the supervisor's file of models whose stub died (a name a line): requests in flight there "
                             "are answered 503")
    args = parser.parse_args(argv)
    loop = asyncio.new_event_loop()
    from ti2i.triton_models.server import HOST, find_free_ports

    openai = (HOST, find_free_ports(1)[0]) if args.openai_grpc is not None and args.repository is not None else None
    guard = HttpGuard(args.listen, args.upstream, args.max_body_bytes, args.repository, openai,
                      stub_deaths=args.stub_deaths)

    async def run() -> None:
        api = None
        if openai is not None:  # up before the guard listens: /v1 answers from the first request
            started = asyncio.Event()
            api = loop.create_task(_serve_openai(args.repository, args.openai_grpc, openai[1], started))
            await asyncio.wait({api, loop.create_task(started.wait())}, return_when=asyncio.FIRST_COMPLETED)
            if api.done():  # it could not start: the guard serves /v2 on, and says why /v1 is missing
                guard.openai = None
                print(f"the OpenAI-compatible API did not start: {api.exception()!r}", file=sys.stderr, flush=True)
        try:
            if args.metrics_listen is not None and args.metrics_upstream is not None:
                metrics = HttpGuard(args.metrics_listen, args.metrics_upstream, max_body_bytes=_SMALL_BODY)
                await asyncio.gather(guard.serve(), metrics.serve())
            else:
                await guard.serve()
        finally:  # a SIGTERM: the API shuts down too (its open requests answered, not cut)
            if api is not None and not api.done():
                api.cancel()
                await asyncio.wait({api})

    task = loop.create_task(run())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        loop.run_until_complete(task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
