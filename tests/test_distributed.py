"""Two processes under `accelerate launch` (gloo, CPU): the evaluation harness and editor training.

The second-moment statistics under both launchers are tested in `test_statistics.py`
(`test_two_processes_equal_one`).
"""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_knowedit.cli import main
from hf_knowedit.evaluation.snapshots import SNAPSHOTS_DIR, latest_snapshot

from .helpers import StopRun, counting_editor, curve_scores
from .launchers import launch
from .test_evaluation import CASES
from .tiny_models import tiny_model, tiny_tokenizer


EVALUATE_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import pytest
    import torch.distributed as dist

    from hf_knowedit.cli import main
    from hf_knowedit.distributed import join_process_group, rank_and_world_size
    from hf_knowedit.edited_model import EditedModel
    from tests.helpers import counting_editor

    runs, failing, report = json.loads(sys.argv[1])
    subjects = counting_editor(pytest.MonkeyPatch())  # the subjects this process edits, reported per run
    edits = []
    for argv in runs:
        subjects.clear()
        assert main(argv) == 0, argv
        edits.append(list(subjects))
    if failing is None:
        with open(f"{report}.{rank_and_world_size()[0]}", "w") as handle:
            json.dump(edits, handle)
        sys.exit(0)

    # An edit that fails on process 1 only: both processes stop, none waits for the other. (A launch of its own: after
    # the runs above, about one launch in 20 aborted at exit, in the finalisation of the interpreter of process 1.)
    join_process_group()
    rank = dist.get_rank()
    if rank == 1:
        def add_edits(self, *args, **kwargs):
            raise RuntimeError("edit failed on process 1")
        EditedModel.add_edits = add_edits
    try:
        outcome = f"exit code {main(failing)}"
    except RuntimeError as error:
        outcome = f"RuntimeError: {error}"
    with open(f"{report}.{rank}", "w") as handle:
        handle.write(outcome)
    """
)
# batch: chunks [0, 1] (done by an earlier one-process run, resumed), [2, 3] on process 0, [4] on process 1.
# sequential every:2: both processes apply the edits; the cases at each checkpoint are scored in chunks of 2.
MODES = {"batch": ["--mode", "batch", "--batch-size", "2"],
         "sequential": ["--mode", "sequential", "--eval-schedule", "every:2"]}


def _evaluate_argv(model_dir, dataset, output, mode, n=5):
    return ["evaluate", "--method", "ft", "--set", "num_steps=4", "--set", "lr=0.05", "--model", str(model_dir),
            "--dataset", str(dataset), "--n", str(n), "--fluency-tokens", "6", "--scorer-batch-size", "2",
            "--output", str(output), *MODES[mode]]


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_evaluation_in_two_processes_equals_one(tmp_path, monkeypatch):
    model_dir, dataset = tmp_path / "model", tmp_path / "cases.jsonl"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    dataset.write_text("".join(json.dumps(case) + "\n" for case in CASES))
    one, two = tmp_path / "one", tmp_path / "two"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the launched processes
    try:
        for mode in MODES:
            assert main(_evaluate_argv(model_dir, dataset, one / mode, mode)) == 0
        # an interrupted one-process batch run, resumed (and extended to 5 cases) by the two processes
        assert main(_evaluate_argv(model_dir, dataset, two / "batch", "batch", n=2)) == 0
        # a one-process stream stopped at its 5th edit, after its checkpoint (and snapshot) at 4: the two processes
        # both load the snapshot and make the 5th edit only
        with monkeypatch.context() as patch:
            counting_editor(patch, stop_at_subject="Leonardo da Vinci")
            with pytest.raises(StopRun):
                main(_evaluate_argv(model_dir, dataset, two / "resumed", "sequential"))
        assert latest_snapshot(two / "resumed", 5) == 4
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATE_SCRIPT)
    runs = {"batch": "batch", "sequential": "sequential", "resumed": "sequential"}  # run -> mode
    argvs = [_evaluate_argv(model_dir, dataset, two / run, mode) for run, mode in runs.items()]
    failing = _evaluate_argv(model_dir, dataset, tmp_path / "failing", "batch")
    result = launch("accelerate", script, json.dumps([argvs, None, str(tmp_path / "edits")]))
    assert result.stdout.count("Wrote ") == len(runs)  # the main process reports; the other is silent
    assert "2 processes" in result.stdout
    for rank in (0, 1):
        edits = dict(zip(runs, json.loads((tmp_path / f"edits.{rank}").read_text())))
        assert len(edits["sequential"]) == 5 and edits["resumed"] == ["Leonardo da Vinci"]
    assert not (two / "resumed" / SNAPSHOTS_DIR).exists()
    result = launch("accelerate", script, json.dumps([[], failing, str(tmp_path / "outcome")]))
    assert (tmp_path / "outcome.0").read_text() == "exit code 2"
    assert "error: Process 1 of 2 failed (RuntimeError: edit failed on process 1)" in result.stderr
    assert (tmp_path / "outcome.1").read_text() == "RuntimeError: edit failed on process 1"

    for run, mode in runs.items():  # the resumed stream equals the uninterrupted one
        # pre-edit scores: the same records in the same order (chunks of 2 cases, dealt to the processes)
        assert _jsonl(two / run / "pre.jsonl") == _jsonl(one / mode / "pre.jsonl")
        records = {"one": _jsonl(one / mode / "results.jsonl"), "two": _jsonl(two / run / "results.jsonl")}
        assert [r["index"] for r in records["two"]] == [r["index"] for r in records["one"]] == [0, 1, 2, 3, 4]
        for a, b in zip(records["one"], records["two"]):
            for key in ("case_id", "chunk", "chunk_indices", "num_edits_applied", "pre", "post", "base_restored"):
                assert a.get(key) == b.get(key), (run, a["index"], key)
        summaries = {"one": json.loads((one / mode / "summary.json").read_text()),
                     "two": json.loads((two / run / "summary.json").read_text())}
        assert summaries["one"]["world_size"] == 1 and summaries["two"]["world_size"] == 2
        assert summaries["two"]["metrics"] == summaries["one"]["metrics"] and summaries["two"]["complete"]
        assert curve_scores(summaries["two"]["curve"]) == curve_scores(summaries["one"]["curve"])
        assert summaries["two"]["settings"] == summaries["one"]["settings"]
    # the work was shared: the resumed batch chunk [4] ran on process 1; sequential scoring used both processes
    batch = {r["index"]: r["rank"] for r in _jsonl(two / "batch" / "results.jsonl")}
    assert batch == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1}
    assert {r["rank"] for r in _jsonl(two / "sequential" / "results.jsonl")} == {0, 1}
    assert [p["num_edits"] for p in _jsonl(two / "sequential" / "curve.jsonl")] == [2, 4, 5]


TRAIN_SCRIPT = textwrap.dedent(
    """
    import json
    import sys

    import torch.distributed as dist
    from safetensors.torch import save_file

    from hf_knowedit.methods.mend import MENDTrainingSpec
    from hf_knowedit.training import EditorTrainingArguments, train_editor
    from tests.test_training import CONFIG
    from tests.test_learned_editors import TRAIN
    from tests.tiny_models import tiny_model, tiny_tokenizer

    trainables = []
    original = MENDTrainingSpec.training_loss

    def training_loss(self, trainable, requests):  # keeps this process's editor network, to compare the processes
        trainables[:] = [trainable]
        return original(self, trainable, requests)

    MENDTrainingSpec.training_loss = training_loss
    output = sys.argv[1]
    arguments = EditorTrainingArguments(batch_size=4, learning_rate=1e-2, save_every=2, log_every=1)
    result = train_editor("mend", tiny_model("gpt2"), tiny_tokenizer(), TRAIN, output, config=CONFIG,
                          args=arguments, max_steps=3)
    rank, trainable = dist.get_rank(), trainables[0]
    state = {name: tensor.detach().contiguous() for name, tensor in trainable.state_dict().items()}
    save_file(state, f"{output}/rank{rank}.safetensors")
    with open(f"{output}/rank{rank}.json", "w") as handle:
        json.dump({"status": result.status, "steps": result.steps, "editor_dir": str(result.editor_dir),
                   "parameters": sorted(name for name, _ in trainable.named_parameters())}, handle)
    """
)


def test_editor_training_in_two_processes(tmp_path):
    """Editor training under `accelerate launch`: what two processes guarantee.

    Not the weights of a one-process run: each process edits its own batch of `batch_size` requests and the gradients
    are averaged, so a step sees `2 * batch_size` requests, and a MEND or KE loss over a batch edited at once is not
    the mean of per-request losses. What holds: the processes stay in step (the same editor parameters on both after
    every step), the saved editor is the main process's, and the main process alone writes the log, the checkpoints
    and the editor. MEND's running normalisation moments (buffers, not parameters) are updated from the batches of
    all the processes at once, so they are equal on both too.
    """
    script, output = tmp_path / "train.py", tmp_path / "run"
    script.write_text(TRAIN_SCRIPT)
    launch("accelerate", script, output)
    results = [json.loads((output / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    parameters = results[0].pop("parameters")
    assert results[1].pop("parameters") == parameters and len(parameters) > 1
    assert results[0] == results[1] == {"status": "completed", "steps": 3, "editor_dir": str(output / "editor")}
    ranks = [load_file(str(output / f"rank{rank}.safetensors")) for rank in (0, 1)]
    saved = load_file(str(output / "editor" / "editor_weights.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() == saved.keys()
    assert all(torch.equal(ranks[0][name], saved[name]) for name in saved)
    assert all(torch.equal(ranks[0][name], ranks[1][name]) for name in parameters)
    moments = [name for name in saved if name.endswith(("mean", "sum_squares", "count"))]
    assert moments and all(torch.allclose(ranks[0][name], ranks[1][name], rtol=1e-6, atol=1e-6) for name in moments)
    assert all(float(ranks[0][name]) > 0 for name in moments if name.endswith("count"))
    log = _jsonl(output / "training_log.jsonl")  # each line once: the main process writes it
    assert [(r["step"], r["split"]) for r in log] == [(1, "train"), (2, "train"), (3, "train"), (3, "validation")]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert '"num_processes": 2' in (output / "editor" / "editor_config.json").read_text()


EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit
    import sys

    import torch.distributed as dist

    from hf_knowedit.distributed import join_process_group

    def report():  # registered first, so it runs after the library's exit hook (atexit runs last-in, first-out)
        with open(f"{sys.argv[1]}.{rank}", "w") as handle:
            handle.write(f"initialized at exit: {dist.is_initialized()}")

    atexit.register(report)
    join_process_group()
    rank = dist.get_rank()
    gathered = [None, None]
    dist.all_gather_object(gathered, rank)
    assert gathered == [0, 1]
    """
)


def test_joined_process_group_is_destroyed_at_exit(tmp_path):
    """The group the library joins is destroyed before the interpreter's finalisation: left to it, gloo's worker
    threads can abort a finished process (`terminate called without an active exception`)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    launch("accelerate", script, tmp_path / "report")
    assert [(tmp_path / f"report.{rank}").read_text() for rank in (0, 1)] == ["initialized at exit: False"] * 2
