"""`hf-knowedit plan`: the command line of :mod:`hf_knowedit.plan`."""

import argparse
import json
from pathlib import Path

from .config import build_config
from .errors import EditConfigError
from .plan import (
    DEFAULT_FLUENCY_TOKENS,
    DEFAULT_SCORER_BATCH_SIZE,
    DEVICES,
    DTYPE_BYTES,
    MODES,
    RequestShape,
    estimate_peak_memory,
)


def add_plan_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit plan`: print the estimated peak memory of an edit or evaluation run, and its breakdown."""
    from .config import EDIT_METHODS

    parser = subparsers.add_parser(
        "plan",
        help="Estimate the peak memory of an edit or evaluation run before loading the model.",
        description="Estimate the peak memory of editing (or evaluating) with a method from the method's config and "
        "the model's config (read from local files; no weight is loaded), and print its breakdown by component "
        "(weights, activations, logits, optimizer states, statistics, editor networks) and the total of each phase.",
    )
    parser.add_argument("--method", choices=sorted(EDIT_METHODS), default=None,
                        help="Editing method (default: the edit_type of --config).")
    parser.add_argument("--model", default="default", help="Model id or local path (default: the embedded model).")
    parser.add_argument("--config", metavar="CONFIG.json", help="A JSON edit config or a saved edit's folder.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config field; VALUE is read as JSON, else as a string.")
    parser.add_argument("--batch-size", type=int, default=1, help="Requests edited at once (default: 1).")
    parser.add_argument("--mode", choices=MODES, default="edit", help="Plan one edit, or an evaluation run.")
    parser.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="float32", help="Dtype of the model.")
    parser.add_argument("--device", choices=DEVICES, default="cpu", help="Where the run computes.")
    parser.add_argument("--requests", metavar="FILE", default=None,
                        help="Plan for the first --batch-size requests of a dataset file (their token counts).")
    parser.add_argument("--prompt-tokens", type=int, default=16, help="Tokens per prompt (without --requests).")
    parser.add_argument("--target-tokens", type=int, default=4, help="Tokens per target (without --requests).")
    parser.add_argument("--rephrase-tokens", type=int, nargs="*", default=[],
                        help="Tokens of each rephrased prompt (without --requests).")
    parser.add_argument("--scorer-batch-size", type=int, default=DEFAULT_SCORER_BATCH_SIZE,
                        help="With --mode evaluate: prompts per scoring pass (as hf-knowedit evaluate's).")
    parser.add_argument("--fluency-tokens", type=int, default=DEFAULT_FLUENCY_TOKENS,
                        help="With --mode evaluate: greedy tokens generated for fluency (0: none).")
    parser.add_argument("--json", action="store_true", help="Print the plan as JSON instead of a table.")
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args) -> int:
    """Run `hf-knowedit plan`."""
    from .data import load_edit_dataset
    from .utils import parse_overrides

    if not args.method and not args.config:
        raise EditConfigError("Give --method (e.g. rome) or --config FILE.")
    method_or_config = args.config if args.config else args.method
    overrides = parse_overrides(args.overrides)
    if args.config and args.method:
        config = build_config(args.method, args.config, overrides)
        method_or_config, overrides = config, None
    requests = None
    if args.requests:
        if not Path(args.requests).expanduser().exists():
            raise EditConfigError(f"--requests {args.requests} does not exist.")
        # An evaluation scores a chunk of cases before editing: plan for as many as it takes at once.
        n = args.batch_size if args.mode == "edit" else max(args.batch_size, args.scorer_batch_size)
        requests = load_edit_dataset(args.requests, n=n)
    shape = RequestShape(prompt_tokens=args.prompt_tokens, target_tokens=args.target_tokens,
                         rephrase_tokens=list(args.rephrase_tokens))
    plan = estimate_peak_memory(method_or_config, args.model, overrides=overrides, batch_size=args.batch_size,
                                mode=args.mode, dtype=args.dtype, device=args.device, requests=requests,
                                request_shape=shape, scorer_batch_size=args.scorer_batch_size,
                                fluency_tokens=args.fluency_tokens)
    print(json.dumps(plan.to_dict(), indent=2, sort_keys=True) if args.json else plan.table())
    return 0
