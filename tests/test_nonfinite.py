"""Training batches with NaN or Inf values never poison a quantizer's state.

The contract, for every public class:

- A token whose features are not all finite never enters a codebook statistic: EMA counts and sums,
  k-means initialisation, dead-code replacement, affine batch moments, or the steps an in-place optimiser
  takes inside forward (VectorQuantize, LatentQuantize). A batch without a single finite token changes no
  state at all, and a partly bad batch updates the state exactly as the batch of its finite tokens would.
  (LatentQuantize quantizes every latent on its own, so it leaves out single non-finite latents; grouped
  and multi-head quantizers likewise learn from the finite groups or heads of a token.)
- This is done with tensor operations only: no host synchronisation in the training forward.
- Outputs keep their shapes; the indices of a non-finite token are still valid indices (in ``[0, K)``), so
  decoding them or using them as embedding lookups cannot crash; its quantized output is not finite
  (garbage in, garbage out).
- Parameters learned by the caller's optimiser (SimVQ's codebook transform, projections, LatentQuantize's
  value grids) are not touched by forward. Their gradients are the caller's business: the quantized output
  of a non-finite token is non-finite, so the caller's reconstruction loss is too, and such a step has to
  be skipped (as ``torch.amp.GradScaler`` does). Where a quantizer's own loss leaves the bad tokens out
  (VectorQuantize, LatentQuantize), the codebook's gradient from that loss is finite as well. SimVQ's loss,
  by contrast, is NaN for such a batch: its codebook is the transform the caller's optimiser learns, and a
  non-finite loss is the honest report of the bad batch (its buffer, the frozen codebook, never changes).
- Exception, by design: with ``affine_param=True`` the EMA of the codebook's own mean and variance moves
  every training step; it follows the codes, not the batch, so it stays finite and unchanged by the bad
  values. Everything derived from the batch (the batch moments, the codes, the statistics) is unchanged.
- After a bad batch, the next clean batch trains normally: the state changes and stays finite.
"""

import copy
import traceback

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

import vector_quantize_pytorch as vqp


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


class Case:
    """A module factory, a training input shape, the number of codes its indices count, and whether a clean
    training step (forward, plus an SGD step on the caller's loss) changes its state."""

    def __init__(self, make, shape, num_codes, learns=True):
        self.make, self.shape, self.num_codes, self.learns = make, shape, num_codes, learns


def sgd(lr=0.1):
    return lambda params: torch.optim.SGD(params, lr=lr)


CASES = {
    "VectorQuantize-ema": Case(lambda: vqp.VectorQuantize(dim=4, codebook_size=8), (2, 6, 4), 8),
    "VectorQuantize-kmeans": Case(lambda: vqp.VectorQuantize(dim=4, codebook_size=8, kmeans_init=True), (2, 6, 4), 8),
    "VectorQuantize-dead-codes": Case(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, threshold_ema_dead_code=2), (2, 6, 4), 8
    ),
    "VectorQuantize-affine": Case(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, affine_param=True), (2, 6, 4), 8
    ),
    "VectorQuantize-cosine": Case(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, use_cosine_sim=True, kmeans_init=True), (2, 6, 4), 8
    ),
    "VectorQuantize-heads": Case(
        lambda: vqp.VectorQuantize(
            dim=8, codebook_size=8, heads=2, separate_codebook_per_head=True, codebook_dim=3, kmeans_init=True
        ),
        (2, 6, 8), 8,
    ),
    "VectorQuantize-shared-heads": Case(
        lambda: vqp.VectorQuantize(dim=8, codebook_size=8, heads=2, threshold_ema_dead_code=1), (2, 6, 8), 8
    ),
    "VectorQuantize-orthogonal": Case(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, orthogonal_reg_weight=1.0), (2, 6, 4), 8
    ),
    "VectorQuantize-image": Case(
        lambda: vqp.VectorQuantize(dim=4, codebook_size=8, accept_image_fmap=True, kmeans_init=True),
        (2, 4, 3, 3), 8,
    ),
    "ResidualVQ": Case(
        lambda: vqp.ResidualVQ(
            dim=4, codebook_size=8, num_quantizers=2, kmeans_init=True, threshold_ema_dead_code=1
        ),
        (2, 6, 4), 8,
    ),
    "ResidualVQ-shared": Case(
        lambda: vqp.ResidualVQ(
            dim=4, codebook_size=8, num_quantizers=2, shared_codebook=True, threshold_ema_dead_code=1
        ),
        (2, 6, 4), 8,
    ),
    "ResidualVQ-beam": Case(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, beam_size=2), (2, 6, 4), 8
    ),
    "ResidualVQ-implicit": Case(
        lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, implicit_neural_codebook=True),
        (2, 6, 4), 8,
    ),
    "GroupedResidualVQ": Case(
        lambda: vqp.GroupedResidualVQ(dim=4, codebook_size=8, num_quantizers=2, groups=2, kmeans_init=True),
        (2, 6, 4), 8,
    ),
    "HierarchicalVQ": Case(
        lambda: vqp.HierarchicalVQ(dim=4, codebook_size=8, scales=(1, 2, 4), accept_image_fmap=True),
        (2, 4, 4, 4), 8,
    ),
    "RandomProjectionQuantizer": Case(
        lambda: vqp.RandomProjectionQuantizer(dim=4, codebook_size=8, codebook_dim=3, num_codebooks=2),
        (2, 6, 4), 8, learns=False,
    ),
    "LatentQuantize": Case(lambda: vqp.LatentQuantize(levels=[3, 4], dim=2), (2, 6, 2), 12),
    "LatentQuantize-projected": Case(lambda: vqp.LatentQuantize(levels=[3, 4], dim=4), (2, 6, 4), 12),
    "LatentQuantize-in-place": Case(
        lambda: vqp.LatentQuantize(
            levels=[3, 4], dim=2, in_place_codebook_optimizer=lambda p: torch.optim.Adam(p, lr=0.1)
        ),
        (2, 6, 2), 12,
    ),
    "LatentQuantize-fixed-grids": Case(
        lambda: vqp.LatentQuantize(levels=[3, 4], dim=2, optimize_values=False), (2, 6, 2), 12, learns=False
    ),
    "SimVQ": Case(lambda: vqp.SimVQ(dim=4, codebook_size=8), (2, 6, 4), 8),
    "ResidualSimVQ": Case(lambda: vqp.ResidualSimVQ(dim=4, codebook_size=8, num_quantizers=2), (2, 6, 4), 8),
    "LFQ": Case(lambda: vqp.LFQ(dim=4, codebook_size=16), (2, 6, 4), 16, learns=False),
    "LFQ-projected": Case(lambda: vqp.LFQ(dim=6, codebook_size=16, spherical=True), (2, 6, 6), 16),
    "ResidualLFQ": Case(lambda: vqp.ResidualLFQ(dim=4, codebook_size=16, num_quantizers=2), (2, 6, 4), 16, False),
    "GroupedResidualLFQ": Case(
        lambda: vqp.GroupedResidualLFQ(dim=8, codebook_size=16, num_quantizers=2, groups=2), (2, 6, 8), 16, False
    ),
    "FSQ": Case(lambda: vqp.FSQ(levels=[3, 4]), (2, 6, 2), 12, learns=False),
    "FSQ-projected": Case(lambda: vqp.FSQ(levels=[3, 4], dim=4, orthogonal_rotation=True), (2, 6, 4), 12),
    "ResidualFSQ": Case(lambda: vqp.ResidualFSQ(levels=[3, 4], num_quantizers=2), (2, 6, 2), 12, learns=False),
    "GroupedResidualFSQ": Case(
        lambda: vqp.GroupedResidualFSQ(levels=[3, 4], num_quantizers=2, dim=8, groups=2), (2, 6, 8), 12
    ),
    "FSP": Case(lambda: vqp.FSP(levels=[3, 4], dim=4, quantize_rate=0.5), (2, 6, 4), 12),
    "BinaryMapper": Case(lambda: vqp.BinaryMapper(bits=3), (2, 6, 3), 8, learns=False),
    "EvoLFQ": Case(
        lambda: vqp.EvoLFQ(nn.Linear(4, 4), nn.Linear(4, 4), dim=4, codebook_size=16), (2, 6, 4), 16
    ),
}  # fmt: skip

CASE_NAMES = list(CASES)

# With affine_param the EMA of the codebook's own moments moves every training step (it follows the codes).
MOVES_WITH_THE_CODES = ("_codebook.codebook_mean", "_codebook.codebook_variance")  # and their *_needs_init flags


def test_every_public_quantizer_is_fed_bad_batches():
    covered = {name.split("-")[0] for name in CASES}
    assert {getattr(cls, "__name__", cls) for cls in vqp.QUANTIZERS} <= covered


# ----------------------------------------------------------------------------------------------------------
# helpers


def full_state(module):
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return {name: t.detach().clone() for name, t in tensors.items()}


def changed_entries(module, before):
    after = full_state(module)
    return [name for name in before if not torch.equal(after[name], before[name])]


def assert_state_finite(module):
    for name, value in full_state(module).items():
        if value.is_floating_point():
            assert torch.isfinite(value).all(), f"{name} is not finite"


def tensors_in(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in tensors_in(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in tensors_in(v)]
    return []


def index_outputs(output):
    return [t for t in tensors_in(output) if not t.is_floating_point() and t.dtype != torch.bool]


def float_outputs(output):
    return [t for t in tensors_in(output) if t.is_floating_point()]


NON_FINITE = {"nan": [float("nan")], "inf": [float("inf")], "-inf": [-float("inf")]}
NON_FINITE["mixed"] = NON_FINITE["nan"] + NON_FINITE["inf"] + NON_FINITE["-inf"]


def bad_batch(shape, kind):
    """A batch of non-finite values only (``mixed``: NaN, +Inf and -Inf drawn at random per element).

    A token with a single bad feature is a bad token too, but grouped and multi-head quantizers (and
    LatentQuantize without projections, which quantizes every latent on its own) rightly learn from the finite
    features of such a token, so every feature is bad here; partly bad batches are tested below."""
    values = torch.tensor(NON_FINITE[kind])
    return values[torch.randint(0, len(values), shape)]


def token_mask_shape(shape):
    """The token axes of an input: every axis but the features (axis 1 for channel-first inputs)."""
    feature_axis = 1 if len(shape) >= 4 else len(shape) - 1
    return tuple(size for axis, size in enumerate(shape) if axis != feature_axis), feature_axis


def trained(case, steps=2):
    module = case.make().train()
    for _ in range(steps):
        module(torch.randn(case.shape))
    return module


# ----------------------------------------------------------------------------------------------------------
# a batch without a finite token changes nothing


@pytest.mark.parametrize("kind", ["nan", "inf", "mixed"])
@pytest.mark.parametrize("warmup", [0, 2], ids=["first batch", "after training"])
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_batch_without_finite_tokens_changes_no_state(name, warmup, kind):
    case = CASES[name]
    module = trained(case, warmup)
    before = full_state(module)
    out = module(bad_batch(case.shape, kind))

    changed = changed_entries(module, before)
    if name == "VectorQuantize-affine":
        changed = [entry for entry in changed if not entry.startswith(MOVES_WITH_THE_CODES)]
    assert changed == [], f"a bad batch changed {changed}"
    assert_state_finite(module)
    for indices in index_outputs(out):
        assert ((indices >= 0) & (indices < case.num_codes)).all(), indices
    assert_a_clean_batch_trains(module, case)


@pytest.mark.parametrize("name", CASE_NAMES)
def test_eval_on_a_bad_batch_gives_valid_indices(name):
    case = CASES[name]
    module = trained(case).eval()
    before = full_state(module)
    with torch.no_grad():
        out = module(bad_batch(case.shape, "mixed"))
    assert changed_entries(module, before) == []
    for indices in index_outputs(out):
        assert ((indices >= 0) & (indices < case.num_codes)).all(), indices


def test_binary_mapper_samples_a_valid_code_for_nan_logits():
    mapper = vqp.BinaryMapper(bits=3).train()
    logits = torch.randn(4, 3)
    logits[1:3] = float("nan")
    one_hot, indices, _ = mapper(logits, return_indices=True, straight_through=False)
    assert torch.equal(one_hot.sum(-1), torch.ones(4))
    assert indices[1:3].tolist() == [0, 0]  # a NaN logit gives bit 0, as in deterministic mode


# ----------------------------------------------------------------------------------------------------------
# a partly bad batch: its bad tokens are left out, the rest trains as usual


@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_partly_bad_batch_keeps_the_state_finite_and_then_a_clean_batch_trains(name):
    case = CASES[name]
    module = trained(case, 1)
    tokens, feature_axis = token_mask_shape(case.shape)
    keep = (torch.rand(tokens) < 0.5).unsqueeze(feature_axis).expand(case.shape)  # tokens that stay clean
    x = torch.where(keep, torch.randn(case.shape), bad_batch(case.shape, "mixed"))
    module(x)
    assert_state_finite(module)
    assert_a_clean_batch_trains(module, case)


def assert_a_clean_batch_trains(module, case):
    """A clean training step (forward, then an SGD step on the outputs) keeps every state finite and, where the
    module learns, changes it."""
    before = full_state(module)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1) if list(module.parameters()) else None
    out = module(torch.randn(case.shape))
    floats = [t for t in float_outputs(out) if t.requires_grad]
    if optimizer is not None and floats:
        loss = sum(t.float().square().mean() for t in floats)
        assert torch.isfinite(loss)
        loss.backward()
        for p in module.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()
        optimizer.step()
    assert_state_finite(module)
    if case.learns:
        assert changed_entries(module, before), "a clean batch after a bad one changed nothing"


def drop_tokens(x, keep):
    """(b, n, d) batch -> (1, kept, d): only the tokens where keep (b, n) is True."""
    return x[keep].unsqueeze(0)


EXACT_EMA = {
    "VectorQuantize-ema": lambda: vqp.VectorQuantize(dim=4, codebook_size=8),
    "VectorQuantize-cosine": lambda: vqp.VectorQuantize(dim=4, codebook_size=8, use_cosine_sim=True),
    "VectorQuantize-separate-heads": lambda: vqp.VectorQuantize(
        dim=8, codebook_size=8, heads=2, separate_codebook_per_head=True
    ),
    "VectorQuantize-shared-heads": lambda: vqp.VectorQuantize(dim=8, codebook_size=8, heads=2),
    "VectorQuantize-affine": lambda: vqp.VectorQuantize(dim=4, codebook_size=8, affine_param=True),
    "ResidualVQ": lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=3),
    "ResidualVQ-shared": lambda: vqp.ResidualVQ(dim=4, codebook_size=8, num_quantizers=2, shared_codebook=True),
    "GroupedResidualVQ": lambda: vqp.GroupedResidualVQ(dim=8, codebook_size=8, num_quantizers=2, groups=2),
}


@pytest.mark.parametrize("name", list(EXACT_EMA))
def test_a_partly_bad_batch_updates_the_statistics_exactly_as_its_finite_tokens_alone(name):
    module = EXACT_EMA[name]().train()
    dim = 8 if "heads" in name or "Grouped" in name else 4
    module(torch.randn(2, 6, dim))
    twin = copy.deepcopy(module)

    x = torch.randn(2, 6, dim)
    keep = torch.tensor([[True, False, True, True, False, True], [False, True, True, False, True, True]])
    bad = x.clone()
    bad[~keep] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * (dim // 4))
    module(bad)
    twin(drop_tokens(x, keep))

    ours, expected = module.state_dict(), twin.state_dict()
    for key in expected:
        torch.testing.assert_close(ours[key], expected[key], msg=lambda m, key=key: f"{key}: {m}")


def test_kmeans_initialisation_uses_only_the_finite_tokens():
    module = vqp.VectorQuantize(dim=2, codebook_size=2, kmeans_init=True, kmeans_iters=5).train()
    x = torch.tensor([[[10.0, 10.0], [10.0, 10.2], [float("nan"), 0.0], [-10.0, -10.0], [float("inf"), 5.0]]])
    module(x)
    codes = module.codebook
    assert module._codebook.initted
    assert torch.isfinite(codes).all()
    # the two clusters of the finite rows, in some order
    expected = {(10.0, 10.1), (-10.0, -10.0)}
    assert {tuple(round(v, 4) for v in row) for row in codes.tolist()} == expected


def test_dead_codes_are_replaced_by_finite_tokens_only():
    module = vqp.VectorQuantize(dim=2, codebook_size=4, threshold_ema_dead_code=2).train()
    x = torch.full((1, 6, 2), float("nan"))
    x[0, 0] = torch.tensor([3.0, 4.0])
    module(x)
    codes = module.codebook
    assert torch.isfinite(codes).all()
    # every initial count (1) is below the threshold: codes are dead, and only one finite row can replace one
    assert (codes == torch.tensor([3.0, 4.0])).all(-1).sum() == 1


# ----------------------------------------------------------------------------------------------------------
# LatentQuantize: the value grids


def test_latent_quantize_loss_and_grid_gradients_leave_non_finite_tokens_out():
    lq = vqp.LatentQuantize(levels=[5, 8], dim=2).train()
    x = torch.randn(1, 6, 2)
    keep = torch.tensor([[True, False, True, True, False, True]])
    bad = x.clone()
    bad[~keep] = torch.tensor([float("nan"), float("inf")])

    _, _, loss = lq(bad)
    grads = torch.autograd.grad(loss, list(lq.values_per_latent))
    _, _, expected_loss = lq(drop_tokens(x, keep))
    expected_grads = torch.autograd.grad(expected_loss, list(lq.values_per_latent))

    torch.testing.assert_close(loss, expected_loss)
    for grad, expected in zip(grads, expected_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, expected)


def test_latent_quantize_in_place_step_uses_only_finite_latents():
    make = lambda: vqp.LatentQuantize(levels=[5, 8], dim=2, in_place_codebook_optimizer=sgd())  # noqa: E731
    lq, twin = make().train(), make().train()
    x = torch.randn(1, 6, 2)
    keep = torch.tensor([[True, False, True, True, False, True]])
    bad = x.clone()
    bad[~keep] = torch.tensor([float("nan"), float("inf")])
    lq(bad)
    twin(drop_tokens(x, keep))
    for grid, expected in zip(lq.values_per_latent, twin.values_per_latent):
        assert torch.isfinite(grid).all()
        torch.testing.assert_close(grid, expected)


def test_latent_quantize_in_place_optimizer_momentum_cannot_move_grids_on_a_bad_batch():
    lq = CASES["LatentQuantize-in-place"].make().train()
    for _ in range(3):
        lq(torch.randn(2, 6, 2))  # Adam builds up momentum
    before = [grid.detach().clone() for grid in lq.values_per_latent]
    lq(torch.full((2, 6, 2), float("nan")))
    for grid, old in zip(lq.values_per_latent, before):
        assert torch.equal(grid, old)


# ----------------------------------------------------------------------------------------------------------
# VectorQuantize with a codebook learned by gradients


def test_vector_quantize_learnable_codebook_gradient_is_finite_on_a_partly_bad_batch():
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True, ema_update=False).train()
    x = torch.randn(2, 6, 4)
    x[0, :3] = float("nan")
    _, _, loss = vq(x)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(vq._codebook.embed.grad).all()


@pytest.mark.parametrize("partial", [True, False], ids=["partly bad", "all bad"])
def test_vector_quantize_in_place_optimizer_never_writes_non_finite_codes(partial):
    vq = vqp.VectorQuantize(
        dim=4, codebook_size=8, learnable_codebook=True, ema_update=False, in_place_codebook_optimizer=sgd()
    ).train()
    vq(torch.randn(2, 6, 4))
    before = vq.codebook.detach().clone()
    x = torch.randn(2, 6, 4)
    if partial:
        x[0, :3] = float("nan")
    else:
        x.fill_(float("nan"))
    vq(x)
    assert torch.isfinite(vq.codebook).all()
    if not partial:
        assert torch.equal(vq.codebook, before)


# ----------------------------------------------------------------------------------------------------------
# no host synchronisation on the way


def _bool_index(index):
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


class HostReads(TorchFunctionMode):
    """Records the tensor operations that make the host wait for the device on an accelerator: reading a
    value (``item``, ``bool``, ``tolist``, ...) or an operation whose output shape depends on values."""

    READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu"}
    VALUE_SHAPED = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select"}
    # a host RNG draw on a CPU tensor (core/distributed.shared_seed), not a read of device data; the range check of
    # given indices, which reads only CPU tensors in eager mode (core/validate.reads_indices_on_host)
    ALLOWED_CALLERS = ("shared_seed", "_raise_if_out_of_range")
    # the caller's optimiser (an in-place codebook optimiser is the user's choice; Adam keeps its step on the CPU)
    ALLOWED_FILES = ("/torch/optim/",)

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        reads = name in self.READS | self.VALUE_SHAPED
        reads = reads or (name in ("__getitem__", "__setitem__") and _bool_index(args[1]))
        if reads:
            stack = traceback.extract_stack(limit=6)[:-1]
            allowed = any(
                frame.name in self.ALLOWED_CALLERS or any(part in frame.filename for part in self.ALLOWED_FILES)
                for frame in stack
            )
            if not allowed:
                self.reads.append((name, stack[-1].filename.split("/")[-1], stack[-1].lineno))
        return func(*args, **(kwargs or {}))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_a_bad_training_batch_is_handled_without_host_synchronisation(name, device):
    case = CASES[name]
    module = case.make().to(device).train()
    for _ in range(2):  # past k-means and the one-time host read of "initialised?"
        module(torch.randn(case.shape, device=device))
    x = bad_batch(case.shape, "mixed").to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            module(x)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return
    with HostReads() as host:
        module(x)
    assert host.reads == [], host.reads


def test_residual_vq_shared_codebook_in_place_optimizer_never_moves_codes_on_an_all_bad_batch():
    rvq = vqp.ResidualVQ(
        dim=4,
        codebook_size=8,
        num_quantizers=2,
        shared_codebook=True,
        learnable_codebook=True,
        ema_update=False,
        in_place_codebook_optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    ).train()
    for _ in range(2):
        rvq(torch.randn(2, 6, 4))  # momentum builds up
    before = rvq.codebooks.detach().clone()
    rvq(torch.full((2, 6, 4), float("nan")))
    assert torch.equal(rvq.codebooks, before)
    rvq(torch.randn(2, 6, 4))
    assert torch.isfinite(rvq.codebooks).all() and not torch.equal(rvq.codebooks, before)
