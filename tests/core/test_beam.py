"""core/beam.py: the beam search equals a brute-force enumeration of every path when the beam holds them all,
and a plain per-vector beam search (the computation ResidualVQ used before the tables) otherwise, with exact
indices: ties are constructed on purpose (duplicated codes, values on a dyadic grid so that every sum is exact)
and resolve to the lowest index. Both search methods (tables, vectors), every selection helper, token chunks,
quantize-dropout stops and both beam scores are covered."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from vector_quantize_pytorch import ResidualVQ
from vector_quantize_pytorch.core import beam as beam_module
from vector_quantize_pytorch.core.beam import (
    beam_search,
    best_first,
    grid_layout,
    grid_order,
    grid_shortlist,
    shortlist,
)


def reference_beam(x, codes, beam, score="final", weights=None, cosine=False, stops=None):
    """The per-vector beam search, written plainly: each path's ``min(beam, K)`` nearest codes (distances from
    the residual vectors, stable sort: equal distances by code), taken in (path, code) order, and the best
    ``beam`` of them by a stable sort of their scores (one at the last layer)."""
    t, q = x.shape[0], len(codes)
    weights = [1.0] * q if weights is None else weights
    paths, residual, scores = torch.zeros(t, 1, 0, dtype=torch.long), x.unsqueeze(1), torch.zeros(t, 1)
    chosen = torch.zeros(t, q, dtype=torch.long)
    for m, book in enumerate(codes):
        w, k = residual.shape[1], min(beam, book.shape[0])
        r = F.normalize(residual, dim=-1) if cosine else residual
        dist = -(r @ book.t()) if cosine else (r.unsqueeze(2) - book).pow(2).sum(-1)
        near = dist.sort(dim=-1, stable=True).indices[..., :k].sort(dim=-1).values  # (t, w, k), in code order
        picked = book[near]
        new_residual = residual.unsqueeze(2) - picked
        error = (new_residual if score == "final" else r.unsqueeze(2) - picked).pow(2).mean(-1)
        total = (-error if score == "final" else scores.unsqueeze(-1) - weights[m] * error).reshape(t, -1)
        keep = 1 if m == q - 1 else min(beam, w * k)
        best = total.sort(dim=-1, descending=True, stable=True).indices[:, :keep]
        parent = torch.div(best, k, rounding_mode="floor")
        paths = torch.cat(
            (paths.gather(1, parent[..., None].expand(-1, -1, m)), near.reshape(t, -1).gather(1, best)[..., None]), -1
        )
        residual = new_residual.reshape(t, w * k, -1).gather(1, best[..., None].expand(-1, -1, x.shape[1]))
        scores = total.gather(1, best)
        if stops is not None:
            chosen[:, : m + 1] = torch.where((stops == m)[:, None], paths[:, 0], chosen[:, : m + 1])
    return paths[:, 0] if stops is None else chosen


def brute_force(x, codes, score="final", weights=None):
    """The lowest path (in lexicographic order) with the best score among all ``prod K_l`` paths (float64)."""
    weights = [1.0] * len(codes) if weights is None else weights
    paths = torch.cartesian_prod(*[torch.arange(c.shape[0]) for c in codes]).reshape(-1, len(codes))
    residual, total = x.double().unsqueeze(1), torch.zeros(x.shape[0], paths.shape[0], dtype=torch.float64)
    for l, book in enumerate(codes):
        picked = book.double()[paths[:, l]]
        total = total + weights[l] * (residual - picked).pow(2).mean(-1)
        residual = residual - picked
    total = residual.pow(2).sum(-1) if score == "final" else total
    return paths[total.argmin(-1)], total, paths


def dyadic(*shape, generator, scale=200):
    """Values ``n / 64`` with ``|n| <= scale``: every sum and product in these tests is exact in float32."""
    return torch.randint(-scale, scale + 1, shape, generator=generator).float() / 64


def with_duplicates(book, generator):
    """The codebook with about a third of its codes replaced by copies of lower ones (ties on purpose)."""
    book = book.clone()
    size = book.shape[0]
    for i in range(1, size):
        if torch.rand((), generator=generator) < 1 / 3:
            book[i] = book[torch.randint(0, i, (), generator=generator)]
    return book


@pytest.fixture(params=["tables", "tables-product", "vectors"])
def method(request, monkeypatch):
    """The tables method with tables (whatever the code size), the tables method estimating from the residual
    product, and the vectors method."""
    if request.param == "tables":
        monkeypatch.setattr(beam_module, "TABLE_VALUE_COST", 0)
    elif request.param == "tables-product":
        monkeypatch.setattr(beam_module, "TABLE_VALUE_COST", 10**9)
    return "vectors" if request.param == "vectors" else "tables"


# ---------------------------------------------------------------- brute force


@pytest.mark.parametrize("score, weights", [("final", None), ("sum", None), ("sum", [2.0, 0.5, 1.0])])
def test_a_beam_holding_every_path_finds_the_brute_force_path_with_ties_at_the_lowest_index(method, score, weights):
    """5 codes, 3 layers, beam 25: every path is scored. Codes are duplicated on purpose; among paths of equal
    score the lowest one wins, as a brute-force argmin over the paths in order."""
    g = torch.Generator().manual_seed(0)
    codes = [with_duplicates(dyadic(5, 3, generator=g), g) for _ in range(3)]
    x = dyadic(60, 3, generator=g, scale=300)
    expected, total, paths = brute_force(x, codes, score, weights)
    # the ties are those of the duplicates: paths of the minimal score differ only by duplicated codes
    first = [torch.tensor([int((book == book[i]).all(-1).nonzero()[0]) for i in range(5)]) for book in codes]
    canonical = torch.stack([first[l][paths[:, l]] for l in range(3)], dim=-1)
    tied = total == total.min(-1, keepdim=True).values
    assert all(len(canonical[row].unique(dim=0)) == 1 for row in tied), "only duplicate codes may tie"
    assert tied.sum(-1).max() > 1  # some minimal paths are tied
    got = beam_search(
        x, codes, 25, score=score, weights=None if weights is None else torch.tensor(weights), method=method
    )
    assert torch.equal(got, expected)


def test_brute_force_with_every_path_and_random_codes(method):
    torch.manual_seed(0)
    codes = [torch.randn(4, 6), torch.randn(7, 6) * 0.5, torch.randn(3, 6) * 0.3]
    x = torch.randn(100, 6)
    assert torch.equal(beam_search(x, codes, 28, method=method), brute_force(x, codes)[0])


# ---------------------------------------------------------------- against the per-vector search


SHAPES = [  # (d, layer sizes, beam)
    (3, (4, 4, 4), 2),
    (8, (5, 16, 32), 3),
    (6, (40, 40), 4),
    (16, (256, 256, 256, 256), 4),
    (12, (300, 100, 300), 5),
    (10, (1000, 1000), 4),
    (8, (64, 64, 64), 8),
    (4, (16, 16, 16), 1),
]


@pytest.mark.parametrize("d, sizes, beam", SHAPES)
@pytest.mark.parametrize("score", ["final", "sum"])
def test_equals_the_per_vector_search_with_ties_on_purpose(method, d, sizes, beam, score):
    g = torch.Generator().manual_seed(sum(sizes) + beam)
    codes = [with_duplicates(dyadic(size, d, generator=g, scale=120), g) for size in sizes]
    x = dyadic(150, d, generator=g, scale=120)
    weights = [1.0, 0.5, 2.0, 1.0, 1.0][: len(sizes)]
    got = beam_search(x, codes, beam, score=score, weights=torch.tensor(weights), method=method)
    assert torch.equal(got, reference_beam(x, codes, beam, score, weights))


@pytest.mark.parametrize("d, sizes, beam", SHAPES)
def test_equals_the_per_vector_search_on_random_codebooks(method, d, sizes, beam):
    torch.manual_seed(1)
    codes = [torch.randn(size, d) * 0.7**l for l, size in enumerate(sizes)]
    x = torch.randn(200, d)
    assert torch.equal(beam_search(x, codes, beam, method=method), reference_beam(x, codes, beam))


def test_cosine_layers_use_the_per_vector_search():
    torch.manual_seed(2)
    codes = [F.normalize(torch.randn(size, 8), dim=-1) for size in (16, 40, 300)]
    x = torch.randn(120, 8)
    for score in ("final", "sum"):
        got = beam_search(x, codes, 4, cosine=True, score=score)
        assert torch.equal(got, reference_beam(x, codes, 4, score, cosine=True))
    with pytest.raises(ValueError, match="tables"):
        beam_search(x, codes, 4, cosine=True, method="tables")


def test_weights_that_are_not_positive_use_the_per_vector_search():
    """With a weight of 0 or below, a path's nearest codes are not its best-scored ones: the candidates stay
    each path's nearest codes, as the per-vector search takes them."""
    g = torch.Generator().manual_seed(3)
    codes = [dyadic(16, 4, generator=g) for _ in range(3)]
    x = dyadic(80, 4, generator=g)
    for weights in ([0.0, 0.0, 1.0], [1.0, -0.5, 1.0]):
        got = beam_search(x, codes, 3, score="sum", weights=torch.tensor(weights))
        assert torch.equal(got, reference_beam(x, codes, 3, "sum", weights))
        with pytest.raises(ValueError, match="tables"):
            beam_search(x, codes, 3, score="sum", weights=torch.tensor(weights), method="tables")


@pytest.mark.parametrize("score", ["final", "sum"])
def test_stops_end_each_path_at_its_own_layer(method, score):
    g = torch.Generator().manual_seed(4)
    codes = [with_duplicates(dyadic(size, 5, generator=g), g) for size in (20, 33, 20, 40)]
    x = dyadic(100, 5, generator=g)
    stops = torch.randint(0, 4, (100,), generator=g)
    got = beam_search(x, codes, 4, stops=stops, score=score, method=method)
    assert torch.equal(got, reference_beam(x, codes, 4, score, stops=stops))
    assert (got[torch.arange(4) > stops[:, None]] == 0).all()


def test_token_chunks_give_the_same_indices(method):
    torch.manual_seed(5)
    codes = [torch.randn(size, 12) * 0.6**l for l, size in enumerate((200, 64, 200))]
    x = torch.randn(333, 12)
    whole = beam_search(x, codes, 4, method=method)
    for budget in (3000, 20000, 2**16):
        assert torch.equal(beam_search(x, codes, 4, method=method, max_scores=budget), whole)


def test_table_budget_past_which_layers_use_the_product(monkeypatch):
    monkeypatch.setattr(beam_module, "TABLE_VALUE_COST", 0)
    torch.manual_seed(6)
    codes = [torch.randn(128, 8) * 0.6**l for l in range(4)]
    x = torch.randn(64, 8)
    expected = reference_beam(x, codes, 4)
    for budget in (1, 2**14, 2**16, 2**20):  # no table, the first ones, all
        assert torch.equal(beam_search(x, codes, 4, max_scores=budget), expected)
    context = beam_module.search_context(codes, [False] * 4, True, 4, 2**14, 16)
    assert [layer["table"] is None for layer in context["layers"]] == [True, False, False, True]


def test_tables_pay_at_the_first_layers_the_more_the_larger_the_dimension():
    # B (m + 1) 20 <= (B - 1) (d + 1): beam 4, d = 128: 4 (m + 1) 20 <= 387 up to m = 3 (320), not m = 4 (400)
    assert [m for m in range(12) if beam_module.tables_pay(m, 128, 4)] == [1, 2, 3]
    assert [m for m in range(12) if beam_module.tables_pay(m, 64, 4)] == [1]  # 160 <= 195 < 240
    assert [m for m in range(12) if beam_module.tables_pay(m, 256, 4)] == list(range(1, 9))  # 720 <= 771 < 800
    assert not any(beam_module.tables_pay(m, 32, 4) for m in range(12))  # 160 > 99
    assert not beam_module.tables_pay(0, 4096, 4)  # layer 0 has no earlier codes
    assert [m for m in range(12) if beam_module.tables_pay(m, 128, 2)] == [1, 2]  # 2 (m + 1) 20 <= 129


def test_search_context_builds_the_tables_that_pay_within_the_budget():
    codes = [torch.randn(64, 128) for _ in range(6)]
    context = beam_module.search_context(codes, [False] * 6, True, 4, 2**20, 16)
    assert [layer["table"] is not None for layer in context["layers"]] == [False, True, True, True, False, False]
    x = torch.randn(50, 128)
    assert torch.equal(beam_search(x, codes, 4), reference_beam(x, codes, 4))


def test_empty_input_and_single_layer(method):
    codes = [torch.randn(10, 4)]
    assert beam_search(torch.randn(0, 4), codes, 3, method=method).shape == (0, 1)
    x = torch.randn(20, 4)
    assert torch.equal(beam_search(x, codes, 3, method=method)[:, 0], torch.cdist(x, codes[0]).argmin(-1))


def test_non_finite_inputs_give_valid_indices(method):
    torch.manual_seed(7)
    codes = [torch.randn(size, 6) for size in (300, 40, 5)]
    x = torch.randn(30, 6)
    x[0, 0], x[1] = float("nan"), float("inf")
    got = beam_search(x, codes, 4, method=method)
    assert all(((got[:, l] >= 0) & (got[:, l] < size)).all() for l, size in enumerate((300, 40, 5)))
    assert torch.equal(got[2:], beam_search(x[2:], codes, 4, method=method))


class HostReads(TorchFunctionMode):
    """Records operations that read a tensor's value on the host (a synchronisation on an accelerator)."""

    NAMES = {"item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_final_score_search_reads_nothing_on_the_host(method):
    torch.manual_seed(8)
    codes = [torch.randn(size, 6) for size in (300, 40)]
    x, stops = torch.randn(50, 6), torch.randint(0, 2, (50,))
    with HostReads() as host:
        beam_search(x, codes, 4, stops=stops, method=method)
    assert host.reads == []


# ---------------------------------------------------------------- selection helpers


@pytest.mark.parametrize("parts, width, k", list(itertools.product((1, 3), (5, 40, 100, 256, 1000), (1, 4, 6))))
def test_shortlist_is_a_stable_sort_of_the_offset_values(parts, width, k):
    k = min(k, parts * width)
    g = torch.Generator().manual_seed(parts * width + k)
    values = torch.randint(0, 9, (120, parts, width), generator=g).float()
    offsets = torch.randint(0, 3, (120, parts), generator=g).float()
    expected = (values + offsets[..., None]).reshape(120, -1).sort(dim=-1, stable=True).indices[:, :k]
    assert torch.equal(shortlist(values, k, offsets), expected)


@pytest.mark.parametrize(
    "size, paths, k", [(5, 1, 2), (100, 4, 6), (256, 4, 6), (1000, 4, 6), (1024, 8, 10), (4096, 1, 3)]
)
def test_grid_shortlist_is_a_stable_sort_in_path_and_code_order(size, paths, k):
    g = torch.Generator().manual_seed(size + paths)
    groups, length = grid_layout(size, paths, k)
    order = grid_order(size, groups, length)
    values = torch.randint(0, 9, (90, paths, size), generator=g).float()
    offsets = torch.randint(0, 3, (90, paths), generator=g).float()
    stored = F.pad(values, (0, 1), value=beam_module.PADDING)[..., order]  # the layout table_step builds
    path, code = grid_shortlist(stored, groups, k, offsets)
    expected = (values + offsets[..., None]).reshape(90, -1).sort(dim=-1, stable=True).indices[:, :k]
    assert torch.equal(path * size + code, expected)


def test_grid_order_places_every_code_once():
    for size, paths, k in [(5, 4, 6), (256, 4, 6), (1000, 4, 6), (1024, 4, 6), (8192, 4, 6)]:
        groups, length = grid_layout(size, paths, k)
        order = grid_order(size, groups, length)
        assert torch.equal(order[order < size].sort().values, torch.arange(size))
        assert length == 1 or groups >= k  # blocks: at least one per shortlisted candidate


def test_best_first_is_stable():
    values = torch.randint(0, 3, (200, 12)).float()
    assert torch.equal(best_first(values, 5), values.sort(dim=-1, descending=True, stable=True).indices[:, :5])


# ---------------------------------------------------------------- ResidualVQ


def test_residual_vq_picks_the_first_of_duplicated_codes():
    torch.manual_seed(9)
    rvq = ResidualVQ(dim=4, num_quantizers=3, codebook_size=64, eval_beam_size=4).eval()
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in rvq.layers:
            book = dyadic(32, 4, generator=g)
            layer._codebook.embed.copy_(torch.cat((book, book)).unsqueeze(0))  # code i + 32 copies code i
    x = dyadic(2, 50, 4, generator=g)
    indices = rvq(x)[1]
    assert (indices < 32).all()
    codes = [layer.codebook for layer in rvq.layers]
    assert torch.equal(indices.reshape(-1, 3), reference_beam(x.reshape(-1, 4), codes, 4))
