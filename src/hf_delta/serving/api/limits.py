"""The request-body limit: a body over ``max_body_bytes`` is answered with 413 before anything parses it.

A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a body sent without
one (chunked) is counted as it arrives and refused as soon as it passes the limit, so neither is ever held
whole in memory.
"""

from __future__ import annotations

from .errors import error_response

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


def too_large_message(limit: int) -> str:
    return (f"The request body is larger than this server's limit of {limit} bytes; send a smaller request "
            "(the server's operator sets the limit with --max-body-bytes).")


class BodyLimitMiddleware:
    """ASGI middleware that enforces ``limit`` on the body of every HTTP request.

    When a body without a declared length passes the limit, this middleware sends the 413 itself and tells the
    app the client is gone (whatever the app answers then is dropped), so no inner middleware or framework
    version can turn the refusal into another status.
    """

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def _refuse(self, scope, receive, send) -> None:
        response = error_response(413, too_large_message(self.limit), "invalid_request_error", "request_too_large")
        await response(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send)
        received = 0
        refused = False

        async def counted():
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    refused = True
                    await self._refuse(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, counted, unless_refused)
        except Exception:
            if not refused:  # after a refusal the app fails on the "disconnect": the client has its answer
                raise


async def read_body(request, limit: int) -> bytes | None:
    """The body of a Starlette ``request``, or None as soon as it passes ``limit`` bytes (for ingresses that read
    bodies themselves, e.g. the Ray router)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        return None
    parts, size = [], 0
    async for part in request.stream():
        size += len(part)
        if size > limit:
            return None
        parts.append(part)
    return b"".join(parts)
