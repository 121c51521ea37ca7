"""The `hf-knowedit` command line: edit a model from the shell, or watch a short demo of the whole workflow.

Each subcommand is built by an `add_<name>_parser(subparsers)` function that adds its parser and sets `func`, the
function that runs it and returns the exit code. :func:`build_parser` calls every function in
:data:`SUBCOMMAND_PARSERS`; a new subcommand defined in another module is added by appending its function there.

Unlike the library, the command line prints its results. Errors of the library (:class:`~hf_knowedit.KnowEditError`)
are reported as one line, `error: ...`, on stderr, with exit code 2.
"""

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from .evaluation.cli import add_evaluate_parser, add_report_parser
from .plan_cli import add_plan_parser
from .training.cli import add_train_editor_parser
from .utils import parse_overrides


DEMO_PROMPT = "The mother tongue of {} is"
DEMO_SUBJECT = "Danielle Darrieux"
DEMO_TARGET = "English"
DEMO_NUM_RECORDS = 5
COUNTERFACT_FILE = Path("counterfact_easyedit") / "counterfact-edit.json"
DTYPES = ("float32", "bfloat16", "float16")


# -- parsers -----------------------------------------------------------------------------------------------------------
def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit edit`: apply an edit to a model, show completions before and after, optionally save it."""
    from .config import EDIT_METHODS

    parser = subparsers.add_parser(
        "edit",
        help="Edit a fact in a model and show its completions before and after.",
        description=(
            "Edit one fact given on the command line (--prompt, --subject, --target-new) or the requests of a dataset "
            "file (--requests), print the greedy completion of each prompt before and after the edit, and save the "
            "edit with --output."
        ),
    )
    methods = sorted(EDIT_METHODS)
    parser.add_argument(
        "--method",
        choices=methods,
        default=None,
        help="Editing method (default: the edit_type of --config, else 'ft').",
    )
    fact = parser.add_argument_group("one fact")
    fact.add_argument("--prompt", help="Edit prompt with '{}' where the subject goes: 'The mother tongue of {} is'.")
    fact.add_argument("--subject", help="The subject of the fact, e.g. 'Danielle Darrieux'.")
    fact.add_argument("--target-new", help="The new object the model should produce, e.g. 'English'.")
    fact.add_argument("--target-true", default=None, help="The object the model knew before the edit (optional).")
    dataset = parser.add_argument_group("many facts")
    dataset.add_argument(
        "--requests",
        metavar="FILE",
        help="A dataset file read by hf_knowedit.load_edit_dataset (CounterFact, zsRE, KnowEdit, WikiBio, JSONL of "
        "EditRequest dicts) or an edit artifact's folder.",
    )
    dataset.add_argument("--n", type=int, default=None, help="How many requests of --requests to edit (default: all).")
    dataset.add_argument("--offset", type=int, default=0, help="How many requests of --requests to skip first.")
    parser.add_argument(
        "--model", default="default", help="Model id or local path (default: the embedded SmolLM2-135M-Instruct)."
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="Dtype to load the model in.")
    parser.add_argument("--device-map", default=None,
                        help="accelerate device map to load the model with, e.g. 'auto' (default: one device).")
    parser.add_argument(
        "--config",
        metavar="CONFIG.json",
        help="A JSON edit config (an artifact's edit_config.json, a file of editing_configs/, or an artifact folder).",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Override a config field; VALUE is read as JSON, else as a string (--set num_steps=10 --set layers=[3]).",
    )
    parser.add_argument("--edit-name", default="default", help="Name of the edit (default: 'default').")
    parser.add_argument("--output", metavar="DIR", help="Save the edit artifact into DIR.")
    parser.add_argument(
        "--resume-dir",
        metavar="DIR",
        help="Store the edit's per-request work (ROME/MEMIT/AlphaEdit target values, KN neurons) in DIR as it is done, "
        "and reuse what a stopped call with the same model, config and requests stored there.",
    )
    parser.add_argument("--max-new-tokens", type=int, default=8, help="Tokens generated per completion (default: 8).")
    parser.set_defaults(func=run_edit)
    return parser


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit demo`: a scripted tour of editing, disabling, saving, reloading and evaluating."""
    parser = subparsers.add_parser(
        "demo",
        help="A one-minute tour: edit, disable, save, reload, and a small evaluation on CounterFact.",
        description=(
            "Edit 'The mother tongue of Danielle Darrieux is' to ' English' with FT-M on the default model, show that "
            "disable_edits() gives the original back, save and reload the edit, and evaluate 5 CounterFact edits "
            "(read from $HF_KNOWEDIT_DATA_DIR/counterfact_easyedit/counterfact-edit.json)."
        ),
    )
    parser.add_argument("--model", default="default", help="Model id or local path (default: the embedded model).")
    parser.add_argument("--output", metavar="DIR", help="Save the demo's edit into DIR (default: a temporary folder).")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="Tokens generated per completion (default: 8).")
    parser.set_defaults(func=run_demo)
    return parser


SUBCOMMAND_PARSERS = [
    add_edit_parser,
    add_demo_parser,
    add_evaluate_parser,
    add_report_parser,
    add_train_editor_parser,
    add_plan_parser,
]
"""The functions that add the subcommands, in the order `--help` lists them; append new ones here."""


def build_parser() -> argparse.ArgumentParser:
    """The `hf-knowedit` argument parser, with one subcommand per function of :data:`SUBCOMMAND_PARSERS`."""
    import hf_knowedit  # registers the built-in methods, so `--method` offers every one of them

    parser = argparse.ArgumentParser(
        prog="hf-knowedit",
        description="Knowledge editing for Hugging Face models: small, reversible, shareable edits.",
    )
    parser.add_argument("--version", action="version", version=f"hf-knowedit {hf_knowedit.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show the library's log messages.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_parser in SUBCOMMAND_PARSERS:
        add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line on `argv` (default: `sys.argv[1:]`) and return the exit code."""
    from .errors import KnowEditError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_output(args.verbose)
    try:
        return args.func(args) or 0
    except KnowEditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


# -- edit --------------------------------------------------------------------------------------------------------------
def run_edit(args) -> int:
    """Run `hf-knowedit edit`."""
    import torch

    from .edited_model import get_edited_model
    from .resumable import resumable_edits

    requests = _requests_from_args(args)
    config = build_config(args.method, args.config, args.overrides)
    if args.max_new_tokens < 1:
        raise _usage_error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")

    model, tokenizer = _load_model(args.model, dtype=getattr(torch, args.dtype), device_map=args.device_map)
    prompts = [r.filled_prompt for r in requests]
    before = greedy_completions(model, tokenizer, prompts, args.max_new_tokens)

    print(f"Editing {len(requests)} request(s) with {config.edit_type} ({type(config).__name__}) ...")
    start = time.perf_counter()
    with resumable_edits(args.resume_dir) if args.resume_dir else contextlib.nullcontext() as work:
        edited = get_edited_model(model, config, requests, tokenizer=tokenizer, edit_name=args.edit_name)
    if work is not None:
        print(f"Edit work in {args.resume_dir}: {work.reused} piece(s) reused, {work.computed} computed.")
    seconds = time.perf_counter() - start
    after = greedy_completions(edited, tokenizer, prompts, args.max_new_tokens)

    for request, old, new in zip(requests, before, after):
        print()
        print(f"prompt: {request.filled_prompt!r}   target_new: {request.target_new!r}")
        print(f"  before: {old!r}")
        print(f"  after:  {new!r}")
    print()
    stats = edited.get_edit(args.edit_name).stats
    details = ", ".join(f"{k}={_short(v)}" for k, v in stats.items() if k not in ("edit_seconds", "num_edit_calls"))
    print(f"Edit time: {seconds:.2f} s" + (f" ({details})" if details else ""))
    if args.output:
        _save(edited, args.output, args.edit_name)
    return 0


def build_config(method: str | None, config_path: str | None, overrides: list[str]):
    """The edit config of `method` (FT when neither it nor `--config` names one), with `--set` overrides applied."""
    from .config import build_config as build

    return build(method or (None if config_path else "ft"), config_path, parse_overrides(overrides))


def _requests_from_args(args):
    from .data import load_edit_dataset
    from .requests import EditRequest

    fact = [args.prompt, args.subject, args.target_new]
    if args.requests:
        if any(v is not None for v in fact + [args.target_true]):
            raise _usage_error("give either --requests FILE or --prompt/--subject/--target-new, not both.")
        if not Path(args.requests).expanduser().exists():
            raise _usage_error(f"--requests {args.requests} does not exist.")
        return load_edit_dataset(args.requests, n=args.n, offset=args.offset)
    if args.n is not None or args.offset:
        raise _usage_error("--n and --offset select records of --requests FILE; give --requests too.")
    missing = [f"--{name}" for name, v in zip(("prompt", "subject", "target-new"), fact) if not v]
    if missing:
        raise _usage_error(f"missing {', '.join(missing)}: give the fact to edit, or --requests FILE.")
    return [EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                        target_true=args.target_true)]


def _usage_error(message: str):
    from .errors import EditRequestError

    return EditRequestError(message)


def _save(edited, output: str, edit_name: str) -> None:
    sizes = edited.save_pretrained(output, edit_names=[edit_name])
    for name, size in sizes.items():
        folder = Path(output) if name == "default" else Path(output) / name
        print(f"Saved the edit {name!r} to {folder.resolve()} ({size:,} bytes)")


# -- demo --------------------------------------------------------------------------------------------------------------
def run_demo(args) -> int:
    """Run `hf-knowedit demo`."""
    from .edited_model import EditedModel, get_edited_model
    from .methods.ft import FTConfig
    from .requests import EditRequest

    started = time.perf_counter()
    n = args.max_new_tokens
    request = EditRequest(prompt=DEMO_PROMPT, subject=DEMO_SUBJECT, target_new=DEMO_TARGET)
    prompt = request.filled_prompt

    _step(1, "Load the model")
    model, tokenizer = _load_model(args.model)
    before = greedy_completion(model, tokenizer, prompt, n)
    print(f"  {prompt!r} -> {before!r}")

    _step(2, f"Edit it with FT-M (FTConfig()) so that the answer is {' ' + DEMO_TARGET!r}")
    print("  edited = get_edited_model(model, FTConfig(), EditRequest(prompt='The mother tongue of {} is',")
    print("                            subject='Danielle Darrieux', target_new='English'), tokenizer=tokenizer)")
    start = time.perf_counter()
    edited = get_edited_model(model, FTConfig(), request, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    after = greedy_completion(edited, tokenizer, prompt, n)
    edit = edited.get_edit()
    print(f"  edit time {seconds:.1f} s; changed modules: {sorted(edit.components)}")
    print(f"  {prompt!r} -> {after!r}")
    if not after.lstrip().startswith(DEMO_TARGET):
        print(f"  (the edit did not make the model say {DEMO_TARGET!r} here)")

    _step(3, "Switch the edit off: `with edited.disable_edits():`")
    with edited.disable_edits():
        disabled = greedy_completion(edited, tokenizer, prompt, n)
    print(f"  {prompt!r} -> {disabled!r}   (same as before the edit: {disabled == before})")

    _step(4, "Save the edit: edited.save_pretrained(folder)")
    with tempfile.TemporaryDirectory(prefix="hf-knowedit-demo-") as tmp:
        folder = Path(args.output) if args.output else Path(tmp) / "danielle-darrieux-english"
        sizes = edited.save_pretrained(folder)
        folder = folder.resolve()
        print(f"  {folder} ({sizes['default']:,} bytes in all)")
        for file in sorted(folder.iterdir()):
            print(f"    {file.name:<28} {file.stat().st_size:>12,} bytes")

        _step(5, "Reload it onto a fresh copy of the base model: EditedModel.from_pretrained(base, folder)")
        fresh, _ = _load_model(args.model)
        reloaded = EditedModel.from_pretrained(fresh, folder, tokenizer=tokenizer)
        again = greedy_completion(reloaded, tokenizer, prompt, n)
        print(f"  {prompt!r} -> {again!r}   (same as the edited model: {again == after})")

    _step(6, f"A small evaluation: {DEMO_NUM_RECORDS} CounterFact edits at once, on the base model again")
    base = reloaded.unload()  # the fresh model, with its original weights
    records = _demo_counterfact_requests()
    if records is not None:
        _demo_evaluation(base, tokenizer, records)

    print(f"\nDemo finished in {time.perf_counter() - started:.0f} s.")
    return 0


def _demo_counterfact_requests():
    from .data import load_edit_dataset

    data_dir = os.environ.get("HF_KNOWEDIT_DATA_DIR")
    if not data_dir:
        print("  Skipped: set HF_KNOWEDIT_DATA_DIR to the folder that holds counterfact_easyedit/counterfact-edit.json "
              "(the Makefile sets it to ../shared/data).")
        return None
    path = Path(data_dir).expanduser() / COUNTERFACT_FILE
    if not path.is_file():
        print(f"  Skipped: {path} was not found (HF_KNOWEDIT_DATA_DIR={data_dir}).")
        return None
    print(f"  the first {DEMO_NUM_RECORDS} valid records of {path}")
    return load_edit_dataset(path, n=DEMO_NUM_RECORDS)


def _demo_evaluation(model, tokenizer, requests) -> None:
    """Edit `requests` in one batch and print their metrics, computed as `hf-knowedit evaluate` computes them.

    Reliability (edit prompt) and generalization (rephrased prompt) under two protocols: token accuracy (teacher
    forcing, as in EasyEdit) and exact match (the greedy completion starts with the new target); locality: the share
    of the locality prompt's teacher-forced top-1 predictions that the edit left unchanged.
    """
    from .edited_model import get_edited_model
    from .evaluation.probes import score_cases
    from .methods.ft import FTConfig
    from .scoring import BatchScorer

    protocols = ("token_accuracy", "exact_match")
    pre = score_cases(BatchScorer(model, tokenizer), requests, protocols=protocols, fluency_tokens=0)
    start = time.perf_counter()
    edited = get_edited_model(model, FTConfig(), requests, tokenizer=tokenizer)
    print(f"  batch edit of {len(requests)} requests with FTConfig(): {time.perf_counter() - start:.1f} s")
    post = score_cases(BatchScorer(edited, tokenizer), requests, protocols=protocols, fluency_tokens=0,
                       pre_raw=[case["raw"] for case in pre])
    print("  rel = reliability on the edit prompt, gen = generalization on the rephrased prompt, each as target token")
    print("  accuracy (teacher-forced top-1) and [exact match: the greedy completion starts with the target]; loc =")
    print("  share of the locality prompt's top-1 predictions the edit left unchanged.")
    print(f"  {'case':>4}  {'subject':<24} {'target_new':<14} {'rel':>9} {'gen':>9} {'loc':>6}")
    rows = []
    for request, case in zip(requests, post):
        row = [_score(case, "reliability", "token_accuracy"), _score(case, "reliability", "exact_match"),
               _score(case, "generalization", "token_accuracy"), _score(case, "generalization", "exact_match"),
               _score(case, "locality_unchanged", "token_accuracy")]
        rows.append(row)
        print(f"  {str(request.case_id):>4}  {request.subject[:24]:<24} {request.target_new[:14]:<14} "
              f"{_cell(row[0], row[1]):>9} {_cell(row[2], row[3]):>9} {row[4]:>6.2f}")
    means = [_nanmean(column) for column in zip(*rows)]
    print(f"  {'mean':>4}  {'':<24} {'':<14} {means[0]:>9.2f} {means[2]:>9.2f} {means[4]:>6.2f}")
    print(f"  exact match (greedy completion starts with the target): {means[1]:.2f} on edit prompts, "
          f"{means[3]:.2f} on rephrased prompts")


def _score(case: dict, metric: str, protocol: str) -> float:
    """A case's score for a metric and protocol; NaN when the case has no probe for it."""
    return case["scores"].get(metric, {}).get(protocol, {}).get("score", float("nan"))


def _nanmean(values) -> float:
    values = [v for v in values if v == v]
    return sum(values) / len(values) if values else float("nan")


def _cell(accuracy: float, exact: float) -> str:
    if accuracy != accuracy:  # NaN: no such prompt
        return "-"
    return f"{accuracy:.2f} [{'y' if exact >= 1 else 'n'}]"


def _step(number: int, title: str) -> None:
    print(f"\n[{number}] {title}")


# -- shared helpers ----------------------------------------------------------------------------------------------------
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 8) -> list[str]:
    """The greedy continuations of `prompts`, batched by the evaluation scorer."""
    from .scoring import BatchScorer

    return BatchScorer(model, tokenizer).generate(prompts, max_new_tokens)


def greedy_completion(model, tokenizer, prompt: str, max_new_tokens: int = 8) -> str:
    """The greedy (deterministic) continuation of `prompt`, decoded without special tokens."""
    return greedy_completions(model, tokenizer, [prompt], max_new_tokens)[0]


def _load_model(name_or_path: str, dtype=None, device_map=None):
    import torch

    from .modeling import (
        CACHE_MARKER,
        DEFAULT_MODEL_ALIASES,
        DEFAULT_MODEL_NAME,
        default_model_cache_dir,
        load_model_and_tokenizer,
    )

    start = time.perf_counter()
    is_default = name_or_path in DEFAULT_MODEL_ALIASES and not Path(name_or_path).exists()
    if is_default and not (default_model_cache_dir() / CACHE_MARKER).is_file():
        print(f"  Loading the default model {DEFAULT_MODEL_NAME}: this first run converts its GGUF file to "
              f"safetensors under {default_model_cache_dir()} (about 20 s, once) ...")
    else:
        print(f"  Loading {DEFAULT_MODEL_NAME if is_default else name_or_path} ...")
    model, tokenizer = load_model_and_tokenizer(name_or_path, dtype=dtype or torch.float32, device_map=device_map)
    print(f"  loaded {type(model).__name__} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters, "
          f"{next(model.parameters()).dtype}) in {time.perf_counter() - start:.1f} s")
    return model, tokenizer


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _configure_output(verbose: bool) -> None:
    """The command line, unlike the library, chooses what reaches the terminal."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        os.environ.setdefault("HF_KNOWEDIT_DISABLE_PROGRESS_BARS", "1")


if __name__ == "__main__":
    sys.exit(main())
