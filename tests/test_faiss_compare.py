"""Smoke test of benchmarks/faiss_compare.py: tiny workloads run on both sides, the table reports identical codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("faiss", reason="faiss is not installed (pip install faiss-cpu, or the 'bench' extra)")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "faiss_compare.py"


@pytest.mark.slow  # ~10 s of CPU
def test_quick_run_reports_identical_codes(tmp_path):
    out, png = tmp_path / "results.json", tmp_path / "ratios.png"
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1", "--json", str(out), "--png", str(png)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr

    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "workload" not in line]
    assert len(rows) == 3
    results = json.loads(out.read_text())
    assert {r["workload"].split()[0] for r in results} == {"nearest", "rvq"}
    for r in results:
        assert r["differing_rows"] == 0, r
        assert r["mse_ours"] == pytest.approx(r["mse_faiss"], rel=1e-5)
        assert r["ours_ms"] > 0 and r["faiss_ms"] > 0
    assert png.stat().st_size > 0


def test_unknown_workload_is_an_error():
    done = subprocess.run([sys.executable, str(SCRIPT), "--only", "no_such_workload"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "no workload matches" in done.stderr
