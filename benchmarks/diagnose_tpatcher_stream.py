"""How many T-Patcher patches fire on the neighbourhood prompts, and on the earlier edits' prompts, as a sequential
stream of edits grows.

T-Patcher's locality on CounterFact collapses over a long stream, and its reliability on zsRE falls (docs/results.md,
sequential section). This script edits the first `--n` cases of `--dataset` (CounterFact by default; any file
`load_edit_dataset` reads) one after another with a T-Patcher config (the editor gets each case's prompt, subject and
targets only, as in the harness; an edit it refuses with `EditFailedError` leaves no patch and is counted, as the
harness counts it) and, after every `--every` edits, reads the FFN inputs of the patched layer on the
locality prompts and on the edit prompts of every case edited so far. All patches sit in that one layer, so those
inputs do not depend on the patches, and a patch fires on a prompt exactly when its score `x @ key + bias` is
positive there. Per checkpoint it prints, on the locality prompts:

- `fire_any`: share of the locality prompts on which at least one patch fires at some position;
- `fire_last`: the same at the prompt's last position (the one that predicts the next token);
- `patches_last`: mean number of patches firing at the last position, and the largest;
- `shift_last`: mean norm of what the patches add to the FFN output at the last position, in units of that
  position's FFN output norm;
- `top1_changed`: share of locality prompts whose greedy next token differs from the unedited model's;
- `other_case_share`: of the firings at the last position, the share by patches written for another case than the
  prompt's own (the patch of the prompt's case is allowed to fire on it only by mistake, too).

and on the edit prompts of the cases edited so far, at their last position (the one that predicts the first target
token), a second line:

- `own_fires`: share of edit prompts on which their own patch fires;
- `other_fires`: share of edit prompts on which at least one patch of another edit fires, and `others` the mean
  number of such patches;
- `other/own`: mean over the edit prompts on which their own patch fires of the norm of what the other edits'
  patches add there, in units of the norm of what the prompt's own patch adds;
- `top1_kept`: share of edit prompts whose greedy next token is still the one the model gave right after their own
  edit (where that token was the target's first, a change costs the edit it).

With `--widest K` (default 3), each checkpoint also lists the K patches that fire (at the last position) on the most
locality prompts: the edit they were written for, that share, and for their neuron with the lowest threshold its
bias, key norm and threshold `-bias / |key|` (the score, in units of the key, that an input must pass to fire it).

    python benchmarks/diagnose_tpatcher_stream.py --config editing_configs/tpatcher/counterfact.json --n 300 --every 50
    python benchmarks/diagnose_tpatcher_stream.py --config editing_configs/tpatcher/default.json \
        --dataset ../shared/data/knowedit/ZsRE-test-all.json --n 300 --every 100
"""

import argparse
import time
from dataclasses import replace

import torch
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def next_tokens(edited, prompts, chunk=32):
    """The greedy next token of every prompt (right padding)."""
    tokenizer = edited.tokenizer
    found = []
    for start in range(0, len(prompts), chunk):
        batch = tokenizer(prompts[start:start + chunk], return_tensors="pt", padding=True)
        with torch.no_grad():
            logits = edited(**batch).logits
        last = batch["attention_mask"].sum(1) - 1  # main() pads on the right
        found.append(logits[torch.arange(len(logits)), last].argmax(-1))
    return torch.cat(found)


def ffn_outputs_last(edited, path, prompts, chunk=32):
    """The FFN output (with the edits disabled) at the last position of every prompt (right padding)."""
    from hf_knowedit.methods.calinet.side_ffn import record_module_io

    found = []
    for start in range(0, len(prompts), chunk):
        batch = edited.tokenizer(prompts[start:start + chunk], return_tensors="pt", padding=True)
        with edited.disable_edits(), torch.no_grad(), record_module_io(edited.base_model, path) as records:
            edited(**batch)
        last = batch["attention_mask"].sum(1) - 1
        found.append(records["output"][-1][torch.arange(len(last)), last].float())
    return torch.cat(found)


def main():
    from hf_knowedit import EditedModel, load_default_model
    from hf_knowedit.config import build_config
    from hf_knowedit.data import load_edit_dataset
    from hf_knowedit.errors import EditFailedError
    from hf_knowedit.methods.calinet.side_ffn import ffn_host_path
    from hf_knowedit.methods.tpatcher.editor import TPatcherEditor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "editing_configs" / "tpatcher" / "counterfact.json"))
    parser.add_argument("--dataset", default=str(COUNTERFACT))
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--widest", type=int, default=3, help="patches to list per checkpoint, widest firing first")
    args = parser.parse_args()
    if args.n < 1 or args.every < 1 or args.widest < 0:
        parser.error("--n and --every must be positive and --widest not negative.")
    config = build_config(None, args.config)
    if config.edit_type != "tpatcher":
        parser.error(f"{args.config} is a {config.edit_type} config, not T-Patcher's.")
    requests = load_edit_dataset(args.dataset, n=args.n)
    model, tokenizer = load_default_model()
    edited = EditedModel(model, tokenizer)
    path = ffn_host_path(edited.layout, config.resolve_layers(edited.layout)[0])
    # the locality prompts of every case, with the index of the case they belong to
    owners, prompts = zip(*[(i, probe.prompt) for i, r in enumerate(requests) for probe in r.locality])
    owners = torch.tensor(owners)
    prompts = list(prompts)
    if tokenizer.padding_side != "right":
        tokenizer.padding_side = "right"
    inputs = TPatcherEditor.ffn_inputs(edited, path, prompts, model.device, per_prompt=True)
    last_inputs = torch.stack([x[-1] for x in inputs])
    base_out = ffn_outputs_last(edited, path, prompts)
    base_top1 = next_tokens(edited, prompts)
    edit_prompts = [r.filled_prompt for r in requests]
    edit_inputs = torch.stack([x[-1] for x in TPatcherEditor.ffn_inputs(
        edited, path, edit_prompts, model.device, per_prompt=True)])
    print(f"T-Patcher stream diagnosis: {args.config}, {args.n} edits of {args.dataset}, layer module {path}, "
          f"{len(prompts)} locality prompts")
    print("edits  prompts  fire_any  fire_last  patches_last(mean/max)  shift_last  top1_changed  other_case_share")
    start = time.perf_counter()
    neuron_case = []  # the edit each neuron was written for: each edit's patch is appended to the stream's one
    top1_after_own = []  # the greedy next token of each edit prompt right after its own edit
    refused = 0
    for i, request in enumerate(requests):
        # as the harness does by default: the editor does not see the probes it is scored on
        bare = replace(request, rephrase_prompts=[], locality=[], portability=[])
        try:
            edited.add_edits(config, [bare], edit_name="stream")
        except EditFailedError:  # refused, the model unchanged: the harness counts it and goes on, as here
            refused += 1
        patches = edited.get_edit("stream").components[path] if "stream" in edited.edit_names else []
        neuron_case += [i] * (sum(p.num_neurons for p in patches) - len(neuron_case))
        top1_after_own.append(next_tokens(edited, [edit_prompts[i]])[0])
        done = i + 1
        if done % args.every and done != len(requests):
            continue
        if not patches:
            print(f"{done:5d}  no patch yet ({refused} edits refused)", flush=True)
            continue
        keys = torch.cat([p.keys for p in patches])
        biases = torch.cat([p.biases for p in patches])
        values = torch.cat([p.values for p in patches])
        patch_case = torch.tensor(neuron_case)
        seen = (owners < done).nonzero().squeeze(1)
        fire_any = torch.tensor([bool(((inputs[j].float() @ keys.T + biases) > 0).any()) for j in seen.tolist()])
        scores_last = last_inputs[seen] @ keys.T + biases
        firing = scores_last > 0
        added = torch.relu(scores_last) @ values
        shift = (added.norm(dim=-1) / base_out[seen].norm(dim=-1)).mean()
        top1 = next_tokens(edited, [prompts[j] for j in seen.tolist()])
        other = (patch_case[None, :] != owners[seen][:, None]) & firing
        count = firing.sum(1).float()
        print(f"{done:5d}  {len(seen):7d}  {fire_any.float().mean():8.3f}  {firing.any(1).float().mean():9.3f}  "
              f"{count.mean():12.2f} / {int(count.max()):<6d}  {shift:10.3f}  "
              f"{(top1 != base_top1[seen]).float().mean():12.3f}  "
              f"{other.sum() / max(int(firing.sum()), 1):16.3f}   "
              f"({refused} refused, {time.perf_counter() - start:.0f} s)", flush=True)
        print_edit_prompts(edited, edit_prompts[:done], edit_inputs[:done], patch_case, keys, biases, values,
                           torch.stack(top1_after_own))
        print_widest(requests[:done], patch_case, firing, keys, biases, args.widest)


def print_edit_prompts(edited, prompts, inputs, patch_case, keys, biases, values, top1_after_own):
    """The second line of a checkpoint: how the patches fire on the edit prompts of the cases edited so far."""
    scores = inputs @ keys.T + biases
    firing = scores > 0
    own = patch_case[None, :] == torch.arange(len(prompts))[:, None]
    other = firing & ~own
    own_added = (torch.relu(scores) * own) @ values
    other_added = (torch.relu(scores) * ~own) @ values
    has_own = (firing & own).any(1)  # a refused edit has no patch
    ratio = (other_added.norm(dim=-1) / own_added.norm(dim=-1).clamp_min(1e-12))[has_own]
    kept = next_tokens(edited, prompts) == top1_after_own
    print(f"       on the {len(prompts)} edit prompts: own_fires {has_own.float().mean():.3f}  "
          f"other_fires {other.any(1).float().mean():.3f}  others {other.sum(1).float().mean():.2f}  "
          f"other/own {ratio.mean():.3f}  top1_kept {kept.float().mean():.3f}", flush=True)


def print_widest(requests, patch_case, firing, keys, biases, k):
    """The `k` patches firing on the most prompts: their edit, that share, and their lowest-threshold neuron."""
    by_patch = torch.zeros(len(firing), len(requests)).index_add_(1, patch_case, firing.float()) > 0
    share = by_patch.float().mean(0)
    thresholds = -biases / keys.norm(dim=-1)
    for p in share.argsort(descending=True)[:k].tolist():
        if share[p] == 0:
            break
        neurons = (patch_case == p).nonzero().squeeze(1)
        low = neurons[thresholds[neurons].argmin()]
        print(f"         patch of edit {p + 1:4d} fires on {share[p]:.3f}: bias {biases[low]:.4f}, "
              f"|key| {keys[low].norm():.2f}, threshold {thresholds[low]:.4f}; "
              f"{requests[p].filled_prompt!r} -> {requests[p].target_new!r}", flush=True)


if __name__ == "__main__":
    main()
