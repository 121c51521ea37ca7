"""Foundation benchmark: the default model's conversion, load and hashing times, one FT edit, its artifact's size.

Run with `make bench` or `python benchmarks/bench_foundation.py [--repeats N]`. The conversion is timed in a temporary
`HF_HOME`, so the user's cache is neither used nor changed; nothing is downloaded.
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Runs of the cached load and of the edit (median).")
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "1")
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    from hf_knowedit import EditedModel, EditRequest, FTConfig, get_edited_model, load_default_model
    from hf_knowedit.modeling import convert_default_model, default_model_gguf

    request = EditRequest(prompt="The mother tongue of {} is", subject="Danielle Darrieux", target_new="English")
    rows = []
    with tempfile.TemporaryDirectory(prefix="hf-knowedit-bench-") as tmp:
        previous_home = os.environ.get("HF_HOME")
        os.environ["HF_HOME"] = str(Path(tmp) / "hf_home")  # read by hf_knowedit.modeling at call time
        try:
            gguf = default_model_gguf()
            _, convert_s = timed(convert_default_model, force=True)
            rows.append(("conversion on first load (GGUF -> safetensors)", f"{convert_s:.2f} s", gguf.name))

            load_times = []
            for _ in range(args.repeats):
                (model, tokenizer), seconds = timed(load_default_model)
                load_times.append(seconds)
            rows.append(("cached load (load_default_model)", f"{statistics.median(load_times):.2f} s",
                         f"median of {args.repeats}"))
        finally:
            if previous_home is None:
                os.environ.pop("HF_HOME", None)
            else:
                os.environ["HF_HOME"] = previous_home

        digest_times = [timed(EditedModel(model, tokenizer).state_digest)[1] for _ in range(args.repeats)]
        rows.append(("state digest (EditedModel.state_digest)", f"{statistics.median(digest_times):.2f} s",
                     f"median of {args.repeats}; the key of resumable edits' pieces, once per edit call"))

        edit_times, edited = [], None
        for _ in range(args.repeats):
            if edited is not None:
                model = edited.unload()  # the base weights, untouched, for the next run
            edited, seconds = timed(get_edited_model, model, FTConfig(), request, tokenizer=tokenizer)
            edit_times.append(seconds)
        stats = edited.get_edit().stats
        rows.append(("FT edit (FTConfig(), 1 request)", f"{statistics.median(edit_times):.2f} s",
                     f"median of {args.repeats}; {stats['ft_steps']} steps, final loss {stats['ft_final_loss']:.3f}"))

        sizes = edited.save_pretrained(Path(tmp) / "edit")
        weights_file = Path(tmp) / "edit" / "edit_weights.safetensors"
        changed = {path: model.get_submodule(path).weight for path in edited.get_edit().components}
        matrix_bytes = sum(w.numel() * w.element_size() for w in changed.values())
        shapes = ", ".join(f"{p} {tuple(w.shape)} {str(w.dtype).removeprefix('torch.')}" for p, w in changed.items())
        rows.append(("artifact size (whole folder)", f"{sizes['default']:,} B", "save_pretrained's return value"))
        rows.append(("  of which edit_weights.safetensors", f"{weights_file.stat().st_size:,} B", ""))
        rows.append(("full weight matrix it changes", f"{matrix_bytes:,} B", shapes))
        rows.append(("artifact / changed matrix", f"{sizes['default'] / matrix_bytes:.3f}", ""))
        total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        rows.append(("artifact / whole model", f"{sizes['default'] / total_bytes:.4f}", f"model: {total_bytes:,} B"))

    print(f"hf-knowedit foundation benchmark: {transformers.__version__=} {torch.__version__=}")
    print(f"python {platform.python_version()}, {platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    width = max(len(r[0]) for r in rows)
    value_width = max(len(r[1]) for r in rows)
    print(f"{'measure':<{width}}  {'value':>{value_width}}  notes")
    print(f"{'-' * width}  {'-' * value_width}  {'-' * 5}")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>{value_width}}  {note}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
