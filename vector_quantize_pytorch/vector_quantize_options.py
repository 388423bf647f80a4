"""VectorQuantize's arguments: the constructor's table of checks, the defaults that depend on other arguments,
which arguments are kept as attributes or handed to the Codebook, and the checks of forward's arguments."""

from __future__ import annotations

from torch import Tensor, nn

from .core.layout import TokenLayout
from .core.validate import check_arguments, check_code_indices, check_indices, check_int

ARGUMENTS = {
    "int": {"dim": 1, "codebook_size": 1, "heads": 1, "kmeans_iters": 0},
    "optional_int": {"codebook_dim": 1, "orthogonal_reg_max_codes": 1},
    "float": {"decay": (0.0, 1.0), "eps": (0.0, None), "threshold_ema_dead_code": (0.0, None),
              "commitment_weight": (0.0, None), "orthogonal_reg_weight": (0.0, None),
              "codebook_diversity_loss_weight": (0.0, None), "codebook_diversity_temperature": (None, None),
              "sample_codebook_temp": (0.0, None), "directional_reparam_variance": (0.0, None),
              "affine_param_batch_decay": (0.0, 1.0), "affine_param_codebook_decay": (0.0, 1.0),
              "sync_update_v": (0.0, 1.0)},
    "bool": ("separate_codebook_per_head", "freeze_codebook", "kmeans_init", "sync_kmeans", "use_cosine_sim",
             "layernorm_after_project_in", "channel_last", "accept_image_fmap", "accept_3d_fmap",
             "commitment_use_cross_entropy_loss", "orthogonal_reg_active_codes_only", "stochastic_sample_codes",
             "straight_through", "directional_reparam", "sync_affine_param", "manual_ema_update",
             "manual_in_place_optimizer_update", "affine_param", "return_zeros_for_masked_padding",
             "route_gradients_to_input"),
    "optional_bool": ("rotation_trick", "sync_codebook", "ema_update", "learnable_codebook"),
}  # fmt: skip

# (arguments that cannot be combined, the error): checked after the defaults that depend on others are resolved
INCOMPATIBLE = [
    (lambda a: a["accept_image_fmap"] and a["accept_3d_fmap"],
     "accept_image_fmap and accept_3d_fmap cannot both be True"),
    (lambda a: a["use_cosine_sim"] and a["learnable_codebook"],
     "use_cosine_sim=True is not supported with a learnable codebook"),
    (lambda a: a["ema_update"] and a["learnable_codebook"],
     "learnable_codebook=True requires ema_update=False (the codebook learns by gradients)"),
    (lambda a: a["straight_through"] and a["learnable_codebook"],
     "straight_through=True (Gumbel straight-through) is not supported with a learnable codebook"),
    (lambda a: a["vq_bridge"] is not None and not a["learnable_codebook"],
     "vq_bridge requires learnable_codebook=True"),
    (lambda a: a["directional_reparam"] and a["threshold_ema_dead_code"] == 0,
     "directional_reparam=True requires threshold_ema_dead_code > 0 (dead-code replacement)"),
    (lambda a: a["sync_update_v"] > 0 and not a["learnable_codebook"],
     "sync_update_v > 0 requires learnable_codebook=True"),
    (lambda a: a["affine_param"] and a["use_cosine_sim"],
     "affine_param=True is only supported with Euclidean distance (use_cosine_sim=False)"),
    (lambda a: a["in_place_codebook_optimizer"] is not None and not a["learnable_codebook"],
     "in_place_codebook_optimizer requires learnable_codebook=True"),
]  # fmt: skip


def validate(args: dict) -> None:
    check_arguments(args, **ARGUMENTS)
    if args["vq_bridge"] is not None and not isinstance(args["vq_bridge"], nn.Module):
        raise TypeError(f"vq_bridge must be an nn.Module, got {type(args['vq_bridge']).__name__}")
    if args["in_place_codebook_optimizer"] is not None and not callable(args["in_place_codebook_optimizer"]):
        raise TypeError("in_place_codebook_optimizer must be a callable params -> torch.optim.Optimizer")


def resolve_defaults(a: dict) -> tuple[bool, bool, bool]:
    """``(ema_update, learnable_codebook, rotation_trick)`` with their defaults resolved: a bridge or DiVeQ learns
    the codebook by gradients; the rotation trick is the estimator unless another one is asked for."""
    has_bridge = a["vq_bridge"] is not None
    ema_update = (not a["directional_reparam"] and not has_bridge) if a["ema_update"] is None else a["ema_update"]
    learnable = a["learnable_codebook"]
    learnable = (a["directional_reparam"] or has_bridge) if learnable is None else learnable
    rotation_trick = a["rotation_trick"]
    if rotation_trick is None:
        rotation_trick = not (a["straight_through"] or a["directional_reparam"]) and a["dim"] > 1
    chosen = [name for name in ("straight_through", "rotation_trick", "directional_reparam")
              if (rotation_trick if name == "rotation_trick" else a[name])]  # fmt: skip
    if len(chosen) > 1:
        raise ValueError(f"at most one gradient estimator may be chosen, got {' and '.join(chosen)} all True")
    resolved = {**a, "ema_update": ema_update, "learnable_codebook": learnable}
    for incompatible, message in INCOMPATIBLE:
        if incompatible(resolved):
            raise ValueError(message)
    return ema_update, learnable, rotation_trick


SHAPES = {4: "(b, c, h, w)", 5: "(b, c, t, h, w)"}

# constructor arguments kept as attributes of the same name, and those handed to the Codebook
STORED_OPTIONS = (
    "eps", "commitment_weight", "commitment_use_cross_entropy_loss", "orthogonal_reg_weight",
    "orthogonal_reg_active_codes_only", "orthogonal_reg_max_codes", "codebook_diversity_loss_weight",
    "codebook_diversity_temperature", "stochastic_sample_codes", "sample_codebook_temp", "straight_through",
    "directional_reparam", "directional_reparam_variance", "sync_update_v", "use_cosine_sim",
    "return_zeros_for_masked_padding", "route_gradients_to_input", "freeze_codebook", "accept_image_fmap",
    "accept_3d_fmap", "channel_last", "vq_bridge", "manual_in_place_optimizer_update",
)  # fmt: skip
CODEBOOK_OPTIONS = (
    "kmeans_init", "kmeans_iters", "sync_kmeans", "decay", "eps", "threshold_ema_dead_code", "manual_ema_update",
    "use_cosine_sim", "affine_param", "sync_affine_param", "affine_param_batch_decay",
    "affine_param_codebook_decay", "sync_codebook",
)  # fmt: skip


def check_forward_indices(vq, name: str, indices, layout: TokenLayout, b: int) -> Tensor:
    """Indices given to forward (``indices=``, ``forced_indices=``) or to ``update_indices``: an integer tensor
    shaped as forward returns indices for this input, with values in ``[0, codebook_size)`` or -1 (ignored, as at
    masked positions), checked by :func:`~.core.validate.check_code_indices` without a host synchronisation off
    the CPU. Returns the indices to use (on that branch, a gather of them carrying the check)."""
    check_indices(name, indices)
    expected = (b, *layout.spatial) + ((vq.heads,) if vq.heads > 1 else ())
    if tuple(indices.shape) != expected:
        raise ValueError(
            f"{name} must have the shape of the indices forward returns for this input, {expected}, "
            f"got {tuple(indices.shape)}"
        )
    return check_code_indices(name, indices, vq.codebook_size, allow_dropped=True)


def check_topk(vq, topk) -> int | None:
    """``topk`` checked and capped at the codebook size (None stays None)."""
    if topk is None:
        return None
    topk = min(check_int("topk", topk, minimum=1), vq.codebook_size)
    if vq.heads != 1:
        raise ValueError("topk is only supported with heads=1")
    if vq.training and (vq.commitment_use_cross_entropy_loss or vq.in_place_codebook_optimizer):
        raise ValueError("topk is not supported in training with a cross-entropy commitment or in-place optimizer")
    return topk


def check_transform(vq, transform, topk, indices) -> None:
    """``codebook_transform_fn`` needs a callable, one head, a learnable codebook and no ``topk``/``indices``."""
    if transform is None:
        return
    if not callable(transform):
        raise TypeError(f"codebook_transform_fn must be callable, got {type(transform).__name__}")
    if vq.heads != 1 or topk is not None or indices is not None or vq.ema_update:
        raise ValueError(
            "codebook_transform_fn needs heads=1, a learnable codebook (ema_update=False) and no topk or indices"
        )
