"""What stands between the network and the model: bounds on connections, time and bytes.

    ConnectionGuard   uvicorn's h11 protocol, plus: a connection must send a request's headers
                      within `read_timeout` of opening (or of its previous response) or it is
                      closed, and past `max_connections` the connection idle the longest is shed
                      first, so slow or half-sent requests cannot starve /health or real clients.
    RequestGuard      ASGI middleware: the API key (GET /health and /metrics may go without), then
                      the body, counted as it arrives (not as Content-Length claims) and cut off at
                      `max_body_bytes` (413) or when it does not arrive within `read_timeout` (408).
                      A request that carries both Content-Length and Transfer-Encoding is refused
                      (400): the two can disagree.

Imports no torch.
"""

from __future__ import annotations

import asyncio
import hmac
import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    """An error in the shape OpenAI's API uses."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class ConnectionGuard(H11Protocol):
    """uvicorn's h11 protocol with a deadline for request headers and a cap on open connections."""

    read_timeout: float = 15.0
    max_connections: int = 512

    @classmethod
    def configured(cls, read_timeout: float, max_connections: int) -> type[ConnectionGuard]:
        """A subclass with these limits, to hand to uvicorn as its `http` protocol class."""
        return type(cls.__name__, (cls,), {"read_timeout": read_timeout, "max_connections": max_connections})

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._last_active = self.loop.time()
        self._arm()
        if len(self.connections) > self.max_connections:
            self._shed()

    def data_received(self, data: bytes) -> None:
        self._last_active = self.loop.time()
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._last_active = self.loop.time()
        self._arm()  # the next request's headers are due within read_timeout too

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _waiting_for_headers(self) -> bool:
        return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

    def _arm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.read_timeout, self._header_deadline)

    def _header_deadline(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers():
            self.transport.close()

    def _shed(self) -> None:
        """Over the cap: close the connection that has waited longest without sending a request;
        if every other connection is busy with a request, refuse this new one."""
        idle = [c for c in self.connections if c is not self and isinstance(c, ConnectionGuard)
                and c._waiting_for_headers()]
        victim = min(idle, key=lambda c: c._last_active) if idle else self
        victim.transport.close()


class RequestGuard:
    """ASGI middleware: authenticate, then read the body within bounds and hand it on whole."""

    def __init__(self, app, max_body_bytes: int, read_timeout: float, api_key: str | None = None,
                 open_paths: frozenset[str] | set[str] = frozenset()):
        self.app, self.max_body_bytes, self.read_timeout, self.api_key = app, max_body_bytes, read_timeout, api_key
        self.open_paths = frozenset(open_paths)  # GET paths that need no key; one ending in / opens its folder

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        keyless = scope["method"] == "GET" and (path in self.open_paths or any(
            p.endswith("/") and p != "/" and path.startswith(p) for p in self.open_paths))
        if self.api_key is not None and not keyless:
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                return await _reply(send, 401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                                    kind="authentication_error", code="invalid_api_key")
        length = headers.get("content-length")
        if length is not None and "transfer-encoding" in headers:
            return await _reply(send, 400, "send either Content-Length or Transfer-Encoding, not both")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        body, status = await self._read_body(receive)
        if status == 413:
            return await _reply(send, 413, f"request body over {self.max_body_bytes} bytes")
        if status == 408:
            return await _reply(send, 408, f"the request body did not arrive within {self.read_timeout:g} s")
        if status == 499:  # the client went away while sending
            return None
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later calls wait for the disconnect, as the app expects

        return await self.app(scope, replay, send)

    async def _read_body(self, receive) -> tuple[bytes, int]:
        """(body, 0), or (b"", status) when it is too large, too slow, or abandoned."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), timeout=max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return b"", 408
            if message["type"] == "http.disconnect":
                return b"", 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:  # counted as received: chunked bodies claim no length
                return b"", 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), 0


async def _reply(send, status: int, message: str, kind: str = "invalid_request_error",
                 code: str | None = None) -> None:
    body = json.dumps(error_body(message, kind, None, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status in (400, 408, 413):  # the rest of the request may still be on the wire: do not read it
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
