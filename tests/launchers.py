"""Run a script in two CPU processes, started as `torchrun` or `accelerate launch` start them (gloo, no GPU).

accelerate 1.15 has no launcher of its own for several processes on CPU without MPI: `accelerate launch --cpu
--num_processes 2` starts ONE process (its multi-CPU path is `mpirun`, with `--mpirun_hostfile`). Its torchrun-based
launcher is the one behind `--multi_gpu`; with no GPU visible, the processes it starts join a gloo group on CPU
(`PartialState(cpu=True)`, as the evaluation harness and the editor trainer do).
"""

import os
import subprocess
import sys
from pathlib import Path


REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_PROCESSES = 2
LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                 str(NUM_PROCESSES)],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                   str(NUM_PROCESSES), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "0"],
}


def launch(launcher: str, script: Path, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `script args` in `NUM_PROCESSES` processes with `launcher`; assert they all succeed; return the result."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_KNOWEDIT_DISABLE_PROGRESS_BARS": "1",
    }
    command = [*LAUNCHERS[launcher], str(script), *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
