"""Plant plausible bugs in a copy of the package and check that the tests catch every one.

    python tests/mutation/run_mutations.py                 # the working tree's package, every mutation
    python tests/mutation/run_mutations.py --ref HEAD      # the package as committed at HEAD
    python tests/mutation/run_mutations.py --only dead_code_at_threshold lfq_softplus_offset
    python tests/mutation/run_mutations.py --check         # only check that every target string exists

Each mutation is an exact string replacement in the one file of ``vector_quantize_pytorch/`` that holds the
target (found by search, so moving code between files needs no update) and the tests that should catch it.
For each, the script copies the package to a temporary folder, plants the bug, and runs those tests with the
copy first on PYTHONPATH (``python -P`` so the checkout is not imported instead); a mutation is caught when
pytest fails. It first runs the union of the tests on the unmodified copy, which must pass. A target
string that no longer exists is an error, not a skip: when the package is refactored, update ``MUTATIONS`` (the
fast test tests/test_mutation_targets.py fails first). Exit status 1 if any mutation survived or a target is
missing. Slow (a few minutes): not part of the default test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "vector_quantize_pytorch"


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    old: str  # the target: found in exactly one file of the package, replaced everywhere there
    new: str
    tests: tuple[str, ...]  # pytest arguments, relative to the repository root


VQ_DEAD_CODES = "tests/test_vector_quantize.py::test_dead_codes_are_replaced_during_training"
TRAINING_STEPS = "tests/test_reference_training_steps.py"
TRAINING_STEP = TRAINING_STEPS + "::test_two_training_steps_match_the_reference[{}]"

MUTATIONS = [
    Mutation("dead_code_at_threshold",
             "expired = self.cluster_size < self.threshold_ema_dead_code",
             "expired = self.cluster_size <= self.threshold_ema_dead_code",
             ("tests/core/test_codebook.py", VQ_DEAD_CODES)),
    Mutation("ema_rate",
             "rate = (1.0 - self.decay)",
             "rate = (0.9 - self.decay)",
             ("tests/core/test_codebook.py", TRAINING_STEPS)),
    Mutation("laplace_smoothing_denominator",
             "return (counts + eps) / (total + counts.shape[-1] * eps) * total",
             "return (counts + eps) / (total + eps) * total",
             ("tests/core/test_codebook.py",)),
    Mutation("dead_code_reset_count",
             "self.cluster_size.masked_fill_(replace, self.reset_cluster_size)",
             "self.cluster_size.masked_fill_(replace, 1.0)",
             ("tests/core/test_codebook.py",)),
    Mutation("mask_ignored_by_statistics",
             "return finite if mask is None else finite & mask",
             "return finite",
             ("tests/core/test_codebook.py", TRAINING_STEPS)),
    Mutation("rotation_trick_gradient",
             ".mul(inv_q * inv_x * 2.0)",
             ".mul(inv_q * inv_x * 1.0)",
             ("tests/core/test_estimators.py",)),
    Mutation("dropout_cutoff_rounding",
             "return (cutoff + multiple_of) // multiple_of * multiple_of - 1",
             "return (cutoff + multiple_of) // multiple_of * multiple_of",
             ("tests/core/test_residual.py",)),
    Mutation("residual_sign",
             "residual = residual - frac_gradient(quantized, quant_grad_frac)",
             "residual = residual + frac_gradient(quantized, quant_grad_frac)",
             ("tests/core/test_residual.py", TRAINING_STEP.format("rvq_3_quantizers"))),
    Mutation("kmeans_empty_cluster",
             "means = torch.where((counts > 0).unsqueeze(-1), new_means, means)",
             "means = new_means",
             ("tests/core/test_kmeans.py",)),
    Mutation("cosine_dead_code_rows_not_normalised",
             "rows = F.normalize(rows, dim=-1)",
             "rows = rows",
             ("tests/core/test_codebook.py", VQ_DEAD_CODES)),
    Mutation("lfq_softplus_offset",
             "F.softplus(entropy_loss + self.entropy_loss_offset)",
             "F.softplus(entropy_loss - self.entropy_loss_offset)",
             ("tests/test_lfq.py::test_softplus_entropy_loss_is_positive",)),
    Mutation("lfq_commitment_abs",
             "per_token = (h - quantized.detach()).square()",
             "per_token = (h - quantized.detach()).abs()",
             ("tests/test_lfq.py",)),
    Mutation("simvq_codes_scaled",
             "codes = self.code_transform(",
             "codes = 0.5 * self.code_transform(",
             (TRAINING_STEP.format("simvq"),)),
    Mutation("fsq_even_level_offset",
             "offset = (levels % 2 == 0) * 0.5",
             "offset = (levels % 2 == 0) * 0.25",
             ("tests/test_fsq.py",)),
    Mutation("latent_quantize_farthest_level",
             "return (grid - rows).abs_().min(0).indices",
             "return (grid - rows).abs_().max(0).indices",
             ("tests/test_latent_quantization.py",)),
]  # fmt: skip


def target_files(package_dir: Path, mutation: Mutation) -> list[Path]:
    return sorted(path for path in package_dir.rglob("*.py") if mutation.old in path.read_text())


def missing_targets(package_dir: Path, mutations=MUTATIONS) -> list[str]:
    """Mutations whose target string is in no file, or in several files, of ``package_dir`` (the package)."""
    problems = []
    for mutation in mutations:
        files = target_files(package_dir, mutation)
        if len(files) != 1:
            where = ", ".join(str(f.relative_to(package_dir)) for f in files) or "no file"
            problems.append(f"{mutation.name}: {mutation.old!r} found in {where} (need exactly one)")
    return problems


def copy_package(dest: Path, ref: str | None) -> Path:
    """The package as in the working tree (``ref`` None) or at a git ref, copied under ``dest``."""
    if ref is None:
        shutil.copytree(REPO_ROOT / PACKAGE, dest / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        archive = subprocess.run(["git", "archive", ref, PACKAGE], cwd=REPO_ROOT, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / PACKAGE


def run_tests(root: Path, tests, timeout: float) -> tuple[bool, str]:
    """Run ``tests`` against the package under ``root``; (passed, last lines of the output)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    probe = subprocess.run([sys.executable, "-P", "-c", f"import {PACKAGE}; print({PACKAGE}.__file__)"],
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True)  # fmt: skip
    if not probe.stdout.strip().startswith(str(root)):
        raise SystemExit(f"the copy is not the package imported: {probe.stdout.strip()} {probe.stderr[-500:]}")
    args = [sys.executable, "-P", "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    try:
        done = subprocess.run(args, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "timed out"
    tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-3:])
    return done.returncode == 0, tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="copy the package from this git ref instead of the working tree")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--check", action="store_true", help="only check that every target string exists")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args(argv)

    names = {m.name for m in MUTATIONS}
    unknown = set(args.only or ()) - names
    if unknown:
        parser.error(f"unknown mutations {sorted(unknown)}; known: {sorted(names)}")
    mutations = [m for m in MUTATIONS if not args.only or m.name in args.only]

    with tempfile.TemporaryDirectory(prefix="vq-mutations-") as tmp:
        (Path(tmp) / "pristine").mkdir()
        pristine = copy_package(Path(tmp) / "pristine", args.ref)
        missing = missing_targets(pristine, mutations)
        if missing:
            print("target strings not found (update MUTATIONS):\n  " + "\n  ".join(missing), file=sys.stderr)
            return 1
        print(f"{len(mutations)} targets found in {'the working tree' if args.ref is None else args.ref}")
        if args.check:
            return 0

        all_tests = tuple(dict.fromkeys(test for m in mutations for test in m.tests))
        start = time.perf_counter()
        passed, tail = run_tests(pristine.parent, all_tests, args.timeout)
        if not passed:
            print(f"the unmodified package fails its tests, so no mutation can be judged:\n{tail}", file=sys.stderr)
            return 1
        print(f"baseline: {len(all_tests)} test selections pass ({time.perf_counter() - start:.0f} s)")

        survived = []
        for mutation in mutations:
            root = Path(tmp) / mutation.name
            shutil.copytree(pristine.parent, root)
            (path,) = target_files(root / PACKAGE, mutation)
            path.write_text(path.read_text().replace(mutation.old, mutation.new))
            where = str(path.relative_to(root / PACKAGE))
            start = time.perf_counter()
            passed, tail = run_tests(root, mutation.tests, args.timeout)
            verdict = "SURVIVED" if passed else "caught"
            print(f"{verdict:8}  {mutation.name:32} {where:32} ({time.perf_counter() - start:.0f} s)")
            if passed:
                survived.append(mutation.name)
            shutil.rmtree(root)
    print(
        f"{len(mutations) - len(survived)} of {len(mutations)} caught" + (f"; survived: {survived}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
