"""`hf-knowedit train-editor`: train a learned editor (MEND, KE, ...) on an edit dataset's train split."""

import argparse
import dataclasses
import sys
from pathlib import Path


def add_train_editor_parser(subparsers) -> argparse.ArgumentParser:
    """Add `hf-knowedit train-editor`; the command prints its progress and the saved editor's path."""
    from .spec import TRAINABLE_EDITORS

    parser = subparsers.add_parser(
        "train-editor",
        help="Train a learned editor (MEND, KE, ...) for a model on an edit dataset.",
        description=(
            "Train the editor network of a learned editing method for one base model, with checkpoints, resume and "
            "a step or time budget. The editor is saved to OUTPUT/editor; use it with e.g. MENDConfig(editor=OUTPUT)."
            " Several GPUs: `accelerate launch -m hf_knowedit.training.cli train-editor ...`."
        ),
    )
    parser.add_argument("--method", required=True, choices=sorted(TRAINABLE_EDITORS), help="The method to train.")
    parser.add_argument("--model", default="default", help="Model id or local path (default: the embedded model).")
    parser.add_argument("--dataset", required=True, metavar="FILE",
                        help="Training requests: a file read by hf_knowedit.load_edit_dataset (e.g. "
                        "counterfact-train.json, zsre_mend_train-1k.json).")
    parser.add_argument("--n", type=int, default=None, help="Use only the first N records of --dataset.")
    parser.add_argument("--validation-dataset", metavar="FILE", default=None,
                        help="Validation requests (default: hold back the last 10%% of --dataset, at most 100).")
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder of the run (editor, checkpoints).")
    parser.add_argument("--max-steps", type=int, default=None, help="Total optimizer steps.")
    parser.add_argument("--max-minutes", type=float, default=None, help="Wall-clock budget of this run.")
    parser.add_argument("--resume", action="store_true", help="Continue from the last checkpoint in --output.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Set a field of the method's config or of the training arguments (learning_rate, "
                        "batch_size, eval_every, save_every, seed, ...); VALUE is read as JSON, else as a string.")
    parser.set_defaults(func=run_train_editor)
    return parser


def split_overrides(method: str, overrides: list[str]):
    """The method config and the :class:`EditorTrainingArguments` that `--set KEY=VALUE` items describe."""
    from ..config import EditConfig
    from ..errors import EditConfigError
    from ..utils import parse_overrides
    from .spec import get_trainable_editor
    from .trainer import EditorTrainingArguments

    config_cls = get_trainable_editor(method).config_class
    config_names = {f.name for f in dataclasses.fields(config_cls) if f.init}
    argument_names = {f.name for f in dataclasses.fields(EditorTrainingArguments)}
    config_data, argument_data = {}, {}
    for key, value in parse_overrides(overrides, example="learning_rate=1e-4").items():
        if key in argument_names:
            argument_data[key] = value
        elif key in config_names:
            config_data[key] = value
        else:
            raise EditConfigError(
                f"--set {key}: neither {config_cls.__name__} nor the training arguments have it; config fields: "
                f"{sorted(config_names)}; training arguments: {sorted(argument_names)}."
            )
    try:
        config = EditConfig.from_dict({**config_data, "edit_type": method})
        arguments = EditorTrainingArguments(**argument_data)
    except TypeError as error:
        raise EditConfigError(f"Invalid --set values: {error}") from None
    return config, arguments


def run_train_editor(args) -> int:
    from ..cli import _load_model
    from ..data import load_edit_dataset
    from .artifact import editor_identity
    from .trainer import train_editor

    config, arguments = split_overrides(args.method, args.overrides)
    requests = load_edit_dataset(args.dataset, n=args.n)
    validation = load_edit_dataset(args.validation_dataset) if args.validation_dataset else None
    model, tokenizer = _load_model(args.model)
    print(f"  Training {args.method} on {len(requests)} requests of {args.dataset} into {args.output} ...")
    result = train_editor(args.method, model, tokenizer, requests, args.output, config=config, args=arguments,
                          validation_requests=validation, max_steps=args.max_steps, max_minutes=args.max_minutes,
                          resume=args.resume, dataset_name=Path(args.dataset).name)
    for record in [r for r in result.history if r.get("split") == "validation"][-1:]:
        print("  last validation: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in record.items()))
    if not result.ok:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    print(f"  {result.message}")
    if result.editor_dir is not None:
        print(f"  Editor weights SHA-256 {editor_identity(result.editor_dir)['sha256']} (by content; the evaluation "
              "runs that use it record it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m hf_knowedit.training.cli train-editor ...`: the subcommand alone (also under `accelerate launch`)."""
    from ..cli import _configure_output
    from ..errors import KnowEditError

    parser = argparse.ArgumentParser(prog="hf-knowedit")
    parser.add_argument("-v", "--verbose", action="store_true", help="Show the library's log messages.")
    add_train_editor_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    _configure_output(args.verbose)
    try:
        return args.func(args)
    except KnowEditError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
