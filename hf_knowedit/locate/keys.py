"""Subject keys `k*`: what the edited MLP output projection reads at the subject's last token.

Meng et al. 2022 ("Locating and Editing Factual Associations in GPT", ROME), Eq. 3: the key of a fact is the input
of the MLP output projection at the last token of the subject, averaged over a handful of short texts that the model
itself generates and that are put in front of the prompt ("context prefixes"), so that the key does not depend on
one particular wording. MEMIT (Meng et al. 2023, §4.3) and AlphaEdit use the same keys.
"""

import weakref

import torch

from ..deltas import as_token_grid
from ..devices import input_device
from ..tokenization import subject_last_token_index
from ..utils import get_logger


logger = get_logger(__name__)

# The first words the model continues to build its own context prefixes (MEMIT's `get_context_templates`).
PREFIX_START_WORDS = ("The", "Therefore", "Because", "I", "You", "It", "In", "When", "This", "A")
PREFIX_SEPARATOR = ". "

_PREFIX_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def context_prefixes(model, tokenizer, num_prefixes: int = 5, length: int = 10) -> list[str]:
    """The empty prefix followed by `num_prefixes` short texts the model writes itself, greedily (cached per model).

    ROME samples its prefixes; greedy decoding from different first words (`"The"`, `"Therefore"`, ...) gives
    varied prefixes too and keeps the edit deterministic. Each prefix ends with `". "`, and the prompt follows it.

    Args:
        model (`PreTrainedModel`): the base model (call with edits disabled so that prefixes do not drift).
        tokenizer: its tokenizer.
        num_prefixes (`int`, *optional*, defaults to `5`): how many generated prefixes (at most 10).
        length (`int`, *optional*, defaults to `10`): tokens generated per prefix.

    Example:

    ```python
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> prefixes = context_prefixes(tiny_model("gpt2"), tiny_tokenizer(), num_prefixes=2, length=3)
    >>> len(prefixes), prefixes[0]
    (3, '')

    ```
    """
    if not 0 <= num_prefixes <= len(PREFIX_START_WORDS):
        raise ValueError(f"num_prefixes must be in 0..{len(PREFIX_START_WORDS)}, got {num_prefixes}.")
    try:
        cache = _PREFIX_CACHE.setdefault(model, {})
    except TypeError:
        cache = {}
    key = (num_prefixes, length)
    if key in cache:
        return list(cache[key])
    prefixes = [""]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = input_device(model)
    for word in PREFIX_START_WORDS[:num_prefixes]:
        encoded = tokenizer(word, return_tensors="pt").to(device)
        with torch.no_grad():
            output = model.generate(
                **encoded, max_new_tokens=length, min_new_tokens=length, do_sample=False, pad_token_id=pad_id,
                num_beams=1,
            )
        text = tokenizer.decode(output[0], skip_special_tokens=True)
        text = " ".join(text.replace("{", " ").replace("}", " ").split())  # one line, no placeholders
        prefixes.append(text + PREFIX_SEPARATOR)
    logger.debug("Context prefixes: %s", prefixes)
    cache[key] = prefixes
    return list(prefixes)


def subject_positions(tokenizer, texts: list[str], spans: list[tuple[int, int]]) -> list[int]:
    """Index of the subject's last token in each tokenised text."""
    return [subject_last_token_index(tokenizer, text, span) for text, span in zip(texts, spans, strict=True)]


def prefixed_prompts(requests, prefixes: list[str]) -> tuple[list[str], list[tuple[int, int]], list[int]]:
    """Every request's filled prompt behind every prefix: texts, subject spans, and the request index of each text."""
    texts, spans, owners = [], [], []
    for index, request in enumerate(requests):
        start, end = request.subject_span
        for prefix in prefixes:
            texts.append(prefix + request.filled_prompt)
            spans.append((start + len(prefix), end + len(prefix)))
            owners.append(index)
    return texts, spans, owners


class _StopForward(Exception):
    """Raised by a hook once the activations it needs are captured, so later blocks are not computed."""


def encode_texts(tokenizer, texts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `input_ids` and `attention_mask` of `texts`."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = [list(tokenizer(text)["input_ids"]) for text in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long, device=device)
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return input_ids, attention_mask


def compute_subject_keys(
    edited_model, requests, layer: int, prefixes: list[str], batch_size: int = 64, site: str = "mlp_in"
) -> torch.Tensor:
    """The keys `k*` of `requests` at `layer`, averaged over `prefixes`: `(num_requests, d_k)`, fp32.

    ROME Eq. 3: `k* = 1/N Σ_j k(x_j + s)`, the input of the MLP output projection at the subject's last token, for
    every prefix `x_j` (the empty prefix included). The forward pass stops at `layer`; the active edits of
    `edited_model` apply, so sequential edits see the earlier ones. With `site="block_out"` it reads the residual
    stream leaving block `layer` instead (MEMIT's current `z` at the last edited layer).

    Example:

    ```python
    >>> from hf_knowedit import EditedModel, EditRequest
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> edited = EditedModel(tiny_model("llama"), tiny_tokenizer())
    >>> request = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis")
    >>> compute_subject_keys(edited, [request], layer=1, prefixes=["", "Hello. "]).shape
    torch.Size([1, 64])

    ```
    """
    model, tokenizer, layout = edited_model.base_model, edited_model.tokenizer, edited_model.layout
    texts, spans, owners = prefixed_prompts(requests, prefixes)
    positions = subject_positions(tokenizer, texts, spans)
    device = input_device(model)
    if site not in ("mlp_in", "block_out"):
        raise ValueError(f"site must be 'mlp_in' or 'block_out', got {site!r}.")
    module = layout.mlp_out(model, layer) if site == "mlp_in" else layout.blocks(model)[layer]
    keys = []
    for start in range(0, len(texts), batch_size):
        input_ids, attention_mask = encode_texts(tokenizer, texts[start : start + batch_size], device)
        cols = torch.tensor(positions[start : start + batch_size], device=device)
        keys.append(_activations_at(model, module, input_ids, attention_mask, cols, site))
    keys = torch.cat(keys)
    owners = torch.tensor(owners, device=keys.device)
    summed = torch.zeros(len(requests), keys.shape[1], device=keys.device).index_add_(0, owners, keys)
    return summed / len(prefixes)


def _activations_at(model, module, input_ids, attention_mask, cols, site: str) -> torch.Tensor:
    """The input (`"mlp_in"`) or output (`"block_out"`) of `module` at one position per row; stops the forward there."""
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    captured = {}

    def capture(mod, args, kwargs, output=None):
        if site == "mlp_in":
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        else:
            x = output if isinstance(output, torch.Tensor) else output[0]
        x = as_token_grid(x, input_ids.shape)
        captured["activations"] = x[rows, cols].detach().float()
        raise _StopForward

    if site == "mlp_in":
        handle = module.register_forward_pre_hook(capture, with_kwargs=True)
    else:
        handle = module.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["activations"]
