"""EvoLFQ: an LFQ autoencoder whose code bits can be refined by a genetic search."""

from __future__ import annotations

from collections import namedtuple

import torch
from torch import Tensor, nn

from .core.validate import check_float, check_int
from .lookup_free_quantization import LFQ

Return = namedtuple("Return", ["reconstructed", "indices", "entropy_aux_loss"])
Result = namedtuple("Result", ["pop_bits", "best_gene", "best_fitness", "best_decoded"])


class EvoLFQ(nn.Module):
    """An encoder, an :class:`LFQ` and a decoder; after training, the bits of a code can be searched by a
    genetic algorithm (tournament selection, uniform crossover, bit-flip mutation, elitism) for a higher
    fitness, e.g. a lower reconstruction error, than the encoder's own bits.

    A population is a tensor of bits ``(pop, *code_shape)`` (0/1, or -1/+1 with ``is_sign``). Fitness is
    any function ``(decoded (pop, ...), bits) -> (pop,)``, larger is better. With a population seeded from
    the encoder's bits (:meth:`init_population_from_data`) and ``elitism_count >= 1``, the best individual
    reported never has a lower fitness than the encoder's bits: the fittest individual of every generation
    survives unchanged and the best is tracked with its own fitness.

    Args:
        encoder, decoder: modules around the quantizer.
        lfq: the quantizer (default: an :class:`LFQ` built from ``dim``, ``codebook_size``, ``num_codebooks`` and
            ``**lfq_kwargs``).
        dim, codebook_size, num_codebooks: the LFQ's sizes when ``lfq`` is not given.
        pop_size: individuals per generation.
        mutation_rate: probability of flipping each bit of a child, in ``[0, 1]``.
        tournament_size: individuals compared to pick each parent.
        elitism_count: fittest individuals copied unchanged into the next generation.
        generations: generations of one :meth:`evolve`.
        **lfq_kwargs: passed to the LFQ built here.

    Shape:
        - forward: ``x`` -> (reconstructed, indices, entropy_aux_loss) as the LFQ and decoder give them

    Example::

        >>> evo = EvoLFQ(nn.Linear(8, 4), nn.Linear(4, 8), dim=4, codebook_size=16)
        >>> reconstructed, indices, aux = evo(torch.randn(2, 8))
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        lfq: LFQ | None = None,
        *,
        dim: int | None = None,
        codebook_size: int | None = None,
        num_codebooks: int = 1,
        pop_size: int = 64,
        mutation_rate: float = 0.02,
        tournament_size: int = 2,
        elitism_count: int = 1,
        generations: int = 50,
        **lfq_kwargs,
    ):
        super().__init__()
        check_int("pop_size", pop_size, minimum=2)
        check_int("tournament_size", tournament_size, minimum=1)
        check_int("elitism_count", elitism_count, minimum=0)
        check_int("generations", generations, minimum=1)
        check_float("mutation_rate", mutation_rate, minimum=0.0, maximum=1.0)
        if elitism_count >= pop_size:
            raise ValueError(f"elitism_count ({elitism_count}) must be smaller than pop_size ({pop_size})")
        for name, module in (("encoder", encoder), ("decoder", decoder)):
            if not callable(module):
                raise TypeError(f"{name} must be a callable module, got {module!r}")
        if lfq is not None and not isinstance(lfq, LFQ):
            raise TypeError(f"lfq must be an LFQ instance or None, got {type(lfq).__name__}")
        if lfq is None:
            if dim is None and codebook_size is None:
                raise ValueError("pass an lfq instance, or dim and/or codebook_size to build one")
            lfq = LFQ(dim=dim, codebook_size=codebook_size, num_codebooks=num_codebooks, **lfq_kwargs)
        self.encoder, self.decoder, self.lfq = encoder, decoder, lfq
        self.pop_size = pop_size
        self.mutation_rate = mutation_rate
        self.tournament_size = tournament_size
        self.elitism_count = elitism_count
        self.generations = generations
        self.register_buffer("zero", torch.tensor(0.0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.zero.device

    def _quantize(self, latents: Tensor, **kwargs):
        if not isinstance(latents, Tensor):
            raise TypeError(f"the encoder must return a torch.Tensor of latents, got {type(latents).__name__}")
        single = latents.ndim == 2
        if single:
            latents = latents.unsqueeze(1)
        quantized, indices, aux = self.lfq(latents, **kwargs)
        if single:
            quantized, indices = quantized.squeeze(1), indices.squeeze(1)
        return quantized, indices, aux

    def forward(self, x: Tensor, **kwargs) -> Return:
        quantized, indices, aux = self._quantize(self.encoder(x), **kwargs)
        return Return(self.decoder(quantized), indices, aux)

    @torch.no_grad()
    def encode(self, x: Tensor, return_signs: bool = False) -> Tensor:
        """The encoder's bits for ``x``: 0/1 (or -1/+1) of the quantized latents (eval mode)."""
        was_training = self.training
        self.eval()
        try:
            quantized, _, _ = self._quantize(self.encoder(x))
        finally:
            self.train(was_training)
        positive = quantized > 0
        return torch.where(positive, 1.0, -1.0) if return_signs else positive.float()

    @torch.no_grad()
    def decode_bits(self, bits: Tensor) -> Tensor:
        """Bits ``(..., codebook_dim * num_codebooks)`` -> the decoder's output for those codes."""
        codes = torch.where(bits > 0, 1.0, -1.0) * self.lfq.codebook_scale
        if self.lfq.spherical:
            codes = nn.functional.normalize(codes.unflatten(-1, (self.lfq.num_codebooks, -1)), dim=-1).flatten(-2)
            codes = codes * self.lfq.codebook_scale
        return self.decoder(self.lfq.project_out(codes.to(self.lfq.dtype)))

    def init_random_population(self, pop_size=None, shape=None, device=None, is_sign: bool = False) -> Tensor:
        pop_size = self.pop_size if pop_size is None else pop_size
        bits = torch.randint(0, 2, (pop_size, *shape), device=device or self.device).float()
        return bits * 2 - 1 if is_sign else bits

    def init_population_from_data(self, x, pop_size=None, mutation_rate=None, is_sign: bool = False) -> Tensor:
        """The encoder's bits for one input, repeated; every individual but the first is mutated."""
        pop_size = self.pop_size if pop_size is None else pop_size
        bits = self.encode(x, return_signs=is_sign)
        population = bits.unsqueeze(0).repeat(pop_size, *([1] * bits.ndim))
        mutated = self.mutate(population[1:], mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat((population[:1], mutated))

    def uniform_crossover(self, parent1: Tensor, parent2: Tensor) -> Tensor:
        return torch.where(torch.rand_like(parent1) < 0.5, parent1, parent2)

    def mutate(self, population: Tensor, mutation_rate=None, is_sign: bool = False) -> Tensor:
        rate = self.mutation_rate if mutation_rate is None else mutation_rate
        flip = torch.rand_like(population) < rate
        return torch.where(flip, -population if is_sign else 1.0 - population, population)

    def tournament_selection(self, population: Tensor, fitnesses: Tensor, tournament_size=None) -> Tensor:
        size = self.tournament_size if tournament_size is None else tournament_size
        contenders = torch.randint(0, population.shape[0], (population.shape[0], size), device=population.device)
        winners = contenders.gather(1, fitnesses[contenders].argmax(dim=1, keepdim=True)).squeeze(1)
        return population[winners]

    @torch.no_grad()
    def fitness_of(self, pop_bits: Tensor, fitness_fn, batch_size=None) -> Tensor:
        chunks = pop_bits.split(batch_size) if batch_size else (pop_bits,)
        decoded = torch.cat([self.decode_bits(c) for c in chunks])
        return torch.as_tensor(fitness_fn(decoded, pop_bits), dtype=torch.float32, device=pop_bits.device)

    @torch.no_grad()
    def step(self, pop_bits, fitness_fn, tournament_size=None, mutation_rate=None, elitism_count=None,
             is_sign=False, batch_size=None, fitnesses=None):  # fmt: skip
        """One generation. Returns the next population and the fitnesses of ``pop_bits`` (the one given)."""
        elites_n = self.elitism_count if elitism_count is None else elitism_count
        size = self.tournament_size if tournament_size is None else tournament_size
        if fitnesses is None:
            fitnesses = self.fitness_of(pop_bits, fitness_fn, batch_size)
        elites = pop_bits[fitnesses.argsort(descending=True)[:elites_n]]
        children = pop_bits.shape[0] - elites_n
        contenders = torch.randint(0, pop_bits.shape[0], (children, 2, size), device=pop_bits.device)
        parents = contenders.gather(-1, fitnesses[contenders].argmax(-1, keepdim=True)).squeeze(-1)
        offspring = self.uniform_crossover(pop_bits[parents[:, 0]], pop_bits[parents[:, 1]])
        offspring = self.mutate(offspring, mutation_rate=mutation_rate, is_sign=is_sign)
        return torch.cat((elites, offspring)), fitnesses

    @torch.no_grad()
    def evolve(self, fitness_fn, pop_bits=None, pop_size=None, shape=None, generations=None, is_sign=False,
               return_best_decoded=False, **step_kwargs):  # fmt: skip
        """Yield a :class:`Result` per generation; ``best_gene`` is the fittest individual evaluated so far,
        with its own fitness."""
        generations = self.generations if generations is None else generations
        if pop_bits is None:
            if shape is None:
                raise ValueError("evolve needs pop_bits or shape")
            pop_bits = self.init_random_population(pop_size, shape, is_sign=is_sign)
        best_fitness, best_gene = float("-inf"), None
        batch_size = step_kwargs.get("batch_size")
        fitnesses = self.fitness_of(pop_bits, fitness_fn, batch_size)
        for _ in range(generations):
            top = int(fitnesses.argmax())
            if float(fitnesses[top]) > best_fitness:
                best_fitness, best_gene = float(fitnesses[top]), pop_bits[top].clone()
            pop_bits, _ = self.step(pop_bits, fitness_fn, is_sign=is_sign, fitnesses=fitnesses, **step_kwargs)
            fitnesses = self.fitness_of(pop_bits, fitness_fn, batch_size)
            best_decoded = self.decode_bits(best_gene.unsqueeze(0))[0] if return_best_decoded else None
            yield Result(pop_bits, best_gene, best_fitness, best_decoded)

    @torch.no_grad()
    def refine(self, x: Tensor, target: Tensor | None = None, generations: int | None = None, **step_kwargs) -> Tensor:
        """Bits for one input ``x`` (no batch axis beyond what the encoder takes) whose reconstruction of
        ``target`` (default ``x``) has a mean squared error no higher than the encoder's bits give."""
        target = x if target is None else target
        population = self.init_population_from_data(x)

        def fitness(decoded, _bits):
            return -(decoded - target.unsqueeze(0)).pow(2).flatten(1).mean(-1)

        *_, last = self.evolve(fitness, pop_bits=population, generations=generations, **step_kwargs)
        return last.best_gene
