"""Editing models dispatched by accelerate: layers split over devices, offloaded to CPU memory or to disk.

On this CPU-only machine a "split" model is one passed through `accelerate.dispatch_model` with an explicit
`device_map` that places every block separately (with `force_hooks=True`, so accelerate's device-alignment hooks run
as they do between GPUs); an "offloaded" model keeps every other block on disk (`"disk"` in the device map) or all its
weights in accelerate's CPU store (`accelerate.cpu_offload`): their parameters are on the `meta` device and are loaded
for each forward pass. Every method must give the same edit as on the plain model, and undo it exactly.
"""

import pytest
import torch
from accelerate import cpu_offload, dispatch_model
from torch import nn

from hf_knowedit import EditedModel, LayerStatistics
from hf_knowedit.devices import execution_device, input_device, is_offloaded, materialized_weight
from hf_knowedit.errors import OffloadedWeightsError
from hf_knowedit.methods.ft import FTConfig
from hf_knowedit.methods.ke import KEConfig
from hf_knowedit.methods.kn import KNConfig
from hf_knowedit.methods.mend import MENDConfig
from hf_knowedit.methods.serac import SERACConfig
from hf_knowedit.resumable import resumable_edits

from .helpers import REQUEST, TOKENIZER, WIKITEXT, logits
from .test_locate_then_edit import fast_config
from .test_side_memory import CONFIGS as SIDE_MEMORY_CONFIGS
from .tiny_models import tiny_model


CONFIGS = {
    "ft": lambda: FTConfig(num_steps=5),
    "rome": lambda: fast_config("rome"),
    "memit": lambda: fast_config("memit"),
    "alphaedit": lambda: fast_config("alphaedit"),
    "kn": lambda: KNConfig(steps=4),
    "mend": lambda: MENDConfig(editor="untrained"),
    "ke": lambda: KEConfig(editor="untrained"),
    "serac": lambda: SERACConfig(editor="untrained"),
    **SIDE_MEMORY_CONFIGS,
}
DISPATCHES = ["split", "disk", "cpu_offload"]
pytestmark = pytest.mark.usefixtures("isolated_statistics_cache")




def block_device_map(model: nn.Module, offload_every_other: bool) -> dict[str, str]:
    """One device-map entry per transformer block and per other top-level module; every other block on `"disk"`."""
    device_map = {}

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.ModuleList):
                for index in range(len(child)):
                    device_map[f"{path}.{index}"] = "disk" if offload_every_other and index % 2 else "cpu"
            elif any(isinstance(m, nn.ModuleList) for m in child.modules()):
                visit(child, f"{path}.")
            else:
                device_map[path] = "cpu"

    visit(model, "")
    return device_map


def dispatched(arch: str, how: str, tmp_path) -> nn.Module:
    model = tiny_model(arch)
    if how == "cpu_offload":
        return cpu_offload(model, execution_device=torch.device("cpu"))
    device_map = block_device_map(model, offload_every_other=how == "disk")
    return dispatch_model(model, device_map, offload_dir=str(tmp_path / "offload"), force_hooks=True)


_REFERENCES = {}


def reference(arch: str, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(base logits, edited logits) of the plain tiny model."""
    if (arch, method) not in _REFERENCES:
        model = tiny_model(arch)
        base = logits(model)
        torch.manual_seed(0)
        edited = EditedModel(model, TOKENIZER).add_edits(CONFIGS[method](), [REQUEST])
        _REFERENCES[arch, method] = base, logits(edited)
    return _REFERENCES[arch, method]


@pytest.mark.parametrize("how", DISPATCHES)
@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_dispatched_model_gets_the_same_edit(method, how, tmp_path):
    base, expected = reference("llama", method)
    model = dispatched("llama", how, tmp_path)
    torch.manual_seed(0)
    edited = EditedModel(model, TOKENIZER).add_edits(CONFIGS[method](), [REQUEST])
    torch.testing.assert_close(logits(edited), expected, rtol=1e-4, atol=1e-5)
    with edited.disable_edits():
        torch.testing.assert_close(logits(edited), base, rtol=0, atol=0)
    # The saved edit loads onto a plain model (the fingerprint read the offloaded weights' values) and back.
    edited.save_pretrained(tmp_path / "edit")
    for target in (tiny_model("llama"), dispatched("llama", how, tmp_path / "again")):
        loaded = EditedModel.from_pretrained(target, tmp_path / "edit", tokenizer=TOKENIZER)
        torch.testing.assert_close(logits(loaded), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(edited.unload()), base, rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
@pytest.mark.parametrize("method", ["ft", "grace"])
def test_other_architectures_offloaded_to_disk(arch, method, tmp_path):
    base, expected = reference(arch, method)
    edited = EditedModel(dispatched(arch, "disk", tmp_path), TOKENIZER).add_edits(CONFIGS[method](), [REQUEST])
    torch.testing.assert_close(logits(edited), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(edited.unload()), base, rtol=0, atol=0)


def test_merging_into_offloaded_weights_is_refused_and_changes_nothing(tmp_path):
    model = dispatched("llama", "cpu_offload", tmp_path)
    edited = EditedModel(model, TOKENIZER).add_edits(FTConfig(num_steps=5), [REQUEST])
    before = logits(edited)
    with pytest.raises(OffloadedWeightsError, match="offloaded by accelerate"):
        edited.merge_edits()
    with pytest.raises(OffloadedWeightsError):
        edited.merge_and_unload()
    torch.testing.assert_close(logits(edited), before, rtol=0, atol=0)
    assert edited.edit_names == ["default"]


def test_merging_a_split_model_that_holds_its_weights(tmp_path):
    base, expected = reference("llama", "ft")
    model = dispatch_model(tiny_model("llama"), block_device_map(tiny_model("llama"), False), force_hooks=True)
    edited = EditedModel(model, TOKENIZER).add_edits(FTConfig(num_steps=5), [REQUEST])
    torch.testing.assert_close(logits(edited.merge_and_unload()), expected, rtol=1e-4, atol=1e-5)


def test_statistics_of_an_offloaded_model_equal_the_plain_ones(tmp_path):
    options = dict(corpus=[WIKITEXT.read_text(encoding="utf-8")[:20000]], num_tokens=512, max_length=64,
                   dtype=torch.float64, use_cache=False, progress=False)
    plain = LayerStatistics.compute(tiny_model("llama"), TOKENIZER, 1, **options)
    offloaded = LayerStatistics.compute(dispatched("llama", "disk", tmp_path), TOKENIZER, 1, **options)
    torch.testing.assert_close(offloaded.mom2, plain.mom2, rtol=1e-9, atol=1e-12)
    assert offloaded.metadata["model_fingerprint"] == plain.metadata["model_fingerprint"]


def test_device_helpers_on_an_offloaded_model(tmp_path):
    model = dispatched("llama", "disk", tmp_path)
    offloaded = model.model.layers[1].mlp.down_proj
    kept = model.model.layers[0].mlp.down_proj
    assert is_offloaded(offloaded) and not is_offloaded(kept)
    assert execution_device(offloaded) == input_device(model) == torch.device("cpu")
    torch.testing.assert_close(materialized_weight(offloaded), tiny_model("llama").model.layers[1].mlp.down_proj.weight)
    assert offloaded.weight.device.type == "meta"  # loading the values did not keep them in memory


@pytest.mark.parametrize("how", DISPATCHES)
def test_resumable_edits_of_a_dispatched_model_hash_and_restore_its_work(how, tmp_path):
    plain = EditedModel(tiny_model("llama"), TOKENIZER)
    edited = EditedModel(dispatched("llama", how, tmp_path), TOKENIZER)
    assert edited.state_digest() == plain.state_digest()  # offloaded weights are read, not refused
    with resumable_edits(tmp_path / "work") as work:
        edited.add_edits(CONFIGS["memit"](), [REQUEST])
    assert work.computed == 1
    first = logits(edited)
    edited.delete_edit("default")
    with resumable_edits(tmp_path / "work") as work:
        edited.add_edits(CONFIGS["memit"](), [REQUEST])
    assert (work.reused, work.computed) == (1, 0)  # the target values were read back for the dispatched model
    torch.testing.assert_close(logits(edited), first, rtol=0, atol=0)
    offloaded = next(edited.base_model.model.layers[1].parameters()).device.type  # block 1 is offloaded but "split"
    assert offloaded == ("cpu" if how == "split" else "meta")  # hashing left the offloaded weights offloaded
