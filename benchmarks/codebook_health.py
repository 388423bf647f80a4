"""Codebook health: how much of its codebook each quantizer family uses after training, and what keeps it healthy.

Trains the MNIST autoencoder of the examples (``examples/_common.py``: 2 strided convs to a 7 x 7 latent, the
quantizer, 2 transposed convs; Adam, batch 128) once per

- family: ``vq`` (VectorQuantize, rotation trick + k-means init + dead-code expiry, the README's recommended
  options), ``simvq`` (SimVQ), ``fsq`` (FSQ, levels of the FSQ paper's table), ``lfq``
  (``LFQ(entropy_loss_weight=0.02)``, nothing else), ``latent`` (LatentQuantize, quantization loss only, as its
  example), ``rvq`` (ResidualVQ, 4 layers, k-means init + expiry);
- codebook size: 2^8, 2^10, 2^12 (FSQ and LatentQuantize: the paper's levels closest to it, 240 / 1000 / 4375);
- encoder: as in the examples (``none``) or with a ``GroupNorm(1, dim, affine=False)`` after it (``norm``: one
  mean and variance per image); on request (``--norms channel``) a ``GroupNorm(dim, dim, affine=False)``
  (``channel``: each channel centred and scaled over the image's positions);
- seed: 0 and 1;

and, at 2^10 codes only, each ``--variants`` (remedies, e.g. ``lfq-spherical``). It reports, on the 10,000 test
images, the MSE, the usage (share of codes used at least once; averaged over layers for ResidualVQ) and the
perplexity, plus, for the scalar families (FSQ, LFQ, LatentQuantize), the *grid occupancy*: how many levels of
each latent dimension the test latents reach, and the share of the codebook those per-dimension levels span
(``box``). Usage far below ``box`` means the latents reach every level of every dimension but not their
combinations: the codebook is bigger than what the latents' joint distribution fills, not unreachable.

Latent channels: 32 for the codebook families (vq, simvq, rvq); the quantizer's own dimension for the scalar ones
(FSQ and LatentQuantize: ``len(levels)``, LFQ: ``log2(codes)``), so that no projection sits between the
normalization layer and the quantization.

Every finished run is appended to a JSON-lines file (default ``benchmarks/results/codebook_health.jsonl``), so an
interrupted grid resumes where it stopped; ``--report`` writes the markdown table and the plot from that file.

    nice -n 10 python benchmarks/codebook_health.py --steps 400            # the grid (resumable)
    python benchmarks/codebook_health.py --report                          # table + benchmarks/images/...png
    python benchmarks/codebook_health.py --families lfq --sizes 1024 --variants lfq-spherical --seeds 0

Warnings raised while training (e.g. the codebook-health warning of ``vector_quantize_pytorch.core.health``) are
recorded in each row with the step they came at.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "examples"))

from _common import (  # noqa: E402  (examples/ is not a package)
    Autoencoder,
    Example,
    Process,
    add_data_arguments,
    evaluate,
    load_mnist_images,
    parse_positive_counts,
    train,
)
from compare import FSQ_LEVELS, no_aux_loss, returns_aux_loss  # noqa: E402

# isort: split
# torch after _common, which sets the OpenMP wait policy before torch loads
import torch  # noqa: E402
from einops import rearrange  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

from vector_quantize_pytorch import FSQ, LFQ, LatentQuantize, ResidualVQ, SimVQ, VectorQuantize  # noqa: E402

DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results" / "codebook_health.jsonl"
DEFAULT_PLOT = REPO_ROOT / "benchmarks" / "images" / "codebook_health.png"
CODEBOOK_DIM = 32  # latent channels of the codebook families
RVQ_LAYERS = 4
LEARNING_RATE = 2e-3
# A test MSE above this is a dead autoencoder: black reconstructions (MSE = mean of x^2 over the MNIST test set,
# 0.114; the mean image would give 0.067). The sigmoid output saturated early and never recovered.
DEAD_MSE = 0.1

FAMILIES = {
    "vq": "VectorQuantize (rotation trick, k-means init, expiry 2)",
    "simvq": "SimVQ",
    "fsq": "FSQ",
    "lfq": "LFQ (entropy_loss_weight 0.02)",
    "latent": "LatentQuantize (quantization loss 0.1 only)",
    "rvq": f"ResidualVQ ({RVQ_LAYERS} layers, k-means init, expiry 2)",
}
SIZES = [2**8, 2**10, 2**12]
NORMS = ["none", "norm"]  # the grid's encoders; "channel" (per-channel norm) is measured on request


def rvq_quantize(residual_vq: nn.Module, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Adapter of ResidualVQ on a ``(b, d, h, w)`` latent: tokens in, indices ``(b, h, w, layers)`` out."""
    height, width = z.shape[-2:]
    quantized, indices, losses = residual_vq(rearrange(z, "b d h w -> b (h w) d"))
    quantized = rearrange(quantized, "b (h w) d -> b d h w", h=height, w=width)
    return quantized, rearrange(indices, "b (h w) q -> b h w q", h=height, w=width), losses.sum()


def make_family(family: str, size: int, **options) -> Example:
    """The :class:`Example` of ``family`` at about ``size`` codes; ``options`` go to the quantizer's constructor."""
    name = f"{family}-{size}"
    if family == "vq":
        kwargs = dict(accept_image_fmap=True, kmeans_init=True, threshold_ema_dead_code=2) | options
        make = lambda dim: VectorQuantize(dim, size, **kwargs)
        return Example(name, make, returns_aux_loss, size, dim=CODEBOOK_DIM)
    if family == "simvq":
        make = lambda dim: SimVQ(dim=dim, codebook_size=size, channel_first=True, **options)
        return Example(name, make, returns_aux_loss, size, dim=CODEBOOK_DIM)
    if family == "rvq":
        kwargs = dict(num_quantizers=RVQ_LAYERS, kmeans_init=True, threshold_ema_dead_code=2) | options
        make = lambda dim: ResidualVQ(dim=dim, codebook_size=size, **kwargs)
        return Example(name, make, rvq_quantize, size, num_codebooks=RVQ_LAYERS, dim=CODEBOOK_DIM)
    if family == "fsq":
        levels = FSQ_LEVELS[size]
        make = lambda dim: FSQ(levels=levels, dim=dim, channel_first=True, **options)
        return Example(name, make, no_aux_loss, math.prod(levels), dim=len(levels))
    if family == "latent":
        levels = FSQ_LEVELS[size]
        kwargs = dict(commitment_loss_weight=0.0, quantization_loss_weight=0.1) | options
        make = lambda dim: LatentQuantize(levels=levels, dim=dim, **kwargs)
        return Example(name, make, returns_aux_loss, math.prod(levels), dim=len(levels))
    if family == "lfq":
        kwargs = dict(entropy_loss_weight=0.02) | options
        make = lambda dim: LFQ(codebook_size=size, dim=dim, **kwargs)
        return Example(name, make, returns_aux_loss, size, dim=int(math.log2(size)))
    raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")


# Remedies and settings measured at 2^10 codes, without the normalization layer unless the name says so:
# name -> (family, constructor options, description)
VARIANTS: dict[str, tuple[str, dict, str]] = {
    "lfq-spherical": ("lfq", {"spherical": True}, "LFQ spherical=True (BSQ)"),
    "lfq-soft-clamp": ("lfq", {"soft_clamp_input_value": 1.0}, "LFQ soft_clamp_input_value=1.0"),
    "simvq-no-rotation": ("simvq", {"rotation_trick": False}, "SimVQ rotation_trick=False"),
    "fsq-noise-dropout": (
        "fsq",
        {"noise_dropout": 0.5, "preserve_symmetry": True},
        "FSQ noise_dropout=0.5, preserve_symmetry=True",
    ),
}


# --------------------------------------------------------------------------------------------- metrics


@torch.no_grad()
def grid_occupancy(
    model: Autoencoder, family: str, size: int, images: Tensor, device: torch.device, batch_size: int = 500
) -> dict | None:
    """For the scalar families: levels of each dimension the test latents reach, and the codes they span.

    ``levels_used``: per latent dimension, how many of its levels at least one test latent is quantized to;
    ``box``: ``prod(levels_used) / codebook_size``, the share of the codebook that the per-dimension ranges span.
    """
    if family == "lfq":
        levels = [2] * int(math.log2(size))
    elif family in ("fsq", "latent"):
        levels = FSQ_LEVELS[size]
    else:
        return None
    quantizer = model.quantizer
    model.eval()
    seen = [torch.zeros(level, dtype=torch.bool) for level in levels]
    for chunk in images.split(batch_size):
        _, indices, _ = model.quantize(quantizer, model.encoder(chunk.to(device)))
        digits = indices.reshape(-1).long().cpu()
        # index = sum_k digit_k * prod(levels[:k]) for FSQ and LatentQuantize (first level fastest); LFQ: bits,
        # most significant first
        order = list(reversed(range(len(levels)))) if family == "lfq" else range(len(levels))
        for k in order:
            seen[k][digits % levels[k]] = True
            digits = digits // levels[k]
    used = [int(s.sum()) for s in seen]
    return {"levels": levels, "levels_used": used, "box": math.prod(used) / math.prod(levels)}


def run_one(job: dict, args: argparse.Namespace, train_images: Tensor, test_images: Tensor) -> dict:
    """Train and test one autoencoder; returns its row."""
    process = Process(rank=0, world_size=1, device=torch.device(args.device))
    torch.manual_seed(job["seed"])
    options = VARIANTS[job["variant"]][1] if job["variant"] else {}
    example = make_family(job["family"], job["size"], **options)
    model = Autoencoder(example.make_quantizer(example.dim), example.quantize, dim=example.dim)
    if job["norm"] == "norm":
        model.encoder.append(nn.GroupNorm(1, example.dim, affine=False))
    elif job["norm"] == "channel":
        model.encoder.append(nn.GroupNorm(example.dim, example.dim, affine=False))
    model.to(process.device)

    train_args = argparse.Namespace(steps=job["steps"], batch_size=args.batch_size, lr=args.lr, seed=job["seed"])
    caught: list[dict] = []  # warnings raised while training, with the step whose forward raised them
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")

        def tag(optimizer, *_):
            step = len(curves_steps) + 1
            curves_steps.append(step)
            caught.extend({"step": step, "category": r.category.__name__, "message": str(r.message)}
                          for r in records[len(caught):])  # fmt: skip

        curves_steps: list[int] = []
        handle = register_optimizer_step_post_hook(tag)
        try:
            curves = train(model, train_images, train_args, example, process)
        finally:
            handle.remove()
        caught.extend({"step": None, "category": r.category.__name__, "message": str(r.message)}
                      for r in records[len(caught):])  # fmt: skip
    train_seconds = time.perf_counter() - start
    metrics, _ = evaluate(model, test_images, example, process)
    unique = list({(w["category"], w["message"]): w for w in caught}.values())
    return {
        **job,
        "description": FAMILIES[job["family"]] if not job["variant"] else VARIANTS[job["variant"]][2],
        "codes": example.codebook_size,
        "test_mse": metrics["test_mse"],
        "usage": metrics["usage"],
        "perplexity": metrics["perplexity"],
        "final_batch_usage": statistics.fmean(curves["usage"][-10:]),
        "occupancy": grid_occupancy(model, job["family"], job["size"], test_images, process.device),
        "warnings": unique,
        "train_seconds": round(train_seconds, 1),
        "torch": torch.__version__,
    }


# ------------------------------------------------------------------------------------------------- jobs


def job_key(job: dict) -> tuple:
    return (job["family"], job["variant"] or "", job["size"], job["norm"], job["seed"], job["steps"])


def make_jobs(args: argparse.Namespace) -> list[dict]:
    """The grid (families x sizes x norms x seeds), then the variants at 2^10, in run order."""
    jobs = []
    for seed in args.seeds:
        for size in args.sizes:
            for norm in args.norms:
                for family in args.families:
                    steps = args.steps
                    if family == "lfq" and size == 2**10:
                        steps = max(steps, args.lfq_steps)
                    jobs.append(dict(family=family, variant=None, size=size, norm=norm, seed=seed, steps=steps))
        for variant in args.variants:
            steps = max(args.steps, args.lfq_steps) if variant.startswith("lfq") else args.steps
            family = VARIANTS[variant][0]
            jobs.append(dict(family=family, variant=variant, size=2**10, norm="none", seed=seed, steps=steps))
    return jobs


def read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- report


def summarize(rows: list[dict]) -> list[dict]:
    """Rows grouped over seeds (in seed order): per-seed MSE and usage, means over the live runs, notes.

    A dead run (test MSE above ``DEAD_MSE``: black reconstructions) is left out of the means, unless every run
    of the group is dead; it stays in the per-seed lists.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in sorted(rows, key=lambda row: row["seed"]):
        groups.setdefault((row["family"], row["variant"] or "", row["size"], row["norm"], row["steps"]), []).append(row)
    summary = []
    for (family, variant, size, norm, steps), own in groups.items():
        live = [row for row in own if row["test_mse"] <= DEAD_MSE] or own
        occupancy = [row["occupancy"]["box"] for row in live if row.get("occupancy")]
        notes = [f"seed {row['seed']} dead" for row in own if row["test_mse"] > DEAD_MSE]
        for row in own:
            steps_warned = [w["step"] for w in row["warnings"] if w["category"] == "CodebookCollapseWarning"]
            if steps_warned:
                notes.append(f"seed {row['seed']} warned at step {steps_warned[0]}")
        summary.append({
            "family": family, "variant": variant, "size": size, "norm": norm, "steps": steps,
            "description": own[0]["description"], "codes": own[0]["codes"], "seeds": [r["seed"] for r in own],
            "test_mse_seeds": [r["test_mse"] for r in own], "usage_seeds": [r["usage"] for r in own],
            "test_mse": statistics.fmean(r["test_mse"] for r in live),
            "usage": statistics.fmean(r["usage"] for r in live),
            "perplexity": statistics.fmean(r["perplexity"] for r in live),
            "box": statistics.fmean(occupancy) if occupancy else None, "notes": "; ".join(notes),
        })  # fmt: skip
    order = {name: i for i, name in enumerate(FAMILIES)}
    norms = {name: i for i, name in enumerate([*NORMS, "channel"])}
    return sorted(summary, key=lambda s: (order[s["family"]], s["variant"], norms[s["norm"]], s["size"]))


def markdown_table(rows: list[dict]) -> str:
    """One line per family, settings, encoder and size; per-seed values joined by ``/``."""
    lines = [
        "| family | settings | encoder | codes | steps | test MSE (per seed) | usage % (per seed) | perplexity "
        "| grid box % | notes |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in summarize(rows):
        mse = " / ".join(f"{v:.4f}" for v in s["test_mse_seeds"])
        usage = " / ".join(f"{100 * v:.1f}" for v in s["usage_seeds"])
        box = "" if s["box"] is None else f"{100 * s['box']:.0f}"
        lines.append(
            f"| {s['family']} | {s['variant'] or 'as listed'} | {s['norm']} | {s['codes']} | {s['steps']} | {mse} "
            f"| {usage} | {s['perplexity']:.1f} | {box} | {s['notes']} |"
        )
    return "\n".join(lines)


def save_plot(rows: list[dict], path: Path) -> None:
    """Usage and test MSE against the codebook size, one colour per family, dashed with the normalization layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = [s for s in summarize(rows) if not s["variant"]]
    fig, (usage_ax, mse_ax) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = dict(zip(FAMILIES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for family in FAMILIES:
        for norm, style in (("none", "-"), ("norm", "--"), ("channel", ":")):
            own = sorted((s for s in summary if s["family"] == family and s["norm"] == norm), key=lambda s: s["size"])
            if not own:
                continue
            label = family + {"none": "", "norm": " + norm", "channel": " + channel norm"}[norm]
            sizes = [s["size"] for s in own]
            kwargs = dict(color=colours[family], linestyle=style, marker="o", label=label)
            usage_ax.plot(sizes, [100 * s["usage"] for s in own], **kwargs)
            mse_ax.plot(sizes, [s["test_mse"] for s in own], **kwargs)
    for ax, title in ((usage_ax, "codes used on the test set (%)"), (mse_ax, "test MSE (lower is better)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("codebook size (FSQ, LatentQuantize: 240 / 1000 / 4375)")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    usage_ax.set_ylim(0, 105)
    mse_ax.set_yscale("log")
    handles, labels = usage_ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle("Codebook health, MNIST autoencoder (mean of seeds); dashed: GroupNorm(1, d), dotted: GroupNorm(d, d)")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Codebook usage of every quantizer family on MNIST.")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--sizes", nargs="*", type=int, default=SIZES, choices=SIZES)
    parser.add_argument("--norms", nargs="*", default=NORMS, choices=[*NORMS, "channel"])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="remedies measured at 2^10 codes (default: all)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=400, help="training steps (default 400)")
    parser.add_argument("--lfq-steps", type=int, default=400,
                        help="at least this many steps for LFQ at 2^10 and its variants (default 400)")  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=LEARNING_RATE)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON-lines results, appended and resumed")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--report", action="store_true", help="only write the table and the plot from --out")
    parser.add_argument("--limit", type=int, default=None, help="run at most this many new jobs")
    add_data_arguments(parser)
    return parse_positive_counts(parser, argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if not args.report:
        try:
            train_images = load_mnist_images(args.data, "train", args.train_subset)
            test_images = load_mnist_images(args.data, "test", args.test_subset)
        except FileNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
        done = {job_key(row) for row in read_rows(args.out)}
        todo = [job for job in make_jobs(args) if job_key(job) not in done][: args.limit]
        print(f"{len(todo)} runs to do ({len(done)} in {args.out})", file=sys.stderr, flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        for i, job in enumerate(todo, start=1):
            row = run_one(job, args, train_images, test_images)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i}/{len(todo)}] {job_key(job)} mse={row['test_mse']:.4f} usage={100 * row['usage']:.1f}% "
                  f"ppl={row['perplexity']:.1f} {row['train_seconds']:.0f}s", file=sys.stderr, flush=True)  # fmt: skip
    rows = read_rows(args.out)
    print(markdown_table(rows))
    if rows:
        save_plot(rows, args.plot)
    return rows


if __name__ == "__main__":
    main()
