"""No placeholder URL or invented address anywhere in the repository.

hf_delta has no public code host or website of its own, so a link to one (a ``github.com/<org>/hf_delta``
style URL, a raw file URL, an ``example.com`` address, an e-mail address) is made up and breaks where it is
used (a Space built from it fails to install). Files link to each other by relative paths. Every web URL must
be local (a server this code starts) or on ``REAL_URLS``, each checked by hand to exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent

# URL prefixes that were checked to exist (add one only after opening it).
REAL_URLS = ("https://docs.ray.io/en/latest/serve/",)
LOCAL_HOSTS = {"127.0.0.1", "localhost", "0.0.0.0"}

URL = re.compile(r"\b(?:git\+)?(?:https?|ssh|ftp)://[^\s)\]>\"'`]+")
PLACEHOLDERS = re.compile(
    r"\bexample\.(?:com|org|net)\b|\bgithub\.com/|\bgithubusercontent\.com\b|\bgitlab\.com/"
    r"|<(?:org|user|username|owner)>|\byour[-_](?:org|user(?:name)?|repo)\b",
    re.IGNORECASE,
)
EMAIL = re.compile(r"\b[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
# Folders that are not the project's (environments, caches, build outputs) when there is no git to ask.
_SKIP = {".git", ".venv", "build", "dist", ".pytest_cache", ".ruff_cache", ".hypothesis", "__pycache__"}


def _files() -> list[Path]:
    done = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if done.returncode == 0 and done.stdout:
        paths = [ROOT / p for p in done.stdout.decode().split("\0") if p]
    else:  # an exported tree without .git
        paths = [p for p in ROOT.rglob("*") if not _SKIP & set(p.relative_to(ROOT).parts)]
    return [p for p in paths if p.is_file() and p != Path(__file__).resolve()]


def _text(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (images)
    return data.decode("utf-8", errors="replace")


def _url_is_fine(url: str) -> bool:
    # A host filled in at run time (f-string or %-format) is whatever the code serves on.
    if url.startswith(REAL_URLS) or url.split("://", 1)[1].startswith(("{", "%s")):
        return True
    return urlsplit(url.removeprefix("git+")).hostname in LOCAL_HOSTS


def find_placeholders(files: list[Path], root: Path = ROOT) -> list[str]:
    """``path:line: text`` (path relative to ``root``) for every made-up or unverified address in ``files``."""
    found = []
    for path in files:
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            bad = [u for u in URL.findall(line) if not _url_is_fine(u)]
            bad += [m.group(0) for m in PLACEHOLDERS.finditer(line)] + EMAIL.findall(line)
            for item in dict.fromkeys(bad):
                found.append(f"{path.relative_to(root)}:{number}: {item}")
    return found


def test_the_repository_has_no_placeholder_url_or_invented_address():
    problems = find_placeholders(_files())
    assert not problems, (
        "Made-up or unverified addresses (use repo-relative links; add a real URL to REAL_URLS only after "
        "opening it):\n" + "\n".join(problems)
    )


def test_the_check_finds_the_kinds_it_is_meant_to(tmp_path):
    sample = tmp_path / "sample.md"
    lines = [
        "hf_delta[demo] @ git+https://" + "github.com/some-org/hf_delta",
        "![shot](https://raw." + "githubusercontent.com/some-org/hf_delta/main/docs/images/space.png)",
        "see https://docs." + "example.com/page and contact team@" + "hf-delta.dev",
        "served on http://127.0.0.1:7860 and http://{host}:{port}/v1 and http://%s:%d/v1",
        "ray: https://docs.ray.io/en/latest/serve/ and the delta org/math-delta@v2",
        "unverified: https://huggingface.co/spaces/someone/hf-delta",
    ]
    sample.write_text("\n".join(lines) + "\n")
    found = [line.split(": ", 1)[1] for line in find_placeholders([sample], tmp_path)]
    assert found == [
        "git+https://" + "github.com/some-org/hf_delta",
        "github.com/",
        "https://raw." + "githubusercontent.com/some-org/hf_delta/main/docs/images/space.png",
        "githubusercontent.com",
        "https://docs." + "example.com/page",
        "example.com",
        "team@" + "hf-delta.dev",
        "https://huggingface.co/spaces/someone/hf-delta",
    ]
