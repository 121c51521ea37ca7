"""Target values `v*`: the output vector that makes the model say the new object.

ROME (Meng et al. 2022), §3.1 Eq. 4: `v* = argmin_z 1/N Σ_j -log P_{G(m_i := z)}[o* | x_j + p]
+ D_KL(P_{G(m_i := z)}[x | p'] || P_G[x | p'])`, where `m_i := z` replaces the edited activation at the subject's
last token, `x_j` are the context prefixes and `p'` the "{subject} is a" prompts that keep the subject's essence.
As in the reference code, `z = v_0 + δ` with `δ` kept within `clamp_norm_factor * ||v_0||` and penalised by
`v_weight_decay * ||δ|| / ||v_0||²`, optimised with Adam; MEMIT (Eq. 16) does the same on the residual stream at the
last edited layer.

All requests of a chunk are optimised together in one batched forward/backward (each has its own `δ`, and Adam is
element-wise, so this equals optimising them one by one), the blocks before the edited layer run once
(:class:`~hf_knowedit.locate.resume.ResumableForward`), and a request stops moving once the mean probability of its
target tokens reaches `target_probability`.
"""

import math

import torch
import torch.nn.functional as F

from ..deltas import as_token_grid, first_tensor
from ..devices import input_device
from ..errors import EditFailedError
from ..resumable import edit_work_piece
from ..tokenization import encode_prompt_target
from ..utils import get_logger, tqdm
from .keys import prefixed_prompts, subject_positions
from .resume import ResumableForward, add_at_positions


logger = get_logger(__name__)
KL_PROMPT = "{} is a"
# the config fields the values depend on (a resumable edit's pieces are keyed by them, see `hf_knowedit.resumable`)
VALUE_FIELDS = ("v_lr", "v_num_grad_steps", "kl_factor", "v_weight_decay", "clamp_norm_factor", "target_probability",
                "values_batch_size")
EDIT_SITES = ("mlp_out", "block_out")


def optimize_target_values(edited_model, requests, layer: int, prefixes: list[str], config, site: str = "mlp_out"):
    """Optimise `v*` for every request at `layer`; returns `(targets, initial, stats)`.

    Args:
        edited_model (`EditedModel`): the model, with its active edits.
        requests (`list[EditRequest]`): the facts.
        layer (`int`): the block whose output is edited.
        prefixes (`list[str]`): context prefixes (see :func:`~hf_knowedit.locate.keys.context_prefixes`).
        config (`LocateThenEditConfig`): reads `v_lr`, `v_num_grad_steps`, `kl_factor`, `v_weight_decay`,
            `clamp_norm_factor`, `target_probability` and `values_batch_size`.
        site (`str`, *optional*, defaults to `"mlp_out"`): `"mlp_out"` edits the output of the MLP output projection
            (ROME), `"block_out"` the residual stream leaving the block (MEMIT, AlphaEdit).

    Returns:
        `targets` `(N, d)` fp32, the optimised `v* = v_0 + δ`; `initial` `(N, d)`, `v_0` read on the bare prompt;
        `stats`, a dict with the steps taken and the final target probabilities.

    Example:

    ```python
    >>> from hf_knowedit import EditedModel, EditRequest
    >>> from hf_knowedit.methods.rome import ROMEConfig
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> edited = EditedModel(tiny_model("gpt2"), tiny_tokenizer())
    >>> request = EditRequest(prompt="{} plays", subject="Messi", target_new="tennis")
    >>> targets, initial, stats = optimize_target_values(edited, [request], 1, [""], ROMEConfig(v_num_grad_steps=2))
    >>> targets.shape
    torch.Size([1, 32])

    ```
    """
    if site not in EDIT_SITES:
        raise ValueError(f"site must be one of {EDIT_SITES}, got {site!r}.")
    targets, initial, steps, probs = [], [], [], []
    size = config.values_batch_size
    chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
    settings = {name: getattr(config, name) for name in VALUE_FIELDS}
    for chunk in tqdm(chunks, desc="target values", leave=False, disable=len(chunks) < 2 or None):
        inputs = {"layer": layer, "site": site, "prefixes": prefixes, "config": settings,
                  "requests": [[r.prompt, r.subject, r.target_new] for r in chunk]}

        def compute(chunk=chunk):
            t, v0, s, p = _optimize_chunk(edited_model, chunk, layer, prefixes, config, site)
            return {"targets": t, "initial": v0, "steps": torch.tensor(s), "probs": p}

        piece = edit_work_piece("target_values", edited_model, inputs, compute)
        targets.append(piece["targets"])
        initial.append(piece["initial"])
        steps.append(int(piece["steps"]))
        probs.append(piece["probs"])
    probs = torch.cat(probs)
    stats = {"value_steps": max(steps), "target_probability_mean": float(probs.mean()),
             "target_probability_min": float(probs.min())}
    return torch.cat(targets), torch.cat(initial), stats


def _optimize_chunk(edited_model, requests, layer, prefixes, config, site):
    model, tokenizer, layout = edited_model.base_model, edited_model.tokenizer, edited_model.layout
    device = input_device(model)
    num = len(requests)

    # Rewriting texts (prefix + prompt + target) and one KL text ("{subject} is a") per request.
    texts, spans, owners = prefixed_prompts(requests, prefixes)
    kl_requests = [_kl_request(r) for r in requests]
    kl_texts, kl_spans, kl_owners = prefixed_prompts(kl_requests, [""])
    batch = encode_prompt_target(tokenizer, texts + kl_texts,
                                 [requests[i].target_new for i in owners] + [requests[i].target_new for i in kl_owners],
                                 model=model)
    num_rewrite = len(texts)
    subject_cols = subject_positions(tokenizer, texts + kl_texts, spans + kl_spans)
    input_ids = batch.input_ids.to(device)
    attention_mask = batch.attention_mask.to(device)
    labels = batch.labels[:num_rewrite]

    # Positions that predict each target token (rewriting texts) and the subject's last token (KL texts).
    target_rows, target_cols = torch.nonzero(labels != -100, as_tuple=True)
    target_ids = labels[target_rows, target_cols].to(device)
    target_owner = torch.tensor(owners)[target_rows].to(device)
    target_rows, target_cols = target_rows.to(device), (target_cols - 1).to(device)
    kl_rows = torch.arange(num_rewrite, num_rewrite + num, device=device)
    kl_cols = torch.tensor(subject_cols[num_rewrite:], device=device)
    rows = torch.cat([target_rows, kl_rows])
    cols = torch.cat([target_cols, kl_cols])
    tokens_per_request = torch.zeros(num, device=device).index_add_(0, target_owner, torch.ones_like(target_owner,
                                                                                                      dtype=torch.float))

    # Where δ is added: the subject's last token of every text; request index of every text.
    edit_rows = torch.arange(len(subject_cols), device=device)
    edit_cols = torch.tensor(subject_cols, device=device)
    edit_owner = torch.tensor(owners + kl_owners, device=device)
    bare_rows = torch.tensor([i * len(prefixes) for i in range(num)], device=device)  # the "" prefix comes first

    module = layout.mlp_out(model, layer) if site == "mlp_out" else layout.blocks(model)[layer]
    width = _edited_width(model, layout, layer)
    delta = torch.zeros(num, width, device=device, requires_grad=True)
    state = {"initial": None}

    def add_delta(mod, args, output):
        hidden = as_token_grid(first_tensor(output), input_ids.shape)
        if state["initial"] is None:
            state["initial"] = hidden[bare_rows, edit_cols[bare_rows]].detach().float()
        return add_at_positions(output, edit_rows, edit_cols, delta[edit_owner], input_ids.shape)

    handle = module.register_forward_hook(add_delta)
    try:
        with torch.no_grad():
            forward = ResumableForward(model, layout, input_ids, attention_mask, layer, rows, cols)
        initial = state["initial"]
        max_norm = config.clamp_norm_factor * initial.norm(dim=-1)
        kl_initial = forward.initial_logits[len(target_rows):].log_softmax(-1).detach()
        optimizer = torch.optim.Adam([delta], lr=config.v_lr)
        active = torch.ones(num, dtype=torch.bool, device=device)
        stop_nll = -math.log(config.target_probability)
        prob = torch.zeros(num, device=device)
        steps = 0
        with torch.enable_grad():
            for steps in range(1, config.v_num_grad_steps + 1):
                optimizer.zero_grad(set_to_none=True)
                logits = forward.logits()
                log_probs = logits[: len(target_rows)].log_softmax(-1)
                token_nll = -log_probs.gather(-1, target_ids[:, None]).squeeze(-1)
                # Per request: mean over its texts of the mean NLL of the target tokens = sum / its token count,
                # weighted per text as in the reference (each text has the same target).
                nll = torch.zeros(num, device=device).index_add(0, target_owner, token_nll) / tokens_per_request
                kl_log_probs = logits[len(target_rows):].log_softmax(-1)
                kl = F.kl_div(kl_initial, kl_log_probs, log_target=True, reduction="none").sum(-1)
                decay = config.v_weight_decay * delta.norm(dim=-1) / initial.norm(dim=-1).clamp(min=1e-8) ** 2
                loss = nll + config.kl_factor * kl + decay
                if not torch.isfinite(loss).all():
                    raise EditFailedError(
                        f"The target-value optimisation at layer {layer} produced a non-finite loss at step {steps}; "
                        "nothing was changed. Lower v_lr, or edit in fp32."
                    )
                prob = torch.exp(-nll.detach())
                logger.debug("step %d: nll %s kl %s", steps, nll.tolist(), kl.tolist())
                active = active & (nll.detach() > stop_nll)
                if not active.any() or steps == config.v_num_grad_steps:
                    break
                (loss * active).sum().backward()
                frozen = delta.detach().clone()
                optimizer.step()
                with torch.no_grad():
                    delta[~active] = frozen[~active]
                    norms = delta.norm(dim=-1)
                    scale = torch.where(norms > max_norm, max_norm / norms.clamp(min=1e-12), torch.ones_like(norms))
                    delta.mul_(scale[:, None])
    finally:
        handle.remove()
    targets = initial + delta.detach()
    if not torch.isfinite(targets).all():
        raise EditFailedError(f"The target values at layer {layer} are not finite; nothing was changed.")
    return targets, initial, steps, prob


def _edited_width(model, layout, layer) -> int:
    """Width of the edited activation: the MLP output projection's output size (the hidden size)."""
    from ..architectures import linear_shape

    return linear_shape(layout.mlp_out(model, layer))[0]


def _kl_request(request):
    from ..requests import EditRequest

    return EditRequest(prompt=KL_PROMPT, subject=request.subject, target_new=request.target_new)
