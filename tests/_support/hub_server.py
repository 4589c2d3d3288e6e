"""A small Hugging Face Hub-compatible HTTP server for tests.

It implements the subset of the Hub HTTP API that the real ``huggingface_hub`` client uses to create
repos, commit files, manage branches and tags and download files, so tests can exercise the client
against 127.0.0.1 without network access. Storage is in memory. Every file is committed inline
(the preupload endpoint always answers ``uploadMode: "regular"``): there is no LFS and no Xet.

Usage::

    with LocalHub() as hub:
        HfApi(endpoint=hub.url).create_repo("org/model")
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = ["HubError", "LocalHub", "RecordedRequest"]

# URL segment ("/api/{segment}/..." and "/{segment}/{repo_id}/resolve/...") -> repo type.
_URL_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_WEB_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_DEFAULT_BRANCH = "main"
# The Hub seeds every new repo with a .gitattributes file; mimic it so code that lists repo files
# sees what it would see on the real Hub.
_GITATTRIBUTES = (
    b"*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n"
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
)
_HEX_REV = re.compile(r"[0-9a-f]{7,40}")
_PR_REF = re.compile(r"refs/pr/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _now() -> str:
    """Current UTC time in the Hub's ``%Y-%m-%dT%H:%M:%S.%fZ`` (milliseconds) format."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def git_blob_oid(content: bytes) -> str:
    """Git blob sha1, which is what the Hub reports as ``oid``/``ETag`` for non-LFS files."""
    return hashlib.sha1(b"blob %d\x00" % len(content) + content).hexdigest()


class HubError(Exception):
    """An HTTP error answered with the ``X-Error-Code`` header that ``huggingface_hub`` maps to exceptions."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body


@dataclass
class RecordedRequest:
    """One request received by the server (headers as sent, e.g. to check ``Authorization``)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    status: int = 0  # filled in once answered


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, str]  # path -> blob oid (full snapshot, so any old commit stays downloadable)
    title: str
    message: str
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[int, str] = field(default_factory=dict)


def _repo_not_found(repo_type: str, repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_type} {repo_id}", code="RepoNotFound")


def _revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


class _State:
    """Repos, commits and blobs, guarded by one lock (handlers run on several threads)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.commit_counter = 0

    # -- repos and revisions ---------------------------------------------------------------------

    def repo(self, repo_type: str, repo_id: str) -> _Repo:
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            raise _repo_not_found(repo_type, repo_id)
        return repo

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> bool:
        """Create a repo with an initial commit on ``main``; False if it already exists."""
        if (repo_type, repo_id) in self.repos:
            return False
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
        self.repos[(repo_type, repo_id)] = repo
        oid = self.new_commit(repo, None, {".gitattributes": self.put_blob(_GITATTRIBUTES)}, "initial commit")
        repo.branches[_DEFAULT_BRANCH] = oid
        return True

    def put_blob(self, content: bytes) -> str:
        oid = git_blob_oid(content)
        self.blobs[oid] = content
        return oid

    def new_commit(
        self, repo: _Repo, parent: str | None, files: dict[str, str], title: str, message: str = ""
    ) -> str:
        # A counter in the hashed text makes every commit unique (even an empty one) yet deterministic.
        self.commit_counter += 1
        tree = "\n".join(f"{path} {blob}" for path, blob in sorted(files.items()))
        text = f"{self.commit_counter}\n{repo.repo_type}/{repo.repo_id}\n{parent}\n{tree}\n{title}\n{message}"
        oid = hashlib.sha1(text.encode()).hexdigest()
        repo.commits[oid] = _Commit(oid, parent, dict(files), title, message, _now())
        return oid

    def resolve(self, repo: _Repo, revision: str) -> str | None:
        """Commit oid for a branch, tag, ``refs/...`` name, PR ref or (possibly short) commit sha."""
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision.startswith("refs/heads/"):
            return repo.branches.get(revision.removeprefix("refs/heads/"))
        if revision.startswith("refs/tags/"):
            return repo.tags.get(revision.removeprefix("refs/tags/"))
        if match := _PR_REF.fullmatch(revision):
            return repo.pulls.get(int(match[1]))
        if _HEX_REV.fullmatch(revision):
            matches = [oid for oid in repo.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return matches[0]
        return None

    def resolve_or_raise(self, repo: _Repo, revision: str) -> str:
        oid = self.resolve(repo, revision)
        if oid is None:
            raise _revision_not_found(revision)
        return oid

    def split_revision_and_path(self, repo: _Repo, segments: list[str]) -> tuple[str, str]:
        """Split raw URL segments into (commit oid, path).

        Clients quote the revision (``/`` becomes ``%2F``), but try every split point so an
        unquoted revision containing ``/`` (e.g. ``refs/pr/1``) resolves too.
        """
        for cut in range(1, len(segments) + 1):
            oid = self.resolve(repo, unquote("/".join(segments[:cut])))
            if oid is not None:
                return oid, unquote("/".join(segments[cut:]))
        raise _revision_not_found(unquote(segments[0]) if segments else "")

    def commit_target(self, repo: _Repo, revision: str) -> tuple[str, str | int]:
        """The ref a commit to ``revision`` moves: ("branch", name) or ("pr", number)."""
        name = revision.removeprefix("refs/heads/")
        if name in repo.branches:
            return "branch", name
        if (match := _PR_REF.fullmatch(revision)) and int(match[1]) in repo.pulls:
            return "pr", int(match[1])
        if self.resolve(repo, revision) is not None:
            raise HubError(400, f"Invalid rev id: {revision} is not a branch, commits must target a branch")
        raise _revision_not_found(revision)

    # -- trees -----------------------------------------------------------------------------------

    @staticmethod
    def subtree_oid(files: dict[str, str], directory: str) -> str | None:
        """A stable hash of a folder's content (None if the folder does not exist)."""
        prefix = directory + "/"
        items = sorted((path, blob) for path, blob in files.items() if path.startswith(prefix))
        if not items:
            return None
        return hashlib.sha1("\n".join(f"{p} {b}" for p, b in items).encode()).hexdigest()

    def last_commit(self, repo: _Repo, oid: str, path: str, is_dir: bool) -> dict[str, str]:
        """The oldest commit in the unbroken run of ancestors where ``path`` has its current content."""

        def state(commit: _Commit) -> str | None:
            return self.subtree_oid(commit.files, path) if is_dir else commit.files.get(path)

        commit = repo.commits[oid]
        current = state(commit)
        while commit.parent is not None and state(repo.commits[commit.parent]) == current:
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    def tree_entry(self, repo: _Repo, oid: str, path: str, expand: bool) -> dict[str, Any] | None:
        files = repo.commits[oid].files
        if path in files:
            entry: dict[str, Any] = {
                "type": "file",
                "oid": files[path],
                "size": len(self.blobs[files[path]]),
                "path": path,
            }
        elif (tree_oid := self.subtree_oid(files, path)) is not None:
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": path}
        else:
            return None
        if expand:
            entry["lastCommit"] = self.last_commit(repo, oid, path, is_dir=entry["type"] == "directory")
        return entry

    def list_tree(
        self, repo: _Repo, oid: str, path: str, recursive: bool, expand: bool
    ) -> list[dict[str, Any]]:
        files = repo.commits[oid].files
        path = path.strip("/")
        prefix = path + "/" if path else ""
        if path and self.subtree_oid(files, path) is None:
            raise HubError(
                404, f"Folder not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        paths: set[str] = set()
        for file_path in files:
            if not file_path.startswith(prefix):
                continue
            parts = file_path[len(prefix) :].split("/")
            depth = len(parts) if recursive else 1
            paths.update(prefix + "/".join(parts[: i + 1]) for i in range(depth))
        entries = [self.tree_entry(repo, oid, p, expand) for p in sorted(paths)]
        return [e for e in entries if e is not None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: LocalHub, host: str) -> None:
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__((host, 0), _Handler)


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keep-alive: the client pools connections, so a fresh TCP connect per request is wasted time.
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms each.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean (the default logs every request to stderr)."""

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.connections_lock:
                self.server.connections.discard(self.connection)

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def hub(self) -> LocalHub:
        return self.server.hub

    @property
    def state(self) -> _State:
        return self.server.hub._state

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # optional trailers
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self) -> None:
        body = self._read_body()
        path, _, query = self.path.partition("?")
        record = RecordedRequest(self.command, path, query, dict(self.headers.items()))
        self.hub.requests.append(record)
        state = self.state
        # The handler serves every request of a keep-alive connection: never reuse a previous response.
        self._response: tuple[int, dict[str, str], bytes] | None = None
        try:
            with state.lock:
                self._route(path.strip("/").split("/"), parse_qs(query), body)
            if self._response is None:
                raise RuntimeError(f"no response set for {self.command} {self.path}")
        except HubError as err:
            headers = {"X-Error-Message": " ".join(err.message.split()), **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send_json(err.body or {"error": err.message}, status=err.status, headers=headers)
        except Exception as exc:
            # A server bug: record it (hub.errors) and answer, rather than drop the connection.
            self.hub.errors.append(traceback.format_exc())
            self._send_json({"error": f"LocalHub internal error: {exc!r}"}, status=500)
        # Write outside the lock, so a slow reader does not stall every other request.
        assert self._response is not None
        status, headers, response_body = self._response
        record.status = status
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response_body)

    def _send(
        self,
        body: bytes,
        status: int = 200,
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Set the response; _dispatch writes it."""
        all_headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        self._response = (status, all_headers, body)

    def _send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(json.dumps(data).encode(), status=status, headers=headers)

    def _unsupported(self) -> HubError:
        return HubError(501, f"LocalHub does not implement {self.command} {self.path}")

    def _web_url(self, repo: _Repo) -> str:
        return f"{self.hub.url}/{_WEB_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- routing ---------------------------------------------------------------------------------

    def _route(self, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        method = self.command
        if segments[0] == "api":
            self._route_api(method, segments[1:], query, body)
            return
        # File downloads: /{ns}/{name}/resolve/{rev}/{path} or /{datasets|spaces}/{ns}/{name}/resolve/...
        if len(segments) >= 4 and segments[2] == "resolve":
            repo_type, rest = "model", segments
        elif len(segments) >= 5 and segments[0] in _URL_REPO_TYPES and segments[3] == "resolve":
            repo_type, rest = _URL_REPO_TYPES[segments[0]], segments[1:]
        else:
            raise self._unsupported()
        if method not in ("GET", "HEAD"):
            raise self._unsupported()
        repo = self.state.repo(repo_type, f"{unquote(rest[0])}/{unquote(rest[1])}")
        self._resolve_file(repo, rest[3:])

    def _route_api(self, method: str, segments: list[str], query: dict[str, list[str]], body: bytes) -> None:
        match (method, segments):
            case ("GET", ["whoami-v2"]):
                self._whoami()
            case ("POST", ["validate-yaml"]):
                self._send_json({"errors": [], "warnings": []})
            case ("POST", ["repos", "create"]):
                self._create_repo(json.loads(body or b"{}"))
            case ("DELETE", ["repos", "delete"]):
                payload = json.loads(body or b"{}")
                repo_type, repo_id = self._repo_from_payload(payload)
                self.state.repo(repo_type, repo_id)
                del self.state.repos[(repo_type, repo_id)]
                self._send_json({})
            case (_, [kind, namespace, name, *rest]) if kind in _URL_REPO_TYPES:
                repo = self.state.repo(_URL_REPO_TYPES[kind], f"{unquote(namespace)}/{unquote(name)}")
                self._route_repo(method, repo, rest, query, body)
            case _:
                raise self._unsupported()

    def _route_repo(
        self, method: str, repo: _Repo, rest: list[str], query: dict[str, list[str]], body: bytes
    ) -> None:
        action, args = (rest[0], rest[1:]) if rest else ("", [])
        revision = unquote("/".join(args)) if args else _DEFAULT_BRANCH

        def flag(name: str) -> bool:
            return query.get(name, ["false"])[-1].lower() in ("1", "true")

        match (method, action):
            case ("GET", "") | ("GET", "revision"):
                self._repo_info(repo, revision, files_metadata=flag("blobs"))
            case ("GET", "tree"):
                oid, path = self.state.split_revision_and_path(repo, args or [_DEFAULT_BRANCH])
                self._send_json(self.state.list_tree(repo, oid, path, flag("recursive"), flag("expand")))
            case ("POST", "paths-info"):
                self._paths_info(repo, revision, parse_qs(body.decode()))
            case ("GET", "refs"):
                self._refs(repo)
            case ("GET", "commits"):
                self._list_commits(repo, revision)
            case ("POST", "preupload"):
                self._preupload(repo, revision, json.loads(body or b"{}"))
            case ("POST", "commit"):
                self._commit(repo, revision, body, create_pr=flag("create_pr"))
            case ("POST", "branch"):
                self._create_branch(repo, revision, json.loads(body or b"{}"))
            case ("DELETE", "branch"):
                self._delete_ref(repo, revision, repo.branches, "Branch")
            case ("POST", "tag"):
                self._create_tag(repo, revision, json.loads(body or b"{}"))
            case ("DELETE", "tag"):
                self._delete_ref(repo, revision, repo.tags, "Tag")
            case _:
                raise self._unsupported()

    # -- endpoints -------------------------------------------------------------------------------

    def _whoami(self) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "Invalid credentials in Authorization header")
        user = self.state.user
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}},
            }
        )

    def _repo_from_payload(self, payload: dict[str, Any]) -> tuple[str, str]:
        repo_type = payload.get("type") or "model"
        if repo_type not in _WEB_PREFIXES:
            raise HubError(400, f"Unsupported repo type: {repo_type}")
        # Like the Hub, a repo created without an organization goes to the caller's namespace.
        namespace = payload.get("organization") or self.state.user
        return repo_type, f"{namespace}/{payload['name']}"

    def _create_repo(self, payload: dict[str, Any]) -> None:
        repo_type, repo_id = self._repo_from_payload(payload)
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        created = self.state.create_repo(repo_type, repo_id, private)
        url = self._web_url(self.state.repo(repo_type, repo_id))
        if not created:
            # `create_repo(exist_ok=True)` reads "url" from this 409 body.
            raise HubError(
                409, f"You already created this {repo_type} repo", body={"error": "exists", "url": url}
            )
        self._send_json({"url": url, "name": repo_id})

    def _repo_info(self, repo: _Repo, revision: str, files_metadata: bool) -> None:
        oid = self.state.resolve_or_raise(repo, revision)
        commit = repo.commits[oid]
        siblings = []
        for path, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if files_metadata:
                sibling.update(size=len(self.state.blobs[blob]), blobId=blob)
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(self.state.blobs[b]) for b in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
        self._send_json(info)

    def _paths_info(self, repo: _Repo, revision: str, form: dict[str, list[str]]) -> None:
        oid = self.state.resolve_or_raise(repo, revision)
        expand = form.get("expand", ["false"])[-1].lower() == "true"
        entries = [self.state.tree_entry(repo, oid, p.strip("/"), expand) for p in form.get("paths", [])]
        self._send_json([e for e in entries if e is not None])

    def _refs(self, repo: _Repo) -> None:
        def refs(items: dict[Any, str], prefix: str) -> list[dict[str, str]]:
            return [
                {"name": str(name), "ref": f"{prefix}{name}", "targetCommit": oid}
                for name, oid in sorted(items.items())
            ]

        self._send_json(
            {
                "branches": refs(repo.branches, "refs/heads/"),
                "converts": [],
                "tags": refs(repo.tags, "refs/tags/"),
                "pullRequests": refs(repo.pulls, "refs/pr/"),
            }
        )

    def _list_commits(self, repo: _Repo, revision: str) -> None:
        oid: str | None = self.state.resolve_or_raise(repo, revision)
        history = []
        while oid is not None:
            commit = repo.commits[oid]
            history.append(
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": [{"user": self.state.user}],
                    "date": commit.date,
                }
            )
            oid = commit.parent
        self._send_json(history)

    def _preupload(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> None:
        self.state.commit_target(repo, revision)
        head = self.state.resolve_or_raise(repo, revision)
        files = repo.commits[head].files
        self._send_json(
            {
                # Always "regular": contents then arrive base64-encoded in the commit payload.
                "files": [
                    {
                        "path": f["path"],
                        "uploadMode": "regular",
                        "shouldIgnore": False,
                        "oid": files.get(f["path"]),
                    }
                    for f in payload.get("files", [])
                ],
                "commitOid": head,
            }
        )

    def _commit(self, repo: _Repo, revision: str, body: bytes, create_pr: bool) -> None:
        kind, target = self.state.commit_target(repo, revision)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise HubError(400, "Commit payload must start with a header holding a summary")
        base = self.state.resolve_or_raise(repo, revision)
        parent_commit = header.get("parentCommit")
        if parent_commit and not base.startswith(parent_commit):
            raise HubError(412, f"A commit has happened since. Parent commit {parent_commit} is not {base}")

        files = dict(repo.commits[base].files)
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                content = value["content"]
                if value.get("encoding") == "base64":
                    data = base64.b64decode(content)
                else:
                    data = content.encode()
                files[value["path"]] = self.state.put_blob(data)
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(
                        404, f"A file with this name doesn't exist: {value['path']}", code="EntryNotFound"
                    )
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                doomed = [p for p in files if p.startswith(prefix)]
                if not doomed:
                    raise HubError(
                        404, f"A folder with this name doesn't exist: {value['path']}", code="EntryNotFound"
                    )
                for p in doomed:
                    del files[p]
            elif key == "lfsFile":
                raise HubError(400, "LocalHub stores files inline only: LFS/Xet uploads are not supported")
            elif key != "header":
                raise HubError(400, f"Unknown commit operation: {key}")

        oid = self.state.new_commit(repo, base, files, header["summary"], header.get("description", ""))
        pr_url = None
        if create_pr:
            number = max(repo.pulls, default=0) + 1
            repo.pulls[number] = oid
            pr_url = f"{self._web_url(repo)}/discussions/{number}"
        elif kind == "pr":
            repo.pulls[int(target)] = oid
        else:
            repo.branches[str(target)] = oid
        self._send_json(
            {
                "success": True,
                "commitOid": oid,
                "commitUrl": f"{self._web_url(repo)}/commit/{oid}",
                "commitMessage": header["summary"],
                "hookOutput": "",
                "pullRequestUrl": pr_url,
            }
        )

    def _create_branch(self, repo: _Repo, branch: str, payload: dict[str, Any]) -> None:
        if branch.startswith("refs/"):
            raise HubError(400, f"Invalid branch name: {branch}")
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = payload.get("startingPoint") or _DEFAULT_BRANCH
        repo.branches[branch] = self.state.resolve_or_raise(repo, start)
        self._send_json({})

    def _create_tag(self, repo: _Repo, revision: str, payload: dict[str, Any]) -> None:
        oid = self.state.resolve_or_raise(repo, revision)
        tag = payload.get("tag") or ""
        if not tag or tag.startswith("refs/"):
            raise HubError(400, f"Invalid tag name: {tag!r}")
        if tag in repo.tags:
            raise HubError(409, f"Reference already exists: refs/tags/{tag}")
        repo.tags[tag] = oid
        self._send_json({})

    def _delete_ref(self, repo: _Repo, name: str, refs: dict[str, str], kind: str) -> None:
        if refs is repo.branches and name == _DEFAULT_BRANCH:
            raise HubError(403, "Cannot delete the default branch")
        if refs.pop(name, None) is None:
            raise HubError(404, f"{kind} not found: {name}", code="RevisionNotFound")
        self._send_json({})

    def _resolve_file(self, repo: _Repo, segments: list[str]) -> None:
        oid, path = self.state.split_revision_and_path(repo, segments)
        blob = repo.commits[oid].files.get(path)
        if blob is None:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": oid}
            )
        data = self.state.blobs[blob]
        headers = {"X-Repo-Commit": oid, "ETag": f'"{blob}"', "Accept-Ranges": "bytes"}
        status = 200
        match = _RANGE.fullmatch(self.headers.get("Range", "").strip())
        if self.command == "GET" and match and (match[1] or match[2]):
            total = len(data)
            if match[1]:
                start, end = int(match[1]), min(int(match[2]) if match[2] else total - 1, total - 1)
            else:  # suffix range: the last N bytes
                start, end = max(total - int(match[2]), 0), total - 1
            if start > end:
                raise HubError(
                    416, "Requested range not satisfiable", headers={"Content-Range": f"bytes */{total}"}
                )
            data, status = data[start : end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        self._send(data, status=status, headers=headers, content_type="application/octet-stream")


class LocalHub:
    """In-memory Hub server on 127.0.0.1 (OS-chosen port); a context manager, or call start()/stop()."""

    def __init__(self, user: str = "user", host: str = "127.0.0.1") -> None:
        self.user = user
        self.host = host
        self.requests: list[RecordedRequest] = []
        self.errors: list[str] = []  # tracebacks of server-side bugs (answered as HTTP 500)
        self._state = _State(user)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalHub is not running; call start() first")
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> LocalHub:
        if self._server is None:
            self._server = _Server(self, self.host)
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name="LocalHub",
                daemon=True,
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        # Pooled keep-alive connections keep handler threads blocked on read: close them explicitly.
        with server.connections_lock:
            for conn in list(server.connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        server.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers for tests -----------------------------------------------------------------------

    def reset(self) -> None:
        """Forget every repo and recorded request."""
        with self._state.lock:
            self._state = _State(self.user)
        self.requests.clear()
        self.errors.clear()

    @property
    def authorizations(self) -> list[str]:
        """``Authorization`` header values received so far (in order; requests without one are skipped)."""
        return [r.headers[k] for r in self.requests for k in r.headers if k.lower() == "authorization"]

    def files(
        self, repo_id: str, revision: str = _DEFAULT_BRANCH, repo_type: str = "model"
    ) -> dict[str, bytes]:
        """Server-side view of a repo at a revision: path -> content."""
        with self._state.lock:
            repo = self._state.repo(repo_type, repo_id)
            oid = self._state.resolve_or_raise(repo, revision)
            return {path: self._state.blobs[blob] for path, blob in repo.commits[oid].files.items()}

    def create_repo(self, repo_id: str, repo_type: str = "model", private: bool = False) -> None:
        """Create a repo server-side (no-op if it exists), like the Hub: one commit holding .gitattributes."""
        with self._state.lock:
            self._state.create_repo(repo_type, repo_id, private)

    def commit(
        self,
        repo_id: str,
        files: dict[str, bytes],
        branch: str = _DEFAULT_BRANCH,
        message: str = "server-side commit",
        repo_type: str = "model",
    ) -> str:
        """Commit ``files`` (path -> content) server-side on top of ``branch`` (created from main if new)."""
        with self._state.lock:
            repo = self._state.repo(repo_type, repo_id)
            base = repo.branches.get(branch) or repo.branches[_DEFAULT_BRANCH]
            tree = dict(repo.commits[base].files)
            tree.update({path: self._state.put_blob(content) for path, content in files.items()})
            repo.branches[branch] = self._state.new_commit(repo, base, tree, message)
            return repo.branches[branch]
