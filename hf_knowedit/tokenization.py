"""Turning prompts and targets into model inputs: target spans, subject positions, context-length checks.

Every method and metric tokenises through these functions, so that "the target tokens" and "the subject's last token"
mean the same thing everywhere.
"""

import dataclasses
from dataclasses import dataclass

import torch

from .errors import EditRequestError


def target_separator(prompt: str, target: str) -> str:
    """The text between a prompt and its target: a space unless either side already has whitespace there."""
    if not prompt or prompt[-1].isspace() or target[:1].isspace():
        return ""
    return " "


def context_length(model) -> int | None:
    """The longest input the model accepts, from its config (`None` when unbounded, e.g. T5's relative positions)."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _encode_with_offsets(tokenizer, text: str, add_special_tokens: bool = True):
    encoding = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return encoding["input_ids"], encoding["offset_mapping"]


def _is_special(offset) -> bool:
    return offset[0] == offset[1] == 0


def split_prompt_target(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """Token ids of `prompt` and of `target` such that their concatenation tokenises `prompt + sep + target`.

    The full text is tokenised once and cut at the first token that reaches past the prompt's characters, so BPE
    merges across the boundary (the space before the target) come out as the model sees them at inference.
    """
    text = prompt + target_separator(prompt, target) + target
    if getattr(tokenizer, "is_fast", False):
        ids, offsets = _encode_with_offsets(tokenizer, text)
        trailing = 0
        while trailing < len(ids) and _is_special(offsets[len(ids) - 1 - trailing]) and len(ids) - 1 - trailing > 0:
            trailing += 1
        body = len(ids) - trailing
        cut = next((i for i in range(body) if not _is_special(offsets[i]) and offsets[i][1] > len(prompt)), body)
        prompt_ids, target_ids = list(ids[:cut]), list(ids[cut:body])
    else:
        prompt_ids = list(tokenizer(prompt)["input_ids"])
        target_ids = list(tokenizer(text[len(prompt) :], add_special_tokens=False)["input_ids"])
        eos = getattr(tokenizer, "eos_token_id", None)
        if prompt_ids and eos is not None and prompt_ids[-1] == eos and len(prompt_ids) > 1:
            prompt_ids = prompt_ids[:-1]
    if not target_ids:
        raise EditRequestError(f"The target {target!r} tokenises to no tokens after the prompt {prompt!r}.")
    return prompt_ids, target_ids


def subject_last_token_index(tokenizer, prompt: str, subject_span: tuple[int, int]) -> int:
    """Index, in the tokenised `prompt`, of the last token that overlaps the subject's character span."""
    start, end = subject_span
    if getattr(tokenizer, "is_fast", False):
        _, offsets = _encode_with_offsets(tokenizer, prompt)
        hits = [i for i, (a, b) in enumerate(offsets) if not (a == b == 0) and a < end and b > start]
        if hits:
            return hits[-1]
    else:  # count the tokens of the text up to the subject's end
        return len(tokenizer(prompt[:end])["input_ids"]) - 1
    raise EditRequestError(f"The subject at characters {start}:{end} of {prompt!r} covers no token.")


@dataclass
class PromptTargetBatch:
    """A padded batch of prompts followed by targets, ready for a teacher-forced forward pass.

    For decoder-only models `input_ids` holds prompt and target, right-padded, and `labels` holds the target tokens
    at their positions (-100 elsewhere), in the convention of transformers (the model shifts them). For
    encoder-decoder models `input_ids` holds the prompt and `labels` the target, fed to the decoder.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    prompt_lengths: list[int]
    target_lengths: list[int]
    is_encoder_decoder: bool
    decoder_input_ids: torch.Tensor | None = None  # encoder-decoder only: the target shifted right

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward (labels excluded, so the model computes no loss itself; no
        key/value cache, which a teacher-forced pass never reuses)."""
        inputs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "use_cache": False}
        if self.is_encoder_decoder:
            inputs["decoder_input_ids"] = self.decoder_input_ids
        return inputs

    def rows(self, start: int, stop: int) -> "PromptTargetBatch":
        """The examples `start:stop`, with the padding of the whole batch (so each row is the same as in it)."""
        cut = {name: getattr(self, name)[start:stop] for name in ("input_ids", "attention_mask", "labels")}
        if self.decoder_input_ids is not None:
            cut["decoder_input_ids"] = self.decoder_input_ids[start:stop]
        return dataclasses.replace(self, **cut, prompt_lengths=self.prompt_lengths[start:stop],
                                   target_lengths=self.target_lengths[start:stop])

    def row_chunks(self, size: int) -> list[tuple[int, "PromptTargetBatch"]]:
        """The examples in chunks of at most `size` (see :meth:`rows`), each with the index of its first example;
        the batch itself, as the one chunk, when it fits."""
        count = self.input_ids.shape[0]
        if count <= size:
            return [(0, self)]
        return [(start, self.rows(start, start + size)) for start in range(0, count, size)]

    def to(self, device) -> "PromptTargetBatch":
        for name in ("input_ids", "attention_mask", "labels", "decoder_input_ids"):
            if getattr(self, name) is not None:
                setattr(self, name, getattr(self, name).to(device))
        return self

    def target_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits that predict each label, aligned with `labels` (shifted by one for decoder-only models)."""
        if self.is_encoder_decoder:
            return logits
        return torch.cat([logits[:, :1] * 0, logits[:, :-1]], dim=1)

    def target_log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Per-example mean log-probability of the target tokens, `(batch,)`, in fp32."""
        aligned = self.target_logits(logits).float().log_softmax(-1)
        mask = self.labels != -100
        gathered = aligned.gather(-1, self.labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return (gathered * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def encode_prompt_target(
    tokenizer, prompts: list[str], targets: list[str], model=None, is_encoder_decoder: bool | None = None
) -> PromptTargetBatch:
    """Tokenise prompts with their targets into a :class:`PromptTargetBatch`, checking the model's context length."""
    if is_encoder_decoder is None:
        is_encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise EditRequestError("The tokenizer has neither a pad nor an eos token; set tokenizer.pad_token first.")
    limit = context_length(model) if model is not None else None
    rows, label_rows, prompt_lengths, target_lengths = [], [], [], []
    decoder_rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        if is_encoder_decoder:
            prompt_ids = list(tokenizer(prompt)["input_ids"])
            target_ids = list(tokenizer(target)["input_ids"])
            length = max(len(prompt_ids), len(target_ids))
        else:
            prompt_ids, target_ids = split_prompt_target(tokenizer, prompt, target)
            length = len(prompt_ids) + len(target_ids)
        if limit is not None and length > limit:
            raise EditRequestError(
                f"The prompt {prompt[:80]!r}... with its target is {length} tokens long, more than the model's context "
                f"of {limit} tokens. Shorten the prompt or the target."
            )
        if is_encoder_decoder:
            rows.append(prompt_ids)
            label_rows.append(target_ids)
            start = model.config.decoder_start_token_id if model is not None else pad_id
            decoder_rows.append([start if start is not None else pad_id] + target_ids[:-1])
        else:
            rows.append(prompt_ids + target_ids)
            label_rows.append([-100] * len(prompt_ids) + target_ids)
        prompt_lengths.append(len(prompt_ids))
        target_lengths.append(len(target_ids))

    def pad(seqs, value):
        width = max(len(s) for s in seqs)
        return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    input_ids = pad(rows, pad_id)
    attention_mask = pad([[1] * len(r) for r in rows], 0)
    labels = pad(label_rows, -100)
    decoder_input_ids = pad(decoder_rows, pad_id) if is_encoder_decoder else None
    return PromptTargetBatch(
        input_ids, attention_mask, labels, prompt_lengths, target_lengths, is_encoder_decoder, decoder_input_ids
    )
