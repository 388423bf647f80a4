"""The figures the READMEs quote from the examples come from examples/results.json, and still hold.

``python examples/make_results.py`` runs the examples and writes ``examples/results.json``; the tables between
``<!-- results:NAME -->`` markers in README.md and examples/README.md are rendered from that file. These tests fail
when a table differs from the file, when a marked table is missing, or when a test MSE is typed by hand outside
the marked tables; the slow test reruns the main example's default run and compares its printed line with the file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import make_results  # noqa: E402  (examples/ is not a package)


@pytest.fixture(scope="module")
def results() -> dict:
    assert make_results.RESULTS.is_file(), "examples/results.json is missing: run python examples/make_results.py"
    return json.loads(make_results.RESULTS.read_text())


EXPECTED_BLOCKS = {
    "README.md": {"final-line", "quick-start", "compare-summary"},
    "examples/README.md": {"final-line", "examples", "compare-settings", "compare"},
}


def test_every_marked_table_matches_results_json(results):
    assert make_results.stale_blocks(results) == [], "run: python examples/make_results.py --render"


@pytest.mark.parametrize("readme", sorted(EXPECTED_BLOCKS))
def test_readme_has_its_marked_tables(readme):
    text = (REPO_ROOT / readme).read_text()
    names = [match.group(2) for match in make_results.MARKER.finditer(text)]
    assert set(names) == EXPECTED_BLOCKS[readme]
    assert text.count("<!-- results:") == text.count("<!-- /results -->") == len(names)  # no unclosed marker


@pytest.mark.parametrize("readme", sorted(EXPECTED_BLOCKS))
def test_no_test_mse_typed_outside_the_marked_tables(readme):
    text = make_results.MARKER.sub("", (REPO_ROOT / readme).read_text())
    # the test MSEs of the autoencoder examples and compare.py are printed with 5 decimals (0.00373)
    assert not re.findall(r"\b0\.0\d{4}\b(?!\d)", text), "a figure of the examples outside a results table"


def test_results_json_has_every_example_run(results):
    assert set(results["examples"]) == set(make_results.SCRIPTS)
    assert results["torchrun"]["command"] == make_results.TORCHRUN


def test_results_json_has_the_comparison(results):
    assert results["compare"]["settings"]["command"] == "python examples/compare.py --threads 1"
    rows = results["compare"]["results"]
    assert {(row["quantizer"], row["codebook_size"]) for row in rows} >= {("fsq", 1000), ("vq-ste", 4096)}


@pytest.mark.parametrize("script", sorted(make_results.SCRIPTS))
def test_printed_line_agrees_with_the_metrics(script, results):
    record = results["examples"][script]
    assert record["command"] == f"python examples/{script}"
    printed = [float(value) for value in make_results.FINAL_LINE.match(record["printed"]).groups()]
    exact = [record["test_mse"], record["usage"], record["perplexity"]]
    for value, full, decimals in zip(printed, exact, (5, 4, 1)):  # printed with these decimals
        assert abs(value - full) <= 0.5 * 10**-decimals + 1e-12


def test_a_changed_figure_is_found(results):
    changed = json.loads(json.dumps(results))
    changed["examples"]["autoencoder_fsq.py"]["usage"] += 0.001
    assert "README.md: quick-start" in make_results.stale_blocks(changed)


@pytest.mark.slow
def test_main_example_default_run_prints_the_results_line(tmp_path, results):
    """``python examples/autoencoder.py`` (seed 0, 1200 steps, one thread) prints exactly the recorded line.

    Exactly on the torch release that recorded it: another release sums in other orders, and 1200 steps of
    training amplify that (torch 2.3.1 prints perplexity 62.8 where 2.13 prints 63.5)."""
    recorded = results["environment"]["torch"].split("+")[0]
    if torch.__version__.split("+")[0] != recorded:
        pytest.skip(f"results.json was recorded with torch {recorded}; this is torch {torch.__version__}")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, str(EXAMPLES / "autoencoder.py"), "--out", str(tmp_path)]
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    printed = make_results.FINAL_LINE.findall(result.stdout)
    assert len(printed) == 1
    line = "test_mse={} usage={} perplexity={}".format(*printed[0])
    assert line == results["examples"]["autoencoder.py"]["printed"]
