"""Training with 2 and 3 gloo processes equals training one process on the concatenated batch (to 1e-6).

Each scenario (scenarios.py) runs a few training steps in every rank; rank r's per-sample outputs must equal
the single process's rows of rank r, values every rank shares (batch entropy, DDP gradients) must equal the
single process's, per-rank mean losses must average to the single process's loss, and the final state
(codebooks, EMA statistics, learned weights) must be equal everywhere. All processes are spawned once per
world size (conftest.py).
"""

from __future__ import annotations

import pytest
import scenarios
import torch

WORLD_SIZES = [2, 3]
# every scenario in one spawn of 2 gloo processes, and (slow: `pytest -m slow`) of 3
SPAWNED_WORLD_SIZES = [2, pytest.param(3, marks=pytest.mark.slow)]
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


def assert_equal(actual, expected, what):
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), what
    else:
        torch.testing.assert_close(actual, expected, **TOLERANCE, msg=lambda m: f"{what}: {m}")


def compare(name: str, world_size: int, per_rank: list[dict]):
    scenario = scenarios.SCENARIOS[name]
    single_records, single_state = scenarios.run_single(scenario, world_size)
    rank_records = [results[name][0] for results in per_rank]
    for step, single in enumerate(single_records):
        for key, expected in single.items():
            values = [records[step][key] for records in rank_records]
            what = f"{name}, world {world_size}, step {step}, {key}"
            kind = key.split("/")[0]
            if kind == "rows":
                for rank, value in enumerate(values):
                    assert_equal(value, scenario.rows(expected, world_size, rank), f"{what}, rank {rank}")
            elif kind == "same":
                for rank, value in enumerate(values):
                    assert_equal(value, expected, f"{what}, rank {rank}")
            else:
                assert_equal(torch.stack(values).mean(0), expected, what)
    for rank, results in enumerate(per_rank):
        state = results[name][1]
        assert state.keys() == single_state.keys()
        for key, expected in single_state.items():
            assert_equal(state[key], expected, f"{name}, world {world_size}, state {key}, rank {rank}")
    return single_records


@pytest.mark.parametrize("world_size", SPAWNED_WORLD_SIZES)
@pytest.mark.parametrize("name", list(scenarios.SCENARIOS))
def test_ranks_train_as_one_process_on_the_concatenated_batch(name, world_size, distributed_results):
    compare(name, world_size, distributed_results(world_size))


# ------------------------------------------------------------------------- the scenarios test what they say


def test_dead_codes_are_replaced_in_the_scenarios():
    """The equality above covers dead-code replacement only if codes die: check that they do."""
    for name in ("vq_ema_kmeans_dead", "vq_cosine_separate_heads_masked"):
        records, _ = scenarios.run_single(scenarios.SCENARIOS[name], world_size=2)
        assert sum(int(r["same/just_replaced"]) for r in records[1:]) > 0, name


def test_ranks_built_from_different_seeds_start_from_different_codebooks():
    scenario = scenarios.SCENARIOS["vq_seeded_per_rank"]
    first, second = scenarios.build(scenario, 0), scenarios.build(scenario, 1)
    assert not torch.equal(first.codebook, second.codebook)


def test_quantize_dropout_drops_layers_in_the_scenario():
    records, _ = scenarios.run_single(scenarios.SCENARIOS["rvq_dropout"], world_size=2)
    assert any((r["rows/indices"] == -1).any() for r in records)


def test_shared_codebook_scenario_replaces_codes_in_the_pass_over_every_layer():
    """The layers' own dead-code passes run first; the scenario covers the last pass (over every layer's inputs,
    where the order of the rows matters) only if codes are still dead then: check that they are."""
    scenario = scenarios.SCENARIOS["rvq_shared_codebook"]
    model = scenarios.build(scenario, rank=0)
    codebook = model.layers[0]._codebook
    dead_per_pass = []
    expire = codebook.expire_codes_

    def counting_expire(*args, **kwargs):
        dead_per_pass.append(int((codebook.cluster_size < codebook.threshold_ema_dead_code).sum()))
        expire(*args, **kwargs)

    codebook.expire_codes_ = counting_expire
    scenarios.train(scenario, model, world_size=2, rank=None)
    passes = model.num_quantizers + 1  # one per layer, then the shared pass
    assert len(dead_per_pass) == scenario.steps * passes
    assert all(dead_per_pass[step * passes + passes - 1] > 0 for step in range(scenario.steps))


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_per_sample_scenario_has_unequal_batches_and_cutoffs_per_sample(world_size):
    scenario = scenarios.SCENARIOS["rvq_per_sample_dropout_unequal_batches"]
    x = scenario.data(0, world_size)["x"]
    sizes = [len(scenario.rows(x, world_size, rank)) for rank in range(world_size)]
    assert len(set(sizes)) == world_size and sum(sizes) == len(x)
    records, _ = scenarios.run_single(scenario, world_size)
    kept = torch.cat([(r["rows/indices"] >= 0).sum(-1)[:, 0] for r in records])
    assert len(set(kept.tolist())) > 1


def test_lfq_scenario_has_a_rank_without_tokens_and_a_nonzero_batch_entropy():
    data = scenarios.lfq_data(0, 2, masked=True)
    assert not data["mask"][-scenarios.PER_RANK :].any() and data["mask"].any()
    records, _ = scenarios.run_single(scenarios.SCENARIOS["lfq_masked_empty_rank"], world_size=2)
    assert all(r["same/batch_entropy"] > 0.1 for r in records)
