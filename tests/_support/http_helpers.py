"""One JSON-over-HTTP call for the server tests (the OpenAI client hides status codes and raw bodies)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def request_json(url: str, *, method: str | None = None, body: bytes | None = None,
                 key: str | None = None) -> tuple[int, dict]:
    """``(HTTP status, decoded JSON body)``; POST when there is a body, GET otherwise, unless ``method`` says."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=body, headers=headers, method=method or ("POST" if body else "GET"))
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())
