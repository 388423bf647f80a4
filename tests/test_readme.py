"""Every Python block of the README runs as written.

Blocks that start a process group run in a fresh interpreter of their own: a process group is per process,
gloo starts threads that outlive the block, and a block must not read launcher variables (``RANK``,
``MASTER_ADDR``...) that the test runner's environment may happen to carry. A deadline turns a hang into a
failure that prints where every thread was waiting; a block that hangs in torch's gloo teardown after its last
line runs once more (``hung_in_teardown``).
"""

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from torch_release import TORCH_RELEASE

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)

LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
BLOCK_DEADLINE_S = 120  # each block takes a few seconds

# the child dumps every thread's stack and exits when the block runs past its deadline
RUN_WITH_DEADLINE = """
import faulthandler, runpy, sys
faulthandler.dump_traceback_later(float(sys.argv[2]), exit=True)
runpy.run_path(sys.argv[1], run_name="__main__")
"""


# what a block uses -> the torch release the README documents it from (said beside the block)
NEEDS_TORCH = {"fully_shard": (2, 6), "torch.export": (2, 6)}


def starts_a_process_group(block: str) -> bool:
    return "init_process_group" in block


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 5
    assert any(starts_a_process_group(block) for block in BLOCKS)


def run_in_fresh_interpreter(block: str, directory: Path) -> subprocess.CompletedProcess:
    script = directory / "readme_block.py"
    script.write_text(block)
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-c", RUN_WITH_DEADLINE, str(script), str(BLOCK_DEADLINE_S)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_DEADLINE_S + 60,
    )


def hung_in_teardown(result: subprocess.CompletedProcess) -> bool:
    """The block ran to its last line and then hung inside ``destroy_process_group``: torch's gloo teardown can
    deadlock on its own worker thread (see tests/distributed/gloo.py's close_group), not the quantizers."""
    return result.returncode != 0 and "Timeout (" in result.stderr and "in destroy_process_group" in result.stderr


def run_process_group_block(block: str, directory: Path) -> None:
    result = run_in_fresh_interpreter(block, directory)
    if hung_in_teardown(result):  # once more; a block that hangs anywhere else, or twice, fails
        message = f"a README block hung in destroy_process_group and is run again:\n{result.stderr[-3000:]}"
        warnings.warn(message, stacklevel=2)
        result = run_in_fresh_interpreter(block, directory)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    block = BLOCKS[index]
    for name, release in NEEDS_TORCH.items():
        if name in block and TORCH_RELEASE < release:
            pytest.skip(f"block {index} uses {name}, documented from torch {release[0]}.{release[1]}")
    if starts_a_process_group(block):
        run_process_group_block(block, tmp_path)
    else:
        exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})


def test_only_a_hang_in_process_group_teardown_is_run_again():
    def ended(code: int, stderr: str) -> subprocess.CompletedProcess:
        return subprocess.CompletedProcess([], code, "", stderr)

    dump = 'Timeout (0:02:00)!\nThread 0x7f (most recent call first):\n  File "c10d.py", line 9 in {}\n'
    assert hung_in_teardown(ended(1, dump.format("destroy_process_group")))
    assert not hung_in_teardown(ended(1, dump.format("all_reduce")))  # a deadlock in training fails at once
    assert not hung_in_teardown(ended(1, "Traceback: ValueError in destroy_process_group"))  # no deadline hit
    assert not hung_in_teardown(ended(0, ""))
