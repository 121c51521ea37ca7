"""Scoring edit cases: what to feed the scorer for each metric and protocol, and the metrics of each case.

All the cases given are scored together (one batched pass of teacher forcing and one of generation), then each case's
metrics are computed with the pure functions of :mod:`hf_knowedit.metrics`. A case's score for a metric is the mean
over its probes (e.g. its two locality prompts). A metric a case cannot support is recorded as skipped, with the
reason, never as a zero.

With `chat_template=True` a run first puts every prompt of its cases into the tokenizer's chat template
(:func:`apply_chat_template`): the prompt is the user's turn, and the target continues the assistant's.
"""

import dataclasses

from jinja2 import TemplateError

from ..errors import KnowEditError
from ..metrics import (
    FLUENCY_PROTOCOL,
    PROTOCOLS,
    edit_fluency,
    edit_generalization,
    edit_locality,
    edit_portability,
    edit_reliability,
)
from ..requests import SUBJECT_PLACEHOLDER, EditRequest
from ..scoring import BatchScorer
from ..statistics import _prefix_tokens


METRICS: tuple[str, ...] = (
    "reliability",
    "generalization",
    "locality_unchanged",
    "locality_ground_truth",
    "portability",
    "fluency",
)
"""The metric keys of every score record, in report order."""

EXACT_MATCH_EXTRA_TOKENS = 2
"""Greedy tokens generated for exact match beyond the longest accepted answer's token count."""

NO_ANSWER_GENERATION_TOKENS = 10
"""Greedy tokens generated for a locality probe without an answer (exact-match `unchanged` only)."""


class ChatTemplateError(KnowEditError, ValueError):
    """The tokenizer has no chat template, or its template cannot hold an edit prompt."""


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as the user's turn of the tokenizer's chat template, followed by the opening of the assistant's turn.

    The text is what `tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
    add_generation_prompt=True)` renders, less a leading BOS that the tokenizer adds again when it encodes the text
    (Llama's), so that the model never sees two.

    Example:

    ```python
    >>> from tests.tiny_models import tiny_tokenizer
    >>> tokenizer = tiny_tokenizer()
    >>> tokenizer.chat_template = (
    ...     "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\\n{% endfor %}"
    ...     "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    ... )
    >>> chat_prompt(tokenizer, "The capital of France is")
    '<|user|>The capital of France is\\n<|assistant|>'

    ```
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(
            f"chat_template=True needs a tokenizer with a chat template, and {type(tokenizer).__name__} (of "
            f"{getattr(tokenizer, 'name_or_path', None)!r}) has none. Use the tokenizer of an instruction-tuned "
            "model, set tokenizer.chat_template to a Jinja template, or evaluate without --chat-template."
        )
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    except TemplateError as error:
        raise ChatTemplateError(
            f"The tokenizer's chat template fails on a single user message ({error}); it must accept "
            "[{'role': 'user', 'content': prompt}] with add_generation_prompt=True."
        ) from error
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _prefix_tokens(tokenizer):
        text = text[len(bos) :]
    return text


def apply_chat_template(requests: list[EditRequest], tokenizer) -> list[EditRequest]:
    """The cases with every prompt (edit prompt, paraphrases, locality and portability probes) in the chat template.

    The edit prompt keeps its subject placeholder, so the templated request is edited as it is queried: the subject's
    tokens are found inside the user's turn, and the target continues the assistant's. Raises
    [`ChatTemplateError`] when the tokenizer has no chat template.
    """
    templated = []
    for request in requests:
        prompt = chat_prompt(tokenizer, request.template)
        if prompt.count(SUBJECT_PLACEHOLDER) != 1:
            raise ChatTemplateError(
                f"The chat template turns the edit prompt {request.template!r} into {prompt!r}, with "
                f"{prompt.count(SUBJECT_PLACEHOLDER)} '{{}}' instead of exactly one where the subject goes; use a "
                "template that writes no '{}' of its own."
            )
        templated.append(dataclasses.replace(
            request,
            prompt=prompt,
            rephrase_prompts=[chat_prompt(tokenizer, p) for p in request.rephrase_prompts],
            locality=[dataclasses.replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in request.locality],
            portability=[dataclasses.replace(p, prompt=chat_prompt(tokenizer, p.prompt)) for p in request.portability],
        ))
    return templated


def _answer_length(tokenizer, answer: str) -> int:
    return len(tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"])


class _Plan:
    """Collects the teacher-forced pairs and generations that a list of cases needs, without duplicates."""

    def __init__(self):
        self.pairs: dict[tuple[str, str], int] = {}
        self.generations: dict[tuple[str, int], int] = {}

    def pair(self, prompt: str, target: str) -> tuple[str, str]:
        self.pairs.setdefault((prompt, target), len(self.pairs))
        return (prompt, target)

    def generation(self, prompt: str, tokens: int) -> tuple[str, int]:
        self.generations.setdefault((prompt, tokens), len(self.generations))
        return (prompt, tokens)


def score_cases(
    scorer: BatchScorer,
    requests: list[EditRequest],
    protocols: tuple[str, ...] = PROTOCOLS,
    fluency_tokens: int = 50,
    pre_raw: list[dict] | None = None,
) -> list[dict]:
    """Score `requests` with the scorer's model in its current state.

    Args:
        scorer (`BatchScorer`):
            Wraps the model (edited or not) and its tokenizer.
        requests (`list[EditRequest]`):
            The cases.
        protocols (`tuple[str, ...]`, *optional*, defaults to all):
            Which of `token_accuracy`, `prob_comparison`, `exact_match` to compute.
        fluency_tokens (`int`, *optional*, defaults to `50`):
            Greedy tokens generated from the edit prompt for fluency; `0` skips fluency.
        pre_raw (`list[dict]`, *optional*):
            The `raw` outputs of the same cases scored before the edit, for locality "unchanged". Without it (the
            pre-edit pass itself), locality "unchanged" is not computed.

    Returns:
        One dict per case: `scores` (`{metric: {protocol: result}}`), `skipped` (`{"metric/protocol": reason}`) and
        `raw` (the locality outputs that a later post-edit pass compares with).
    """
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocols must be among {PROTOCOLS}, got {protocol!r}.")
    tokenizer = scorer.tokenizer
    plan = _Plan()
    wants_tf = "token_accuracy" in protocols or "prob_comparison" in protocols
    wants_em = "exact_match" in protocols
    needs = []
    for request in requests:
        new_len = _answer_length(tokenizer, request.target_new) + EXACT_MATCH_EXTRA_TOKENS
        need = {"edit": [], "loc": [], "port": []}
        for prompt in [request.filled_prompt, *request.rephrase_prompts]:
            need["edit"].append({
                "new": plan.pair(prompt, request.target_new) if wants_tf else None,
                "true": plan.pair(prompt, request.target_true) if wants_tf and request.target_true else None,
                "gen": plan.generation(prompt, new_len) if wants_em else None,
            })
        for probe in request.locality:
            answers = probe.answers
            tokens = (max(_answer_length(tokenizer, a) for a in answers) + EXACT_MATCH_EXTRA_TOKENS if answers
                      else NO_ANSWER_GENERATION_TOKENS)
            need["loc"].append({
                "answers": answers,
                "answer": plan.pair(probe.prompt, answers[0]) if wants_tf and answers else None,
                "new": plan.pair(probe.prompt, request.target_new) if wants_tf and answers else None,
                "gen": plan.generation(probe.prompt, tokens) if wants_em else None,
            })
        for probe in request.portability:
            answers = probe.answers
            if not answers:
                continue
            tokens = max(_answer_length(tokenizer, a) for a in answers) + EXACT_MATCH_EXTRA_TOKENS
            need["port"].append({
                "answers": answers,
                "answer": plan.pair(probe.prompt, answers[0]) if wants_tf else None,
                "gen": plan.generation(probe.prompt, tokens) if wants_em else None,
            })
        need["fluency"] = plan.generation(request.filled_prompt, fluency_tokens) if fluency_tokens > 0 else None
        needs.append(need)

    pairs = list(plan.pairs)
    target_scores = dict(zip(pairs, scorer.score_targets([p for p, _ in pairs], [t for _, t in pairs]))) if pairs \
        else {}
    gens = list(plan.generations)
    generations = dict(zip(gens, scorer.generate([p for p, _ in gens], [n for _, n in gens]))) if gens else {}

    results = []
    for index, (request, need) in enumerate(zip(requests, needs)):
        pre = pre_raw[index] if pre_raw is not None else None
        results.append(_case_metrics(request, need, protocols, target_scores, generations, pre))
    return results


def _case_metrics(request, need, protocols, target_scores, generations, pre) -> dict:
    scores: dict[str, dict] = {}
    skipped: dict[str, str] = {}

    def put(metric, protocol, fn, *args, **kwargs):
        result = fn(*args, protocol=protocol, **kwargs)
        result.pop("scores", None)
        scores.setdefault(metric, {})[protocol] = result

    def skip(metric, protocol, reason):
        skipped[f"{metric}/{protocol}"] = reason

    edit_probes = {"reliability": need["edit"][:1], "generalization": need["edit"][1:]}
    edit_fns = {"reliability": edit_reliability, "generalization": edit_generalization}
    for metric, probes in edit_probes.items():
        for protocol in protocols:
            if not probes:
                skip(metric, protocol, "no rephrase prompts")
            elif protocol == "token_accuracy":
                tf = [target_scores[p["new"]] for p in probes]
                put(metric, protocol, edit_fns[metric], [s.predicted_ids for s in tf], [s.target_ids for s in tf])
            elif protocol == "prob_comparison":
                if probes[0]["true"] is None:
                    skip(metric, protocol, "no target_true to compare with")
                    continue
                put(metric, protocol, edit_fns[metric], [target_scores[p["new"]].mean_log_prob for p in probes],
                    [target_scores[p["true"]].mean_log_prob for p in probes])
            else:
                put(metric, protocol, edit_fns[metric], [generations[p["gen"]] for p in probes],
                    [[request.target_new]] * len(probes))

    raw = {"loc_tokens": None, "loc_margins": None, "loc_generations": None, "edit_log_prob": None}
    if need["edit"][0]["new"] is not None:
        raw["edit_log_prob"] = target_scores[need["edit"][0]["new"]].mean_log_prob
    loc = need["loc"]
    answered = [p for p in loc if p["answers"]]
    for protocol in protocols:
        if protocol == "token_accuracy":
            if answered:
                tf = [target_scores[p["answer"]] for p in answered]
                raw["loc_tokens"] = [list(s.predicted_ids) for s in tf]
                put("locality_ground_truth", protocol, edit_locality, [s.predicted_ids for s in tf],
                    [s.target_ids for s in tf], variant="ground_truth")
        elif protocol == "prob_comparison":
            if answered:
                answer_lp = [target_scores[p["answer"]].mean_log_prob for p in answered]
                new_lp = [target_scores[p["new"]].mean_log_prob for p in answered]
                raw["loc_margins"] = [a - b for a, b in zip(answer_lp, new_lp)]
                put("locality_ground_truth", protocol, edit_locality, answer_lp, new_lp, variant="ground_truth")
        else:
            if loc:
                raw["loc_generations"] = [generations[p["gen"]] for p in loc]
            if answered:
                put("locality_ground_truth", protocol, edit_locality, [generations[p["gen"]] for p in answered],
                    [p["answers"] for p in answered], variant="ground_truth")
        if not answered:
            skip("locality_ground_truth", protocol, "no locality prompt with an answer" if loc else
                 "no locality prompts")
        if pre is None:
            continue  # the pre-edit pass: "unchanged" is what the post-edit pass compares with it
        key = {"token_accuracy": "loc_tokens", "prob_comparison": "loc_margins",
               "exact_match": "loc_generations"}[protocol]
        if raw[key] is None or pre.get(key) is None:
            skip("locality_unchanged", protocol, "no locality prompts" if not loc else
                 "no locality prompt with an answer to teacher-force")
        else:
            put("locality_unchanged", protocol, edit_locality, raw[key], pre[key], variant="unchanged")

    port = need["port"]
    for protocol in protocols:
        if not port:
            skip("portability", protocol, "no portability prompts")
        elif protocol == "token_accuracy":
            tf = [target_scores[p["answer"]] for p in port]
            put("portability", protocol, edit_portability, [s.predicted_ids for s in tf], [s.target_ids for s in tf])
        elif protocol == "prob_comparison":
            skip("portability", protocol, "portability probes have no contrasting answer")
        else:
            put("portability", protocol, edit_portability, [generations[p["gen"]] for p in port],
                [p["answers"] for p in port])

    if need["fluency"] is not None:
        put("fluency", FLUENCY_PROTOCOL, edit_fluency, [generations[need["fluency"]]])
        raw["fluency_text"] = generations[need["fluency"]]
    return {"scores": scores, "skipped": skipped, "raw": raw}


__all__ = ["METRICS", "ChatTemplateError", "apply_chat_template", "chat_prompt", "score_cases"]
