"""RandomProjectionQuantizer: frozen BEST-RQ targets, equal to a brute-force cosine search, the same in every
mode, call, process and rank."""

import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from vector_quantize_pytorch import RandomProjectionQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed"))

import gloo  # noqa: E402  (tests/distributed/gloo.py: a group that cannot hang)


def brute_force_logits(rpq, x):
    """Cosine logits ``(b, n, h, K)`` computed in float64 from the module's state, one step at a time."""
    sd = {k: v.double() for k, v in rpq.state_dict().items()}
    h = rpq.num_codebooks
    frames = F.layer_norm(x.double(), (x.shape[-1],))
    projected = torch.einsum("bnd,hde->bnhe", frames, sd["rand_projs"]).flatten(2)
    if "vq.project_in.weight" in sd:
        projected = projected @ sd["vq.project_in.weight"].t() + sd["vq.project_in.bias"]
    heads = F.normalize(projected.unflatten(-1, (h, -1)), dim=-1)
    return torch.einsum("bnhd,hkd->bnhk", heads, sd["vq._codebook.embed"])


def brute_force_indices(rpq, x):
    indices = brute_force_logits(rpq, x).argmax(-1)
    return indices[..., 0] if rpq.num_codebooks == 1 else indices


@pytest.mark.slow  # 3 GB and ~15 s on 2 CPU cores; CI runs it with the other slow tests
def test_seed_example_with_its_stated_shapes():
    quantizer = RandomProjectionQuantizer(
        dim=512,  # input dimensions
        num_codebooks=16,  # in USM, they used up to 16 for 5% gain
        codebook_dim=256,  # codebook dimension
        codebook_size=1024,  # codebook size
    )
    x = torch.randn(1, 1024, 512)
    indices = quantizer(x)
    assert indices.shape == (1, 1024, 16)


def test_seed_example_structure_at_small_size():
    quantizer = RandomProjectionQuantizer(dim=32, num_codebooks=16, codebook_dim=4, codebook_size=64)
    x = torch.randn(1, 50, 32)
    indices = quantizer(x)
    assert indices.shape == (1, 50, 16) and indices.dtype == torch.int64
    assert torch.equal(indices, brute_force_indices(quantizer, x))


@pytest.mark.parametrize("num_codebooks", [1, 3])
def test_indices_equal_brute_force_cosine_search(num_codebooks):
    torch.manual_seed(num_codebooks)
    rpq = RandomProjectionQuantizer(dim=12, codebook_dim=5, codebook_size=40, num_codebooks=num_codebooks)
    x = torch.randn(3, 17, 12)
    indices = rpq(x)
    assert indices.shape == ((3, 17) if num_codebooks == 1 else (3, 17, num_codebooks))
    assert torch.equal(indices, brute_force_indices(rpq, x))


def test_non_linear_project_in_uses_the_direct_search():
    torch.manual_seed(0)
    rpq = RandomProjectionQuantizer(
        dim=12, codebook_dim=5, codebook_size=40, num_codebooks=2, layernorm_after_project_in=True
    )
    x = torch.randn(2, 9, 12)
    sd = {k: v.double() for k, v in rpq.state_dict().items()}
    frames = F.layer_norm(x.double(), (12,))
    projected = torch.einsum("bnd,hde->bnhe", frames, sd["rand_projs"]).flatten(2)
    projected = projected @ sd["vq.project_in.0.weight"].t() + sd["vq.project_in.0.bias"]
    projected = F.layer_norm(
        projected, (projected.shape[-1],), sd["vq.project_in.1.weight"], sd["vq.project_in.1.bias"]
    )
    heads = F.normalize(projected.unflatten(-1, (2, -1)), dim=-1)
    expected = torch.einsum("bnhd,hkd->bnhk", heads, sd["vq._codebook.embed"]).argmax(-1)
    assert torch.equal(rpq(x), expected)


def test_without_norm_the_frames_are_projected_as_they_are():
    torch.manual_seed(1)
    rpq = RandomProjectionQuantizer(dim=6, codebook_dim=6, codebook_size=30, norm=False)
    x = torch.randn(2, 8, 6) * 5 + 3
    projected = F.normalize(torch.einsum("bnd,de->bne", x, rpq.rand_projs[0]), dim=-1)
    expected = (projected @ rpq.vq.codebook[0].t()).argmax(-1)
    assert torch.equal(rpq(x), expected)


def test_codebook_is_frozen_and_training_mode_equals_eval_mode():
    torch.manual_seed(2)
    rpq = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    assert rpq.training and rpq.vq.training
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    x = torch.randn(4, 10, 8)
    train_indices = [rpq(x) for _ in range(3)]
    assert rpq.training and rpq.vq.training  # the caller's mode is never changed
    assert all(torch.equal(rpq.state_dict()[k], v) for k, v in before.items())
    eval_indices = rpq.eval()(x)
    assert all(torch.equal(i, eval_indices) for i in train_indices)
    assert not any(p.requires_grad for p in rpq.parameters())


def test_options_that_would_update_the_codebook_change_nothing():
    torch.manual_seed(3)
    rpq = RandomProjectionQuantizer(
        dim=8, codebook_dim=4, codebook_size=16, threshold_ema_dead_code=5, decay=0.1, stochastic_sample_codes=True
    )
    before = {k: v.clone() for k, v in rpq.state_dict().items()}
    x = torch.randn(2, 20, 8)
    first = rpq(x)
    assert torch.equal(first, rpq(x)) and torch.equal(first, brute_force_indices(rpq, x))
    assert all(torch.equal(rpq.state_dict()[k], v) for k, v in before.items())


def test_cross_entropy_against_given_indices():
    torch.manual_seed(4)
    rpq = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    x = torch.randn(2, 5, 8)
    targets = torch.randint(0, 16, (2, 5, 2))
    targets[0, 0, 1] = -1  # ignored
    loss = rpq(x, indices=targets)
    logits = brute_force_logits(rpq, x).float()
    expected = F.cross_entropy(logits.reshape(-1, 16), targets.reshape(-1), ignore_index=-1)
    assert loss.shape == ()
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="indices must have shape"):
        rpq(x, indices=targets[..., 0])


def test_scores_follow_a_loaded_or_edited_state():
    torch.manual_seed(5)
    a = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    b = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    x = torch.randn(2, 30, 8)
    a_indices, b_indices = a(x), b(x)
    assert not torch.equal(a_indices, b_indices)
    a.load_state_dict(b.state_dict())
    assert torch.equal(a(x), b_indices)
    a.vq.codebook = F.normalize(torch.randn(2, 16, 8), dim=-1)
    assert torch.equal(a(x), brute_force_indices(a, x))


def test_same_indices_for_the_same_seed_and_across_calls():
    torch.manual_seed(6)
    a = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    torch.manual_seed(6)
    b = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)
    x = torch.randn(2, 12, 8)
    assert torch.equal(a(x), b(x)) and torch.equal(a(x), a(x))


def test_state_dict_keys_match_the_reference():
    sd = RandomProjectionQuantizer(dim=64, codebook_dim=16, codebook_size=32, num_codebooks=2).state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "rand_projs": (2, 64, 16),
        "vq.project_in.weight": (64, 32),
        "vq.project_in.bias": (64,),
        "vq.project_out.weight": (32, 64),
        "vq.project_out.bias": (32,),
        "vq._codebook.initted": (),
        "vq._codebook.cluster_size": (2, 32),
        "vq._codebook.embed_avg": (2, 32, 32),
        "vq._codebook.embed": (2, 32, 32),
    }


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(dim=0), ValueError, "dim"),
        (dict(codebook_size=1.5), TypeError, "codebook_size"),
        (dict(codebook_dim=None), TypeError, "codebook_dim"),
        (dict(num_codebooks=0), ValueError, "num_codebooks"),
        (dict(norm=1), TypeError, "norm"),
        (dict(kmeans_init=True), ValueError, "kmeans_init"),
        (dict(use_cosine_sim=False), TypeError, "use_cosine_sim"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, error, name):
    args = dict(dim=8, codebook_dim=4, codebook_size=16) | kwargs
    with pytest.raises(error, match=name):
        RandomProjectionQuantizer(**args)


def test_invalid_inputs_are_reported():
    rpq = RandomProjectionQuantizer(dim=8, codebook_dim=4, codebook_size=16)
    with pytest.raises(ValueError, match="8 features"):
        rpq(torch.randn(2, 3, 7))
    with pytest.raises(ValueError, match="3 dimensions"):
        rpq(torch.randn(2, 8))


# ---------------------------------------------------------------------- distributed (2 processes, gloo)

CONFIG = dict(dim=8, codebook_dim=4, codebook_size=16, num_codebooks=2)


def _worker(rank, world_size, out_dir):
    torch.set_num_threads(1)
    x = torch.randn(2, 12, 8, generator=torch.Generator().manual_seed(0))

    # a fresh process, the same seed, no process group: must agree with the other process
    torch.manual_seed(7)
    same_seed_indices = RandomProjectionQuantizer(**CONFIG)(x)

    # different seeds per rank, built before the process group exists
    torch.manual_seed(100 + rank)
    lazy = RandomProjectionQuantizer(**CONFIG)
    state_before = {k: v.clone() for k, v in lazy.state_dict().items()}
    local_indices = lazy(x)

    gloo.init_group(rank, world_size, out_dir)
    try:
        synced_indices = lazy(x)  # the first call in the group broadcasts rank 0's state
        torch.manual_seed(200 + rank)
        explicit = RandomProjectionQuantizer(**CONFIG)
        explicit.sync_buffers_()
        explicit_state = explicit.state_dict()
        dist.barrier()  # no rank tears the group down while the other still uses it
    finally:
        gloo.close_group()

    torch.save(
        dict(
            same_seed_indices=same_seed_indices,
            state_before=state_before,
            local_indices=local_indices,
            synced_indices=synced_indices,
            state_after=lazy.state_dict(),
            explicit_state=explicit_state,
        ),
        f"{out_dir}/rank{rank}.pt",
    )


def test_every_rank_and_every_fresh_process_gets_the_same_codebooks_and_indices(tmp_path):
    gloo.run_processes(_worker, (2, str(tmp_path)), 2)
    r0, r1 = (torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2))

    assert torch.equal(r0["same_seed_indices"], r1["same_seed_indices"])

    assert not torch.equal(r0["state_before"]["rand_projs"], r1["state_before"]["rand_projs"])
    for key, value in r0["state_before"].items():
        assert torch.equal(r0["state_after"][key], value), key  # rank 0 keeps its own state
        assert torch.equal(r1["state_after"][key], value), key  # rank 1 receives it
        assert torch.equal(r0["explicit_state"][key], r1["explicit_state"][key]), key
    assert torch.equal(r0["synced_indices"], r0["local_indices"])
    assert torch.equal(r1["synced_indices"], r0["local_indices"])
