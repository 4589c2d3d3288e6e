"""The request-body limit: a body over ``max_body_bytes`` is answered with 413 before anything parses it.

A declared ``Content-Length`` over the limit is refused before a byte of the body is read; a body sent without
one (chunked) is counted as it arrives and refused as soon as it passes the limit, so neither is ever held
whole in memory.
"""

from __future__ import annotations

from fastapi import HTTPException

from .errors import error_response

DEFAULT_MAX_BODY_BYTES = 16 * 2**20


class BodyTooLarge(HTTPException):
    """A request body over the limit (raised while the body is being received; answered with 413)."""

    def __init__(self, limit: int):
        super().__init__(413, too_large_message(limit))


def too_large_message(limit: int) -> str:
    return (f"The request body is larger than this server's limit of {limit} bytes; send a smaller request "
            "(the server's operator sets the limit with --max-body-bytes).")


class BodyLimitMiddleware:
    """ASGI middleware that enforces ``limit`` on the body of every HTTP request."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error_response(413, too_large_message(self.limit), "invalid_request_error",
                                      "request_too_large")
            return await response(scope, receive, send)
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)  # FastAPI re-raises HTTPExceptions met while reading a body
            return message

        return await self.app(scope, counted, send)
