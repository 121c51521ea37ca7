from dataclasses import dataclass, field
from typing import ClassVar

from ...config import EditConfig
from ...errors import EditConfigError


SCOPES = ("subject", "always")


@dataclass
class IKEConfig(EditConfig):
    """In-context knowledge editing (IKE; Zheng et al. 2023, "Can We Edit Factual Knowledge by In-Context
    Learning?"): no weight changes; the new fact and demonstrations retrieved for it are put before the prompt.

    Demonstrations are built from an edit dataset's train split as in the paper, three per record: *copy* (the fact's
    own prompt answered with its new target), *update* (a paraphrase answered with the new target) and *retain* (an
    unrelated prompt answered with its true answer), each written
    `"New Fact: <prompt> <target>\\n<query> <answer>\\n\\n"`.
    The `num_demonstrations` most similar to the new fact (TF-IDF cosine over words, offline) are stored with it.

    Args:
        demonstrations_file (`str`, *optional*, defaults to `None`):
            A CounterFact-style JSON file (`prompt, subject, target_new, rephrase_prompt, locality_prompt,
            locality_ground_truth`), e.g. `counterfact-train.json`. `None` stores the new fact alone.
        num_demonstrations (`int`, *optional*, defaults to `16`):
            Demonstrations put before each in-scope prompt (the paper uses 32 with GPT-J's longer context).
        max_pool_records (`int`, *optional*, defaults to `2000`):
            Records of the file searched for demonstrations (the first ones).
        scope (`str`, *optional*, defaults to `"subject"`):
            Which prompts get the context: `"subject"`, those that mention an edited subject (the fact with the
            longest matching subject is used; other prompts reach the model unchanged); `"always"`, every prompt, with
            the most similar stored fact, as in the paper.
        layers (`list[int]`, *optional*, defaults to `None`):
            Unused: IKE changes no layer.
    """

    edit_type: ClassVar[str] = "ike"

    demonstrations_file: str | None = field(
        default=None, metadata={"help": "CounterFact-style JSON train split to draw demonstrations from."}
    )
    num_demonstrations: int = field(default=16, metadata={"help": "Demonstrations put before an in-scope prompt."})
    max_pool_records: int = field(default=2000, metadata={"help": "Records of the file searched for demonstrations."})
    scope: str = field(default="subject", metadata={"help": f"One of {SCOPES}."})

    def __post_init__(self):
        super().__post_init__()
        if self.scope not in SCOPES:
            raise EditConfigError(f"IKEConfig.scope must be one of {SCOPES}, got {self.scope!r}.")
        for name in ("num_demonstrations", "max_pool_records"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise EditConfigError(f"IKEConfig.{name} must be a non-negative integer, got {value!r}.")
