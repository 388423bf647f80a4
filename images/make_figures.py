"""Draw the README figures ``vq.png``, ``fsq.png``, ``lfq.png`` and ``simvq.png`` from real runs of the library.

Every coloured cell, code, curve and count in the figures is computed by ``vector_quantize_pytorch`` itself
(forward passes, ``indices_to_codes``, the loss breakdowns); nothing is drawn by hand. The runs are tiny, seeded
and CPU-only, so the figures are reproducible and regenerate in well under a minute.

Run from anywhere (the repository root is put on ``sys.path``, no installation needed)::

    python images/make_figures.py            # all four figures
    python images/make_figures.py vq lfq     # some of them
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.colors import ListedColormap, hsv_to_rgb  # noqa: E402

IMAGES = Path(__file__).resolve().parent
sys.path.insert(0, str(IMAGES.parent))

from vector_quantize_pytorch import FSQ, LFQ, SimVQ, VectorQuantize  # noqa: E402

SEED = 0
DPI = 76
CODE_STYLE = dict(marker="o", s=46, c="white", edgecolors="black", linewidths=1.2, zorder=4)
plt.rcParams.update(
    {
        "font.size": 10,
        "axes.titlesize": 11,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "savefig.dpi": DPI,
        "figure.dpi": DPI,
        "savefig.bbox": "tight",
    }
)


# ---------------------------------------------------------------------------------------------- shared helpers


def two_moons(num_points: int, generator: torch.Generator, noise: float = 0.08) -> torch.Tensor:
    """The two-moons toy set, centred on the origin: ``(num_points, 2)``."""
    half = num_points // 2
    angle = torch.rand(num_points, generator=generator) * torch.pi
    upper = torch.stack([angle.cos(), angle.sin()], dim=-1)
    lower = torch.stack([1 - angle.cos(), 0.5 - angle.sin()], dim=-1)
    points = torch.where(torch.arange(num_points)[:, None] < half, upper, lower)
    points = points + noise * torch.randn(num_points, 2, generator=generator)
    return points - torch.tensor([0.5, 0.25])


def plane_grid(lo: float, hi: float, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """A ``steps x steps`` grid over ``[lo, hi]^2``: points ``(steps * steps, 2)`` and the imshow extent."""
    axis = torch.linspace(lo, hi, steps)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([x, y], dim=-1).reshape(-1, 2), np.array([lo, hi, lo, hi])


def code_colours(num_codes: int, seed: int = SEED) -> ListedColormap:
    """Soft, distinct colours for ``num_codes`` cells (shuffled so that neighbours differ)."""
    hues = np.linspace(0, 1, num_codes, endpoint=False)
    rng = np.random.default_rng(seed)
    hsv = np.stack([rng.permutation(hues), np.full(num_codes, 0.35), np.full(num_codes, 0.97)], axis=-1)
    hsv[::2, 1] = 0.5
    return ListedColormap(hsv_to_rgb(hsv))


def save(fig: plt.Figure, name: str) -> None:
    path = IMAGES / name
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    print(f"wrote {path.relative_to(IMAGES.parent)} ({path.stat().st_size // 1024} KB)")


# ---------------------------------------------------------------------------------------------- vq.png


def train_vq(data: torch.Tensor, steps: int, batch: int, generator: torch.Generator, **kwargs):
    """Train a 2-d VectorQuantize by its EMA updates; returns the module and per-step (codes used, MSE)."""
    vq = VectorQuantize(dim=2, **kwargs).train()
    history = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (batch,), generator=generator)]
        quantized, indices, _ = vq(x[None])
        used = int(torch.unique(indices).numel())
        history.append((used, float(F.mse_loss(quantized, x[None]))))
    return vq.eval(), np.array(history)


def input_gradients(vq: VectorQuantize, x: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    """Gradient reaching the inputs ``x`` when ``upstream`` is the gradient of a loss at the quantized output."""
    x = x.clone().requires_grad_(True)
    state = {k: v.clone() for k, v in vq.state_dict().items()}
    quantized, _, _ = vq.train()(x[None], freeze_codebook=True)  # estimators act in training only
    vq.eval()
    if not all(torch.equal(v, vq.state_dict()[k]) for k, v in state.items()):
        raise RuntimeError("freeze_codebook=True changed the VectorQuantize state")
    (quantized[0] * upstream).sum().backward()
    return x.grad


def draw_voronoi(ax: plt.Axes, vq: VectorQuantize, data: torch.Tensor, lo: float, hi: float) -> None:
    grid, extent = plane_grid(lo, hi, 400)
    with torch.no_grad():
        _, cells, _ = vq(grid[None])  # eval mode: the nearest code of each grid point, no state change
    cells = cells.reshape(400, 400).numpy()
    ax.imshow(cells, origin="lower", extent=extent, cmap=code_colours(vq.codebook_size), interpolation="nearest")
    ax.contour(cells, levels=np.arange(vq.codebook_size) + 0.5, extent=extent, colors="white", linewidths=0.6)
    ax.scatter(*data[::4].T, s=2, c="#333333", alpha=0.45, linewidths=0)
    ax.scatter(*vq.codebook.detach().reshape(-1, 2).T, **CODE_STYLE)
    ax.set(xlim=(lo, hi), ylim=(0.65 * lo, 0.65 * hi), aspect="equal", xticks=[], yticks=[])


def draw_gradients(ax: plt.Axes, vq_rotation: VectorQuantize, data: torch.Tensor, code: int) -> None:
    """Inputs of one cell, each receiving the same upstream gradient at its code: STE vs rotation trick."""
    vq_ste = VectorQuantize(dim=2, codebook_size=vq_rotation.codebook_size, rotation_trick=False).eval()
    vq_ste.load_state_dict(vq_rotation.state_dict())
    codes = vq_rotation.codebook.detach().reshape(-1, 2)
    with torch.no_grad():
        _, indices, _ = vq_rotation(data[None])
    members = data[indices[0] == code][:8]
    upstream = F.normalize(torch.tensor([[0.6, 1.0]]), dim=-1).expand_as(members) * 0.3
    step_ste = -input_gradients(vq_ste, members, upstream)
    step_rot = -input_gradients(vq_rotation, members, upstream)

    centre = codes[code]
    ax.scatter(0, 0, marker="+", s=90, c="black", zorder=5)
    ax.annotate("origin", (0, 0), textcoords="offset points", xytext=(6, -12))
    ax.scatter(*members.T, s=16, c="#333333", zorder=3)
    ax.scatter(*centre, **CODE_STYLE)
    ax.annotate(f"code {code}", centre.numpy(), textcoords="offset points", xytext=(8, 6))
    arrow = dict(angles="xy", scale_units="xy", scale=1, width=0.006, zorder=4)
    ax.quiver(*members.T, *step_ste.T, color="#1f77b4", label="straight-through (same for all)", **arrow)
    ax.quiver(*members.T, *step_rot.T, color="#d62728", label="rotation trick (per input)", **arrow)
    ax.quiver(*centre, *(-upstream[0]), color="black", label="- upstream gradient", **arrow)
    every = torch.cat([members, members + step_rot, members + step_ste, centre[None], torch.zeros(1, 2)])
    lo, hi = every.min(0).values - 0.25, every.max(0).values + 0.25
    ax.set(xlim=(lo[0], hi[0]), ylim=(lo[1], hi[1]), aspect="equal")
    ax.legend(loc="lower right", fontsize=8.5, frameon=False)


def draw_code_usage(ax: plt.Axes, data: torch.Tensor, generator: torch.Generator) -> None:
    """Codes in use per batch while training from the default (random) init, with and without the remedies."""
    shifted = data + 2.0  # away from the random initial codes, which sit near the origin
    configs = {
        "random init": ("#7f7f7f", dict()),
        "random init + threshold_ema_dead_code=2": ("#d62728", dict(threshold_ema_dead_code=2)),
        "kmeans_init=True": ("#1f77b4", dict(kmeans_init=True)),
    }
    for label, (colour, extra) in configs.items():
        torch.manual_seed(SEED)
        _, history = train_vq(shifted, 120, 512, generator, codebook_size=16, decay=0.9, **extra)
        ax.plot(history[:, 0], color=colour, lw=1.8, label=f"{label}: {history[-10:, 1].mean():.3f}")
    ax.set(xlabel="training step (batch of 512)", ylabel="codes used in the batch", ylim=(0, 17.5))
    ax.set_yticks([0, 4, 8, 12, 16])
    ax.legend(loc="center right", fontsize=8.5, frameon=False, title="final quantization MSE", title_fontsize=8.5)


def make_vq_figure() -> None:
    generator = torch.Generator().manual_seed(SEED)
    data = two_moons(6000, generator)
    torch.manual_seed(SEED)
    vq, _ = train_vq(
        data, 150, 512, generator, codebook_size=16, decay=0.9, kmeans_init=True, threshold_ema_dead_code=2
    )

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6))
    draw_voronoi(axes[0], vq, data, -1.7, 1.7)
    axes[0].set_title("Voronoi cells of the trained codebook\n(eval-mode indices; kmeans_init, dead-code expiry)")

    draw_code_usage(axes[1], data, generator)
    axes[1].set_title("Codes in use while training\n(the same moons moved by (2, 2))")

    draw_gradients(axes[2], vq, data, code=int(vq.codebook.detach().reshape(-1, 2).norm(dim=-1).argmin()))
    axes[2].set_title("Gradient reaching the inputs of one cell\n(one upstream gradient at the code)")
    fig.suptitle(
        "VectorQuantize(dim=2, codebook_size=16, decay=0.9) on two moons: EMA codebook, rotation trick", fontsize=12.5
    )
    fig.tight_layout()
    save(fig, "vq.png")


# ---------------------------------------------------------------------------------------------- fsq.png


def level_colours(levels: list[int]) -> np.ndarray:
    """One colour per code of a 2-d FSQ grid: the hue follows dimension 0's level, the shade dimension 1's."""
    hue = np.linspace(0, 1, levels[0], endpoint=False)[:, None].repeat(levels[1], 1)
    shade = np.linspace(0.25, 0.75, levels[1])[None, :].repeat(levels[0], 0)
    hsv = np.stack([hue, shade, 1.05 - 0.4 * shade], axis=-1)
    return hsv_to_rgb(hsv.transpose(1, 0, 2).reshape(-1, 3))  # row = index = d0 + L0 * d1


def make_fsq_figure() -> None:
    levels = [8, 5]
    fsq = FSQ(levels=levels).eval()
    colours = level_colours(levels)
    cmap = ListedColormap(colours)
    lo, hi, steps = -2.5, 2.5, 500
    grid, extent = plane_grid(lo, hi, steps)
    with torch.no_grad():
        out, indices = fsq(grid[None])
        codes = fsq.indices_to_codes(torch.arange(fsq.codebook_size)[None])[0]
    if not torch.equal(out[0], codes[indices[0].long()]):
        raise RuntimeError("FSQ's forward and indices_to_codes disagree")
    cells = indices[0].reshape(steps, steps).numpy()
    counts = np.bincount(cells.ravel(), minlength=fsq.codebook_size)

    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.6), gridspec_kw=dict(width_ratios=[1, 1, 1.25]))
    ax = axes[0]
    ax.imshow(cells, origin="lower", extent=extent, cmap=cmap, vmin=-0.5, vmax=fsq.codebook_size - 0.5)
    ax.contour(cells, levels=np.arange(fsq.codebook_size) + 0.5, extent=extent, colors="white", linewidths=0.6)
    points = grid.numpy()
    for index in range(fsq.codebook_size):
        centre = np.median(points[cells.ravel() == index], axis=0)
        ax.text(*centre, str(index), ha="center", va="center", fontsize=8.5)
    ax.set(xlabel="input z[0]", ylabel="input z[1]", aspect="equal")
    ax.set_title("Input plane coloured by FSQ's index\n(bounded by tanh, then rounded per dimension)")

    ax = axes[1]
    for index, code in enumerate(codes.numpy()):
        ax.add_patch(plt.Rectangle(code - [0.125, 0.25], 0.25, 0.5, fc=colours[index], ec="white", lw=1))
        ax.text(*code, str(index), ha="center", va="center", fontsize=8.5)
    ax.set(xlim=(-1.2, 0.95), ylim=(-1.35, 1.35), xlabel="code[0]  (8 levels: -4/4 ... 3/4)")
    ax.set(ylabel="code[1]  (5 levels: -2/2 ... 2/2)", xticks=codes[:8, 0].numpy(), yticks=[-1, -0.5, 0, 0.5, 1])
    ax.tick_params(axis="x", labelsize=8)
    ax.set_title("The 40 codes, from indices_to_codes\n(index = level[0] + 8 * level[1])")

    ax = axes[2]
    ax.bar(np.arange(fsq.codebook_size), counts / counts.sum(), color=colours, edgecolor="#555555", linewidth=0.5)
    ax.axhline(1 / fsq.codebook_size, color="black", ls="--", lw=1, label="uniform: 1/40")
    ax.set(xlabel="code index", ylabel="share of the grid's inputs", xlim=(-1, fsq.codebook_size))
    ax.set_title(f"Code usage over a uniform grid of [{lo}, {hi}]²\n({int((counts > 0).sum())} of 40 codes used)")
    ax.legend(frameon=False, loc="upper right")
    fig.suptitle("FSQ(levels=[8, 5]): an implicit grid codebook of 8 x 5 = 40 codes", fontsize=12.5)
    fig.tight_layout()
    save(fig, "fsq.png")


# ---------------------------------------------------------------------------------------------- lfq.png


def optimise_lfq_inputs(x: torch.Tensor, diversity_gamma: float, steps: int) -> tuple[torch.Tensor, np.ndarray]:
    """Move 3-d inputs by Adam on LFQ's entropy loss alone; returns the final inputs and per-step entropies."""
    lfq = LFQ(dim=3, codebook_size=8, entropy_loss_weight=1.0, diversity_gamma=diversity_gamma).train()
    x = x.clone().requires_grad_(True)
    optimiser = torch.optim.Adam([x], lr=0.002)
    history = []
    for _ in range(steps):
        (_, _, entropy_loss), breakdown = lfq(x[None], inv_temperature=5.0, return_loss_breakdown=True)
        optimiser.zero_grad()
        entropy_loss.backward()
        optimiser.step()
        history.append((breakdown.per_sample_entropy.item(), breakdown.batch_entropy.item()))
    return x.detach(), np.array(history)


def draw_cube(ax, lfq: LFQ, inputs: torch.Tensor, input_indices: torch.Tensor) -> None:
    codes = lfq.indices_to_codes(torch.arange(8)[None])[0].numpy()
    for a in range(8):
        for b in range(a + 1, 8):
            if np.abs(codes[a] - codes[b]).sum() == 2:  # cube edge: the codes differ in one bit
                ax.plot(*np.stack([codes[a], codes[b]]).T, color="#bbbbbb", lw=1)
    colours = plt.get_cmap("tab10")(np.arange(8))
    ax.scatter(*inputs.T, s=3, c=colours[input_indices], alpha=0.6, depthshade=False)
    ax.scatter(*codes.T, s=80, c=colours, edgecolors="black", depthshade=False)
    for index, code in enumerate(codes):
        bits = "".join("1" if v > 0 else "0" for v in code)
        ax.text(*(code * [1.25, 1.25, 1.32]), f"{index} ({bits})", ha="center", va="center", fontsize=9.5)
    ax.set(xticks=[], yticks=[], zticks=[], xlabel="x[0]", ylabel="x[1]", zlabel="x[2]")
    for axis in (ax.xaxis, ax.yaxis, ax.zaxis):
        axis.labelpad = -12
    ax.view_init(elev=18, azim=-52)


def make_lfq_figure() -> None:
    generator = torch.Generator().manual_seed(SEED)
    start = 0.3 + 0.1 * torch.randn(512, 3, generator=generator)  # collapsed: nearly all on code 7
    runs = {gamma: optimise_lfq_inputs(start, gamma, 200) for gamma in (1.0, 1.5)}
    lfq = LFQ(dim=3, codebook_size=8).eval()
    with torch.no_grad():
        indices = {gamma: lfq(x[None]).indices[0] for gamma, (x, _) in runs.items()}
        start_indices = lfq(start[None]).indices[0]

    fig = plt.figure(figsize=(13.5, 4.8))
    ax = fig.add_subplot(1, 3, 1, projection="3d")
    draw_cube(ax, lfq, runs[1.5][0], indices[1.5])
    ax.set_title(
        "The 8 codes: corners of the cube, 'index (bits)'\nfrom indices_to_codes; dots: inputs after 200 steps"
    )

    ax = fig.add_subplot(1, 3, 2)
    for (gamma, (_, history)), colour in zip(runs.items(), ["#1f77b4", "#d62728"]):
        ax.plot(history[:, 1], color=colour, lw=1.8, label=f"gamma = {gamma}")
        ax.plot(history[:, 0], color=colour, lw=1.5, ls="--")
    ax.plot([], [], color="black", lw=1.8, label="batch")
    ax.plot([], [], color="black", lw=1.5, ls="--", label="per-sample")
    ax.axhline(np.log(8), color="black", lw=1, ls=":", label="log 8 = max")
    ax.set(xlabel="Adam step on the inputs", ylabel="entropy (nats)", ylim=(0, 2.75))
    ax.set_title("Entropies from return_loss_breakdown=True\nloss = per-sample - diversity_gamma * batch")
    ax.legend(fontsize=8.5, frameon=False, loc="upper left", ncol=2)

    ax = fig.add_subplot(1, 3, 3)
    width = 0.27
    ax.bar(np.arange(8) - width, np.bincount(start_indices, minlength=8), width, color="#999999", label="start")
    for offset, (gamma, colour) in zip([0, width], [(1.0, "#1f77b4"), (1.5, "#d62728")]):
        counts = np.bincount(indices[gamma], minlength=8)
        ax.bar(np.arange(8) + offset, counts, width, color=colour, label=f"after, diversity_gamma={gamma}")
    ax.axhline(512 / 8, color="black", lw=1, ls=":", label="uniform")
    ax.set(xlabel="code index", ylabel="inputs (of 512)", xticks=range(8), yscale="log", ylim=(0.8, 700))
    ax.set_title("Code usage of the 512 inputs")
    ax.legend(fontsize=8.5, frameon=False, loc="upper left")
    fig.suptitle("LFQ(dim=3, codebook_size=8): 512 collapsed inputs moved by the entropy loss alone", fontsize=12.5)
    fig.tight_layout()
    save(fig, "lfq.png")


# ---------------------------------------------------------------------------------------------- simvq.png


def train_by_gradient(module: torch.nn.Module, data: torch.Tensor, steps: int, generator: torch.Generator):
    """Adam on the quantizer's own loss (no encoder): returns per-step codes used in the batch."""
    optimiser = torch.optim.Adam(module.parameters(), lr=1e-2)
    used = []
    for _ in range(steps):
        x = data[torch.randint(len(data), (512,), generator=generator)]
        _, indices, loss = module(x[None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        used.append(int(torch.unique(indices).numel()))
    return np.array(used)


def assignments(module: torch.nn.Module, data: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Eval-mode indices of ``data`` and the quantization MSE."""
    with torch.no_grad():
        quantized, indices, _ = module.eval()(data[None])
    module.train()
    return indices[0], float(F.mse_loss(quantized[0], data))


def draw_codes(ax: plt.Axes, data: torch.Tensor, codes: torch.Tensor, indices: torch.Tensor, colour: str) -> None:
    """Data, used codes (filled) and dead codes (crosses: no data point is nearest to them)."""
    used = torch.zeros(len(codes), dtype=torch.bool)
    used[indices.unique()] = True
    ax.scatter(*data[::3].T, s=2, c="#999999", alpha=0.5, linewidths=0)
    ax.scatter(*codes[used].T, s=30, c=colour, edgecolors="black", linewidths=0.7, zorder=4, label="used codes")
    ax.scatter(*codes[~used].T, s=34, marker="x", c="black", zorder=4, label="dead codes")
    ax.set(aspect="equal", xlim=(-5.2, 5.2), ylim=(-3.4, 3.4))


def make_simvq_figure() -> None:
    generator = torch.Generator().manual_seed(SEED)
    data = two_moons(6000, generator) * 3
    torch.manual_seed(SEED)
    sim_vq = SimVQ(dim=2, codebook_size=64)
    torch.manual_seed(SEED)
    vq = VectorQuantize(dim=2, codebook_size=64, ema_update=False, learnable_codebook=True)
    frozen = sim_vq.frozen_codebook.clone()
    codes_before = sim_vq.codebook.detach()
    indices_before, _ = assignments(sim_vq, data)

    used_sim = train_by_gradient(sim_vq, data, 300, generator)
    used_vq = train_by_gradient(vq, data, 300, generator)
    codes_after = sim_vq.codebook.detach()
    indices_sim, mse_sim = assignments(sim_vq, data)
    indices_vq, mse_vq = assignments(vq, data)

    fig, axes = plt.subplots(2, 2, figsize=(11.5, 8.6), layout="constrained")
    ax = axes[0, 0]
    ax.scatter(*frozen.T, s=14, marker="+", c="#2ca02c", zorder=3, label="frozen codebook C (never trained)")
    draw_codes(ax, data, codes_before, indices_before, "#9ecae1")
    ax.set_title(
        f"SimVQ before training: codes W C, W = initial Linear\n({indices_before.unique().numel()} of 64 used)"
    )
    ax.legend(loc="upper left", fontsize=8.5, frameon=False)

    ax = axes[0, 1]
    draw_codes(ax, data, codes_after, indices_sim, "#1f77b4")
    ax.set_title(f"SimVQ after 300 steps: only the 2x2 W was trained\n"
                 f"({indices_sim.unique().numel()} of 64 used, MSE {mse_sim:.3f})")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8.5, frameon=False)

    ax = axes[1, 0]
    draw_codes(ax, data, vq.codebook.detach().reshape(-1, 2), indices_vq, "#d62728")
    ax.set_title(f"VectorQuantize(learnable_codebook=True, ema_update=False)\nafter 300 steps: "
                 f"{indices_vq.unique().numel()} of 64 used, MSE {mse_vq:.3f}")  # fmt: skip
    ax.legend(loc="upper left", fontsize=8.5, frameon=False)

    ax = axes[1, 1]
    ax.plot(used_sim, color="#1f77b4", lw=1.8, label="SimVQ(dim=2, codebook_size=64)")
    ax.plot(used_vq, color="#d62728", lw=1.8, label="VectorQuantize, learned codebook")
    ax.set(xlabel="Adam step (batch of 512, lr 1e-2)", ylabel="codes used in the batch", ylim=(0, 66))
    ax.set_title("Codebook usage while training on the same data")
    ax.legend(loc="lower right", fontsize=8.5, frameon=False)
    fig.suptitle("SimVQ: a frozen random codebook moved as a whole by one linear layer (two moons x 3)", fontsize=12.5)
    save(fig, "simvq.png")


# ---------------------------------------------------------------------------------------------- entry point

FIGURES = {"vq": make_vq_figure, "fsq": make_fsq_figure, "lfq": make_lfq_figure, "simvq": make_simvq_figure}


def main(names: list[str]) -> None:
    torch.set_num_threads(1)  # every tensor here is tiny: threads only add synchronisation overhead
    start = time.perf_counter()
    for name in names or list(FIGURES):
        FIGURES[name]()
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
