"""IKE's artifact: the new facts with their demonstrations, routed per prompt (a model-level component)."""

from typing import ClassVar

from ...deltas import register_component
from ...edited_model import ModelComponent
from .retrieval import TfidfIndex


def fact_text(prompt: str, target: str) -> str:
    return f"{prompt} {target.strip()}"


def demonstration(fact: str, query: str, answer: str) -> str:
    return f"New Fact: {fact}\n{query} {answer.strip()}\n\n"


@register_component
class InContextMemory(ModelComponent):
    """The stored facts of an IKE edit; an in-scope prompt gets `demonstrations + "New Fact: <fact>\\n"` before it.

    Args:
        entries (`list[dict]`):
            One per edited fact: `subject`, `fact` (prompt and new target) and `demonstrations` (texts).
        scope (`str`, *optional*, defaults to `"subject"`):
            `"subject"` (prompts that mention an edited subject) or `"always"` (every prompt).
    """

    kind: ClassVar[str] = "in_context_memory"
    shares_long_contexts: ClassVar[bool] = True  # the demonstrations, the same for every prompt of a fact

    def __init__(self, entries: list[dict], scope: str = "subject"):
        super().__init__()
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("fact"), str) \
                    or not isinstance(entry.get("subject"), str) or not isinstance(entry.get("demonstrations"), list):
                raise ValueError(f"An IKE memory entry needs 'subject', 'fact' and 'demonstrations', got {entry!r}.")
        self.entries = [dict(e) for e in entries]
        self.scope = scope

    def context(self, index: int) -> str:
        entry = self.entries[index]
        return "".join(entry["demonstrations"]) + f"New Fact: {entry['fact']}\n"

    def match(self, prompt: str) -> int | None:
        """The stored fact that `prompt` falls under, or `None`."""
        lowered = " ".join(prompt.lower().split())
        hits = [(len(e["subject"]), i) for i, e in enumerate(self.entries)
                if e["subject"].strip() and " ".join(e["subject"].lower().split()) in lowered]
        if hits:
            return max(hits)[1]  # the longest subject; the latest fact among equals
        if self.scope == "always" and self.entries:
            return TfidfIndex([e["fact"] for e in self.entries]).most_similar(prompt, 1)[0]
        return None

    def route(self, edited_model, prompts):
        matches = [self.match(p) for p in prompts]
        return [None if m is None else self.context(m) for m in matches]

    def extra_meta(self):
        return {"entries": self.entries, "scope": self.scope}

    def combine(self, other):
        if isinstance(other, InContextMemory) and other.scope == self.scope:
            return InContextMemory(self.entries + other.entries, self.scope)
        return None

    @classmethod
    def from_state(cls, tensors, meta):
        if not isinstance(meta.get("entries"), list):
            raise ValueError("the IKE memory lacks its 'entries' list")
        return cls(meta["entries"], meta.get("scope", "subject"))
