"""The `evaluate` and `report` subcommands of `hf-knowedit` (added to the parser by `hf_knowedit.cli`)."""

import argparse
from pathlib import Path

from ..metrics import PROTOCOLS


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit evaluate`: edit and score a model on a dataset, writing JSONL records and a summary."""
    parser = subparsers.add_parser(
        "evaluate",
        help="Evaluate an editing method on a dataset (single, batch or sequential editing).",
        description="Score the untouched model, edit it case by case, in batches or sequentially, score it again, "
        "and write per-case records (results.jsonl) and a summary (summary.json) into --output. A run into a "
        "directory that holds an interrupted run with the same settings resumes it; in single and batch modes --n may "
        "grow there (a smaller --n summarizes the first n cases and keeps the others' records). Under `accelerate "
        "launch --multi_gpu --num_processes N` (or torchrun) the cases are split between the processes and the main "
        "process writes the output.",
    )
    parser.add_argument("--method", default=None, help="Registered method name, e.g. 'ft' (default: the config's).")
    parser.add_argument("--config", default=None, help="JSON file (or artifact folder) with the method's config.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field (value read as JSON, else as a string); repeatable.")
    parser.add_argument("--model", default="default", help="Model id or path (default: the embedded SmolLM2-135M).")
    parser.add_argument("--dataset", required=True, help="A dataset file load_edit_dataset reads.")
    parser.add_argument("--n", type=int, default=None, help="Number of cases (default: all after --offset).")
    parser.add_argument("--offset", type=int, default=0, help="Index of the first case.")
    parser.add_argument("--mode", choices=("single", "batch", "sequential"), default="single")
    parser.add_argument("--batch-size", type=int, default=1, help="Cases per edit in batch and sequential modes.")
    parser.add_argument("--eval-schedule", default="final",
                        help="final | immediate | every:K (sequential mode: when the edited cases are scored).")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS),
                        help=f"Comma-separated subset of {', '.join(PROTOCOLS)}.")
    parser.add_argument("--fluency-tokens", type=int, default=50,
                        help="Greedy tokens generated from the edit prompt for fluency (0: no fluency).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default=None, help="The method's name in reports (default from the config).")
    parser.add_argument("--editor-sees-probes", action="store_true",
                        help="Give the editor each case's rephrase, locality and portability prompts too (by default "
                             "it gets only the prompt, subject and targets, so no method is fitted to the prompts it "
                             "is scored on).")
    parser.add_argument("--chat-template", action="store_true",
                        help="Put every prompt into the tokenizer's chat template (the user's turn; the target "
                        "continues the assistant's), for editing and scoring.")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="Dtype to load the model in (edits are still computed in fp32; see README).")
    parser.add_argument("--device-map", default=None,
                        help="accelerate device map for loading the model, e.g. 'auto' (layers spread over the GPUs, "
                             "the rest offloaded to CPU); default: one device.")
    parser.add_argument("--scorer-batch-size", type=int, default=32, help="Prompts per scoring forward pass.")
    parser.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                        help="Sequential mode: snapshot the edited state every N edits, for a stopped run to resume "
                             "from (default: every checkpoint of every:K, every 100 edits otherwise and, with final, "
                             "after the last edit; 0: none; with every:K a multiple of K).")
    parser.add_argument("--output", required=True, help="Output directory.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Delete the run in --output and start afresh (needed when its settings differ).")
    parser.set_defaults(func=run_evaluate_command)
    return parser


def run_evaluate_command(args) -> int:
    from ..config import build_config
    from ..distributed import rank_and_world_size
    from ..utils import parse_overrides
    from .harness import NOT_COMPARED_CONFIG_FIELDS, EvaluationSettings, run_evaluation

    config = build_config(args.method, args.config, parse_overrides(args.overrides))
    config_dict = {k: v for k, v in config.to_dict().items() if k not in NOT_COMPARED_CONFIG_FIELDS}
    settings = EvaluationSettings(
        method=config.edit_type,
        config=config_dict,
        model=args.model,
        dataset=str(args.dataset),
        n=args.n,
        offset=args.offset,
        mode=args.mode,
        batch_size=args.batch_size,
        eval_schedule=args.eval_schedule,
        protocols=[p.strip() for p in args.protocols.split(",") if p.strip()],
        fluency_tokens=args.fluency_tokens,
        seed=args.seed,
        label=args.label,
        chat_template=args.chat_template,
        editor_sees_probes=args.editor_sees_probes,
        dtype=args.dtype,
        device_map=args.device_map,
    )
    summary = run_evaluation(settings, args.output, overwrite=args.overwrite,
                             scorer_batch_size=args.scorer_batch_size, snapshot_every=args.snapshot_every)
    if rank_and_world_size()[0] != 0:
        return 0  # the main process reports
    processes = f", {summary['world_size']} processes" if summary["world_size"] > 1 else ""
    print(f"{summary['method_label']} on {summary['dataset_name']} ({summary['mode']}, batch {summary['batch_size']}, "
          f"schedule {summary['eval_schedule']}{processes}): {summary['num_completed']}/{summary['num_cases']} cases")
    for metric, by_protocol in summary["metrics"]["post"].items():
        for protocol, stats in by_protocol.items():
            if stats["mean"] is None:
                print(f"  {metric:24} {protocol:16} skipped in {stats['skipped']} case(s)")
            else:
                low, high = stats["ci95"]
                print(f"  {metric:24} {protocol:16} {stats['mean']:.4f}  [{low:.4f}, {high:.4f}]  n={stats['n']}")
    print(f"Wrote {Path(args.output) / 'results.jsonl'} and {Path(args.output) / 'summary.json'}")
    return 0


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit report`: tables (Markdown) and plots (PNG) from evaluation runs."""
    parser = subparsers.add_parser(
        "report",
        help="Render tables and plots from evaluation runs.",
        description="Read the summary.json of each run directory given (or found below it) and write report.md (a "
        "method x dataset table of reliability, generalization, locality and portability, and a table of every run, "
        "where runs of one method with different configs are named by the fields that differ) "
        "and PNG plots of each metric against the number of edits and of time and memory per method.",
    )
    parser.add_argument("runs", nargs="+", help="Run directories, or folders holding run directories.")
    parser.add_argument("--output", default=None, help="Where to write report.md and the plots (default: ./report).")
    parser.add_argument("--protocol", default="token_accuracy", choices=PROTOCOLS,
                        help="The protocol shown in the main table.")
    parser.set_defaults(func=run_report_command)
    return parser


def run_report_command(args) -> int:
    from .report import write_report

    output = args.output or "report"
    files = write_report(args.runs, output, protocol=args.protocol)
    for path in files:
        print(f"Wrote {path}")
    return 0


__all__ = ["add_evaluate_parser", "add_report_parser"]
