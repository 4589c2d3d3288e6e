"""OpenAI-style error answers and API-key checks shared by the app, its routers and the Ray ingress.

Errors use OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: unknown model → 404 (the message
lists the served ones), prompt/context/``max_tokens`` limits, unsupported options and unknown fields → 400,
malformed JSON or wrong types → 422, missing/wrong API key → 401, a body over the size limit → 413, a delta
whose repo cannot be loaded → 500 for its own requests only. No message names a path on the server: every one
goes through ``scrub_paths``.
"""

from __future__ import annotations

import json
import logging
import re
import secrets

from fastapi.responses import JSONResponse

from ...errors import DeltaLoadError, DeltaNotFoundError, InvalidRequestError

logger = logging.getLogger("hf_delta.serving.api")
SSE_DONE = "data: [DONE]\n\n"  # the closing event of every stream

# An absolute POSIX path of two or more parts (not inside a URL: no word character, '.', ':' or '/' right before
# it), or a Windows drive path. Its last part stays: it names the file, not where the server keeps it.
_PATH = re.compile(r"(?<![\w.:/~])(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'\"<>|,;()\[\]{}]+)+[/\\]"
                   r"(?=[^\s/\\'\"<>|,;()\[\]{}]*)")


def scrub_paths(message: str) -> str:
    """``message`` with every absolute path on the server reduced to its last part (``/srv/ft/job/a.jsonl`` →
    ``a.jsonl``): error answers must not show clients where the server keeps its files."""
    return _PATH.sub("", message)


def error_response(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    """An OpenAI-style error answer (paths on the server scrubbed from ``message``)."""
    return JSONResponse({"error": {"message": scrub_paths(message), "type": kind, "param": None, "code": code}},
                        status_code=status)


def from_exception(err: BaseException) -> JSONResponse:
    """The answer to a request that raised ``err``."""
    if isinstance(err, DeltaNotFoundError):
        return error_response(404, str(err), "invalid_request_error", "model_not_found")
    if isinstance(err, InvalidRequestError):
        return error_response(400, str(err), "invalid_request_error")
    if isinstance(err, DeltaLoadError):
        return error_response(500, str(err), "delta_load_error")
    logger.error("Request failed: %r", err)
    return error_response(500, f"The request failed: {err}", "server_error")


def error_event(err: BaseException) -> str:
    """The SSE event that ends a stream which failed after its first chunk."""
    kind = "delta_load_error" if isinstance(err, DeltaLoadError) else "server_error"
    error = {"message": scrub_paths(str(err)), "type": kind, "param": None, "code": None}
    return f"data: {json.dumps({'error': error})}\n\n"


def authorized(authorization: str, api_key: str | None) -> bool:
    """Whether an ``Authorization`` header value carries ``api_key`` (always true when no key is set)."""
    return not api_key or secrets.compare_digest(authorization.encode(), f"Bearer {api_key}".encode())


def unauthorized() -> JSONResponse:
    """The 401 answer to a request without the right API key."""
    return error_response(401, "Invalid or missing API key: send 'Authorization: Bearer <key>'.",
                          "invalid_request_error", "invalid_api_key")
