"""Compute the target values of a MEMIT or AlphaEdit batch run from its last chunk backwards, alongside the harness.

A batch of 1,000 facts spends hours of one CPU core on its target values (chunks of `values_batch_size` requests,
optimised one after the other), and the harness computes them in one process. While it works forwards, this script
works backwards in a second process, storing each chunk's values in the run's edit work
(`<run>/edit_work/chunk-<N>/`, see `hf_knowedit.resumable`) under the same key as the harness: the harness reads the
pieces stored here when it reaches them, and this script stops at the first piece it finds stored. The edit is the
one an uninterrupted call gives (a piece's key is a SHA-256 of everything it depends on); the run's edit seconds
count every piece's own seconds, whichever process computed it.

The script rebuilds the chunk's requests as the harness does (the run's `settings.json`: dataset, selection, batch
size, probes withheld from the editor, contradicting cases left out) and checks that the chunk's first piece of
values, which the harness stores first, is there under the key it computes: start it once the harness has stored
that piece (`ls <run>/edit_work/chunk-<N>/`).

Usage (from the repository root, with the environment of the run, e.g. `source benchmarks/results/common.sh`):
    python benchmarks/results/fill_target_values.py runs/zsre/memit_batch1000 [--chunk N]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_knowedit.config import build_config
from hf_knowedit.data import load_edit_dataset
from hf_knowedit.edited_model import EditedModel
from hf_knowedit.errors import ContradictoryRequestsError
from hf_knowedit.evaluation.harness import SETTINGS_NAME, _edit_work_dir, _seed, contradicting_cases, editor_requests
from hf_knowedit.locate import values as values_module
from hf_knowedit.locate.base import check_consistent_requests
from hf_knowedit.locate.keys import context_prefixes
from hf_knowedit.modeling import load_model_and_tokenizer, prepare_tokenizer
from hf_knowedit.resumable import resumable_edits


METHODS = ("memit", "alphaedit")  # the editors whose target values sit on the block output of their last layer


def chunk_requests(settings: dict, chunk: int) -> list:
    """The requests the harness gives the editor for chunk `chunk` of a batch run with these settings."""
    requests = load_edit_dataset(settings["dataset"], n=settings["n"], offset=settings["offset"])
    size = settings["batch_size"]
    requests = requests[chunk * size:(chunk + 1) * size]
    if not requests:
        raise SystemExit(f"The run has no chunk {chunk} ({settings['n']} cases in chunks of {size}).")
    kept = list(range(len(requests)))
    while True:  # as the harness's apply_edits, with the check MEMIT and AlphaEdit make before editing
        chosen = editor_requests([requests[i] for i in kept], settings.get("editor_sees_probes", False))
        try:
            check_consistent_requests(chosen)
            return chosen
        except ContradictoryRequestsError as error:
            dropped = contradicting_cases(kept, error)
            if not dropped:  # as the harness: nothing to leave out, the run's edit itself fails
                raise
            kept = [i for i in kept if i not in dropped]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the batch run's output directory (holding settings.json)")
    parser.add_argument("--chunk", type=int, default=0, help="the run's chunk whose values to compute (default 0)")
    args = parser.parse_args(argv)
    if not (args.run / SETTINGS_NAME).is_file():
        raise SystemExit(f"{args.run} holds no run ({SETTINGS_NAME} is missing): start the harness run first.")
    settings = json.loads((args.run / SETTINGS_NAME).read_text(encoding="utf-8"))
    if settings["method"] not in METHODS or settings["mode"] != "batch":
        raise SystemExit(f"{args.run} is a {settings['mode']} run of {settings['method']}; this script fills the "
                         f"target values of batch runs of {', '.join(METHODS)}.")
    if settings.get("chat_template"):
        raise SystemExit("The run edits chat-templated prompts, which this script does not rebuild.")
    config = build_config(settings["method"], settings["config"])
    requests = chunk_requests(settings, args.chunk)
    model, tokenizer = load_model_and_tokenizer(settings["model"], dtype=getattr(torch, settings["dtype"]),
                                                device_map=settings.get("device_map"))
    prepare_tokenizer(tokenizer)
    edited = EditedModel(model, tokenizer)
    edited.eval()
    _seed(settings["seed"] + args.chunk)
    layers = config.resolve_layers(edited.layout)
    with edited.disable_edits(), torch.no_grad():
        prefixes = context_prefixes(edited.base_model, tokenizer, config.num_context_prefixes,
                                    config.context_prefix_length)
    size = config.values_batch_size
    pieces = [requests[i:i + size] for i in range(0, len(requests), size)]
    folder = _edit_work_dir(args.run, args.chunk)

    def values(piece):
        return values_module.optimize_target_values(edited, piece, layers[-1], prefixes, config, site="block_out")

    with edited._editing_state(), resumable_edits(folder) as work:
        compute = values_module._optimize_chunk

        def not_stored(*_args, **_kwargs):
            raise SystemExit(f"The first piece of values of chunk {args.chunk} is not in {folder} under the key "
                             "computed here: start this script once the harness has stored it (or the run's "
                             "settings do not rebuild its requests).")

        values_module._optimize_chunk = not_stored
        try:
            values(pieces[0])
        finally:
            values_module._optimize_chunk = compute
        print(f"{len(requests)} requests in {len(pieces)} pieces; piece 0 found under its key", flush=True)
        for number in reversed(range(len(pieces))):
            reused, start = work.reused, time.perf_counter()
            values(pieces[number])
            if work.reused > reused:
                print(f"piece {number} is stored already: the harness has come this far; done", flush=True)
                return 0
            print(f"{time.strftime('%H:%M:%S')} piece {number} computed in {time.perf_counter() - start:.0f} s",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
