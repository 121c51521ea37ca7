"""Edit requests: the fact to write into the model, and the prompts that evaluate it."""

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import EditRequestError


SUBJECT_PLACEHOLDER = "{}"


@dataclass
class EvalPrompt:
    """A probe used to evaluate an edit: a prompt and the answer expected from the model.

    Args:
        prompt (`str`):
            The full prompt, subject already filled in.
        answer (`str` or `list[str]`, *optional*, defaults to `None`):
            The expected answer, or a list of accepted aliases (the first is used for teacher forcing). `None` when
            only "unchanged by the edit" can be measured.
        kind (`str`, *optional*, defaults to `""`):
            The category of the probe, e.g. `"Relation_Specificity"`, `"Reasoning"`, `"Subject_Aliasing"`.
    """

    prompt: str
    answer: str | list[str] | None = None
    kind: str = ""

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise EditRequestError(f"EvalPrompt.prompt must be a non-empty string, got {self.prompt!r}.")
        if isinstance(self.answer, (list, tuple)):
            aliases = [str(a) for a in _flatten(self.answer) if str(a).strip()]
            self.answer = aliases or None

    @property
    def answers(self) -> list[str]:
        """All accepted answers (empty when there is none)."""
        if self.answer is None:
            return []
        return [self.answer] if isinstance(self.answer, str) else list(self.answer)

    @classmethod
    def coerce(cls, value: "EvalPrompt | Mapping | str", kind: str = "") -> "EvalPrompt":
        """Build an `EvalPrompt` from itself, a mapping with `prompt` and `answer`/`ground_truth`, or a bare prompt."""
        if isinstance(value, EvalPrompt):
            return value
        if isinstance(value, str):
            return cls(prompt=value, kind=kind)
        if isinstance(value, Mapping):
            answer = value.get("answer", value.get("ground_truth", value.get("target")))
            return cls(prompt=value.get("prompt"), answer=answer, kind=value.get("kind", kind))
        raise EditRequestError(
            f"An evaluation probe must be a string or a mapping with 'prompt' and 'answer', got {type(value).__name__}."
        )


@dataclass
class EditRequest:
    """One fact to edit, with optional prompts to evaluate the edit.

    Args:
        prompt (`str`):
            The edit prompt. Either contains the placeholder `{}` where the subject goes
            (`"The mother tongue of {} is"`), or contains the subject verbatim.
        subject (`str`):
            The subject of the fact (`"Danielle Darrieux"`); locate-then-edit methods edit its last token's key.
        target_new (`str`):
            The new object the model should produce after the prompt (`"English"`). A leading space is added when
            tokenising if neither the prompt ends nor the target starts with whitespace.
        target_true (`str`, *optional*, defaults to `None`):
            The object the model knew before the edit; needed by probability-comparison metrics.
        rephrase_prompts (`list[str]`, *optional*, defaults to `[]`):
            Paraphrases of the edit prompt, to measure generalization.
        locality (`list[EvalPrompt]`, *optional*, defaults to `[]`):
            Unrelated prompts whose predictions the edit must not change.
        portability (`list[EvalPrompt]`, *optional*, defaults to `[]`):
            Prompts whose answers follow from the edited fact (reasoning, aliases, ...).
        case_id (`str` or `int`, *optional*, defaults to `None`):
            The record's identifier in its dataset.

    Example:

    ```python
    >>> from hf_knowedit import EditRequest
    >>> request = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
    >>> request.filled_prompt
    'The mother tongue of Danielle Darrieux is'

    ```
    """

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: list[str] = field(default_factory=list)
    locality: list[EvalPrompt] = field(default_factory=list)
    portability: list[EvalPrompt] = field(default_factory=list)
    case_id: str | int | None = None

    def __post_init__(self):
        for name in ("prompt", "subject", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise EditRequestError(
                    f"EditRequest.{name} must be a non-empty string, got {value!r}"
                    f"{f' (case {self.case_id})' if self.case_id is not None else ''}. Give the {name} of the fact."
                )
        if self.prompt.count(SUBJECT_PLACEHOLDER) > 1:
            raise EditRequestError(
                f"EditRequest.prompt {self.prompt!r} has {self.prompt.count('{}')} '{{}}' placeholders; use exactly "
                "one, where the subject goes."
            )
        if SUBJECT_PLACEHOLDER not in self.prompt and self.subject not in self.prompt:
            raise EditRequestError(
                f"EditRequest.subject {self.subject!r} does not occur in the prompt {self.prompt!r}. Put '{{}}' where "
                "the subject goes, or write the subject verbatim in the prompt."
            )
        if self.target_true is not None and not str(self.target_true).strip():
            self.target_true = None
        if isinstance(self.rephrase_prompts, str):
            self.rephrase_prompts = [self.rephrase_prompts]
        self.rephrase_prompts = [p for p in self.rephrase_prompts if isinstance(p, str) and p.strip()]
        self.locality = [EvalPrompt.coerce(p) for p in self.locality]
        self.portability = [EvalPrompt.coerce(p) for p in self.portability]

    @property
    def template(self) -> str:
        """The prompt with `{}` where the subject goes."""
        if SUBJECT_PLACEHOLDER in self.prompt:
            return self.prompt
        index = self.prompt.rfind(self.subject)
        return self.prompt[:index] + SUBJECT_PLACEHOLDER + self.prompt[index + len(self.subject) :]

    @property
    def filled_prompt(self) -> str:
        """The prompt with the subject written in."""
        return self.template.replace(SUBJECT_PLACEHOLDER, self.subject)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span `(start, end)` of the subject in :attr:`filled_prompt`."""
        start = self.template.index(SUBJECT_PLACEHOLDER)
        return start, start + len(self.subject)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EditRequest":
        """Build a request from a dict with this class's field names.

        EasyEdit's names are accepted too: `ground_truth` for `target_true`, `rephrase_prompt` for
        `rephrase_prompts`, `locality_prompt`/`locality_ground_truth` for one locality probe.
        """
        if isinstance(data, EditRequest):
            return data
        if not isinstance(data, Mapping):
            raise EditRequestError(f"An edit request must be an EditRequest or a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "target_true" not in kwargs and "ground_truth" in data:
            truth = data["ground_truth"]
            kwargs["target_true"] = truth[0] if isinstance(truth, (list, tuple)) and truth else truth
        if "rephrase_prompts" not in kwargs and data.get("rephrase_prompt"):
            kwargs["rephrase_prompts"] = data["rephrase_prompt"]
        if "locality" not in kwargs and data.get("locality_prompt"):
            answer = data.get("locality_ground_truth")
            kwargs["locality"] = [EvalPrompt(prompt=data["locality_prompt"], answer=answer, kind="Neighborhood")]
        missing = [name for name in ("prompt", "subject", "target_new") if name not in kwargs]
        if missing:
            raise EditRequestError(
                f"The edit request {dict(data)!r:.200} lacks the key(s) {missing}; every request needs 'prompt', "
                "'subject' and 'target_new'."
            )
        for name in ("locality", "portability"):
            kwargs[name] = [EvalPrompt.coerce(p) for p in kwargs.get(name) or []]
        return cls(**kwargs)


def as_requests(requests: "EditRequest | Mapping | Iterable[EditRequest | Mapping]") -> list[EditRequest]:
    """Normalise one request, a dict, or an iterable of either into a non-empty list of `EditRequest`."""
    if isinstance(requests, (EditRequest, Mapping)):
        requests = [requests]
    if requests is None or isinstance(requests, str):
        raise EditRequestError(
            f"requests must be an EditRequest, a dict, or a list of them, got {type(requests).__name__}."
        )
    result = [EditRequest.from_dict(r) for r in requests]
    if not result:
        raise EditRequestError("The list of edit requests is empty; give at least one EditRequest to edit.")
    return result


def _flatten(values) -> list:
    out = []
    for value in values:
        if isinstance(value, (list, tuple)):
            out.extend(_flatten(value))
        elif value is not None:
            out.append(value)
    return out
