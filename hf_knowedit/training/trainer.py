"""The editor-training loop: :func:`train_editor`, on `accelerate`, with checkpoints, resume, budgets and NaN stops.

Output folder of a run:

- `editor/`: the trained editor (:class:`~hf_knowedit.training.TrainedEditor`), written when the run ends well
  (steps or time budget reached);
- `checkpoints/step-XXXXXXXX/`: a trained editor too (usable as `editor=`), plus `optimizer.safetensors` and
  `trainer_state.json` (step, optimizer scalars, metrics history) to resume from; the last `keep_checkpoints` are
  kept;
- `training_log.jsonl`: one JSON line per logged step and per validation.

Only the main process writes. Under `accelerate launch`, every process takes its own batches of a shared,
deterministic order, and the gradients of the editor network are averaged across processes before each step (the
editor is not wrapped in `DistributedDataParallel`: the specs call its submodules, not its `forward`).
"""

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from ..config import EditConfig
from ..distributed import destroy_process_group_at_exit
from ..errors import ArtifactError, EditConfigError, EditRequestError
from ..requests import as_requests
from ..utils import get_logger, progress_enabled, tqdm, write_json
from .artifact import FINAL_SUBFOLDER, TrainedEditor
from .spec import TrainableEditorSpec, get_trainable_editor


logger = get_logger(__name__)

CHECKPOINTS_DIR = "checkpoints"
OPTIMIZER_NAME = "optimizer.safetensors"
TRAINER_STATE_NAME = "trainer_state.json"
LOG_NAME = "training_log.jsonl"
STATUSES = ("completed", "time_budget", "diverged")


@dataclass
class EditorTrainingArguments:
    """How an editor is trained (the method's own settings live in its config).

    Args:
        learning_rate (`float`, *optional*, defaults to `None`):
            Adam learning rate of the editor network; `None` takes the spec's `default_learning_rate`.
        batch_size (`int`, *optional*, defaults to `None`):
            Requests per step and process; `None` takes the spec's `default_batch_size`.
        max_steps (`int`, *optional*, defaults to `None`):
            Optimizer steps to train in all (a resumed run counts the steps done before). `None` with no
            `max_minutes` means 1000.
        max_minutes (`float`, *optional*, defaults to `None`):
            Wall-clock budget of this run in minutes; training stops, checkpoints and saves the editor when spent.
        eval_every (`int`, *optional*, defaults to `50`):
            Steps between validations on the held-back requests (and one at the end).
        save_every (`int`, *optional*, defaults to `100`):
            Steps between checkpoints (and one at the end).
        keep_checkpoints (`int`, *optional*, defaults to `2`):
            How many of the latest checkpoints to keep.
        validation_size (`int`, *optional*, defaults to `None`):
            Requests held back from the end of the training list for validation, when no validation requests are
            given; `None` holds back 10% (at most 100), none when fewer than 10 requests.
        max_grad_norm (`float`, *optional*, defaults to `100.0`):
            Gradient clipping norm (MEND clips at 100); `0` switches clipping off.
        seed (`int`, *optional*, defaults to `0`):
            Seeds the editor's initialisation and the data order.
        log_every (`int`, *optional*, defaults to `10`):
            Steps between lines of `training_log.jsonl`.
    """

    learning_rate: float | None = field(default=None, metadata={"help": "Adam learning rate; None: the method's."})
    batch_size: int | None = field(default=None, metadata={"help": "Requests per step and process."})
    max_steps: int | None = field(default=None, metadata={"help": "Total optimizer steps."})
    max_minutes: float | None = field(default=None, metadata={"help": "Wall-clock budget of this run, in minutes."})
    eval_every: int = field(default=50, metadata={"help": "Steps between validations."})
    save_every: int = field(default=100, metadata={"help": "Steps between checkpoints."})
    keep_checkpoints: int = field(default=2, metadata={"help": "Checkpoints kept."})
    validation_size: int | None = field(default=None, metadata={"help": "Requests held back for validation."})
    max_grad_norm: float = field(default=100.0, metadata={"help": "Gradient clipping norm; 0: none."})
    seed: int = field(default=0, metadata={"help": "Seed of initialisation and data order."})
    log_every: int = field(default=10, metadata={"help": "Steps between log lines."})

    def __post_init__(self):
        for name in ("batch_size", "max_steps", "validation_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "validation_size" else 1)):
                raise EditConfigError(f"EditorTrainingArguments.{name} must be a positive integer, got {value!r}.")
        for name in ("eval_every", "save_every", "keep_checkpoints", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise EditConfigError(
                    f"EditorTrainingArguments.{name} must be a positive integer, got {getattr(self, name)!r}."
                )
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise EditConfigError(f"EditorTrainingArguments.max_minutes must be positive, got {self.max_minutes!r}.")
        if self.learning_rate is not None and not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise EditConfigError(
                f"EditorTrainingArguments.learning_rate must be positive and finite, got {self.learning_rate!r}."
            )


@dataclass
class TrainingResult:
    """What a training run did.

    Attributes:
        status (`str`): `"completed"` (steps done), `"time_budget"` (stopped by `max_minutes`) or `"diverged"` (a
            loss or gradient became NaN/Inf: training stopped before that step, nothing was saved after it).
        steps (`int`): optimizer steps done in all.
        editor_dir (`Path | None`): the saved editor (`None` when the run diverged).
        last_checkpoint (`Path | None`): the latest good checkpoint (itself usable as `editor=`).
        history (`list[dict]`): the logged training and validation metrics.
        message (`str`): a one-line summary.
    """

    status: str
    steps: int
    editor_dir: Path | None
    last_checkpoint: Path | None
    history: list[dict]
    message: str

    @property
    def ok(self) -> bool:
        return self.status != "diverged"


class _StepBatchSampler(torch.utils.data.Sampler):
    """Batches of request indices for global batches `first..last-1`, a function of `(seed, batch number)` only.

    Epoch `e` visits the requests in `randperm(n, seed + e)`, so a resumed run sees exactly the batches the
    uninterrupted run would have seen.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, first: int, last: int):
        self.num_items, self.batch_size, self.seed = num_items, min(batch_size, num_items), seed
        self.first, self.last = first, last
        self.batches_per_epoch = max(1, num_items // self.batch_size)

    def __len__(self):
        return max(0, self.last - self.first)

    def __iter__(self):
        order, epoch = None, None
        for number in range(self.first, self.last):
            if number // self.batches_per_epoch != epoch:
                epoch = number // self.batches_per_epoch
                order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed + epoch))
            start = (number % self.batches_per_epoch) * self.batch_size
            yield order[start : start + self.batch_size].tolist()


def train_editor(
    method: str,
    model: nn.Module,
    tokenizer,
    dataset_requests,
    output_dir,
    config: EditConfig | None = None,
    args: EditorTrainingArguments | None = None,
    validation_requests=None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    resume: bool = False,
    dataset_name: str | None = None,
) -> TrainingResult:
    """Train the editor network of `method` (e.g. `"mend"`, `"ke"`) for `model` on edit requests.

    Runs on `accelerate` (CPU when there is no GPU; several processes under `accelerate launch`), validates on
    held-back requests, checkpoints under `output_dir/checkpoints/`, resumes from the last checkpoint with
    `resume=True`, stops at `max_steps` or after `max_minutes`, and stops before any step whose loss or gradient is
    NaN or Inf (status `"diverged"`, a warning in the log, the last good checkpoint kept). The trained editor is
    saved to `output_dir/editor/`; use it with e.g. `MENDConfig(editor=output_dir)`.

    Example:

    ```python
    >>> from hf_knowedit.training import train_editor
    >>> from tests.tiny_models import tiny_model, tiny_tokenizer
    >>> requests = [{"prompt": f"{{}} number {i} is", "subject": f"Item{i}", "target_new": "red"} for i in range(4)]
    >>> result = train_editor("mend", tiny_model("gpt2"), tiny_tokenizer(), requests, "/tmp/mend-doc",
    ...                       max_steps=2)  # doctest: +SKIP
    >>> result.status  # doctest: +SKIP
    'completed'
    ```
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    spec_cls = get_trainable_editor(method)
    config = config if config is not None else spec_cls.config_class()
    if not isinstance(config, spec_cls.config_class):
        raise EditConfigError(f"train_editor({method!r}) needs a {spec_cls.config_class.__name__}, got "
                              f"{type(config).__name__}.")
    args = args if args is not None else EditorTrainingArguments()
    overrides = {k: v for k, v in (("max_steps", max_steps), ("max_minutes", max_minutes)) if v is not None}
    args = EditorTrainingArguments(**{**asdict(args), **overrides})
    total_steps = args.max_steps or (1000 if args.max_minutes is None else 10**9)
    batch_size = args.batch_size or spec_cls.default_batch_size
    learning_rate = args.learning_rate or spec_cls.default_learning_rate

    requests = as_requests(dataset_requests)
    train_requests, held_back = _split_validation(requests, validation_requests, args.validation_size)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    destroy_process_group_at_exit()
    model.to(accelerator.device)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    set_seed(args.seed)
    spec: TrainableEditorSpec = spec_cls(config, model, tokenizer)
    spec.check_training_requests(train_requests, batch_size)
    trainable = spec.build_trainable().to(accelerator.device)
    optimizer = torch.optim.Adam(spec.parameter_groups(trainable, learning_rate))

    output_dir = Path(output_dir).expanduser()
    state = {"step": 0, "history": [], "elapsed_seconds": 0.0}
    if resume:
        checkpoint = latest_checkpoint(output_dir)
        if checkpoint is None:
            logger.warning("resume=True, but %s has no checkpoint; training from scratch.",
                           output_dir / CHECKPOINTS_DIR)
        else:
            state = _load_checkpoint(checkpoint, spec, trainable, optimizer)
            logger.info("Resumed from %s (step %d).", checkpoint, state["step"])
    start_step = state["step"]
    processes = accelerator.num_processes
    sampler = _StepBatchSampler(len(train_requests), batch_size, args.seed, start_step * processes,
                                max(start_step, total_steps) * processes)
    loader = torch.utils.data.DataLoader(list(range(len(train_requests))), batch_sampler=sampler,
                                         collate_fn=lambda indices: indices)
    optimizer, loader = accelerator.prepare(optimizer, loader)

    run_info = {"dataset": dataset_name, "num_train_requests": len(train_requests),
                "num_validation_requests": len(held_back), "batch_size": batch_size, "learning_rate": learning_rate,
                "seed": args.seed, "num_processes": processes}
    history: list[dict] = state["history"]
    step, status, last_good = start_step, "completed", latest_checkpoint(output_dir)
    started = time.perf_counter()
    deadline = started + 60 * args.max_minutes if args.max_minutes else None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(total=total_steps if total_steps < 10**9 else None, initial=step, desc=f"train {method}",
               disable=not (accelerator.is_main_process and progress_enabled()))
    running: dict[str, float] = {}
    for indices in loader:
        if step >= total_steps:
            break
        trainable.train()
        batch = [train_requests[i] for i in indices]
        loss, metrics = spec.training_loss(trainable, batch)
        bad = not bool(torch.isfinite(loss.detach()))
        if not bad:
            accelerator.backward(loss)
            if processes > 1:
                for p in params:
                    if p.grad is not None:
                        p.grad = accelerator.reduce(p.grad, reduction="mean")
            bad = any(p.grad is not None and not bool(torch.isfinite(p.grad).all()) for p in params)
        if bad:
            status = "diverged"
            optimizer.zero_grad(set_to_none=True)
            break
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        for key, value in {"loss": float(loss.detach()), **metrics}.items():
            running[key] = running.get(key, 0.0) + float(value)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        if step % args.log_every == 0:
            history.append({"step": step, "split": "train", **{k: v / args.log_every for k, v in running.items()}})
            running = {}
            _append_log(accelerator, output_dir, history[-1])
        out_of_time = deadline is not None and time.perf_counter() > deadline
        last = step >= total_steps or out_of_time
        if step % args.eval_every == 0 or (last and held_back):
            if held_back:
                history.append({"step": step, "split": "validation",
                                **spec.validation_metrics(trainable, held_back)})
                _append_log(accelerator, output_dir, history[-1])
                logger.info("step %d validation: %s", step, history[-1])
        if step % args.save_every == 0 or last:
            state = {"step": step, "history": history,
                     "elapsed_seconds": state["elapsed_seconds"] + time.perf_counter() - started}
            last_good = _save_checkpoint(accelerator, output_dir, spec, trainable, optimizer, state,
                                         {**run_info, "steps": step}, args.keep_checkpoints)
            started = time.perf_counter()
        if out_of_time:
            status = "time_budget"
            break
    bar.close()
    accelerator.wait_for_everyone()

    if status == "diverged":
        message = (
            f"Training {method} diverged at step {step + 1}: the loss or a gradient became NaN or Inf, so that step "
            f"was not taken. The last good checkpoint is {last_good} (usable as editor=...); lower the learning rate "
            f"(now {learning_rate}) or the method's initial edit step size, and resume with resume=True."
        )
        logger.warning(message)
        return TrainingResult(status, step, None, last_good, history, message)
    editor_dir = output_dir / FINAL_SUBFOLDER
    if step > start_step or last_good is None:
        if accelerator.is_main_process:
            training = {**run_info, "steps": step, "status": status, "history": history[-20:]}
            TrainedEditor.from_spec(spec, trainable, training).save_pretrained(editor_dir)
    elif accelerator.is_main_process and not (editor_dir / "editor_config.json").is_file():
        shutil.copytree(last_good, editor_dir, ignore=shutil.ignore_patterns(OPTIMIZER_NAME, TRAINER_STATE_NAME))
    accelerator.wait_for_everyone()
    message = f"Trained {method} for {step} steps ({status}); editor saved to {editor_dir}."
    logger.info(message)
    return TrainingResult(status, step, editor_dir, last_good, history, message)


def _split_validation(requests, validation_requests, validation_size):
    if validation_requests is not None:
        return requests, as_requests(validation_requests)
    size = validation_size if validation_size is not None else (min(100, len(requests) // 10)
                                                                if len(requests) >= 10 else 0)
    if size >= len(requests):
        raise EditRequestError(
            f"validation_size={size} leaves no training request out of {len(requests)}; give more requests or a "
            "smaller validation_size."
        )
    return (requests[:-size], requests[-size:]) if size else (requests, [])


def _append_log(accelerator, output_dir: Path, record: dict) -> None:
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        with open(output_dir / LOG_NAME, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True) + "\n")


# -- checkpoints ---------------------------------------------------------------------------------------------------
def latest_checkpoint(output_dir) -> Path | None:
    """The checkpoint of the highest step under `output_dir/checkpoints/`, or `None`."""
    root = Path(output_dir).expanduser() / CHECKPOINTS_DIR
    found = sorted(p for p in root.glob("step-*") if (p / TRAINER_STATE_NAME).is_file()) if root.is_dir() else []
    return found[-1] if found else None


def optimizer_state_to_safetensors(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (`state.<param>.<key>`) and a JSON-ready rest, without pickle."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state_dict["param_groups"]}


def optimizer_state_from_safetensors(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """The inverse of :func:`optimizer_state_to_safetensors`."""
    state: dict[int, dict] = {}
    for name, tensor in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = tensor
    for name, value in rest.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def _save_checkpoint(accelerator, output_dir, spec, trainable, optimizer, state, training, keep) -> Path:
    from safetensors.torch import save_file

    from ..hub import atomic_directory

    directory = Path(output_dir) / CHECKPOINTS_DIR / f"step-{state['step']:08d}"
    if accelerator.is_main_process:
        editor = TrainedEditor.from_spec(spec, trainable, {**training, "status": "checkpoint"})
        with atomic_directory(directory) as staging:
            editor.save_pretrained(staging / FINAL_SUBFOLDER)
            for item in (staging / FINAL_SUBFOLDER).iterdir():
                item.rename(staging / item.name)
            (staging / FINAL_SUBFOLDER).rmdir()
            tensors, rest = optimizer_state_to_safetensors(optimizer.state_dict())
            save_file(tensors, str(staging / OPTIMIZER_NAME), metadata={"format": "pt"})
            write_json(staging / TRAINER_STATE_NAME, {**state, "optimizer": rest, "method": spec.config.edit_type,
                                                      "config": spec.config.to_dict()})
        checkpoints = sorted((Path(output_dir) / CHECKPOINTS_DIR).glob("step-*"))
        for old in checkpoints[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return directory


def _load_checkpoint(directory: Path, spec, trainable, optimizer) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        saved = json.loads((directory / TRAINER_STATE_NAME).read_text(encoding="utf-8"))
        editor = TrainedEditor.from_pretrained(directory)
        optimizer_tensors = load_file(str(directory / OPTIMIZER_NAME))
    except (json.JSONDecodeError, SafetensorError, OSError) as error:
        raise ArtifactError(f"The checkpoint {directory} is damaged ({error}); delete it to resume from an earlier "
                            "one.") from error
    current = _comparable(spec.config.to_dict())
    if saved.get("method") != spec.config.edit_type or _comparable(saved.get("config", {})) != current:
        raise EditConfigError(
            f"The checkpoint {directory} was made with another config ({saved.get('method')}: "
            f"{_comparable(saved.get('config', {}))}) than this run ({current}). Resume with the same settings, or "
            "train into a new output directory."
        )
    editor.check_compatible(spec.model)
    trainable.load_state_dict({k: v.to(next(iter(trainable.state_dict().values())).device)
                               for k, v in editor.state_dict.items()})
    optimizer.load_state_dict(optimizer_state_from_safetensors(optimizer_tensors, saved["optimizer"]))
    return {"step": int(saved["step"]), "history": list(saved.get("history", [])),
            "elapsed_seconds": float(saved.get("elapsed_seconds", 0.0))}


def _comparable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision", "editor")}


def training_argument_names() -> list[str]:
    return [f.name for f in fields(EditorTrainingArguments)]


