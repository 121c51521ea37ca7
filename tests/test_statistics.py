"""Second-moment statistics: exact values, corpora, caching, sharing, model checks, AlphaEdit's projector, processes."""

import logging
import os
import random
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hf_knowedit import statistics as statistics_module
from hf_knowedit.architectures import resolve_layout
from hf_knowedit.errors import BaseModelMismatchError
from hf_knowedit.statistics import (
    CORPUS_ENV,
    CorpusNotFoundError,
    InsufficientTokensError,
    LayerStatistics,
    SingularStatisticsError,
    clear_statistics_cache,
    detokenize_wikitext,
    get_layer_statistics,
    resolve_corpus,
)

from .launchers import LAUNCHERS, launch
from .tiny_models import DECODER_ARCHITECTURES, INTERMEDIATE_SIZE, tiny_model, tiny_tokenizer


REPO_ROOT = Path(__file__).resolve().parent.parent
D_K = INTERMEDIATE_SIZE
NUM_TOKENS = 1000
MAX_LENGTH = 64
WORDS = (
    "the a of in city river king music paris france capital born played team song film war year first new old "
    "north south language written people found called large small known many later early village school church "
    "university football album series station island company government army player actor"
).split()


def make_texts(count: int = 150, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        words = [rng.choice(WORDS) for _ in range(rng.randint(8, 30))]
        texts.append(" ".join(words).capitalize() + ".")
    return texts


TEXTS = make_texts()


def expected_sequences(tokenizer, texts, num_tokens, max_length):
    """The packing rule written out: texts + EOS each, concatenated, cut at num_tokens, chunked by max_length."""
    stream = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream = stream[:num_tokens]
    return [stream[i : i + max_length] for i in range(0, len(stream), max_length)]


def direct_mom2(model, layer, sequences):
    """K^T K / n from keys collected by a hook of our own, one full forward pass per sequence, in fp64."""
    module = resolve_layout(model).mlp_out(model, layer)
    keys = []
    handle = module.register_forward_pre_hook(lambda mod, args: keys.append(args[0].reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            for sequence in sequences:
                ids = torch.tensor([sequence])
                extra = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
                model(input_ids=ids, **extra)
    finally:
        handle.remove()
    k = torch.cat(keys).double()
    return k.T @ k / k.shape[0], k.shape[0]


def compute(model, layer=1, **kwargs):
    options = {"corpus": TEXTS, "num_tokens": NUM_TOKENS, "max_length": MAX_LENGTH, "batch_tokens": 256,
               "progress": False}
    options.update(kwargs)
    return LayerStatistics.compute(model, tiny_tokenizer(), layer, **options)


class CountForwards:
    """Counts calls of a module's forward while active."""

    def __init__(self, module):
        self.calls = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def remove(self):
        self.handle.remove()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_KNOWEDIT_STATS_CACHE", str(tmp_path / "stats-cache"))
    monkeypatch.setenv("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    clear_statistics_cache()
    yield
    clear_statistics_cache()


@pytest.fixture(scope="module")
def gpt2():
    return tiny_model("gpt2", seed=0)


# ------------------------------------------------------------------------------------------------ exact values
@pytest.mark.parametrize("arch", DECODER_ARCHITECTURES + ["t5"])
def test_mom2_equals_direct_computation(arch):
    model = tiny_model(arch)
    stats = compute(model, layer=1, dtype=torch.float64, use_cache=False)
    sequences = expected_sequences(tiny_tokenizer(), TEXTS, NUM_TOKENS, MAX_LENGTH)
    expected, count = direct_mom2(model, 1, sequences)
    assert stats.count == count == NUM_TOKENS
    assert stats.mom2.dtype == torch.float64 and stats.mom2.device.type == "cpu"
    assert stats.second_moment is stats.mom2
    torch.testing.assert_close(stats.mom2, expected, rtol=1e-5, atol=1e-8)


def test_fp32_accumulation_close_to_fp64(gpt2):
    fp32 = compute(gpt2, dtype=torch.float32, use_cache=False)
    fp64 = compute(gpt2, dtype=torch.float64, use_cache=False)
    assert fp32.mom2.dtype == torch.float32 and fp32.metadata["dtype"] == "float32"
    torch.testing.assert_close(fp32.mom2.double(), fp64.mom2, rtol=1e-4, atol=1e-6)


def test_padding_excluded_and_batching_irrelevant(gpt2):
    # 1000 tokens in sequences of 64: the last one is 40 long and padded in its batch.
    one_per_batch = compute(gpt2, dtype=torch.float64, batch_tokens=1, use_cache=False)
    many_per_batch = compute(gpt2, dtype=torch.float64, batch_tokens=4096, use_cache=False)
    assert one_per_batch.count == many_per_batch.count == NUM_TOKENS
    torch.testing.assert_close(one_per_batch.mom2, many_per_batch.mom2, rtol=1e-6, atol=1e-9)


def test_compute_many_equals_separate_computes(gpt2):
    many = LayerStatistics.compute_many(gpt2, tiny_tokenizer(), [2, 0], corpus=TEXTS, num_tokens=NUM_TOKENS,
                                        max_length=MAX_LENGTH, dtype=torch.float64, use_cache=False, progress=False)
    assert list(many) == [2, 0]
    for layer in (0, 2):
        single = compute(gpt2, layer=layer, dtype=torch.float64, use_cache=False)
        torch.testing.assert_close(many[layer].mom2, single.mom2, rtol=1e-10, atol=1e-12)
        assert many[layer].metadata["layer"] == layer


def test_forward_stopped_at_the_layer(gpt2):
    layout = resolve_layout(gpt2)
    at_layer, later, head = (CountForwards(layout.blocks(gpt2)[1]), CountForwards(layout.blocks(gpt2)[2]),
                             CountForwards(layout.lm_head(gpt2)))
    try:
        compute(gpt2, layer=1, use_cache=False)
    finally:
        for counter in (at_layer, later, head):
            counter.remove()
    assert at_layer.calls > 0
    assert later.calls == 0 and head.calls == 0


def test_model_left_as_it_was(gpt2):
    gpt2.train()
    try:
        compute(gpt2, use_cache=False)
        assert gpt2.training
        assert not any(module._forward_pre_hooks for module in gpt2.modules())
    finally:
        gpt2.eval()


# ---------------------------------------------------------------------------------------------------- corpora
def test_corpus_text_file_folder_and_env_default(gpt2, tmp_path, monkeypatch):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(TEXTS[:75]) + "\n", encoding="utf-8")
    (folder / "b.txt").write_text("\n\n".join(TEXTS[75:]) + "\n", encoding="utf-8")
    (folder / ".hidden.txt").write_text("never read " * 100, encoding="utf-8")
    (folder / "data.bin").write_bytes(b"\x00\xff" * 100)
    from_list = compute(gpt2, dtype=torch.float64, use_cache=False)
    from_folder = compute(gpt2, corpus=folder, dtype=torch.float64, use_cache=False)
    from_file = compute(gpt2, corpus=str(folder / "a.txt"), num_tokens=500, dtype=torch.float64, use_cache=False)
    torch.testing.assert_close(from_folder.mom2, from_list.mom2, rtol=1e-10, atol=1e-12)
    assert from_folder.metadata["corpus"]["files"] == ["a.txt", "b.txt"]
    assert from_file.count == 500 and from_file.metadata["corpus"]["files"] == ["a.txt"]
    monkeypatch.setenv(CORPUS_ENV, str(folder))
    from_env = compute(gpt2, corpus=None, dtype=torch.float64, use_cache=False)
    torch.testing.assert_close(from_env.mom2, from_list.mom2, rtol=1e-10, atol=1e-12)
    assert from_env.metadata["corpus"]["source"] == f"env:{CORPUS_ENV}"
    assert from_env.metadata["corpus"]["fingerprint"] == from_folder.metadata["corpus"]["fingerprint"]


def test_files_corpus_fingerprint_is_by_content(tmp_path):
    """A copy of a corpus elsewhere with new modification times (a fresh checkout) shares the cache; a file whose
    text changed, or a new file, does not."""
    import shutil

    from hf_knowedit.statistics import corpus_identity

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("alpha beta\n\ngamma delta\n", encoding="utf-8")
    os.utime(folder / "a.txt", ns=(10**18, 10**18))
    first = corpus_identity(folder)
    assert first["files"] == ["a.txt"] and first["num_bytes"] == 24
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy, copy_function=shutil.copy)  # new modification times
    assert (copy / "a.txt").stat().st_mtime_ns != 10**18
    assert resolve_corpus(copy).fingerprint == first["fingerprint"]
    (copy / "a.txt").write_text("alpha BETA\n\ngamma delta\n", encoding="utf-8")  # the same size
    os.utime(copy / "a.txt", ns=(2 * 10**18, 2 * 10**18))  # a new time, even where times are coarse
    assert resolve_corpus(copy).fingerprint != first["fingerprint"]
    (folder / "b.txt").write_text("more text\n", encoding="utf-8")
    assert corpus_identity(folder)["fingerprint"] != first["fingerprint"]


def test_corpus_datasets_dataset(gpt2):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"body": TEXTS, "id": list(range(len(TEXTS)))})
    from_dataset = compute(gpt2, corpus=dataset, text_column="body", dtype=torch.float64, use_cache=False)
    from_list = compute(gpt2, dtype=torch.float64, use_cache=False)
    torch.testing.assert_close(from_dataset.mom2, from_list.mom2, rtol=1e-10, atol=1e-12)
    assert from_dataset.metadata["corpus"]["kind"] == "datasets"
    with pytest.raises(ValueError, match="text_column"):
        compute(gpt2, corpus=dataset, use_cache=False)


def test_corpus_generator_is_read_once(gpt2):
    stats = compute(gpt2, corpus=(text for text in TEXTS), dtype=torch.float64, use_cache=False)
    torch.testing.assert_close(stats.mom2, compute(gpt2, dtype=torch.float64, use_cache=False).mom2)


def test_wikitext_tokens_files_are_detokenized(tmp_path):
    (tmp_path / "wiki.test.tokens").write_text(
        " \n = Robert Boulter = \n \n Robert Boulter is an English actor . He had a guest @-@ starring role in "
        "2 @,@ 000 . \n \n = = Career = = \n \n He starred as \" Craig \" in Teddy 's Story <unk> . \n"
        " \n = Du Fu = \n \n Du Fu ( 712 – 770 ) was a poet . \n",
        encoding="utf-8",
    )
    documents = list(resolve_corpus(tmp_path).read())
    assert documents == [
        "Robert Boulter\n\nRobert Boulter is an English actor. He had a guest-starring role in 2,000.\n\nCareer\n\n"
        'He starred as "Craig" in Teddy\'s Story.',
        "Du Fu\n\nDu Fu (712 – 770) was a poet.",
    ]
    assert detokenize_wikitext("3 @.@ 5 km , ( see above ) ; it isn 't") == "3.5 km, (see above); it isn't"


def test_shared_wikitext_corpus_reads():
    path = REPO_ROOT.parent / "shared" / "data" / "wikitext"
    if not path.is_dir():
        pytest.skip("../shared/data/wikitext is not here")
    first = next(resolve_corpus(path).read())
    assert first.startswith("Robert Boulter\n\n") and " @-@ " not in first and "<unk>" not in first


def test_missing_corpus_error(gpt2, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(CorpusNotFoundError, match=CORPUS_ENV) as info:
        compute(gpt2, corpus=None, use_cache=False)
    assert "corpus=" in str(info.value) and isinstance(info.value, ValueError)
    monkeypatch.setenv(CORPUS_ENV, "/nonexistent/corpus/folder")
    with pytest.raises(CorpusNotFoundError, match="does not exist"):
        compute(gpt2, corpus=None, use_cache=False)


def test_an_unreachable_hub_fails_at_once_and_says_how_to_use_the_cache(monkeypatch):
    datasets = pytest.importorskip("datasets")
    called = []
    monkeypatch.delenv(CORPUS_ENV, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: called.append(args) or [])

    def no_network(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(statistics_module.socket, "create_connection", no_network)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(statistics_module, "_dataset_corpus", lambda *args, **kwargs: "read through datasets")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(CorpusNotFoundError, match="cannot be reached.*HF_HUB_OFFLINE=1") as info:
        resolve_corpus(None)
    assert "Name or service not known" in str(info.value) and not called  # no 30 s of `datasets` retries
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # offline: `datasets` reads its cache
    assert resolve_corpus(None) == "read through datasets" and len(called) == 1
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # a proxy may reach what a socket cannot
    assert resolve_corpus(None) == "read through datasets" and len(called) == 2


def test_too_few_tokens(gpt2, caplog):
    with pytest.raises(InsufficientTokensError, match=f"at least {D_K} tokens") as info:
        compute(gpt2, num_tokens=D_K - 1, use_cache=False)
    assert f"about {10 * D_K}" in str(info.value)
    with pytest.raises(InsufficientTokensError, match="corpus gives only") as info:
        compute(gpt2, corpus=["Only a few words here.", "And here."], use_cache=False)
    assert f"at least {D_K}" in str(info.value)
    with caplog.at_level(logging.WARNING, logger="hf_knowedit"):
        stats = compute(gpt2, num_tokens=2 * D_K, use_cache=False)
    assert stats.count == 2 * D_K
    assert any("recommended" in record.getMessage() for record in caplog.records)


def test_singular_second_moment_is_a_typed_error(gpt2):
    stats = compute(gpt2, use_cache=False)
    stats.check_nonsingular()
    mom2 = stats.mom2.clone()
    mom2[:, 0] = mom2[0, :] = 0
    with pytest.raises(SingularStatisticsError, match="singular"):
        LayerStatistics(mom2, stats.count, stats.metadata).check_nonsingular()


# ----------------------------------------------------------------------------------------------------- caching
def test_disk_cache_hit_does_not_run_the_model(gpt2, tmp_path):
    first = compute(gpt2, cache_dir=tmp_path / "cache")
    counter = CountForwards(gpt2)
    try:
        second = compute(gpt2, cache_dir=tmp_path / "cache")
    finally:
        counter.remove()
    assert counter.calls == 0
    torch.testing.assert_close(second.mom2, first.mom2, rtol=0, atol=0)
    assert second.metadata["cache_key"] == first.metadata["cache_key"]


def test_cache_keys_differ_by_layer_tokens_corpus_dtype(gpt2, tmp_path):
    cache = tmp_path / "cache"
    variants = [
        {},
        {"layer": 2},
        {"num_tokens": NUM_TOKENS + 64},
        {"corpus": make_texts(seed=1)},
        {"dtype": torch.float64},
        {"max_length": 32},
    ]
    keys = set()
    for variant in variants:
        counter = CountForwards(gpt2)
        try:
            stats = compute(gpt2, cache_dir=cache, **variant)
        finally:
            counter.remove()
        assert counter.calls > 0, variant
        keys.add(stats.metadata["cache_key"])
    assert len(keys) == len(variants)
    assert len(list(cache.rglob("statistics.safetensors"))) == len(variants)
    other_model = tiny_model("gpt2", seed=1)
    counter = CountForwards(other_model)
    try:
        compute(other_model, cache_dir=cache)
    finally:
        counter.remove()
    assert counter.calls > 0


def test_compute_many_caches_each_layer(gpt2, tmp_path):
    cache = tmp_path / "cache"
    compute(gpt2, layer=1, cache_dir=cache)
    layout = resolve_layout(gpt2)
    block1, block3 = CountForwards(layout.blocks(gpt2)[1]), CountForwards(layout.blocks(gpt2)[3])
    try:
        many = LayerStatistics.compute_many(gpt2, tiny_tokenizer(), [1, 2], corpus=TEXTS, num_tokens=NUM_TOKENS,
                                            max_length=MAX_LENGTH, cache_dir=cache, progress=False)
    finally:
        block1.remove()
        block3.remove()
    assert block1.calls > 0 and block3.calls == 0  # ran for layer 2 only, stopped there
    assert set(many) == {1, 2}
    assert len(list(cache.rglob("statistics.safetensors"))) == 2


def test_get_layer_statistics_memory_cache(gpt2):
    kwargs = {"corpus": TEXTS, "num_tokens": NUM_TOKENS, "max_length": MAX_LENGTH, "use_cache": False,
              "progress": False}
    first = get_layer_statistics(gpt2, tiny_tokenizer(), [1, 2], **kwargs)
    counter = CountForwards(gpt2)
    try:
        again = get_layer_statistics(gpt2, tiny_tokenizer(), 2, **kwargs)
    finally:
        counter.remove()
    assert counter.calls == 0 and again[2] is first[2]
    other = get_layer_statistics(gpt2, tiny_tokenizer(), [2], **{**kwargs, "num_tokens": NUM_TOKENS + 1})
    assert other[2] is not first[2]


# ------------------------------------------------------------------------------------------- save, load, checks
def test_save_and_load_round_trip(gpt2, tmp_path):
    stats = compute(gpt2, dtype=torch.float64, use_cache=False)
    projector = stats.null_space_projector(threshold=0.5, relative=True)
    stats.save_pretrained(tmp_path / "stats")
    assert {p.name for p in (tmp_path / "stats").iterdir()} == {
        "statistics.safetensors", "statistics_config.json", "README.md"
    }
    text = (tmp_path / "stats" / "statistics_config.json").read_text()
    assert '"hf_knowedit_version"' in text and text.startswith('{\n  "')
    loaded = LayerStatistics.from_pretrained(tmp_path / "stats", model=gpt2, layer=1)
    assert loaded.count == stats.count and loaded.mom2.dtype == torch.float64
    torch.testing.assert_close(loaded.mom2, stats.mom2, rtol=0, atol=0)
    assert loaded.metadata["corpus"] == stats.metadata["corpus"]
    assert loaded.metadata["module_path"] == "transformer.h.1.mlp.c_proj"
    torch.testing.assert_close(loaded._projectors[(0.5, True)], projector, rtol=0, atol=0)
    assert loaded.null_space_projector(threshold=0.5, relative=True) is loaded._projectors[(0.5, True)]


def test_check_compatible(gpt2, tmp_path):
    stats = compute(gpt2, layer=1, use_cache=False)
    stats.check_compatible(gpt2, 1)
    with pytest.raises(BaseModelMismatchError, match="layer 1"):
        stats.check_compatible(gpt2, 2)
    other = tiny_model("gpt2", seed=1)
    with pytest.raises(BaseModelMismatchError):
        stats.check_compatible(other, 1)
    with pytest.raises(BaseModelMismatchError):
        stats.check_compatible(tiny_model("llama"), 1)
    stats.save_pretrained(tmp_path / "stats")
    with pytest.raises(BaseModelMismatchError):
        LayerStatistics.from_pretrained(tmp_path / "stats", model=other)
    with pytest.raises(BaseModelMismatchError):
        LayerStatistics.from_pretrained(tmp_path / "stats", layer=3)


def test_from_pretrained_missing_directory_is_artifact_error(tmp_path):
    from hf_knowedit.errors import ArtifactError

    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError):
        LayerStatistics.from_pretrained(tmp_path / "empty")


# ------------------------------------------------------------------------------------------------- AlphaEdit
def test_null_space_projector(gpt2):
    stats = compute(gpt2, dtype=torch.float64, num_tokens=2000, use_cache=False)
    eigenvalues, eigenvectors = torch.linalg.eigh(stats.mom2)
    threshold = float(eigenvalues[D_K // 2])  # about half of the directions are "null"
    projector = stats.null_space_projector(threshold)
    assert projector.dtype == torch.float32 and projector.shape == (D_K, D_K)
    assert stats.null_space_projector(threshold) is projector  # cached
    torch.testing.assert_close(projector, projector.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(projector @ projector, projector, rtol=0, atol=1e-5)
    assert round(float(torch.trace(projector))) == int((eigenvalues < threshold).sum())
    large = eigenvectors[:, eigenvalues >= threshold].float()
    assert projector @ large == pytest.approx(torch.zeros_like(large), abs=1e-5)
    small = eigenvectors[:, eigenvalues < threshold].float()
    torch.testing.assert_close(projector @ small, small, rtol=0, atol=1e-5)
    # On the keys the statistics come from, ‖K P‖² / n is the sum of the null eigenvalues: a small part of tr(C).
    keys = []
    module = resolve_layout(gpt2).mlp_out(gpt2, 1)
    handle = module.register_forward_pre_hook(lambda mod, args: keys.append(args[0].reshape(-1, D_K)))
    with torch.no_grad():
        for sequence in expected_sequences(tiny_tokenizer(), TEXTS, 2000, MAX_LENGTH):
            gpt2(input_ids=torch.tensor([sequence]))
    handle.remove()
    k = torch.cat(keys).double()
    null_energy = float((k @ projector.double()).pow(2).sum()) / k.shape[0]
    assert null_energy == pytest.approx(float(eigenvalues[eigenvalues < threshold].sum()), rel=1e-3)
    assert null_energy < 0.02 * float(eigenvalues.sum())
    # Thresholds at the extremes: nothing is null, or everything is.
    assert stats.null_space_projector(0.0).abs().max() == 0
    torch.testing.assert_close(stats.null_space_projector(1.01, relative=True), torch.eye(D_K), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------- two processes
DISTRIBUTED_SCRIPT = textwrap.dedent(
    """
    import sys

    import torch
    import torch.distributed as dist

    from hf_knowedit.statistics import LayerStatistics
    from tests.test_statistics import MAX_LENGTH, TEXTS
    from tests.tiny_models import tiny_model, tiny_tokenizer

    dist.init_process_group("gloo")
    out, cache = sys.argv[1], sys.argv[2]
    stats = LayerStatistics.compute_many(
        tiny_model("gpt2"), tiny_tokenizer(), [1, 2], corpus=TEXTS, num_tokens=1990, max_length=MAX_LENGTH,
        batch_tokens=128, dtype=torch.float64, cache_dir=cache, progress=False,
    )
    if dist.get_rank() == 0:
        for layer, stat in stats.items():
            stat.save_pretrained(f"{out}/layer{layer}")
    dist.barrier()
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_equal_one(gpt2, tmp_path, launcher):
    script = tmp_path / "stats_distributed.py"
    script.write_text(DISTRIBUTED_SCRIPT, encoding="utf-8")
    launch(launcher, script, tmp_path / "out", tmp_path / "dist-cache")
    # Only the main process wrote the cache: one entry per layer.
    assert len(list((tmp_path / "dist-cache").rglob("statistics.safetensors"))) == 2
    for layer in (1, 2):
        two = LayerStatistics.from_pretrained(tmp_path / "out" / f"layer{layer}")
        one = compute(gpt2, layer=layer, num_tokens=1990, batch_tokens=128, dtype=torch.float64, use_cache=False)
        assert two.count == one.count == 1990 and two.metadata["world_size"] == 2
        torch.testing.assert_close(two.mom2, one.mom2, rtol=1e-9, atol=1e-12)
        assert two.metadata["cache_key"] == one.metadata["cache_key"]
