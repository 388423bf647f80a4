"""Beam search through the layers of a residual quantizer, in bounded memory.

A path takes one code per layer; its reconstruction is the sum of its codes, its residual what is left of
the input. For every token the search keeps a beam of at most ``B`` paths, best first. At layer ``m`` every
path proposes the ``k = min(B, K_m)`` codes nearest to its residual, and the ``B`` best of these candidates
by the beam score survive (one at the last layer). The score of a candidate that adds code ``c`` to a path
with residual ``r`` is

- ``"final"``: ``-||r - c||^2 / d``, the error of the reconstruction so far (faiss's criterion);
- ``"sum"``: the path's score ``- w_m ||r - c||^2 / d``, the weighted sum of every layer's error, with
  ``r`` l2-normalised on a cosine-similarity layer.

With quantize dropout a token's path ends at its own last layer (``stops``): it takes the best path of the
beam at that layer, the path a beam through the kept layers alone finds, since a beam's state at a layer does
not depend on the layers after it. Later entries are 0.

**Exact scores from a shortlist.** Every path carries its residual vector, and the candidates that are kept
are ranked by scores computed from the difference ``r - c``, as a direct search computes them. Finding the
candidates is the expensive part, and an estimate is enough for it: a shortlist of the candidates with the
best estimated scores, ``SHORTLIST_MARGIN`` more than needed, is scored exactly. An estimate's error can then
change a choice only if three candidates lie within it.

- **tables** (Euclidean layers, ``"final"`` or positive weights): half the squared distance of a path's
  residual to a code, ``||r||^2 / 2 + ||c||^2 / 2 - r.c``, for all the ``B K`` (path, code) pairs of a token
  at once, and each token's shortlist among them. ``r.c`` comes from the product of the residuals with the
  codes (``t B x d x K``; the norms ride along as one more column), or, at the first layers (:func:`tables_pay`),
  from faiss's look-up tables: ``||x - sum_l c_l||^2`` expands into ``||x||^2 - 2 sum_l x.c_l + sum_l ||c_l||^2 +
  2 sum_{l<m} c_l.c_m``, so ``r.c = x.c - sum_{l<m} c_l.c``, with the inner products of the earlier layers'
  codes with this layer's in a table (``(K_0 + ... + K_{m-1}) x K_m``, built once per call): one ``t x d x K``
  product shared by the ``B`` paths of a token and ``m`` table rows summed per path (one ``embedding_bag``).
  The product runs at the matrix unit's speed, the table rows at the memory's, and a path sums one more row
  at every layer: the tables pay at the first layers only (for a beam of 4: 3 at d = 128, 8 at d = 256);
  a table past the budget falls back to the product too.
- **vectors** (cosine-similarity layers, ``"sum"`` with a weight that is not positive): each path's
  candidates by the distance logits of its residual (l2-normalised on a cosine layer) to every code, as
  :func:`~vector_quantize_pytorch.core.search.distance_logits` computes them: a shortlist of each path's
  codes, then its ``k`` best logits exactly. This is the search as it was before the tables.

**Selection.** ``torch.topk`` orders equal values arbitrarily and costs about 2 ns per value on a CPU. The
shortlists are found through block minima instead: the ``n`` smallest values of a row lie in the ``n`` blocks
with the smallest minima, so one vectorised ``amin`` over the blocks, a selection of ``n`` blocks and a
selection among their values find them (:func:`grid_shortlist`, :func:`shortlist`). Selections keep rows
in columns (every operation is vectorised across rows) and write a value's row into its low mantissa bits
(:func:`tag`), so that one ``amin`` finds both the smallest value and where it is.

**Ties** resolve to the lowest index everywhere: a path's candidates in code order, a token's candidates in
(path, code) order, paths best first (:func:`best_first`), so a code duplicated in a codebook is chosen at
its first index, as a brute-force search over all paths in order chooses it. The estimates and the direct
difference round differently, so the methods may still part where two candidates' exact scores differ by a
rounding error (as any two floating-point implementations may); none did on the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .policy import chunk_policy
from .search import balanced_chunk, distance_logits, squared_norms

# A beam step holds several temporaries of its chunk's size; a quarter of the logits budget was twice as fast as
# the whole of it (20k tokens, 256 codes, d = 32, beam 4 and 8, 2 CPU cores).
BEAM_BUDGET_FRACTION = 4

# The tables of all layers together may hold this many times the logits budget (CPU: 2^25 values, 128 MiB,
# enough for 8 layers of 1024 codes); later layers estimate from the residuals.
TABLE_BUDGET_FACTOR = 4

# What summing one table value costs, in multiply-adds of the product with the residuals (see tables_pay). Fitted
# on one CPU core, 5000 tokens, beam 4, 4 and 8 layers of 1024 codes, timing every cut-off layer: the fastest
# cut-off was layer 1 at d = 64 and layer 3 or 4 at d = 128, and tables at every layer were 18-20% faster at
# d = 256 and 512 with 4 layers. Every value from 17 to 24 gives these cut-offs; 20 sits in the middle. On the
# trained codebooks of benchmarks/faiss_compare.py this is 10% faster than no tables at d = 128 with 4 layers,
# 0-2% with 8 layers and at d = 64 (one thread, fresh processes, medians of 4 alternating rounds).
TABLE_VALUE_COST = 20

# Candidates per token (tables) or per path (vectors) scored exactly beyond the ones kept.
SHORTLIST_MARGIN = 2

# Row minima of contiguous blocks of this many values run at full speed on a CPU (smaller blocks do not).
SELECT_BLOCK = 32

# Rows of at most this many values are selected directly: a tag holds 8 bits of position.
TAGGED_ROWS = 256

SCORES = ("final", "sum")

# Padding (codes past a codebook, rows past a block): larger than any estimate, finite (a tag of infinity is NaN).
PADDING = 1e30


# ------------------------------------------------------------------ selection


def tag(columns: Tensor) -> tuple[Tensor, int]:
    """Values ``>= 0`` whose low mantissa bits hold their row, so that a column minimum also says where it is
    (:func:`untag`). Order is kept between values that differ above those bits (2^-15 relative for 256 rows);
    equal values order by row. A negative value (a rounding error below 0) counts as its magnitude; infinity
    and NaN become NaN (no row; :func:`untag` clamps).

    Shape:
        - columns: ``(W, R)`` float32; output: ``(W, R)`` float32 and the number of bits
    """
    bits = max(1, (columns.shape[0] - 1).bit_length())
    keep = 0x7FFFFFFF ^ ((1 << bits) - 1)  # the sign too: -0.0 is 0.0
    rows = torch.arange(columns.shape[0], dtype=torch.int32, device=columns.device).unsqueeze(1)
    return (columns.view(torch.int32) & keep | rows).view(torch.float32), bits


def untag(values: Tensor, bits: int, rows: int) -> Tensor:
    """The rows :func:`tag` wrote into ``values`` (clamped to ``[0, rows)``: a NaN's bits are no row).

    Shape:
        - values: ``(...)`` float32; output: ``(...)`` int64
    """
    return (values.view(torch.int32) & ((1 << bits) - 1)).long().clamp_(max=rows - 1)


def smallest_tagged(columns: Tensor, k: int) -> Tensor:
    """Rows of the ``k`` smallest values of every column, ascending, equal values by row (up to the tag's
    precision): ``k`` rounds of a column minimum, each removing the one it found.

    Shape:
        - columns: ``(W, R)`` float32, ``k <= W <= TAGGED_ROWS``; output: ``(k, R)`` int64
    """
    tagged, bits = tag(columns)
    found = []
    for _ in range(k):
        row = untag(tagged.amin(0, keepdim=True), bits, columns.shape[0])
        found.append(row)
        tagged.scatter_(0, row, float("inf"))
    return torch.cat(found)


def shortlist_columns(columns: Tensor, k: int) -> Tensor:
    """Rows of the ``k`` smallest values of every column (up to the tag's precision; equal values by row):
    directly for short columns, else through the minima of blocks of 8 rows (the ``k`` smallest values lie
    in the ``k`` blocks with the smallest minima, and blocks taken in row order keep ties in row order).

    Shape:
        - columns: ``(W, R)`` float32, contiguous, ``k <= W``; output: ``(k, R)`` int64, best first
    """
    width, num = columns.shape
    block = 8
    if width <= max(TAGGED_ROWS, block * k):  # (a beam above 32 paths tags more bits)
        return smallest_tagged(columns, k)
    if width % block:
        columns = F.pad(columns, (0, 0, 0, -width % block), value=PADDING)
    blocks = shortlist_columns(columns.view(-1, block, num).amin(1), k).sort(dim=0).values  # in row order
    rows = (blocks.unsqueeze(1) * block + torch.arange(block, device=columns.device).view(1, block, 1)).flatten(0, 1)
    return rows.gather(0, shortlist_columns(columns.gather(0, rows), k)).clamp_(max=width - 1)


def shortlist(keys: Tensor, k: int, offsets: Tensor | None = None) -> Tensor:
    """Positions ``p K + c`` of the ``k`` smallest ``keys[r, p, c] + offsets[r, p]`` of every row ``r``, best
    first, equal values by position (up to the tag's precision): block minima of ``SELECT_BLOCK`` codes (one
    vectorised ``amin``, ``K`` padded to a multiple of the block), the ``k`` best blocks, their values.

    Shape:
        - keys: ``(R, P, K)`` float32, offsets: ``(R, P)``; output: ``(R, k)`` int64 in ``[0, P K)``
    """
    num, parts, width = keys.shape
    keys, offsets = keys.float(), None if offsets is None else offsets.float()  # tags are float32 bits
    if parts * width <= TAGGED_ROWS:
        full = keys if offsets is None else keys + offsets.unsqueeze(-1)
        return smallest_tagged(full.reshape(num, -1).t().contiguous(), k).t()
    padded = width + -width % SELECT_BLOCK
    if padded != width:
        keys = F.pad(keys, (0, padded - width), value=PADDING)
    per_part = padded // SELECT_BLOCK
    minima = keys.reshape(num, parts, per_part, SELECT_BLOCK).amin(-1)
    if offsets is not None:
        minima = minima + offsets.unsqueeze(-1)
    blocks = shortlist_columns(minima.reshape(num, -1).t().contiguous(), k).sort(dim=0).values.t()  # (R, k)
    start = torch.arange(num, device=keys.device).unsqueeze(1) * (parts * per_part)
    picked = keys.reshape(-1, SELECT_BLOCK).index_select(0, (blocks + start).reshape(-1)).view(num, k, -1)
    if offsets is not None:
        picked = picked + offsets.gather(1, torch.div(blocks, per_part, rounding_mode="floor")).unsqueeze(-1)
    best = shortlist_columns(picked.reshape(num, -1).t().contiguous(), k).t()  # (R, k) in picked
    block, within = torch.div(best, SELECT_BLOCK, rounding_mode="floor"), best % SELECT_BLOCK
    position = blocks.gather(1, block) * SELECT_BLOCK + within  # in the padded layout
    part = torch.div(position, padded, rounding_mode="floor")
    return part * width + (position % padded).clamp_(max=width - 1)


def grid_layout(size: int, paths: int, width: int) -> tuple[int, int]:
    """``(groups, length)`` of the grid a layer of ``size`` codes is stored in (:func:`grid_order`) for
    shortlists of ``width`` among ``paths`` paths per token: code blocks of ``length`` codes (a power of two near
    ``sqrt(paths size / width)``, which balances the blocks' minima against the codes of the chosen blocks, at
    most 32), and at least ``width`` blocks. Layers of at most 64 codes are not blocked (``length`` 1).

    Shape:
        - output: two ints, ``groups * length >= size``
    """
    length = 1
    while length < 32 and size > 64 and (2 * length) ** 2 * width <= paths * size and -(-size // (2 * length)) >= width:
        length *= 2
    return -(-size // length), length


def grid_order(size: int, groups: int, length: int, device=None) -> Tensor:
    """The code stored at every place of the grid: place ``i G + j`` holds code ``j L + i``, so that the codes
    of block ``j`` (``j L`` to ``j L + L - 1``) sit ``G`` places apart and a block's minimum is a vectorised
    ``amin`` across the ``L`` rows of ``G`` places. Places of codes past ``size`` (padding) hold ``size``.

    Shape:
        - output: ``(G L,)`` int64 codes in ``[0, size]``
    """
    place = torch.arange(groups * length, device=device)
    return ((place % groups) * length + torch.div(place, groups, rounding_mode="floor")).clamp_(max=size)


def grid_shortlist(keys: Tensor, groups: int, k: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """The ``k`` (path, code) pairs of every token with the smallest ``keys + offsets[path]``, best first, equal
    values by (path, code) (up to the tag's precision), for keys stored in :func:`grid_order`: the minima of
    the code blocks (one ``amin``), the ``k`` best blocks of all paths, the ``k`` best of their codes.

    Shape:
        - keys: ``(t, w, G L)`` float32 (grid order), offsets: ``(t, w)``, values ``>= 0`` once offset
        - output: paths ``(t, k)``, codes ``(t, k)`` (``j L + i``, past the real codes only for padding)
    """
    t, w, places = keys.shape
    length, keys, offsets = places // groups, keys.float(), offsets.float()  # tags are float32 bits
    minima = keys.view(t, w, length, groups).amin(2).add_(offsets.unsqueeze(-1))  # (t, w, G)
    blocks = shortlist_columns(minima.view(t, w * groups).t().contiguous(), k).sort(dim=0).values  # p G + j
    path, block = torch.div(blocks, groups, rounding_mode="floor"), blocks % groups
    first = (torch.arange(t, device=keys.device) * (w * places) + path * places + block).unsqueeze(1)
    picked = keys.reshape(-1).take(first + (torch.arange(length, device=keys.device) * groups).view(1, -1, 1))
    picked = picked.add_(offsets.t().gather(0, path).unsqueeze(1)).view(k * length, t)  # (k L, t)
    best = shortlist_columns(picked, k)  # (k, t) in [0, k L)
    which, within = torch.div(best, length, rounding_mode="floor"), best % length
    return path.gather(0, which).t(), (block.gather(0, which) * length + within).t()


def best_first(values: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest values of every row, best first, equal values by lowest index (a stable
    sort of short rows).

    Shape:
        - values: ``(R, C)``, ``k <= C``; output: ``(R, k)`` int64
    """
    return values.sort(dim=-1, descending=True, stable=True).indices[:, :k]


# ------------------------------------------------------------------ beam state


class Beam(NamedTuple):
    """The beam of a chunk of ``t`` tokens after some layers: ``w`` paths per token, best first.

    Shape:
        - paths: ``(t, w, m)`` int64 codes, score: ``(t, w)``, residual: ``(t, w, d)``
    """

    paths: Tensor
    score: Tensor
    residual: Tensor


def score_candidates(beam: Beam, parent: Tensor, codes: Tensor, book: Tensor, cosine: bool, score: str, weight):
    """Residuals and exact scores of candidates (path ``parent`` + code ``codes``): ``-||r - c||^2 / d``
    (``"final"``) or the parent's score ``- weight ||r - c||^2 / d`` (``"sum"``, ``r`` l2-normalised if
    ``cosine``), computed from the vectors.

    Shape:
        - parent, codes: ``(t, c)``, book: ``(K, d)``
        - output: residuals ``(t, c, d)``, scores ``(t, c)``
    """
    t, w, d = beam.residual.shape
    rows = (parent + torch.arange(t, device=parent.device).unsqueeze(1) * w).reshape(-1)
    residual = beam.residual.reshape(t * w, d).index_select(0, rows).view(*parent.shape, d)
    q = F.embedding(codes, book)
    new_residual = residual - q
    if score == "final":
        return new_residual, -new_residual.pow(2).mean(-1)
    r = F.normalize(residual, dim=-1) if cosine else residual
    return new_residual, beam.score.gather(1, parent) - weight * (r - q).pow(2).mean(-1)


def select(beam: Beam, total: Tensor, parent: Tensor, codes: Tensor, residual: Tensor, keep: int) -> Beam:
    """The ``keep`` best candidates of every token by ``total`` (ties: the earlier candidate), with their
    parents' paths extended by their codes.

    Shape:
        - total, parent, codes: ``(t, c)``, residual: ``(t, c, d)``
        - output: a :class:`Beam` of ``keep`` paths
    """
    best = best_first(total, keep)
    parent = parent.gather(1, best)
    paths = beam.paths.gather(1, parent.unsqueeze(-1).expand(-1, -1, beam.paths.shape[-1]))
    paths = torch.cat((paths, codes.gather(1, best).unsqueeze(-1)), dim=-1)
    d = residual.shape[-1]
    return Beam(paths, total.gather(1, best), residual.gather(1, best.unsqueeze(-1).expand(-1, -1, d)))


def record_stops(chosen: Tensor, beam: Beam, stops: Tensor, layer: int) -> None:
    """Write the best path into ``chosen`` for the tokens whose last layer is ``layer``.

    Shape:
        - chosen: ``(t, q)`` int64 (in place), stops: ``(t,)``
    """
    stopping = (stops == layer).unsqueeze(-1)
    chosen[:, : layer + 1] = torch.where(stopping, beam.paths[:, 0], chosen[:, : layer + 1])


# ------------------------------------------------------------------ steps


def vector_step(beam: Beam, book: Tensor, cosine: bool, keep: int, beam_size: int, weight, score: str) -> Beam:
    """Extend the beam of a token chunk by one layer from the paths' residual vectors: each path's ``k``
    candidates by distance logits (of the l2-normalised residual on a cosine layer), then their exact scores.

    Shape:
        - beam: ``w`` paths with residuals ``(t, w, d)``, book: ``(K, d)``
        - output: ``keep`` paths of one more code
    """
    t, w, d = beam.residual.shape
    r = F.normalize(beam.residual, dim=-1) if cosine else beam.residual
    logits = distance_logits(r.reshape(1, t * w, d), book.unsqueeze(0), cosine=cosine)[0]  # (t w, K)
    k = min(beam_size, book.shape[0])
    near = shortlist(logits.amax(-1, keepdim=True).sub(logits).unsqueeze(1), min(book.shape[0], k + SHORTLIST_MARGIN))
    codes = near.gather(1, best_first(logits.gather(1, near), k)).sort(dim=-1).values.reshape(t, w * k)
    parent = torch.arange(w, device=codes.device).repeat_interleave(k).expand(t, -1)
    residual, total = score_candidates(beam, parent, codes, book, cosine, score, weight)
    return select(beam, total, parent, codes, residual, keep)


def with_one(v: Tensor) -> Tensor:
    """``[v, 1]`` ``(n, d + 1)`` of ``(n, d)`` rows: a product with ``[-c, b]`` is ``b - v.c``."""
    return torch.cat((v, v.new_ones(v.shape[0], 1)), dim=1)


def table_step(beam: Beam, x: Tensor, layer: dict, keep: int, weight, score: str) -> Beam:
    """Extend the beam of a token chunk by one Euclidean layer: a shortlist of ``keep + SHORTLIST_MARGIN``
    (path, code) pairs per token by estimated half squared distance (from tables or residuals, see the
    module's docstring; for ``"sum"`` shifted by each path's score), then their exact scores. ``layer`` is one
    of :func:`search_context`'s layers.

    Shape:
        - beam: ``w`` paths with residuals ``(t, w, d)``, x: ``(t, d)``
        - output: ``keep`` paths of one more code
    """
    book, table = layer["codes"], layer["table"]
    t, w, m = beam.paths.shape
    # [v, 1] @ [-c, ||c||^2 / 2]^T = ||c||^2 / 2 - v.c in one product (no pass to add the norms)
    if m == 0 or table is None:  # ||c||^2 / 2 - r.c
        keys = torch.mm(with_one(beam.residual.reshape(t * w, -1)), layer["weights"]).view(t, w, -1)
    else:  # sum_{l<m} c_l.c + (||c||^2 / 2 - x.c): m table rows and the token's row, after the table's rows
        earlier = layer["earlier"]
        torch.mm(with_one(x), layer["weights"], out=table[earlier : earlier + t])
        own = torch.arange(earlier, earlier + t, device=x.device).view(t, 1, 1).expand(t, w, 1)
        rows = torch.cat((beam.paths + layer["offsets"], own), dim=-1).view(t * w, m + 1)
        keys = F.embedding_bag(rows, table, mode="sum").view(t, w, -1)
    offsets = beam.residual.pow(2).sum(-1).mul_(0.5)  # ||r||^2 / 2: keys + offsets estimate ||r - c||^2 / 2
    if score == "sum":  # rank by the score, the parent's score - (2 weight / d) * (half squared distance)
        offsets = offsets - beam.score * (x.shape[-1] / (2 * weight))
    size = book.shape[0]
    parent, codes = grid_shortlist(keys, layer["groups"], min(w * size, keep + SHORTLIST_MARGIN), offsets)
    # in (path, code) order, so that equal exact scores keep that order whatever the estimates' rounding
    flat = (parent * size + codes.clamp_(max=size - 1)).sort(dim=-1).values
    parent, codes = torch.div(flat, size, rounding_mode="floor"), flat % size
    residual, total = score_candidates(beam, parent, codes, book, False, score, weight)
    return select(beam, total, parent, codes, residual, keep)


# ------------------------------------------------------------------ search


def search_context(codes: Sequence[Tensor], cosine: Sequence[bool], use_tables: bool, beam_size: int,
                   max_scores: int, chunk: int) -> dict:  # fmt: skip
    """What every chunk's search reads: the codes and cosine flags, and for the tables method, per layer, its
    codes in :func:`grid_order` (``stored``, the padding zeros), ``weights`` ``[-c, ||c||^2 / 2]^T`` in that order
    (``PADDING`` for the padding, which is never chosen), its table (:func:`cross_tables`, columns in grid
    order, with ``chunk`` spare rows for the tokens' own terms), its number of rows ``earlier`` and each
    earlier layer's first row.

    Shape:
        - codes: ``q`` tensors ``(K_l, d)``
    """
    context = dict(codes=list(codes), cosine=list(cosine), use_tables=use_tables)
    if not use_tables:
        return context
    width, layers = beam_size + SHORTLIST_MARGIN, []
    for book in codes:
        size = book.shape[0]
        groups, length = grid_layout(size, beam_size, width)
        order = grid_order(size, groups, length, book.device)
        half = F.pad(squared_norms(book.unsqueeze(0))[0] * 0.5, (0, 1), value=PADDING)
        stored = F.pad(book, (0, 0, 0, 1))[order]
        weights = torch.cat((-stored, half[order].unsqueeze(1)), dim=1).t().contiguous()
        layers.append(dict(codes=book, stored=stored, weights=weights, groups=groups))
    starts = [0]
    for book in codes[:-1]:
        starts.append(starts[-1] + book.shape[0])
    paying = [tables_pay(m, codes[0].shape[1], beam_size) for m in range(len(codes))]
    tables = cross_tables(codes, [layer["stored"] for layer in layers], max_scores * TABLE_BUDGET_FACTOR, chunk,
                          paying)  # fmt: skip
    for m, layer in enumerate(layers):
        offsets = torch.tensor(starts[:m], dtype=torch.long, device=codes[0].device)
        layer.update(table=tables[m], offsets=offsets, earlier=starts[m])
    context["layers"] = layers
    return context


def tables_pay(layer: int, dim: int, beam_size: int) -> bool:
    """Whether layer ``m`` of a beam of ``B`` paths estimates faster from tables than from the product with the
    residuals. Per token and code, the product takes ``B (d + 1)`` multiply-adds; the tables take the ``d``
    of the token's ``x.c`` and sum ``m + 1`` values per path (``m`` table rows and ``x.c``), each costing about
    ``TABLE_VALUE_COST`` multiply-adds: tables pay while ``B (m + 1) TABLE_VALUE_COST <= (B - 1) (d + 1)``, so
    for the first layers only, the more of them the larger ``d``. Layer 0 has no earlier codes, hence no table.
    """
    return layer >= 1 and beam_size * (layer + 1) * TABLE_VALUE_COST <= (beam_size - 1) * (dim + 1)


def cross_tables(codes: Sequence[Tensor], stored: Sequence[Tensor], max_values: int, spare: int,
                 paying: Sequence[bool]) -> list:  # fmt: skip
    """For every layer ``m`` for which ``paying[m]`` is true, the inner products of the codes of
    the layers before it with its codes (in the order of ``stored``), followed by ``spare`` rows left for the
    caller, while all the tables so far hold at most ``max_values`` values (None for the first layer, the
    layers that do not pay and past the budget).

    Shape:
        - codes: ``q`` tensors ``(K_l, d)``, stored: ``q`` tensors ``(P_l, d)``
        - output: ``q`` tensors ``(K_0 + ... + K_{m-1} + spare, P_m)``; row ``K_0 + ... + K_{l-1} + i`` is code
          ``i`` of layer ``l``
    """
    tables, used = [None], 0
    for m in range(1, len(codes)):
        if not paying[m]:
            tables.append(None)
            continue
        earlier = sum(c.shape[0] for c in codes[:m])
        used += (earlier + spare) * stored[m].shape[0]
        if used > max_values:
            tables.append(None)
            continue
        table = stored[m].new_empty(earlier + spare, stored[m].shape[0])
        torch.mm(torch.cat(list(codes[:m])), stored[m].t(), out=table[:earlier])
        tables.append(table)
    return tables


def beam_chunk(x: Tensor, stops: Tensor | None, context: dict, beam_size: int, *, score: str, weights: Tensor):
    """Beam search of one token chunk, layer after layer (:func:`table_step` or :func:`vector_step`); a token
    whose ``stops`` entry is ``l`` takes the best path at layer ``l`` (None: all at the last).

    Shape:
        - x: ``(t, d)``, stops: ``(t,)``, weights: ``(q,)``
        - output: ``(t, q)`` int64
    """
    t, codes = x.shape[0], context["codes"]
    beam = Beam(x.new_zeros(t, 1, 0, dtype=torch.long), x.new_zeros(t, 1), x.unsqueeze(1))
    chosen = None if stops is None else torch.zeros(t, len(codes), dtype=torch.long, device=x.device)
    for layer, book in enumerate(codes):
        width = beam.paths.shape[1]
        keep = 1 if layer == len(codes) - 1 else min(beam_size, width * min(beam_size, book.shape[0]))
        if context["use_tables"]:
            beam = table_step(beam, x, context["layers"][layer], keep, weights[layer], score)
        else:
            beam = vector_step(beam, book, context["cosine"][layer], keep, beam_size, weights[layer], score)
        if stops is not None:
            record_stops(chosen, beam, stops, layer)
    return beam.paths[:, 0] if stops is None else chosen


@torch.no_grad()
def beam_search(
    x: Tensor,
    codes: Sequence[Tensor],
    beam_size: int,
    *,
    stops: Tensor | None = None,
    cosine: bool | Sequence[bool] = False,
    score: str = "final",
    weights: Tensor | None = None,
    method: str | None = None,
    max_scores: int | None = None,
) -> Tensor:
    """Indices of the best path of every token through the layers ``codes`` (see the module's docstring).

    Args:
        x: the inputs, float32.
        codes: every layer's codes, float32.
        beam_size: paths kept per token, ``B``.
        stops: each token's last layer (default: the last); later entries of its path are 0.
        cosine: whether a layer searches by cosine similarity (one bool, or one per layer).
        score: ``"final"`` or ``"sum"`` (with ``weights``, default all 1).
        method: ``"tables"`` or ``"vectors"``; default tables where they apply (every layer Euclidean and, for
            ``"sum"``, every weight positive).
        max_scores: memory budget in distances (default: the device's ``chunk_policy(...).logit_scores``);
            tokens go in chunks of at most ``max_scores / BEAM_BUDGET_FRACTION`` (path, code) distances.

    Shape:
        - x: ``(N, d)``, codes: ``q`` tensors ``(K_l, d)``, stops: ``(N,)``, weights: ``(q,)``
        - output: ``(N, q)`` int64
    """
    q, (n, d) = len(codes), x.shape
    cosine = [bool(cosine)] * q if isinstance(cosine, bool) else [bool(c) for c in cosine]
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    weights = torch.ones(q, device=x.device) if weights is None else weights.detach().to(x.device, torch.float32)
    # "sum" reads its weights (a host read on an accelerator); "final" never does
    tables_apply = not any(cosine) and (score == "final" or bool((weights > 0).all()))
    method = method or ("tables" if tables_apply else "vectors")
    if method not in ("tables", "vectors") or (method == "tables" and not tables_apply):
        raise ValueError(f"method must be 'vectors' or, where tables apply, 'tables'; got {method!r}")
    stops = None if stops is None else stops.long()
    max_scores = max_scores or chunk_policy(x.device).logit_scores
    widest = max(c.shape[0] + -c.shape[0] % SELECT_BLOCK for c in codes)
    chunk = balanced_chunk(n, max(1, max_scores // BEAM_BUDGET_FRACTION // (beam_size * max(widest, beam_size * d))))
    context = search_context(codes, cosine, method == "tables", beam_size, max_scores, chunk)
    parts = [beam_chunk(x[s : s + chunk], None if stops is None else stops[s : s + chunk], context, beam_size,
                        score=score, weights=weights) for s in range(0, n, chunk)]  # fmt: skip
    return torch.cat(parts) if parts else torch.zeros(0, q, dtype=torch.long, device=x.device)
