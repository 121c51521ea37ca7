import json
from pathlib import Path

from ...edited_model import MODEL_ROOT
from ...editor import BaseEditor
from ...errors import EditConfigError
from .config import IKEConfig
from .memory import InContextMemory, demonstration, fact_text
from .retrieval import TfidfIndex


def load_demonstration_pool(path: str, max_records: int) -> list[dict]:
    """The copy, update and retain demonstrations of the first `max_records` records of a CounterFact-style file."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise EditConfigError(f"IKEConfig.demonstrations_file {path!r} does not exist; give a CounterFact-style JSON.")
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise EditConfigError(f"IKEConfig.demonstrations_file {path!r} is not valid JSON: {error}") from error
    pool = []
    for record in records[:max_records]:
        if not all(isinstance(record.get(k), str) for k in ("prompt", "target_new")):
            continue
        prompt = record["prompt"].replace("{}", str(record.get("subject", "")))
        fact = fact_text(prompt, record["target_new"])
        pool.append({"fact": fact, "text": demonstration(fact, prompt, record["target_new"])})  # copy
        if isinstance(record.get("rephrase_prompt"), str):  # update
            pool.append({"fact": fact, "text": demonstration(fact, record["rephrase_prompt"], record["target_new"])})
        if isinstance(record.get("locality_prompt"), str) and isinstance(record.get("locality_ground_truth"), str):
            pool.append({"fact": fact, "text": demonstration(  # retain
                fact, record["locality_prompt"], record["locality_ground_truth"])})
    return pool


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
        pool = []
        if config.demonstrations_file and config.num_demonstrations:
            pool = load_demonstration_pool(config.demonstrations_file, config.max_pool_records)
        index = TfidfIndex([d["text"] for d in pool]) if pool else None
        entries = []
        for request in requests:
            fact = fact_text(request.filled_prompt, request.target_new)
            chosen = index.most_similar(fact, config.num_demonstrations) if index else []
            # Most similar last, nearest to the prompt, as in the paper.
            entries.append({"subject": request.subject, "fact": fact,
                            "demonstrations": [pool[i]["text"] for i in reversed(chosen)]})
        self.stats = {"ike_demonstrations": len(entries[0]["demonstrations"]) if entries else 0}
        return {MODEL_ROOT: InContextMemory(entries, config.scope)}
