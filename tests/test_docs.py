"""The shipped text refers only to files that exist, and benchmarks/README.md documents every option of run.py.

Shipped text: the READMEs, CHANGELOG.md, and the docstrings and comments of the package, the examples, the
benchmarks and the tests (everything the sdist carries). A reference is a relative ``*.md`` path or the target of a
Markdown link or image; it must resolve from the repository root or from the referring file's folder, except the
few files that scripts write when they run.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TEXT = sorted(
    [
        *REPO_ROOT.glob("*.md"),
        *(REPO_ROOT / "examples").glob("*.md"),
        *(REPO_ROOT / "benchmarks").glob("*.md"),
        *(REPO_ROOT / "images").glob("*.md"),
        *(REPO_ROOT / "data").rglob("*.md"),
        *(REPO_ROOT / "tests").rglob("*.md"),
        *(REPO_ROOT / "vector_quantize_pytorch").rglob("*.py"),
        *(REPO_ROOT / "examples").glob("*.py"),
        *(REPO_ROOT / "benchmarks").glob("*.py"),
        *(REPO_ROOT / "tests").rglob("*.py"),
    ]
)
# written by the scripts when they run, not shipped
GENERATED = {"results.md", "summary.md", "gpu_check.md"}
MD_PATH = re.compile(r"(?<![\w/.:-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)|<img src=\"([^\"]+)\"")


def references(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    found = set(MD_PATH.findall(text))
    if path.suffix == ".md":
        found |= {target for pair in LINK.findall(text) for target in pair if target}
    return {ref for ref in found if not re.match(r"[a-z]+://", ref) and Path(ref).name not in GENERATED}


def resolves(ref: str, path: Path) -> bool:
    ref = ref.removeprefix("./")
    return (REPO_ROOT / ref).exists() or (path.parent / ref).exists()


def test_shipped_text_is_found():
    names = {path.relative_to(REPO_ROOT).as_posix() for path in SHIPPED_TEXT}
    assert {"README.md", "CHANGELOG.md", "examples/README.md", "benchmarks/README.md"} <= names


@pytest.mark.parametrize("path", SHIPPED_TEXT, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_no_dangling_file_reference(path):
    dangling = sorted(ref for ref in references(path) if not resolves(ref, path))
    assert not dangling, f"{path.relative_to(REPO_ROOT)} refers to missing files: {', '.join(dangling)}"


@pytest.mark.parametrize("path", SHIPPED_TEXT, ids=lambda path: path.relative_to(REPO_ROOT).as_posix())
def test_no_path_outside_the_repository(path):
    machine_path = "/" + "work/"  # spelled so that this file passes its own test
    assert machine_path not in path.read_text(encoding="utf-8"), f"{path.relative_to(REPO_ROOT)} names a machine path"


def test_benchmarks_readme_documents_every_option_of_run_py():
    source = (REPO_ROOT / "benchmarks" / "run.py").read_text()
    options = {
        match.group(1)
        for match in re.finditer(r'add_argument\(\s*"(--[\w-]+)"(.*?)\)\n', source, flags=re.S)
        if "argparse.SUPPRESS" not in match.group(2)
    }
    assert "--min-time" in options and "--clock" in options
    readme = (REPO_ROOT / "benchmarks" / "README.md").read_text()
    documented = set(re.findall(r"^\| `(--[\w-]+)", readme, flags=re.M))
    assert sorted(options - documented) == []
