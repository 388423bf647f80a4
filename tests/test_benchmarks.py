"""Smoke tests of the benchmark harness (benchmarks/run.py): it runs, isolates workers and reports a table."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO_ROOT / "benchmarks"


def test_quick_run_prints_a_table_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--quick", "--no-reference", "--warmup", "1"]
    command += ["--repeats", "1", "--only", "matmul", "--only", "lfq_train_16bit", "--out", str(out)]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr

    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"workload", "matmul_f32_16384x128x8192", "lfq_train_16bit"}
    assert "time ratio (ours/ref)" in rows["workload"]

    report = json.loads(out.read_text())
    by_name = {result["workload"]: result for result in report["results"]}
    matmul = by_name["matmul_f32_16384x128x8192"]["ours"]
    assert matmul["status"] == "ok"
    assert matmul["time_ms"] > 0 and matmul["peak_mb"] >= 0
    # LFQ is implemented: "n/a" (the harness's answer for a missing class) would mean it stopped being exported
    lfq = by_name["lfq_train_16bit"]["ours"]
    assert lfq["status"] == "ok", lfq
    assert lfq["time_ms"] > 0 and lfq["package_file"].startswith(str(REPO_ROOT))


def test_unknown_workload_is_an_error():
    command = [sys.executable, str(BENCHMARKS / "run.py"), "--no-reference", "--only", "no_such_workload"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no workload matches" in done.stderr


def test_train_loss_sums_float_outputs_requiring_grad_only(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _worker import float_tensors_requiring_grad

    Return = namedtuple("Return", ["quantized", "indices", "aux_loss"])
    quantized = torch.ones(2, 3, requires_grad=True) * 2
    aux_loss = torch.tensor(0.5, requires_grad=True)
    output = (Return(quantized, torch.zeros(2, dtype=torch.long), aux_loss), torch.ones(4), {"loss": aux_loss * 3})

    found = float_tensors_requiring_grad(output)

    assert len(found) == 3
    assert sum(t.float().mean() for t in found).item() == 2 + 0.5 + 1.5


def _run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, str(BENCHMARKS / name), *args]
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done


def test_search_chunks_prints_one_row_per_shape(tmp_path):
    done = _run_script("search_chunks.py", "--shapes", "64x32x8", "128x16x4", "--budgets", "8", "10", "--repeats", "1",
                       cwd=tmp_path)  # fmt: skip
    rows = [line for line in done.stdout.splitlines() if line.startswith("| 64x32x8") or line.startswith("| 128x16x4")]
    assert len(rows) == 2 and all(len(row.split("|")) == 5 for row in rows)


def test_search_floor_times_every_kernel_and_finds_the_same_indices(tmp_path):
    done = _run_script("search_floor.py", "--shapes", "64x32x8", "--rounds", "1", "--repeats", "1", cwd=tmp_path)
    rows = {line.split("|")[1].strip() for line in done.stdout.splitlines() if line.startswith("| ")}
    kernels = {"nearest_codes", "addmm", "mm", "max", "amax", "addmm + max"}
    assert kernels <= rows and rows - kernels <= {"kernel", "faiss"}
    assert "identical indices: nearest_codes, addmm + max" in done.stdout


@pytest.mark.slow  # about a minute of CPU
def test_scaling_reuses_reference_points_from_an_earlier_run(tmp_path):
    sizes = ["--min-log2-codes", "4", "--max-log2-codes", "5", "--min-log2-tokens", "4", "--max-log2-tokens", "5"]
    sizes += ["--repeats", "1", "--warmup", "0", "--png", str(tmp_path / "s.png")]
    first = tmp_path / "first.json"
    _run_script("scaling.py", "--no-reference", *sizes, "--out", str(first), cwd=tmp_path)
    earlier = json.loads(first.read_text())
    earlier["results"]["reference"] = earlier["results"]["ours"]  # stands in for a reference run
    first.write_text(json.dumps(earlier))
    second = tmp_path / "second.json"
    done = _run_script("scaling.py", "--reference-from", str(first), *sizes, "--out", str(second), cwd=tmp_path)
    assert json.loads(second.read_text())["results"]["reference"] == earlier["results"]["ours"]
    assert "| 2^4 |" in done.stdout and (tmp_path / "s.png").exists()


@pytest.mark.slow  # ~15 s of CPU; tests/test_op_counts.py counts operators in the default run
def test_op_counts_quick_run_counts_both_policies(tmp_path):
    out = tmp_path / "counts.json"
    done = _run_script("op_counts.py", "--quick", "--no-reference", "--only", "fsq_train", "--out", str(out),
                       cwd=tmp_path)  # fmt: skip
    rows = [line.split("|") for line in done.stdout.splitlines() if line.startswith("| fsq_train ")]
    assert len(rows) == 1
    cpu, accelerator, reference = (cell.strip() for cell in rows[0][2:5])
    assert int(cpu) > 0 and int(accelerator) > 0 and reference == "-"
    result = json.loads(out.read_text())["results"][0]
    for key in ("ours_cpu", "ours_accelerator"):
        assert result[key]["status"] == "ok" and result[key]["policy"] == key.removeprefix("ours_")
        assert sum(result[key]["op_counts"].values()) == result[key]["op_total"]


@pytest.mark.slow  # test_quick_run_prints_a_table_and_writes_json runs run.py in the default run
def test_one_process_measures_memory_and_time_in_the_same_worker(tmp_path):
    out = tmp_path / "results.json"
    done = _run_script("run.py", "--quick", "--no-reference", "--one-process", "--rounds", "2", "--repeats", "2",
                       "--only", "matmul", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert "| matmul_f32_16384x128x8192 |" in done.stdout
    ours = json.loads(out.read_text())["results"][0]["ours"]
    assert ours["status"] == "ok" and ours["peak_mb"] >= 0
    assert len(ours["times_ms"]) == 4 and ours["timer"] == "perf_counter"  # round 1 in the memory process


def test_combined_table_joins_times_and_operator_counts(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from op_counts import combined_table

    ok = {"status": "ok", "time_ms": 2.0, "peak_mb": 4.0}
    run_report = {"results": [{"workload": "w", "ours": ok, "reference": {**ok, "time_ms": 4.0, "peak_mb": 8.0}}]}
    counts = {"ours_cpu": {"status": "ok", "op_total": 30}, "ours_accelerator": {"status": "ok", "op_total": 10}}
    count_report = {"results": [{"workload": "w", **counts, "reference": {"status": "ok", "op_total": 40}}]}

    row = combined_table(run_report, count_report).splitlines()[-1]

    assert [cell.strip() for cell in row.split("|")[1:-1]] == [
        "w", "2.00", "4.00", "0.50", "4.00", "8.00", "0.50", "30", "10", "40", "0.25"
    ]  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_timing_uses_one_event_pair_per_iteration(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from _worker import measure_time

    x = torch.randn(256, 256, device="cuda")
    timing = measure_time(lambda: x @ x, torch.device("cuda"), repeats=3)
    assert timing["timer"] == "cuda events"
    assert len(timing["times_ms"]) == len(timing["host_times_ms"]) == 3
    assert all(t >= 0 for t in timing["times_ms"])
