"""Two training steps reproduce what the reference library (vector-quantize-pytorch 1.32.0) did.

Each file in tests/fixtures/training/ was written by tests/fixtures/make_training_fixtures.py with the
reference: a config, the freshly initialised state_dict, and for each of two training steps the batch, what the
forward returned, the gradient of the objective with respect to the input, and the state_dict after the step
(EMA statistics, dead-code replacement, k-means initialisation, SGD-updated weights). We load the initial state
into our class, run the same steps (same objective, SGD with the same learning rate) and compare after every
step: indices exactly; outputs, input gradients and state to ATOL/RTOL. Where the reference's step draws random
numbers the fixture is built so that the result does not depend on them (see tests/fixtures/README.md);
``up_to_code_order`` fixtures (k-means) are compared after matching our codes to the reference's by value.
"""

from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import vector_quantize_pytorch

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "training"
FIXTURES = {path.stem: torch.load(path, weights_only=True) for path in sorted(FIXTURE_DIR.glob("*.pt"))}

# no fixture is reproduced bit for bit (our float32 reductions run in another order); the largest difference
# measured is 8.8e-7 (lfq_projected's project_in.weight after step 2), most are 1e-7 to 6e-7. 5e-6 is about six
# times the largest and far below what a wrong EMA rate, loss weight, tie-break or gradient changes
ATOL = RTOL = 5e-6
EXPECTED = {
    "vq_ema", "vq_ema_cosine", "vq_heads2_separate_projected", "vq_heads2_shared_learnable", "vq_kmeans",
    "vq_dead_codes_masked", "rvq_3_quantizers", "simvq", "lfq_projected",
}  # fmt: skip


def test_every_training_fixture_is_present():
    assert set(FIXTURES) == EXPECTED
    for fixture in FIXTURES.values():
        assert fixture["reference_version"] == "1.32.0" and len(fixture["steps"]) == 2


def objective(outputs):
    """The generator's objective: sum of mean squares of the float outputs that carry a graph."""
    return sum(out.float().square().mean() for out in outputs if out.is_floating_point() and out.requires_grad)


def run_steps(fixture):
    """Our module, loaded with the reference's initial state, after each of the fixture's steps."""
    module = getattr(vector_quantize_pytorch, fixture["class"])(**fixture["config"])
    module.load_state_dict(fixture["initial_state"], strict=True)
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=fixture["learning_rate"]) if params else None
    for step in fixture["steps"]:
        x = step["input"].clone().requires_grad_(True)
        returned = module(x, **step["forward_kwargs"])
        returned = (returned,) if isinstance(returned, torch.Tensor) else tuple(returned)
        assert len(returned) == len(fixture["output_names"])
        if optimizer is not None:
            optimizer.zero_grad()
        objective(returned).backward()
        if optimizer is not None:
            optimizer.step()
        outputs = {name: value.detach() for name, value in zip(fixture["output_names"], returned)}
        state = {key: value.detach().clone() for key, value in module.state_dict().items()}
        yield step, outputs, x.grad, state


def code_order(ours, theirs):
    """perm with ours[perm[k]] == theirs[k] (codes matched by value); fails if the codebooks are not the same set."""
    distances = torch.cdist(theirs[0], ours[0])
    perm = distances.argmin(dim=-1)
    assert sorted(perm.tolist()) == list(range(ours.shape[1])), "our codebook is not a reordering of the reference's"
    assert_close(ours[:, perm], theirs, atol=ATOL, rtol=RTOL)
    return perm


def reorder_codes(state, perm):
    """Our codebook state with codes in the reference's order (code axis 1 of the codebook buffers)."""
    reordered = dict(state)
    for key in ("_codebook.embed", "_codebook.embed_avg", "_codebook.cluster_size"):
        reordered[key] = state[key][:, perm]
    return reordered


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_two_training_steps_match_the_reference(name):
    fixture = FIXTURES[name]
    perm = None
    for number, (step, outputs, input_grad, state) in enumerate(run_steps(fixture), start=1):
        where = f"{name} step {number}"
        if fixture["match"] == "up_to_code_order":
            perm = code_order(state["_codebook.embed"], step["state"]["_codebook.embed"]) if perm is None else perm
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(len(perm))
            outputs = {**outputs, "indices": inverse[outputs["indices"]]}
            state = reorder_codes(state, perm)
        for key, expected in step["outputs"].items():
            tolerance = dict(atol=0, rtol=0) if key == "indices" else dict(atol=ATOL, rtol=RTOL)
            assert_close(
                outputs[key], expected, **tolerance, msg=lambda m, key=key, where=where: f"{where}, {key}: {m}"
            )
        assert_close(
            input_grad, step["input_grad"], atol=ATOL, rtol=RTOL, msg=lambda m, where=where: f"{where}, input grad: {m}"
        )
        assert sorted(state) == sorted(step["state"]), where
        for key, expected in step["state"].items():
            assert_close(
                state[key], expected, atol=ATOL, rtol=RTOL, msg=lambda m, key=key, where=where: f"{where}, {key}: {m}"
            )


def test_the_fixtures_exercise_what_they_are_named_for():
    """Guards against a regenerated fixture that no longer tests dead codes, masks or k-means."""
    dead = FIXTURES["vq_dead_codes_masked"]
    before, after = dead["steps"][0]["state"], dead["steps"][1]["state"]
    replaced = after["_codebook.cluster_size"][0] == 0.7  # reset to the threshold
    assert 1 <= int(replaced.sum()) < 16 and bool((before["_codebook.cluster_size"] >= 0.7).all())
    kept = dead["steps"][1]["forward_kwargs"]["mask"]
    v = dead["steps"][1]["input"][kept][0]
    assert torch.equal(after["_codebook.embed"][0, replaced], v.expand(int(replaced.sum()), -1))
    assert (dead["steps"][1]["outputs"]["indices"][~kept] == -1).all() and not kept.all()

    kmeans = FIXTURES["vq_kmeans"]
    assert not kmeans["initial_state"]["_codebook.initted"] and kmeans["steps"][0]["state"]["_codebook.initted"]
    assert kmeans["steps"][0]["input"].flatten(0, 1).unique(dim=0).shape[0] == 16
