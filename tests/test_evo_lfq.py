import pytest
import torch
from torch import nn

from vector_quantize_pytorch import EvoLFQ


def make(seed=0, **kwargs):
    torch.manual_seed(seed)
    return EvoLFQ(nn.Linear(16, 8), nn.Linear(8, 16), dim=8, codebook_size=256, **kwargs)


def test_forward_shapes_and_decode_bits_matches_eval_forward():
    evo = make().eval()
    x = torch.randn(3, 16)
    reconstructed, indices, aux = evo(x)
    assert reconstructed.shape == (3, 16) and indices.shape == (3,) and aux.shape == ()
    bits = evo.encode(x)
    assert bits.shape == (3, 8) and set(bits.unique().tolist()) <= {0.0, 1.0}
    assert torch.allclose(evo.decode_bits(bits), reconstructed, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_refined_bits_never_reconstruct_worse_than_the_encoders(seed):
    evo = make(seed, pop_size=16, generations=8, mutation_rate=0.1)
    x = torch.randn(1, 16)
    start = evo.encode(x)[0]
    refined = evo.refine(x)
    error = lambda bits: (evo.decode_bits(bits.unsqueeze(0)) - x).pow(2).mean()  # noqa: E731
    assert error(refined) <= error(start) + 1e-7


def test_evolve_reports_the_fitness_of_its_best_gene():
    evo = make(pop_size=12, generations=5)
    target = torch.randn(16)

    def fitness(decoded, _bits):
        return -(decoded - target).pow(2).mean(-1)

    for result in evo.evolve(fitness, shape=(8,)):
        decoded = evo.decode_bits(result.best_gene.unsqueeze(0))
        assert fitness(decoded, None).item() == pytest.approx(result.best_fitness, abs=1e-6)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="elitism_count"):
        make(pop_size=2, elitism_count=2)
    with pytest.raises(ValueError, match="mutation_rate"):
        make(mutation_rate=2.0)
    with pytest.raises(ValueError, match="lfq"):
        EvoLFQ(nn.Identity(), nn.Identity())
