"""Delta repos on a (local) Hub: push, load by id / revision / from the cache, tokens, model cards, errors."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import HfApi, ModelCard, snapshot_download

from hf_delta import BitDeltaConfig, DeltaModel, compress
from hf_delta.errors import BaseModelMismatchError, DeltaFormatError
from hf_delta.hub import push_delta_to_hub
from hf_delta.storage import Delta

pytestmark = [pytest.mark.hub, pytest.mark.usefixtures("torch_one_thread", "hub_errors_fail")]


def _tensors_equal(a: Delta, b: Delta) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def _push_folder(folder: Path, repo_id: str, **kwargs) -> str:
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    if kwargs.get("revision"):
        api.create_branch(repo_id, branch=kwargs["revision"], exist_ok=True)
    return api.upload_folder(folder_path=folder, repo_id=repo_id, **kwargs).oid


def _local(micro_delta, name: str) -> Delta:
    return Delta.from_folder(micro_delta(name))


# ------------------------------------------------------------------------------------------------ push + load
def test_push_then_load_by_repo_id(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    model = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, micro_delta("llama-arith"))
    sha = model.push_to_hub(repo_id)
    assert re.fullmatch(r"[0-9a-f]{40}", sha)
    files = hub.files(repo_id)
    assert {"delta_config.json", "delta_model.safetensors", "README.md"} <= files.keys()
    assert not any(name.startswith("tokenizer") for name in files)  # arith keeps the base's tokenizer
    loaded = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id, "arith")
    assert loaded.list_deltas() == ["arith"]
    assert _tensors_equal(loaded.get_delta("arith"), _local(micro_delta, "llama-arith"))
    assert any(hub_cache.rglob("delta_model.safetensors"))  # went through the hub cache
    ids = torch.tensor([[5, 60, 7, 80, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_chat_delta_carries_its_tokenizer_through_the_hub(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    from transformers import AutoTokenizer

    push_delta_to_hub(_local(micro_delta, "llama-chat"), repo_id, commit_message="chat delta")
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= hub.files(repo_id).keys()
    folder = snapshot_download(repo_id)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == len(AutoTokenizer.from_pretrained(micro_zoo["llama-chat"].path)) == 387
    model = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id)
    assert model.get_delta("default").files.keys() >= {"tokenizer.json", "generation_config.json"}


def test_load_by_branch_and_by_older_commit(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    base = micro_zoo["llama-base"].path
    first = push_delta_to_hub(_local(micro_delta, "llama-arith"), repo_id)
    push_delta_to_hub(_local(micro_delta, "llama-cipher"), repo_id, revision="v2")
    push_delta_to_hub(_local(micro_delta, "llama-facts"), repo_id)
    cases = {None: "llama-facts", "main": "llama-facts", "v2": "llama-cipher", first: "llama-arith"}
    for revision, name in cases.items():
        model = DeltaModel.from_pretrained(base, repo_id, revision=revision)
        assert _tensors_equal(model.get_delta("default"), _local(micro_delta, name)), revision
    with pytest.raises(DeltaFormatError, match=r"Revision 'v3' of delta repo .* does not exist"):
        DeltaModel.from_pretrained(base, repo_id, revision="v3")


# ------------------------------------------------------------------------------------------ cache and offline
def test_offline_and_local_files_only_use_the_cache(hub, hub_cache, hf_offline, micro_zoo, micro_delta, repo_id):
    base = micro_zoo["llama-base"].path
    push_delta_to_hub(_local(micro_delta, "llama-arith"), repo_id)
    push_delta_to_hub(_local(micro_delta, "llama-cipher"), repo_id, revision="v2")
    with pytest.raises(DeltaFormatError, match="not in the local cache"):
        DeltaModel.from_pretrained(base, repo_id, local_files_only=True)
    DeltaModel.from_pretrained(base, repo_id)  # downloads main
    DeltaModel.from_pretrained(base, repo_id, revision="v2")  # and v2
    served = len(hub.requests)
    model = DeltaModel.from_pretrained(base, repo_id, local_files_only=True)
    assert _tensors_equal(model.get_delta("default"), _local(micro_delta, "llama-arith"))
    hf_offline()
    model = DeltaModel.from_pretrained(base, repo_id)
    assert _tensors_equal(model.get_delta("default"), _local(micro_delta, "llama-arith"))
    model = DeltaModel.from_pretrained(base, repo_id, revision="v2")
    assert _tensors_equal(model.get_delta("default"), _local(micro_delta, "llama-cipher"))
    assert len(hub.requests) == served  # nothing asked of the server
    with pytest.raises(DeltaFormatError, match=r"not in the local cache.*HF_HUB_OFFLINE"):
        DeltaModel.from_pretrained(base, repo_id + "-never-downloaded")


def test_checksums_survive_push_and_pull_and_catch_a_corrupted_cache(hub, hub_cache, micro_zoo, micro_delta,
                                                                      repo_id):
    delta = _local(micro_delta, "llama-arith")
    push_delta_to_hub(delta, repo_id)
    files = hub.files(repo_id)
    recorded = json.loads(files["delta_config.json"])["checksums"]
    assert recorded == {"delta_model.safetensors":
                        "sha256:" + hashlib.sha256(files["delta_model.safetensors"]).hexdigest()}
    model = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id)
    assert _tensors_equal(model.get_delta("default"), delta)
    # A bit flipped in the cached snapshot (disk error, interrupted copy) is refused, naming the file.
    cached = Path(snapshot_download(repo_id)) / "delta_model.safetensors"
    blob = cached.resolve()
    data = bytearray(blob.read_bytes())
    data[-5] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError, match=rf"{re.escape(str(cached))} is corrupted.*download"):
        DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id)


# ---------------------------------------------------------------------------------------------- tokens, cards
def test_token_is_sent_on_push_and_load(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    model = DeltaModel.from_pretrained(micro_zoo["llama-base"].path, micro_delta("llama-arith"))
    start = len(hub.requests)
    model.push_to_hub(repo_id, token="hf_push_secret")
    assert _authorizations(hub, start) == {"Bearer hf_push_secret"}
    start = len(hub.requests)
    DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id, token="hf_load_secret")
    assert _authorizations(hub, start) == {"Bearer hf_load_secret"}


def _authorizations(hub: LocalHub, start: int) -> set[str]:
    """Authorization headers of the requests since ``start`` (every request must carry one)."""
    sent = [{k.lower(): v for k, v in r.headers.items()}.get("authorization") for r in hub.requests[start:]]
    assert sent
    return set(sent)


def test_model_card_names_the_library_and_the_base(hub, hub_cache, micro_zoo, repo_id):
    base_id = repo_id + "-base"
    _push_folder(micro_zoo["llama-base"].path, base_id)
    model = compress(base_id, micro_zoo["llama-arith"].path, BitDeltaConfig(distill_steps=0), progress=False)
    model.push_to_hub(repo_id)
    card = ModelCard(hub.files(repo_id)["README.md"].decode())
    assert card.data.library_name == "hf_delta"
    assert card.data.base_model == base_id
    assert {"hf_delta", "bitdelta"} <= set(card.data.tags)
    assert f'DeltaModel.from_pretrained("{base_id}", "{repo_id}")' in card.text


def test_model_card_of_a_delta_made_from_a_local_base(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    # A local path is not a Hub id: the real Hub rejects such a base_model, so the card must not claim one.
    push_delta_to_hub(_local(micro_delta, "llama-arith"), repo_id)
    card = ModelCard(hub.files(repo_id)["README.md"].decode())
    assert card.data.library_name == "hf_delta"
    assert card.data.base_model is None
    assert str(micro_zoo["llama-base"].path) not in card.content.split("---")[1]


# ---------------------------------------------------------------------------------------------------- errors
def test_plain_model_repo_is_not_a_delta_repo(hub, hub_cache, micro_zoo, repo_id):
    _push_folder(micro_zoo["llama-arith"].path, repo_id)
    with pytest.raises(DeltaFormatError, match=r"has no delta_config.json: it is not an hf_delta delta repo"):
        DeltaModel.from_pretrained(micro_zoo["llama-base"].path, repo_id)


def test_unknown_repo_is_a_clear_error(hub, hub_cache, micro_zoo):
    with pytest.raises(DeltaFormatError, match=r"'org/does-not-exist' is not a local folder and was not found"):
        DeltaModel.from_pretrained(micro_zoo["llama-base"].path, "org/does-not-exist")


@pytest.mark.parametrize("bad", ["a/b/c", "org/bad name", "./missing-folder", "/no/such/delta"])
def test_neither_folder_nor_repo_id(hub, hub_cache, micro_zoo, bad):
    with pytest.raises(DeltaFormatError, match=re.escape(repr(bad))):
        DeltaModel.from_pretrained(micro_zoo["llama-base"].path, bad)


# --------------------------------------------------------------------------------- base revision vs delta revision
def test_base_revision_reaches_the_base_load(hub, hub_cache, micro_zoo, micro_delta, repo_id):
    base_id = repo_id + "-base"
    _push_folder(micro_zoo["qwen2-base"].path, base_id)  # main: another model
    _push_folder(micro_zoo["llama-base"].path, base_id, revision="llama")  # the real base, on a branch
    push_delta_to_hub(_local(micro_delta, "llama-arith"), repo_id, revision="v2")
    with pytest.raises(BaseModelMismatchError):
        DeltaModel.from_pretrained(base_id, repo_id, revision="v2")
    # The delta's revision and the base's revision are different arguments, each for its own repo.
    model = DeltaModel.from_pretrained(base_id, repo_id, revision="v2", base_revision="llama")
    assert model.config.model_type == "llama"
    assert _tensors_equal(model.get_delta("default"), _local(micro_delta, "llama-arith"))
    asked = {r.path for r in hub.requests if f"/{base_id}/" in r.path}
    assert f"/api/models/{base_id}/revision/llama" in asked
    assert not any(p.endswith("/v2") or "/v2/" in p for p in asked)
