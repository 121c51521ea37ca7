import functools
from pathlib import Path

from ...data import load_config_records
from ...edited_model import MODEL_ROOT
from ...editor import BaseEditor
from .config import IKEConfig
from .memory import InContextMemory, demonstration, fact_text
from .retrieval import TfidfIndex


def load_demonstration_pool(path: str, max_records: int) -> list[dict]:
    """The copy, update and retain demonstrations of the first `max_records` records of an edit dataset (any file
    :func:`~hf_knowedit.load_edit_dataset` reads: CounterFact, zsRE, KnowEdit, JSONL, ...).

    Each record gives a *copy* demonstration (the edit prompt answered with the new target), an *update* one per
    paraphrase (answered with the new target) and a *retain* one per locality prompt with an answer (answered as
    before), as in Zheng et al. (2023).
    """
    requests = load_config_records(path, max_records, "IKEConfig.demonstrations_file")
    pool = []
    for request in requests:
        fact = fact_text(request.filled_prompt, request.target_new)
        pool.append({"fact": fact, "text": demonstration(fact, request.filled_prompt, request.target_new)})  # copy
        for prompt in request.rephrase_prompts:  # update
            pool.append({"fact": fact, "text": demonstration(fact, prompt, request.target_new)})
        for probe in request.locality:  # retain
            answer = probe.answer[0] if isinstance(probe.answer, list) and probe.answer else probe.answer
            if isinstance(answer, str) and answer:
                pool.append({"fact": fact, "text": demonstration(fact, probe.prompt, answer)})
    return pool


def indexed_pool(path: str, max_records: int) -> tuple[list[dict], TfidfIndex | None]:
    """The demonstration pool of `path` and its TF-IDF index, read once per process for as long as the file is
    unchanged (a stream of edits reads it at its first edit, not at every one)."""
    try:
        resolved = Path(path).expanduser().resolve()
        stat = resolved.stat()
    except OSError:  # read uncached: load_config_records says what is wrong with the path
        return _indexed_pool.__wrapped__(path, max_records, None)
    return _indexed_pool(str(resolved), max_records, (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _indexed_pool(path: str, max_records: int, version) -> tuple[list[dict], TfidfIndex | None]:
    pool = load_demonstration_pool(path, max_records)
    return pool, TfidfIndex([d["text"] for d in pool]) if pool else None


class IKEEditor(BaseEditor):
    """Stores each new fact with the demonstrations most similar to it; no weight is changed.

    >>> from hf_knowedit import get_edited_model, EditRequest
    >>> from hf_knowedit.methods.ike import IKEConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> request = EditRequest(prompt="The capital of {} is", subject="Atlantis", target_new="Paris")
    >>> edited = get_edited_model(tiny_model("gpt2"), IKEConfig(), [request], tokenizer=tiny_tokenizer())
    >>> edited.get_edit().components[""][0].context(0)
    'New Fact: The capital of Atlantis is Paris\\n'
    """

    config_class = IKEConfig

    def compute_components(self, edited_model, requests):
        config = self.config
        pool, index = [], None
        if config.demonstrations_file and config.num_demonstrations:
            pool, index = indexed_pool(config.demonstrations_file, config.max_pool_records)
        entries = []
        for request in requests:
            fact = fact_text(request.filled_prompt, request.target_new)
            chosen = index.most_similar(fact, config.num_demonstrations) if index else []
            # Most similar last, nearest to the prompt, as in the paper.
            entries.append({"subject": request.subject, "fact": fact,
                            "demonstrations": [pool[i]["text"] for i in reversed(chosen)]})
        self.stats = {"ike_demonstrations": len(entries[0]["demonstrations"]) if entries else 0}
        return {MODEL_ROOT: InContextMemory(entries, config.scope)}
