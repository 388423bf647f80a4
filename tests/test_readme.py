"""Every Python block of the README runs as written.

Blocks that start a process group run in a fresh interpreter of their own: a process group is per process,
gloo starts threads that outlive the block, and a block must not read launcher variables (``RANK``,
``MASTER_ADDR``...) that the test runner's environment may happen to carry. A deadline turns a hang into a
failure that prints where every thread was waiting.
"""

import os
import re
import subprocess
import sys
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
BLOCK_DEADLINE_S = 240

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


def run_in_fresh_interpreter(block: str, directory: Path) -> None:
    script = directory / "readme_block.py"
    script.write_text(block)
    env = {name: value for name, value in os.environ.items() if name not in LAUNCHER_VARIABLES}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-c", RUN_WITH_DEADLINE, str(script), str(BLOCK_DEADLINE_S)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_DEADLINE_S + 60,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-8000:]


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index, tmp_path):
    block = BLOCKS[index]
    for name, release in NEEDS_TORCH.items():
        if name in block and TORCH_RELEASE < release:
            pytest.skip(f"block {index} uses {name}, documented from torch {release[0]}.{release[1]}")
    if starts_a_process_group(block):
        run_in_fresh_interpreter(block, tmp_path)
    else:
        exec(compile(block, f"README.md block {index}", "exec"), {"__name__": "readme"})
