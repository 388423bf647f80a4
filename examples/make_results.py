"""Run the examples at their default settings and write every figure the READMEs quote from them.

    python examples/make_results.py                    # examples, torchrun and compare: ~20 min of CPU time
    python examples/make_results.py --runs examples    # only the seven autoencoder scripts
    python examples/make_results.py --runs examples --scripts autoencoder.py   # only the main example
    python examples/make_results.py --render           # no training: rewrite the README tables from the file
    python examples/make_results.py --check            # exit 1 when a README table differs from the file

Runs (``--runs``; the first three by default, the tables quote them):

- ``examples``: each ``examples/autoencoder*.py`` with no arguments (seed 0, 1200 steps, ``--threads 1``);
- ``torchrun``: ``torchrun --nproc_per_node 2 examples/autoencoder.py``;
- ``compare``: ``python examples/compare.py --threads 1`` (5 quantizers x 3 codebook sizes, 800 steps);
- ``long`` (only when asked for): ``python examples/compare.py --quantizers vq-ste simvq fsq --sizes 1024 --steps 3000
  --threads 1``, longer training for the quantizers whose usage still grows at 800 steps; a ``<!-- results:long -->``
  block renders it.

It writes ``examples/results.json`` (the numbers each run printed or wrote, its command, wall and CPU time, and
the machine's load), then rewrites the tables of README.md and examples/README.md that sit between
``<!-- results:NAME -->`` and ``<!-- /results -->`` markers, and copies the main example's
``reconstructions.png`` to ``images/``. tests/test_readme.py fails when a marked table differs from what this
script renders from ``examples/results.json``; a slow test reruns ``python examples/autoencoder.py`` and compares
its printed line with the file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES.parent
RESULTS = EXAMPLES / "results.json"
READMES = (REPO_ROOT / "README.md", EXAMPLES / "README.md")

SCRIPTS = {  # script -> codes per position, as the tables show them
    "autoencoder.py": "256",
    "autoencoder_fsq.py": "1000",
    "autoencoder_lfq.py": "1024",
    "autoencoder_sim_vq.py": "1024",
    "autoencoder_residual_vq.py": "4 x 256",
    "autoencoder_latent_quantization.py": "240",
    "autoencoder_fsp.py": "1000",
}
QUANTIZER = {
    "autoencoder.py": "VectorQuantize",
    "autoencoder_fsq.py": "FSQ",
    "autoencoder_lfq.py": "LFQ",
    "autoencoder_sim_vq.py": "SimVQ",
    "autoencoder_residual_vq.py": "ResidualVQ",
    "autoencoder_latent_quantization.py": "LatentQuantize",
    "autoencoder_fsp.py": "FSP",
}
TORCHRUN = "torchrun --nproc_per_node 2 examples/autoencoder.py"
COMPARE_ARGS = ["--threads", "1"]
LONG_ARGS = ["--quantizers", "vq-ste", "simvq", "fsq", "--sizes", "1024", "--steps", "3000", "--threads", "1"]
FINAL_LINE = re.compile(r"^test_mse=(\S+) usage=(\S+) perplexity=(\S+)$", re.M)
MARKER = re.compile(r"(<!-- results:([\w-]+) -->\n)(.*?)(<!-- /results -->)", re.S)
RUNS = ("examples", "torchrun", "compare", "long")
DEFAULT_RUNS = ("examples", "torchrun", "compare")


# ------------------------------------------------------------------------------------------------ runs


def run(args: list[str]) -> tuple[str, float, float]:
    """Run ``args`` in the repository root; returns its stdout, wall seconds and CPU seconds (user + system)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result.stdout, round(wall, 1), round(cpu, 1)


def example_record(command: str, stdout: str, out: Path, wall: float, cpu: float) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    printed = FINAL_LINE.findall(stdout)
    if len(printed) != 1:
        sys.exit(f"{command}: expected one final line test_mse=... usage=... perplexity=..., got {printed}")
    return {
        "command": command,
        "printed": "test_mse={} usage={} perplexity={}".format(*printed[0]),
        "test_mse": metrics["test_mse"],
        "usage": metrics["usage"],
        "perplexity": metrics["perplexity"],
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "load_before": round(os.getloadavg()[0], 1),
    }


def run_examples(results: dict, scripts: list[str]) -> None:
    for script in scripts:
        out = REPO_ROOT / "out" / script.removesuffix(".py")
        load = os.getloadavg()[0]
        stdout, wall, cpu = run([sys.executable, str(EXAMPLES / script), "--out", str(out)])
        record = example_record(f"python examples/{script}", stdout, out, wall, cpu)
        record["load_before"] = round(load, 1)
        results["examples"][script] = record
        print(f"{script}: {record['printed']} ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)
    shutil.copyfile(
        REPO_ROOT / "out" / "autoencoder" / "reconstructions.png", REPO_ROOT / "images" / "reconstructions.png"
    )


def run_torchrun(results: dict) -> None:
    out = REPO_ROOT / "out" / "autoencoder-torchrun"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    load = os.getloadavg()[0]
    stdout, wall, cpu = run([*launcher, str(EXAMPLES / "autoencoder.py"), "--out", str(out)])
    record = example_record(TORCHRUN, stdout, out, wall, cpu)
    record["load_before"] = round(load, 1)
    results["torchrun"] = record
    print(f"torchrun: {record['printed']} ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)


def run_compare(results: dict, key: str, args: list[str]) -> None:
    out = REPO_ROOT / "out" / ("compare" if key == "compare" else f"compare-{key}")
    load = os.getloadavg()[0]
    _, wall, cpu = run([sys.executable, str(EXAMPLES / "compare.py"), *args, "--out", str(out)])
    data = json.loads((out / "results.json").read_text())
    data["settings"]["command"] = " ".join(["python examples/compare.py", *args])
    data.update(wall_seconds=wall, cpu_seconds=cpu, load_before=round(load, 1))
    results[key] = data
    if key == "compare":
        shutil.copyfile(out / "compare.png", REPO_ROOT / "images" / "compare.png")
    print(f"{key}: {len(data['results'])} runs ({wall:.0f} s wall, {cpu:.0f} s CPU)", flush=True)


# ----------------------------------------------------------------------------------------------- tables


def percent(share: float) -> str:
    value = f"{100 * share:.1f}"
    return "100%" if value == "100.0" else f"{value}%"


def table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] * len(header)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def example_rows(results: dict) -> list[tuple[str, str, dict]]:
    rows = [(script, SCRIPTS[script], results["examples"][script]) for script in SCRIPTS]
    return rows + [("torchrun", "256", results["torchrun"])]


def render_quick_start(results: dict) -> str:
    rows = []
    for script, codes, record in example_rows(results):
        name = f"`{record['command']}`" + (f" ({QUANTIZER[script]})" if script == "autoencoder.py" else "")
        rows.append([name, codes, f"{record['test_mse']:.5f}", percent(record["usage"]), f"{record['perplexity']:.1f}"])
    return table(["command", "codes", "test MSE", "usage", "perplexity"], rows)


def render_examples(results: dict) -> str:
    rows = []
    for _, codes, record in example_rows(results):
        test_mse, usage, perplexity = FINAL_LINE.match(record["printed"]).groups()
        wall, cpu = f"{record['wall_seconds']:.0f} s", f"{record['cpu_seconds']:.0f} s"
        rows.append([f"`{record['command']}`", codes, test_mse, usage, perplexity, wall, cpu])
    return table(["command", "codes", "test_mse", "usage", "perplexity", "wall", "CPU"], rows)


def render_final_line(results: dict) -> str:
    return f"```\n{results['examples']['autoencoder.py']['printed']}\n```\n"


def compare_table(rows: list[dict]) -> str:
    sys.path.insert(0, str(EXAMPLES))
    import compare  # noqa: PLC0415  (examples/ is not a package; compare imports torch)

    return compare.results_table(rows) + "\n"


def render_compare_summary(results: dict) -> str:
    by_name: dict[str, list[dict]] = {}
    for row in results["compare"]["results"]:
        by_name.setdefault(row["description"], []).append(row)
    rows = []
    for description, own in by_name.items():
        rows.append([
            description,
            " / ".join(str(row["codebook_size"]) for row in own),
            " / ".join(f"{row['test_mse']:.5f}" for row in own),
            " / ".join(f"{100 * row['usage']:.1f}" for row in own),
            " / ".join(f"{row['perplexity']:.1f}" for row in own),
        ])  # fmt: skip
    align = ["---", "---:", "---:", "---:", "---:"]
    return table(["quantizer", "codes", "test MSE", "usage %", "perplexity"], rows, align)


def render_compare_settings(results: dict) -> str:
    data = results["compare"]
    settings = data["settings"]
    return (
        f"Results of `{settings['command']}` (torch {settings['torch']} on {settings['device']}; "
        f"{data['wall_seconds']:.0f} s wall, {data['cpu_seconds']:.0f} s CPU, load {data['load_before']} when it "
        f"started on a 2-core machine shared with other work).\n"
    )


def render_long(results: dict) -> str:
    data = results["long"]
    return f"`{data['settings']['command']}`:\n\n" + compare_table(data["results"])


RENDERERS = {
    "quick-start": render_quick_start,
    "examples": render_examples,
    "final-line": render_final_line,
    "compare-summary": render_compare_summary,
    "compare-settings": render_compare_settings,
    "compare": lambda results: compare_table(results["compare"]["results"]),
    "long": render_long,
}


def render_block(name: str, results: dict) -> str:
    """The block's table, or a line saying which run writes it when ``results`` has no such run yet."""
    try:
        return RENDERERS[name](results)
    except KeyError as missing:
        return f"*Not generated yet: `python examples/make_results.py --runs {missing.args[0]}` writes this table.*\n"


def rendered(text: str, results: dict) -> str:
    """``text`` with every marked block replaced by its rendering from ``results``."""

    def replace(match: re.Match) -> str:
        name = match.group(2)
        if name not in RENDERERS:
            raise KeyError(f"unknown results block {name!r}; known: {', '.join(RENDERERS)}")
        return match.group(1) + render_block(name, results) + match.group(4)

    return MARKER.sub(replace, text)


def stale_blocks(results: dict) -> list[str]:
    """``file: block`` for every marked block whose text differs from its rendering from ``results``."""
    stale = []
    for path in READMES:
        text = path.read_text()
        for match in MARKER.finditer(text):
            if match.group(3) != render_block(match.group(2), results):
                stale.append(f"{path.relative_to(REPO_ROOT)}: {match.group(2)}")
    return stale


def load_results() -> dict:
    if RESULTS.is_file():
        return json.loads(RESULTS.read_text())
    return {"examples": {}}


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(DEFAULT_RUNS),
                        help="what to run (default: examples torchrun compare)")  # fmt: skip
    parser.add_argument("--scripts", nargs="+", choices=list(SCRIPTS), default=list(SCRIPTS),
                        help="with --runs examples: only these scripts (default: all seven)")  # fmt: skip
    parser.add_argument("--render", action="store_true", help="run nothing; rewrite the README tables")
    parser.add_argument("--check", action="store_true", help="run nothing; exit 1 if a README table is stale")
    args = parser.parse_args(argv)

    results = load_results()
    if args.check:
        stale = stale_blocks(results)
        if stale:
            sys.exit("stale (run python examples/make_results.py --render):\n" + "\n".join(stale))
        print("README tables match examples/results.json")
        return
    if not args.render:
        import torch

        results["environment"] = {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        runners = {
            "examples": lambda r: run_examples(r, args.scripts),
            "torchrun": run_torchrun,
            "compare": lambda r: run_compare(r, "compare", COMPARE_ARGS),
            "long": lambda r: run_compare(r, "long", LONG_ARGS),
        }
        for name in args.runs:
            runners[name](results)
            # after each run, into the file as it is now: a partial run keeps its numbers, and runs of other
            # invocations (--runs compare next to --runs examples) are kept
            saved = load_results()
            if name == "examples":
                saved.setdefault("examples", {}).update({s: results["examples"][s] for s in args.scripts})
            else:
                saved[name] = results[name]
            saved["environment"] = results["environment"]
            RESULTS.write_text(json.dumps(saved, indent=2) + "\n")
        results = load_results()
    for path in READMES:
        path.write_text(rendered(path.read_text(), results))
    print(f"wrote {RESULTS.relative_to(REPO_ROOT)}; README tables rendered from it")


if __name__ == "__main__":
    main()
