"""The delta repo on disk: round trips, sharding, corrupt repos, atomic saves, carried tokenizer files."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GenerationConfig

import hf_delta.storage as storage
from hf_delta.config import CONFIG_NAME, FORMAT_VERSION
from hf_delta.errors import DeltaFormatError
from hf_delta.methods.bitdelta import BitDeltaConfig, BitDeltaWeight
from hf_delta.methods.deltazip import DeltaZipConfig, DeltaZipWeight, prune_quantize
from hf_delta.packing import compact_2of4_width
from hf_delta.storage import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, Delta

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_delta(a: Delta, b: Delta) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name
    assert a.config.to_dict() == b.config.to_dict()
    assert (a.tied, a.vocab_size, a.files) == (b.tied, b.vocab_size, b.files)
    assert {m: type(w) for m, w in a.weights.items()} == {m: type(w) for m, w in b.weights.items()}


@pytest.fixture
def chat_folder(micro_delta, tmp_path) -> Path:
    """A private copy of the llama-chat delta repo (tests may break it)."""
    folder = tmp_path / "chat-delta"
    shutil.copytree(micro_delta("llama-chat"), folder)
    return folder


# ------------------------------------------------------------------------------------------- round trips
def test_save_and_load_round_trip(chat_folder, tmp_path):
    delta = Delta.from_folder(chat_folder)
    assert delta.config.method == "bitdelta" and isinstance(delta.config, BitDeltaConfig)
    assert delta.vocab_size == 387 and set(delta.new_rows) == {"model.embed_tokens", "lm_head"}
    assert all(isinstance(w, BitDeltaWeight) for w in delta.weights.values()) and len(delta.weights) == 16
    # What is on disk is exactly what the object holds, under the documented names.
    on_disk = load_file(chat_folder / WEIGHTS_NAME)
    assert set(on_disk) == set(delta.tensors())
    assert "model.layers.0.self_attn.q_proj::signs" in on_disk and "new_rows::lm_head" in on_disk
    assert "exact::model.norm.weight" in on_disk
    config = json.loads((chat_folder / CONFIG_NAME).read_text())
    assert config["method"] == "bitdelta" and config["format_version"] == FORMAT_VERSION
    assert config["base_fingerprint"]["layout"] and config["library_version"]
    assert config["modules"]["weights"]["lm_head"] == {"type": "bitdelta", "shape": [384, 32]}
    delta.save_pretrained(tmp_path / "again")
    _assert_same_delta(delta, Delta.from_folder(tmp_path / "again"))


def test_tied_delta_round_trip(micro_delta):
    delta = Delta.from_folder(micro_delta("qwen2-arith"))
    assert delta.tied == {"lm_head": "model.embed_tokens"}
    assert "lm_head" not in delta.weights and "model.embed_tokens" in delta.weights
    assert "exact::model.layers.0.self_attn.q_proj.bias" in delta.tensors()


def test_sharded_save_writes_an_index_and_loads_back(chat_folder, tmp_path):
    delta = Delta.from_folder(chat_folder)
    folder = tmp_path / "sharded"
    delta.save_pretrained(folder, max_shard_size=4000)
    shards = sorted(p.name for p in folder.glob("delta_model*.safetensors"))
    assert len(shards) >= 2 and WEIGHTS_NAME not in shards
    index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(delta.tensors())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == delta.nbytes()
    _assert_same_delta(delta, Delta.from_folder(folder))
    # Re-saving unsharded into the same folder removes the old shards and index.
    delta.save_pretrained(folder)
    assert sorted(p.name for p in folder.glob("delta_model*")) == [WEIGHTS_NAME]
    _assert_same_delta(delta, Delta.from_folder(folder))


def test_carried_files_travel_with_the_chat_delta_only(micro_zoo, micro_delta, chat_folder):
    chat_files = {p.name for p in chat_folder.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= chat_files
    arith_files = {p.name for p in micro_delta("llama-arith").iterdir()}
    assert arith_files == {CONFIG_NAME, WEIGHTS_NAME}
    # The carried tokenizer is the fine-tune's: new tokens, its chat template and its end-of-turn token.
    tok = AutoTokenizer.from_pretrained(chat_folder)
    ref = AutoTokenizer.from_pretrained(micro_zoo["llama-chat"].path)
    base = AutoTokenizer.from_pretrained(micro_zoo["llama-base"].path)
    assert tok.get_vocab() == ref.get_vocab() and len(tok) == len(base) + 3
    assert tok.chat_template == ref.chat_template != base.chat_template
    assert tok.eos_token_id == ref.eos_token_id != base.eos_token_id
    gen = GenerationConfig.from_pretrained(chat_folder)
    assert gen.eos_token_id == GenerationConfig.from_pretrained(micro_zoo["llama-chat"].path).eos_token_id
    assert Delta.from_folder(chat_folder).files.keys() >= {"tokenizer.json", "generation_config.json"}


# ------------------------------------------------------------------- DeltaZip: compact 2:4 masks on disk
def _deltazip_delta() -> Delta:
    """DeltaZip weights of every layout; 2:4 ones with column counts that are not multiples of 12 (nor of 8)."""
    g = torch.Generator().manual_seed(0)
    weights = {}
    for name, (shape, bits, group, sparsity, zero_rows) in {
        "a": ((12, 40), 4, None, "2:4", False),
        "b": ((9, 20), 2, 4, "2:4", True),  # 5 groups of 4: the in-memory metadata ends in half a byte
        "c": ((5, 24), 3, None, None, False),
        "d": ((6, 16), 4, 8, 0.6, False),
    }.items():
        w = torch.randn(shape, generator=g)
        if zero_rows:  # stored with a row_index
            w[[0, 3, 4, 5, 8]] = 0
        qm = prune_quantize(w, None, bits=bits, group_size=group, sparsity=sparsity)
        layout = {None: "dense", "2:4": "2:4"}.get(sparsity, "bitmap")
        weights[name] = DeltaZipWeight.from_quantized(qm.q, qm.scales, qm.keep, bits=bits, group_size=group,
                                                      layout=layout)
    return Delta(config=DeltaZipConfig(), weights=weights, exact={"norm.weight": torch.ones(3)}, vocab_size=12)


def test_deltazip_masks_are_compact_on_disk_and_expanded_on_load(tmp_path):
    delta = _deltazip_delta()
    dense = {m: w.to_dense() for m, w in delta.weights.items()}
    delta.save_pretrained(tmp_path / "repo")
    on_disk = load_file(tmp_path / "repo" / WEIGHTS_NAME)
    assert set(on_disk) == set(delta.tensors())
    for module, k in (("a", 40), ("b", 20)):
        rows = delta.weights[module].mask.shape[0]
        assert on_disk[f"{module}::mask"].shape == (rows, compact_2of4_width(k))  # 2/3 bit per weight
    assert on_disk["d::mask"].shape == delta.weights["d"].mask.shape  # bitmaps are saved as they are
    config = json.loads((tmp_path / "repo" / CONFIG_NAME).read_text())
    assert config["format_version"] == FORMAT_VERSION == 3
    assert config["modules"]["weights"]["a"]["mask_encoding"] == "2of4-compact"
    assert "mask_encoding" not in config["modules"]["weights"]["d"]
    loaded = Delta.from_folder(tmp_path / "repo")
    _assert_same_delta(delta, loaded)  # the in-memory layout (what the kernels read) comes back exactly
    assert all(torch.equal(loaded.weights[m].to_dense(), d) for m, d in dense.items())
    # Shards and their index count the bytes as saved.
    delta.save_pretrained(tmp_path / "sharded", max_shard_size=100)
    index = json.loads((tmp_path / "sharded" / WEIGHTS_INDEX_NAME).read_text())
    saved = {k: v for f in storage.weight_files(tmp_path / "sharded") for k, v in load_file(f).items()}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    assert index["metadata"]["total_size"] < delta.nbytes()
    _assert_same_delta(delta, Delta.from_folder(tmp_path / "sharded"))


def test_format_1_repo_still_loads_and_is_resaved_in_the_current_format(tmp_path):
    delta = _deltazip_delta()
    folder = tmp_path / "v1"
    delta.save_pretrained(folder)
    # Format 1 = the in-memory tensors as they are, no mask_encoding.
    save_file(delta.tensors(), folder / WEIGHTS_NAME, metadata={"format": "pt"})
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["format_version"] = 1
    del config["checksums"]  # format 3 added them
    for meta in config["modules"]["weights"].values():
        meta.pop("mask_encoding", None)
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    old = Delta.from_folder(folder)
    assert old.format_version == 1
    for module, w in delta.weights.items():
        assert torch.equal(old.weights[module].to_dense(), w.to_dense()), module
        assert all(torch.equal(t, dict(old.weights[module].named_buffers())[b]) for b, t in w.named_buffers())
    old.save_pretrained(tmp_path / "v2")
    assert json.loads((tmp_path / "v2" / CONFIG_NAME).read_text())["format_version"] == FORMAT_VERSION
    again = Delta.from_folder(tmp_path / "v2")
    assert all(torch.equal(again.weights[m].to_dense(), w.to_dense()) for m, w in delta.weights.items())


def _rewrite_weights(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the weight file as a buggy writer would: wrong content, consistent checksums (so the load gets
    past them to the check under test)."""
    save_file(tensors, folder / WEIGHTS_NAME)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["checksums"] = {WEIGHTS_NAME: "sha256:" + hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()}
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _set_tensor(folder: Path, name: str, value) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors[name] = value(tensors[name])
    _rewrite_weights(folder, tensors)


@pytest.mark.parametrize(("breaks", "message"), [
    (lambda f: _set_tensor(f, "a::mask", lambda t: torch.full_like(t, 250)), r"byte 250.*corrupt"),
    (lambda f: _set_tensor(f, "a::mask", lambda t: t[:, :2].contiguous()), r"4 bytes a row.*corrupt"),
    (lambda f: _edit_modules(f, lambda m: m["weights"]["a"].update(mask_encoding="zstd")),
     r"Unknown mask_encoding 'zstd'"),
    (lambda f: _edit_modules(f, lambda m: m["weights"]["d"].update(mask_encoding="2of4-compact")),
     r"mask_encoding '2of4-compact' for layout 'bitmap'"),
])
def test_corrupt_compact_mask_is_a_format_error(tmp_path, breaks, message):
    _deltazip_delta().save_pretrained(tmp_path)
    breaks(tmp_path)
    with pytest.raises(DeltaFormatError, match=message):
        Delta.from_folder(tmp_path)


# ------------------------------------------------------------------------------------------ broken repos
def _truncate(folder: Path) -> None:
    path = folder / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(folder: Path) -> None:
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[8:40] = b"\x00" * 32
    path.write_bytes(bytes(data))


def _edit_config(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / CONFIG_NAME).read_text())
        config.update(changes)
        (folder / CONFIG_NAME).write_text(json.dumps(config))

    return edit


def _drop_module_tensors(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    _rewrite_weights(folder, {k: v for k, v in tensors.items() if not k.startswith("model.layers.1.mlp.up_proj::")})


def _drop_scales(folder: Path) -> None:
    tensors = load_file(folder / WEIGHTS_NAME)
    _rewrite_weights(folder, {k: v for k, v in tensors.items() if k != "lm_head::scales"})


BROKEN = {
    "truncated weights": (_truncate, r"corrupted or truncated.*save the delta again"),
    "garbled header": (_garble_header, r"corrupted or truncated"),
    "empty weights": (lambda f: (f / WEIGHTS_NAME).write_bytes(b""), r"corrupted or truncated"),
    "missing weights": (lambda f: (f / WEIGHTS_NAME).unlink(), r"delta_model.safetensors is missing"),
    "missing config": (lambda f: (f / CONFIG_NAME).unlink(), r"delta_config.json not found.*not an hf_delta"),
    "malformed json": (lambda f: (f / CONFIG_NAME).write_text('{"method": "bitdelta",'), r"not valid JSON"),
    "json list": (lambda f: (f / CONFIG_NAME).write_text("[1, 2]"), r"must hold a JSON object"),
    "newer format": (_edit_config(format_version=FORMAT_VERSION + 1),
                     rf"format_version {FORMAT_VERSION + 1}.*Upgrade hf_delta"),
    "bad format": (_edit_config(format_version="one"), r"format_version 'one'.*integer from 1"),
    "format zero": (_edit_config(format_version=0), r"format_version 0.*integer from 1"),
    "unknown method": (_edit_config(method="magicdelta"), r"Unknown delta method 'magicdelta'.*bitdelta"),
    "no method": (lambda f: _strip_key(f, "method"), r"no 'method' field"),
    "unknown weight type": (
        lambda f: _edit_modules(f, lambda m: m["weights"]["lm_head"].update(type="quantum")),
        r"Unknown compressed weight type 'quantum'",
    ),
    "modules not a mapping": (_edit_config(modules=[1]), r"'modules' entry is malformed"),
    "module entry without type": (
        lambda f: _edit_modules(f, lambda m: m["weights"]["lm_head"].pop("type")),
        r"'modules' entry is malformed",
    ),
    "bad shape": (
        lambda f: _edit_modules(f, lambda m: m["weights"]["lm_head"].pop("shape")),
        r"module 'lm_head' lacks 'shape'",
    ),
    "missing module tensors": (_drop_module_tensors, r"model.layers.1.mlp.up_proj.*missing"),
    "missing scales": (_drop_scales, r"module 'lm_head' lacks 'scales'"),
    "wrong signs shape": (
        lambda f: _edit_modules(f, lambda m: m["weights"]["lm_head"].update(shape=[384, 64])),
        r"do not fit a \[384, 64\] matrix",
    ),
    "bad index": (lambda f: (f / WEIGHTS_INDEX_NAME).write_text("{}"), r"index.json is malformed"),
}


def _strip_key(folder: Path, key: str) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config[key]
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _edit_modules(folder: Path, change) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config["modules"])
    (folder / CONFIG_NAME).write_text(json.dumps(config))


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_repo_is_a_format_error(chat_folder, case):
    breaks, message = BROKEN[case]
    breaks(chat_folder)
    with pytest.raises(DeltaFormatError, match=message):
        Delta.from_folder(chat_folder)


def test_missing_shard_is_a_format_error(chat_folder, tmp_path):
    folder = tmp_path / "sharded"
    Delta.from_folder(chat_folder).save_pretrained(folder, max_shard_size=4000)
    next(iter(folder.glob("delta_model-*.safetensors"))).unlink()
    with pytest.raises(DeltaFormatError, match=r"is missing.*incomplete"):
        Delta.from_folder(folder)


def test_plain_model_folder_is_not_a_delta_repo(micro_zoo):
    with pytest.raises(DeltaFormatError, match="not an hf_delta delta repo"):
        Delta.from_folder(micro_zoo["llama-base"].path)


def test_missing_folder(tmp_path):
    with pytest.raises(DeltaFormatError, match="does not exist"):
        Delta.from_folder(tmp_path / "nope")


def test_unknown_config_keys_warn_but_load(chat_folder, caplog):
    _edit_config(shiny_new_option=3)(chat_folder)
    with caplog.at_level("WARNING"):
        delta = Delta.from_folder(chat_folder)
    assert "shiny_new_option" in caplog.text and delta.vocab_size == 387


# ---------------------------------------------------------------------------------------- atomic saves
def _failing_save_file(monkeypatch, after: int) -> list[str]:
    written: list[str] = []
    real = storage.write_safetensors

    def write_safetensors(filename, tensors, metadata=None):
        if len(written) >= after:
            raise OSError("disk full (simulated)")
        real(filename, tensors, metadata=metadata)
        written.append(str(filename))

    monkeypatch.setattr(storage, "write_safetensors", write_safetensors)
    return written


@pytest.mark.parametrize("sharded", [False, True])
def test_failed_save_leaves_the_previous_repo_intact(chat_folder, tmp_path, monkeypatch, sharded):
    delta = Delta.from_folder(chat_folder)
    folder = tmp_path / "repo"
    delta.save_pretrained(folder, max_shard_size=4000 if sharded else "5GB")
    (folder / "README.md").write_text("my notes")
    before = _snapshot(folder)
    written = _failing_save_file(monkeypatch, after=1)
    other = Delta.from_folder(chat_folder)
    with pytest.raises(OSError, match="simulated"):
        other.save_pretrained(folder, max_shard_size=3000)
    assert len(written) == 1  # it did fail half-way
    assert _snapshot(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-delta", "repo"]  # no temporary folders left
    monkeypatch.undo()
    _assert_same_delta(delta, Delta.from_folder(folder))


def test_failed_first_save_creates_nothing(chat_folder, tmp_path, monkeypatch):
    delta = Delta.from_folder(chat_folder)
    _failing_save_file(monkeypatch, after=0)
    with pytest.raises(OSError, match="simulated"):
        delta.save_pretrained(tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat-delta"]


def test_resave_of_another_delta_drops_the_old_carried_files(micro_delta, chat_folder, tmp_path):
    folder = tmp_path / "repo"
    shutil.copytree(chat_folder, folder)
    (folder / "README.md").write_text("card")
    arith = Delta.from_folder(micro_delta("llama-arith"))
    arith.save_pretrained(folder)
    # The chat tokenizer must not travel with the arith delta; the user's README stays.
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME, "README.md"])
    _assert_same_delta(arith, Delta.from_folder(folder))


def test_save_keeps_unrelated_files(chat_folder, tmp_path):
    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    Delta.from_folder(chat_folder).save_pretrained(folder)
    assert (folder / "README.md").read_text() == "card" and (folder / WEIGHTS_NAME).is_file()


# ------------------------------------------------------------------------------------------------- checksums
def _sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_data_byte(path: Path, at: float = 0.5) -> None:
    """Flip one byte of the tensor data, leaving the safetensors header (and so every shape) intact."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    i = start + int((len(data) - start) * at)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("shard_size", ["5GB", 4000])
def test_checksums_record_every_weight_file(chat_folder, tmp_path, shard_size):
    folder = tmp_path / "repo"
    Delta.from_folder(chat_folder).save_pretrained(folder, max_shard_size=shard_size)
    config = json.loads((folder / CONFIG_NAME).read_text())
    files = storage.weight_files(folder)
    assert len(files) == (1 if shard_size == "5GB" else len(list(folder.glob("delta_model-*.safetensors")))) >= 1
    assert config["checksums"] == {p.name: _sha256(p) for p in files}  # hashlib over the files as written


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("shard_size", ["5GB", 4000])
def test_flipped_tensor_bytes_are_refused_naming_the_file(chat_folder, tmp_path, monkeypatch, shard_size,
                                                          chunked):
    if chunked:  # the path of large files: memory-mapped, hashed in chunks
        monkeypatch.setattr(storage, "_READ_WHOLE_BYTES", 0)
    folder = tmp_path / "repo"
    Delta.from_folder(chat_folder).save_pretrained(folder, max_shard_size=shard_size)
    victim = storage.weight_files(folder)[-1]
    _flip_data_byte(victim)
    with pytest.raises(DeltaFormatError, match=rf"{re.escape(str(victim))} is corrupted.*download or save the "
                                               "delta again"):
        Delta.from_folder(folder)
    # Without the checksum the same file parses: the check is what stands between it and a wrong model.
    _strip_key(folder, "checksums")
    _edit_config(format_version=2)(folder)
    silent, saved = Delta.from_folder(folder).tensors(), Delta.from_folder(chat_folder).tensors()
    assert silent.keys() == saved.keys() and not all(torch.equal(silent[k], saved[k]) for k in saved)


def test_format_2_repo_without_checksums_loads_with_a_note(chat_folder, tmp_path, caplog):
    delta = Delta.from_folder(chat_folder)
    _strip_key(chat_folder, "checksums")
    _edit_config(format_version=2)(chat_folder)
    with caplog.at_level("INFO", logger="hf_delta.storage"):
        old = Delta.from_folder(chat_folder)
    assert old.format_version == 2 and "carry no checksums" in caplog.text
    _assert_same_delta(delta, old)
    old.save_pretrained(tmp_path / "v3")  # re-saving adds them
    assert json.loads((tmp_path / "v3" / CONFIG_NAME).read_text())["checksums"] == \
        {WEIGHTS_NAME: _sha256(tmp_path / "v3" / WEIGHTS_NAME)}


@pytest.mark.parametrize(("edit", "message"), [
    (lambda f: _strip_key(f, "checksums"), r"format 3 records a checksum for each weight file"),
    (_edit_config(checksums=["sha256:00"]), r"format 3 records a checksum"),
    (_edit_config(checksums={"other.safetensors": "sha256:00"}), r"no checksum for delta_model.safetensors"),
    (_edit_config(checksums={WEIGHTS_NAME: "sha256:00"}), r"delta_model.safetensors is corrupted"),
])
def test_format_3_checksum_entry_is_checked(chat_folder, edit, message):
    edit(chat_folder)
    with pytest.raises(DeltaFormatError, match=message):
        Delta.from_folder(chat_folder)


def test_a_large_shard_is_not_left_mapped_once_its_delta_is_loaded(chat_folder, monkeypatch):
    """Large shards are read through a memory map; their tensors are copied out, so attaching the delta (which
    copies its packed tensors into slot buffers) does not also keep every page of the file resident."""
    monkeypatch.setattr(storage, "_READ_WHOLE_BYTES", 0)
    shard = storage.weight_files(chat_folder)[0]
    delta = Delta.from_folder(chat_folder)
    assert str(shard.resolve()) not in Path("/proc/self/maps").read_text()
    on_disk = load_file(shard)
    assert all(torch.equal(delta.tensors()[k], on_disk[k]) for k in on_disk)
