"""Whether T-Patcher's key separates an edit's input from its memory set, case by case (docs/results.md, sequential
section, "Why T-Patcher's patches fire where they should not: the key").

Each case is edited alone on the untouched model with a T-Patcher config (prompt, subject and target only, as in the
harness). Patches sit beside the last FFN and do not change its inputs, so a case's patch here is the one it gets in
a sequential stream, up to what earlier patches add to its edit loss. Per case it prints, scores being in units of
`|key| |edit input|`:

- `init max/median`: the memory inputs' scores under the paper's initial key (the edit input itself), as a share of
  the edit input's own score;
- `margin gap`: the smallest gap between the edit input and a memory input along the max-margin direction, as a share
  of `|edit input|` (positive: that direction separates them);
- `trained edit/closest`: the trained key's score on the edit input and on the closest memory input (before the
  threshold is raised), and `fire trained` the share of memory inputs it fires on then;
- `fire silenced`, `value x`: the share it fires on once silenced (`silence_on_memory`), and the factor its value was
  scaled by there;
- `hit`: whether the edited model's greedy next token is the target's first token; `refused` when the editor refuses
  the patch (`max_memory_fire_rate`).

    python benchmarks/diagnose_tpatcher_keys.py --config editing_configs/tpatcher/counterfact_capped.json \
        --cases 0-5,316-318
"""

import argparse
from dataclasses import replace

import torch
from paths import COUNTERFACT, ROOT  # noqa: E402  (sets the benchmarks' environment first)


def parse_cases(text: str) -> list[int]:
    """'0-5,316' -> [0, 1, 2, 3, 4, 5, 316]."""
    cases = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        cases += list(range(int(low), int(high or low) + 1))
    return cases


def main():
    from hf_knowedit import EditedModel, EditFailedError, load_default_model
    from hf_knowedit.config import build_config
    from hf_knowedit.data import load_edit_dataset
    from hf_knowedit.methods.tpatcher.editor import TPatcherEditor, max_margin_direction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "editing_configs" / "tpatcher" / "counterfact_capped.json"))
    parser.add_argument("--dataset", default=str(COUNTERFACT))
    parser.add_argument("--cases", default="0-5,316-318", help="0-based case indices, e.g. 0-5,316")
    args = parser.parse_args()
    config = build_config(None, args.config)
    if config.edit_type != "tpatcher":
        parser.error(f"{args.config} is a {config.edit_type} config, not T-Patcher's.")
    cases = parse_cases(args.cases)
    requests = load_edit_dataset(args.dataset, n=max(cases) + 1)
    model, tokenizer = load_default_model()
    edited = EditedModel(model, tokenizer)
    found = {}

    class Probe(TPatcherEditor):
        """T-Patcher's editor, recording what each patch's training and silencing saw."""

        def train_patch(self, edited_model, path, layer, batch, position, edit_input, memory):
            initial = memory @ edit_input / edit_input.norm().pow(2)
            direction = max_margin_direction(edit_input, memory)
            found.update(init_max=float(initial.max()), init_median=float(initial.median()),
                         margin_gap=float((direction @ edit_input - (memory @ direction).max()) / edit_input.norm()))
            return super().train_patch(edited_model, path, layer, batch, position, edit_input, memory)

        @staticmethod
        def silence_on_memory(patch, edit_input, memory, max_scale=None):
            with torch.no_grad():
                unit = patch.keys[0].norm() * edit_input.norm()
                found.update(trained_edit=float(patch.keys[0] @ edit_input / unit),
                             trained_closest=float((memory @ patch.keys[0]).max() / unit),
                             fire_trained=float((patch.scores(memory)[:, 0] > 0).float().mean()))
            silenced, scale = TPatcherEditor.silence_on_memory(patch, edit_input, memory, max_scale)
            found.update(fire_silenced=float((silenced.scores(memory)[:, 0] > 0).float().mean()), value_x=scale)
            return silenced, scale

    print(f"T-Patcher keys: {args.config}")
    print("case  init max/median  margin gap  trained edit/closest  fire trained  fire silenced  value x  hit  prompt")
    for index in cases:
        request = replace(requests[index], rephrase_prompts=[], locality=[], portability=[])
        found.clear()
        editor = Probe(config)
        try:
            components = editor.compute_components(edited, [request])
        except EditFailedError:
            outcome = "refused"
        else:
            inputs = tokenizer(request.filled_prompt, return_tensors="pt").to(model.device)
            with torch.no_grad(), edited.temporary_components(components):
                top = edited(**inputs).logits[0, -1].argmax().item()
            outcome = str(top == tokenizer(" " + request.target_new)["input_ids"][0])
        print(f"{index:4d}  {found['init_max']:6.3f} / {found['init_median']:.3f}  {found['margin_gap']:10.3f}  "
              f"{found['trained_edit']:9.3f} / {found['trained_closest']:.3f}  {found['fire_trained']:12.3f}  "
              f"{found.get('fire_silenced', float('nan')):13.3f}  {found.get('value_x', float('nan')):7.2f}  "
              f"{outcome:>5}  {request.filled_prompt!r} -> {request.target_new!r}", flush=True)


if __name__ == "__main__":
    main()
