"""The LocalHub test server speaks enough of the Hub API for the real ``huggingface_hub`` client."""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hub_server import LocalHub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

CONFIG = b'{"hidden_size": 8}\n'
WEIGHTS = random.Random(0).randbytes(100_000)  # binary, not valid UTF-8
SHA = re.compile(r"[0-9a-f]{40}")
pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("hub_errors_fail")]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_bytes(CONFIG)
    (folder / "sub" / "weights.bin").write_bytes(WEIGHTS)
    return folder


def _upload(api: HfApi, repo_id: str, folder: Path, **kwargs) -> str:
    return api.upload_folder(repo_id=repo_id, folder_path=folder, **kwargs).oid


def test_create_repo_upload_folder_and_info(hub: LocalHub, repo_id: str, model_dir: Path) -> None:
    api = HfApi(token="hf_local_test_token")
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    assert url.startswith(hub.url)
    api.create_repo(repo_id, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo(repo_id)
    assert excinfo.value.response.status_code == 409

    oid = _upload(api, repo_id, model_dir)

    assert SHA.fullmatch(oid)
    assert api.list_repo_files(repo_id) == [".gitattributes", "config.json", "sub/weights.bin"]
    info = api.model_info(repo_id, files_metadata=True)
    assert info.sha == oid == api.repo_info(repo_id).sha
    assert {s.rfilename: s.size for s in info.siblings}["sub/weights.bin"] == len(WEIGHTS)
    assert api.file_exists(repo_id, "sub/weights.bin")
    assert not api.file_exists(repo_id, "missing.bin")
    assert hub.files(repo_id)["sub/weights.bin"] == WEIGHTS
    assert "Bearer hf_local_test_token" in hub.authorizations


def test_download_by_branch_tag_and_commit_sha(
    hub: LocalHub, repo_id: str, model_dir: Path, hub_cache: Path
) -> None:
    api = HfApi()
    api.create_repo(repo_id)
    v1 = _upload(api, repo_id, model_dir)
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    dev = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd("config.json", b'{"hidden_size": 16}\n'),
            CommitOperationDelete("sub/weights.bin"),
        ],
        commit_message="dev change",
        revision="dev",
    ).oid
    (model_dir / "config.json").write_bytes(b'{"hidden_size": 32}\n')
    v2 = _upload(api, repo_id, model_dir)
    assert len({v1, dev, v2}) == 3

    def config(revision: str) -> bytes:
        return Path(hf_hub_download(repo_id, "config.json", revision=revision)).read_bytes()

    assert config("main") == b'{"hidden_size": 32}\n'
    assert config("dev") == b'{"hidden_size": 16}\n'
    assert config("v1") == CONFIG
    assert config(v1) == CONFIG
    assert config(v1[:10]) == CONFIG
    weights = hf_hub_download(repo_id, "sub/weights.bin", revision="v1")
    assert Path(weights).read_bytes() == WEIGHTS
    assert Path(weights).is_relative_to(hub_cache)  # hub_cache is the default cache
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "sub/weights.bin", revision="dev")
    assert api.list_repo_refs(repo_id).tags[0].target_commit == v1
    assert [c.commit_id for c in api.list_repo_commits(repo_id, revision="dev")][:2] == [dev, v1]


def test_snapshot_download(hub: LocalHub, repo_id: str, model_dir: Path, hub_cache: Path) -> None:
    api = HfApi()
    api.create_repo(repo_id)
    v1 = _upload(api, repo_id, model_dir)
    api.create_tag(repo_id, tag="v1")
    api.upload_file(path_or_fileobj=b"new", path_in_repo="extra.txt", repo_id=repo_id)

    for revision in ("v1", v1):
        folder = Path(snapshot_download(repo_id, revision=revision))
        assert folder.name == v1
        assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) == [
            ".gitattributes",
            "config.json",
            "sub/weights.bin",
        ]
        assert (folder / "sub" / "weights.bin").read_bytes() == WEIGHTS
    latest = Path(snapshot_download(repo_id, allow_patterns=["*.txt"]))
    assert [p.name for p in latest.iterdir()] == ["extra.txt"]


def test_cached_files_load_offline_without_the_server(
    hub: LocalHub, hub_cache: Path, hf_offline: Callable[[], None]
) -> None:
    # A private server, seeded server-side, so this test can stop it and prove nothing is fetched afterwards.
    with LocalHub() as private_hub:
        private_hub.create_repo("org/offline")
        private_hub.commit("org/offline", {"config.json": CONFIG, "sub/weights.bin": WEIGHTS})
        private_hub.commit("org/offline", {"config.json": b"{}"}, branch="dev")
        snapshot = snapshot_download("org/offline", endpoint=private_hub.url)
        dev_config = hf_hub_download("org/offline", "config.json", revision="dev", endpoint=private_hub.url)

    assert Path(hf_hub_download("org/offline", "config.json", local_files_only=True)).read_bytes() == CONFIG
    hf_offline()
    assert constants.HF_HUB_OFFLINE
    assert snapshot_download("org/offline") == snapshot
    assert Path(hf_hub_download("org/offline", "config.json", revision="dev")).read_bytes() == b"{}"
    assert hf_hub_download("org/offline", "config.json", revision="dev") == dev_config
    assert Path(hf_hub_download("org/offline", "sub/weights.bin")).read_bytes() == WEIGHTS
    with pytest.raises(LocalEntryNotFoundError):
        hf_hub_download("org/offline", "never-downloaded.txt")


def test_not_found_errors(hub: LocalHub, repo_id: str, model_dir: Path, hub_cache: Path) -> None:
    api = HfApi()
    api.create_repo(repo_id)
    _upload(api, repo_id, model_dir)

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/no-such-repo", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/no-such-repo")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("org/no-such-repo")

    with pytest.raises(EntryNotFoundError) as excinfo:
        hf_hub_download(repo_id, "missing.bin")
    # LocalEntryNotFoundError is an EntryNotFoundError too: make sure this one came from the server.
    assert isinstance(excinfo.value, HfHubHTTPError)
    assert excinfo.value.response.status_code == 404

    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        snapshot_download(repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(
            path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id, revision="no-such-branch"
        )


def test_pull_request_and_deletions(hub: LocalHub, repo_id: str, model_dir: Path, hub_cache: Path) -> None:
    api = HfApi()
    api.create_repo(repo_id)
    main = _upload(api, repo_id, model_dir)
    pr = api.create_commit(
        repo_id,
        operations=[CommitOperationDelete("sub/", is_folder=True)],
        commit_message="drop weights",
        create_pr=True,
    )
    assert pr.pr_revision == "refs/pr/1"
    assert api.list_repo_files(repo_id, revision=pr.pr_revision) == [".gitattributes", "config.json"]
    assert api.model_info(repo_id).sha == main  # a PR leaves main alone
    assert Path(hf_hub_download(repo_id, "config.json", revision=pr.pr_revision)).read_bytes() == CONFIG
