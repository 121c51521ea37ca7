"""The on-disk artifact of an edit: its files, its model card, atomic writes, and typed errors on bad artifacts."""

import json
import struct

import pytest
import torch
import yaml

from hf_knowedit import (
    ArtifactError,
    BaseModelMismatchError,
    EditConfig,
    EditConfigError,
    EditedModel,
    EditRequest,
    FTConfig,
    __version__,
)
from hf_knowedit import artifacts as artifacts_module

from .helpers import BATCH, REQUEST, TOKENIZER, Snapshot, assert_same_state, fast_ft, logits, state_copy
from .test_edit_api import DummyConfig
from .tiny_models import tiny_model


FILES = {"edit_config.json", "edit_weights.safetensors", "edit_requests.jsonl", "README.md"}
# Pickle streams (protocol 2+) start with 0x80; torch.save writes a zip archive.
PICKLE_MAGIC, ZIP_MAGIC = b"\x80", b"PK\x03\x04"


def make_edit(arch: str = "llama", requests=(REQUEST,), name_or_path: str | None = None, **config) -> EditedModel:
    model = tiny_model(arch)
    if name_or_path is not None:
        model.config._name_or_path = name_or_path
    return EditedModel(model, TOKENIZER).add_edits(fast_ft(num_steps=3, **config), list(requests))


def read_front_matter(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    header, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(header), body


def directory_listing(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One llama edit of three requests saved once, with the base model named like a Hub repo."""
    edited = make_edit(requests=BATCH, name_or_path="owner/tiny-llama")
    directory = tmp_path_factory.mktemp("artifact") / "edit"
    sizes = edited.save_pretrained(directory)
    return edited, directory, sizes


def test_artifact_files_hold_no_pickle(saved):
    _, directory, sizes = saved
    assert {p.name for p in directory.iterdir()} == FILES
    for path in directory.iterdir():
        head = path.read_bytes()[:4]
        assert not head.startswith(PICKLE_MAGIC) and head != ZIP_MAGIC, path.name
    # A safetensors file: an 8-byte header length, a JSON header, then raw tensor bytes.
    raw = (directory / "edit_weights.safetensors").read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_length])
    assert header["__metadata__"]["hf_knowedit_version"] == __version__
    assert header["__metadata__"]["edit_type"] == "ft"
    assert {key for key in header if key != "__metadata__"} == {"model.layers.2.mlp.down_proj.0.delta"}
    assert sizes["default"] == sum(p.stat().st_size for p in directory.iterdir())


def test_edit_config_json_is_sorted_indented_and_stamped(saved):
    edited, directory, _ = saved
    text = (directory / "edit_config.json").read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert data["hf_knowedit_version"] == __version__
    assert data["edit_type"] == "ft" and data["num_requests"] == 3
    assert data["base_model_name_or_path"] == "owner/tiny-llama"
    assert data["base_model_fingerprint"]["model_type"] == "llama"
    assert set(data["base_model_fingerprint"]["tensors"]) == {"model.layers.2.mlp.down_proj.weight"}
    entry = {"kind": "dense", "meta": {}, "tensors": ["delta"]}
    assert data["edit_modules"] == {"model.layers.2.mlp.down_proj": [entry]}
    assert FTConfig.from_pretrained(directory) == edited.get_edit().config
    assert EditConfig.from_pretrained(directory) == edited.get_edit().config


def test_requests_jsonl_round_trips(saved):
    _, directory, _ = saved
    lines = (directory / "edit_requests.jsonl").read_text(encoding="utf-8").splitlines()
    assert [EditRequest.from_dict(json.loads(line)) for line in lines] == BATCH


def test_model_card(saved, tmp_path):
    _, directory, _ = saved
    metadata, body = read_front_matter((directory / "README.md").read_text(encoding="utf-8"))
    assert metadata["library_name"] == "hf-knowedit"
    assert metadata["base_model"] == "owner/tiny-llama"
    assert {"hf-knowedit", "knowledge-editing", "ft"} <= set(metadata["tags"])
    assert metadata["edit_method"] == "ft"
    assert metadata["edited_layers"] == [2]  # chosen by the method: layers=None in the config
    assert metadata["edited_modules"] == ["model.layers.2.mlp.down_proj"]
    assert metadata["num_requests"] == 3
    for request in BATCH:
        assert request.filled_prompt in body and request.target_new in body
    assert "model.layers.2.mlp.down_proj" in body

    # A base model loaded from a local directory is not named as a Hub base_model.
    make_edit(name_or_path=str(tmp_path)).save_pretrained(tmp_path / "local")
    metadata, _ = read_front_matter((tmp_path / "local" / "README.md").read_text(encoding="utf-8"))
    assert "base_model" not in metadata


def test_several_named_edits(tmp_path):
    edited = make_edit()
    edited.add_edits(fast_ft(num_steps=3, target_module="attn_out", layers=[1]), [BATCH[1]], edit_name="second")
    sizes = edited.save_pretrained(tmp_path / "edits")
    assert set(sizes) == {"default", "second"}
    assert {p.name for p in (tmp_path / "edits").iterdir()} == FILES | {"second"}
    assert {p.name for p in (tmp_path / "edits" / "second").iterdir()} == FILES
    metadata, _ = read_front_matter((tmp_path / "edits" / "second" / "README.md").read_text(encoding="utf-8"))
    assert metadata["edited_layers"] == [1]

    loaded = EditedModel(tiny_model("llama"), TOKENIZER)
    loaded.load_edit(tmp_path / "edits")
    loaded.load_edit(tmp_path / "edits", edit_name="second")
    assert loaded.get_edit("second").requests == [BATCH[1]]
    assert sorted(loaded.get_edit("second").components) == sorted(edited.get_edit("second").components)
    assert torch.equal(logits(loaded), logits(edited))

    with pytest.raises(EditConfigError, match="exists already"):
        loaded.load_edit(tmp_path / "edits", edit_name="second")


@pytest.mark.parametrize("fail_in", ["save_file", "render_card"])
def test_save_is_atomic(tmp_path, monkeypatch, fail_in):
    edited = make_edit()
    target = tmp_path / "edit"
    edited.save_pretrained(target)
    before = directory_listing(target)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts_module, fail_in, fail)
    edited.add_edits(fast_ft(num_steps=3, layers=[0]), [BATCH[2]], edit_name="more")
    with pytest.raises(OSError, match="disk full"):
        edited.save_pretrained(target)
    assert directory_listing(target) == before  # the previous artifact is intact
    with pytest.raises(OSError, match="disk full"):
        edited.save_pretrained(tmp_path / "new")
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]  # no half-written directory, no temporary one

    monkeypatch.undo()
    edited.save_pretrained(target)  # overwriting works, and leaves no backup behind
    assert directory_listing(target) != before and (target / "more" / "README.md").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["edit"]


def test_save_into_a_file_path_raises(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ArtifactError, match="not a directory"):
        make_edit().save_pretrained(tmp_path / "file")
    assert (tmp_path / "file").read_text() == "not a directory"


def corrupt_garbage(directory):
    (directory / "edit_weights.safetensors").write_bytes(b"\x13\x37" * 50)


def corrupt_truncate(directory):
    path = directory / "edit_weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def corrupt_flip_data_byte(directory):
    path = directory / "edit_weights.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # inside the tensor data: the header still parses
    path.write_bytes(bytes(raw))


def corrupt_missing_weights(directory):
    (directory / "edit_weights.safetensors").unlink()


def corrupt_config_json(directory):
    (directory / "edit_config.json").write_text("{not json", encoding="utf-8")


def corrupt_bare_config(directory):
    FTConfig().save_pretrained(directory)  # overwrites edit_config.json with a config that is not a saved edit


def corrupt_unknown_method(directory):
    path = directory / "edit_config.json"
    path.write_text(path.read_text().replace('"edit_type": "ft"', '"edit_type": "no_such_method"'))


def corrupt_requests(directory):
    (directory / "edit_requests.jsonl").write_text("{broken\n", encoding="utf-8")


CORRUPTIONS = [
    corrupt_garbage,
    corrupt_truncate,
    corrupt_flip_data_byte,
    corrupt_missing_weights,
    corrupt_config_json,
    corrupt_bare_config,
    corrupt_unknown_method,
    corrupt_requests,
]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda f: f.__name__.removeprefix("corrupt_"))
def test_bad_artifact_raises_and_changes_nothing(tmp_path, arch, corrupt):
    make_edit(arch).save_pretrained(tmp_path / "edit")
    corrupt(tmp_path / "edit")
    holder = make_edit(arch)
    snapshot = Snapshot(holder)
    with pytest.raises(ArtifactError):
        holder.load_edit(tmp_path / "edit", edit_name="loaded")
    snapshot.assert_unchanged()


@pytest.mark.parametrize("missing", ["absolute", "relative", "nested"])
def test_missing_artifact_directory(tmp_path, monkeypatch, missing):
    monkeypatch.chdir(tmp_path)
    path = {"absolute": tmp_path / "nowhere", "relative": "./nowhere", "nested": "a/b/nowhere"}[missing]
    model = tiny_model("gpt2")
    with pytest.raises(ArtifactError, match="nowhere"):
        EditedModel.from_pretrained(model, path, tokenizer=TOKENIZER)
    assert not any(m._forward_hooks for m in model.modules())


def test_missing_subfolder(tmp_path):
    make_edit().save_pretrained(tmp_path / "edit")
    with pytest.raises(ArtifactError, match="subfolder"):
        EditedModel.from_pretrained(tiny_model("llama"), tmp_path / "edit", subfolder="nope")


def test_artifact_for_another_base_model(tmp_path):
    make_edit("llama").save_pretrained(tmp_path / "edit")
    for other in (tiny_model("llama", seed=1), tiny_model("mistral", seed=1), tiny_model("gpt2")):
        state = state_copy(other)
        with pytest.raises(BaseModelMismatchError):
            EditedModel.from_pretrained(other, tmp_path / "edit", tokenizer=TOKENIZER)
        assert_same_state(other, state)
        assert not any(m._forward_hooks for m in other.modules())


def test_config_of_another_method_refused(tmp_path, monkeypatch):
    from hf_knowedit.config import EDIT_METHODS
    from hf_knowedit.methods.ft import FTEditor

    monkeypatch.setitem(EDIT_METHODS, "dummy", (DummyConfig, FTEditor))
    make_edit().save_pretrained(tmp_path / "edit")
    with pytest.raises(EditConfigError, match="'ft', not 'dummy'"):
        DummyConfig.from_pretrained(tmp_path / "edit")
    DummyConfig().save_pretrained(tmp_path / "dummy")
    with pytest.raises(EditConfigError, match="'dummy', not 'ft'"):
        FTConfig.from_pretrained(tmp_path / "dummy")
