"""Hub round trips without a network: `push_to_hub` with huggingface_hub's calls replaced, loading by repo id from a
Hugging Face cache built under `tmp_path` with `HF_HUB_OFFLINE=1`."""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch

from hf_knowedit import ArtifactError, EditedModel, FTConfig

from .helpers import BATCH, REQUEST, TOKENIZER, fast_ft, logits
from .tiny_models import tiny_model


SHA = "0123456789abcdef0123456789abcdef01234567"
FILES = {"edit_config.json", "edit_weights.safetensors", "edit_requests.jsonl", "README.md"}


def edited_gpt2() -> EditedModel:
    edited = EditedModel(tiny_model("gpt2"), TOKENIZER).add_edits(fast_ft(num_steps=3), [REQUEST])
    return edited.add_edits(fast_ft(num_steps=3, target_module="attn_out"), [BATCH[1]], edit_name="second")


def fake_cache(root: Path, repo_id: str, edited: EditedModel) -> Path:
    """A Hugging Face cache under `root` holding `repo_id` at commit `SHA`, with `edited` saved in its snapshot."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    edited.save_pretrained(repo / "snapshots" / SHA)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return repo


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_push_to_hub_uploads_the_artifact(monkeypatch):
    edited = edited_gpt2()
    calls = {}

    def create_repo(repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=f"resolved/{repo_id.split('/')[-1]}")

    def upload_folder(**kwargs):
        folder = Path(kwargs["folder_path"])
        calls["upload_folder"] = kwargs
        calls["files"] = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}
        if (folder / "edit_config.json").is_file():
            calls["config"] = json.loads((folder / "edit_config.json").read_text())
            calls["card"] = (folder / "README.md").read_text()
        return "commit-info"

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    result = edited.push_to_hub("me/my-edit", private=True, token="hf_x", revision="dev", create_pr=True)

    assert result == "commit-info"
    assert calls["create_repo"] == ("me/my-edit", {"private": True, "token": "hf_x", "exist_ok": True})
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "resolved/my-edit" and upload["token"] == "hf_x"
    assert upload["revision"] == "dev" and upload["create_pr"] is True
    assert upload["commit_message"] == "Upload edit with hf-knowedit"
    assert calls["files"] == FILES | {f"second/{name}" for name in FILES}
    assert calls["config"]["edit_type"] == "ft" and calls["config"]["num_requests"] == 1
    assert calls["card"].startswith("---\n") and "library_name: hf-knowedit" in calls["card"]
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up

    calls.clear()
    edited.push_to_hub("me/only-second", edit_names=["second"])
    assert calls["files"] == {f"second/{name}" for name in FILES}


def test_push_to_hub_failure_propagates(monkeypatch):
    def create_repo(repo_id, **kwargs):
        raise PermissionError("no write access")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    with pytest.raises(PermissionError, match="no write access"):
        edited_gpt2().push_to_hub("someone/else")


@pytest.mark.parametrize("how", ["HF_HUB_CACHE", "HF_HOME", "cache_dir"])
def test_load_by_repo_id_from_the_cache(tmp_path, monkeypatch, offline, how):
    edited = edited_gpt2()
    root = tmp_path / "home" / "hub"
    fake_cache(root, "owner/name", edited)
    kwargs = {}
    if how == "HF_HUB_CACHE":
        monkeypatch.setenv("HF_HUB_CACHE", str(root))
    elif how == "HF_HOME":
        monkeypatch.delenv("HF_HUB_CACHE", raising=False)
        monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    else:
        kwargs["cache_dir"] = root
    monkeypatch.chdir(tmp_path)  # "owner/name" is not a local directory here

    loaded = EditedModel.from_pretrained(tiny_model("gpt2"), "owner/name", tokenizer=TOKENIZER, **kwargs)
    assert loaded.get_edit().requests == [REQUEST]
    loaded.load_edit("owner/name", edit_name="second", **kwargs)
    assert loaded.get_edit("second").requests == [BATCH[1]]
    assert torch.equal(logits(loaded), logits(edited))
    assert FTConfig.from_pretrained("owner/name", **kwargs) == edited.get_edit().config

    pinned = EditedModel.from_pretrained(tiny_model("gpt2"), "owner/name", revision=SHA, subfolder="second", **kwargs)
    assert pinned.get_edit().requests == [BATCH[1]]


def test_repo_id_absent_from_the_cache(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    model = tiny_model("gpt2")
    with pytest.raises(ArtifactError, match="owner/missing is neither a local directory nor in the Hugging Face"):
        EditedModel.from_pretrained(model, "owner/missing", tokenizer=TOKENIZER)
    assert not any(m._forward_hooks for m in model.modules())

    # A repo in the cache without the asked subfolder.
    fake_cache(tmp_path / "hub", "owner/name", edited_gpt2())
    with pytest.raises(ArtifactError, match="nope"):
        EditedModel.from_pretrained(model, "owner/name", subfolder="nope")


def test_a_local_directory_wins_over_a_repo_id(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    edited = edited_gpt2()
    edited.save_pretrained(tmp_path / "owner" / "name", edit_names=["default"])
    loaded = EditedModel.from_pretrained(tiny_model("gpt2"), "owner/name", tokenizer=TOKENIZER)
    edited.set_active_edits(["default"])
    assert torch.equal(logits(loaded), logits(edited))
    shutil.rmtree(tmp_path / "owner")
    with pytest.raises(ArtifactError, match="owner/name"):
        EditedModel.from_pretrained(tiny_model("gpt2"), "owner/name")
