"""Maximal Update Parametrisation flags (Megatron-LM 0.19's names, defaults and rules).

muP (Yang et al., "Tensor Programs V") makes the best learning rate and initialisation of a
small proxy model carry over to a wider one: with ``m = --hidden-size /
--mup-base-hidden-size`` (the width multiplier), the hidden weights are drawn with std
``sigma / sqrt(m)`` (the output projections ``sigma / (sqrt(2 L) sqrt(m))``), attention
scores are scaled by ``1 / d_head`` instead of ``1 / sqrt(d_head)`` (``--mup-attn-scale-power``),
the logits by ``1 / m`` (``--mup-output-mult``), the embedding output by
``--mup-embedding-mult``, and Adam's hidden matrices learn at ``lr / m`` with ``eps / m``
(SGD: the vector-like parameters at ``lr * m``). The embeddings and the output layer keep
the base initialisation and learning rate. These are Megatron-LM 0.19's rules
(``TransformerConfig.__post_init__``, ``get_mup_config_overrides``); this trainer applies
them on megatron-core 0.16.1: the weights in :mod:`tst.init`, the multipliers in
:mod:`tst.model` and :mod:`tst.embedding` (the bag embedding's mean is scaled as a token's
embedding is, and the multi-hot loss scores the scaled logits), the parameter groups in
:func:`mup_optimizer_overrides`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from tst.config_fields import _f, _require

__all__ = ["MuPConfig", "mup_optimizer_overrides"]


@dataclass
class MuPConfig:
    use_mup: bool = _f(
        False,
        "Maximal Update Parametrisation: initialisation, attention / logit scaling and "
        "per-parameter learning rates that carry hyperparameters across widths (Megatron-LM "
        "0.19's muP).",
    )
    mup_base_hidden_size: int | None = _f(
        None,
        "The proxy model's hidden size the width multiplier is taken against (default "
        "--hidden-size: multiplier 1).",
    )
    mup_embedding_mult: float = _f(1.0, "muP: multiplier of the embedding output.")
    mup_output_mult: float = _f(
        1.0,
        "muP: multiplier of the logits; left at 1.0 it becomes 1 / width multiplier "
        "(Megatron-LM's rule).",
    )
    mup_base_head_dim: float | None = _f(
        None,
        "muP: the proxy's head dimension; the softmax scale becomes sqrt(base) / "
        "kv_channels ** --mup-attn-scale-power (default: 1 / kv_channels ** power).",
    )
    mup_attn_scale_power: float = _f(
        1.0,
        "muP: the softmax scale's power of kv_channels (1.0: muP's 1 / d_head; 0.5: the "
        "standard 1 / sqrt(d_head)).",
    )
    mup_width_mult: float = _f(
        1.0,
        "muP's width multiplier: always computed as --hidden-size / --mup-base-hidden-size "
        "with --use-mup (Megatron-LM's rule); a different value given is replaced, with a "
        "warning.",
    )

    def __post_init__(self):
        _require(
            self.mup_base_hidden_size is None or self.mup_base_hidden_size > 0,
            f"--mup-base-hidden-size must be positive, got {self.mup_base_hidden_size}",
        )
        for flag, value in (
            ("--mup-embedding-mult", self.mup_embedding_mult),
            ("--mup-output-mult", self.mup_output_mult),
            ("--mup-attn-scale-power", self.mup_attn_scale_power),
            ("--mup-width-mult", self.mup_width_mult),
        ):
            _require(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        _require(
            self.mup_embedding_mult > 0 and self.mup_output_mult > 0,
            "--mup-embedding-mult and --mup-output-mult must be > 0, got "
            f"{self.mup_embedding_mult} and {self.mup_output_mult}",
        )
        _require(
            self.mup_base_head_dim is None
            or (math.isfinite(self.mup_base_head_dim) and self.mup_base_head_dim > 0),
            f"--mup-base-head-dim must be a positive number, got {self.mup_base_head_dim}",
        )
        given = [
            flag
            for flag, value, default in (
                ("--mup-base-hidden-size", self.mup_base_hidden_size, None),
                ("--mup-embedding-mult", self.mup_embedding_mult, 1.0),
                ("--mup-output-mult", self.mup_output_mult, 1.0),
                ("--mup-base-head-dim", self.mup_base_head_dim, None),
                ("--mup-attn-scale-power", self.mup_attn_scale_power, 1.0),
                ("--mup-width-mult", self.mup_width_mult, 1.0),
            )
            if value != default
        ]
        if given and not self.use_mup:
            warnings.warn(
                f"{', '.join(given)} without --use-mup change nothing (Megatron-LM ignores "
                "them too): add --use-mup for muP",
                stacklevel=3,
            )

    def settings(self, hidden_size: int, kv_channels: int) -> dict | None:
        """Megatron-LM 0.19's derived muP settings for this model, or None without --use-mup:
        ``use_mup``, ``mup_width_mult``, ``mup_embedding_mult``, ``mup_output_mult`` and
        ``softmax_scale`` (the names of its ``TransformerConfig`` fields)."""
        if not self.use_mup:
            return None
        base = self.mup_base_hidden_size or hidden_size
        width_mult = hidden_size / base
        if self.mup_width_mult not in (1.0, width_mult):
            warnings.warn(
                f"--mup-width-mult {self.mup_width_mult:g} is replaced by --hidden-size / "
                f"--mup-base-hidden-size = {hidden_size} / {base} = {width_mult:g} "
                "(Megatron-LM computes it the same way)",
                stacklevel=2,
            )
        output_mult = self.mup_output_mult
        if output_mult == 1.0 and width_mult != 1.0:
            output_mult = 1.0 / width_mult
        head = 1.0 if self.mup_base_head_dim is None else math.sqrt(self.mup_base_head_dim)
        return {
            "use_mup": True,
            "mup_width_mult": width_mult,
            "mup_embedding_mult": self.mup_embedding_mult,
            "mup_output_mult": output_mult,
            "softmax_scale": head / kv_channels**self.mup_attn_scale_power,
        }


def is_embedding_parameter(param, name: str) -> bool:
    """The embeddings and the output layer (Megatron-LM 0.19's muP grouping): marked by
    :func:`tst.model.build_gpt` (``is_embedding_parameter``), a tied copy by megatron-core
    (``shared_embedding``), else by name."""
    if getattr(param, "shared_embedding", False):
        return True
    if hasattr(param, "is_embedding_parameter"):
        return bool(param.is_embedding_parameter)
    return "embedding" in name.lower()


def _vector_like(param, name: str) -> bool:
    return is_embedding_parameter(param, name) or param.dim() <= 1


def mup_optimizer_overrides(config, width_mult: float) -> dict:
    """megatron-core ``ParamKey -> ParamGroupOverride`` entries for muP's learning rates and
    Adam epsilon, Megatron-LM 0.19's rules, for the megatron-core ``OptimizerConfig``
    ``config``: Adam's hidden matrices (not vector-like: more than one dimension and not an
    embedding / output weight) at ``lr / m``, ``min_lr / m`` and ``eps / m``; SGD's
    vector-like parameters at ``lr * m``, ``min_lr * m``. With --decoupled-lr the embedding
    and output weights keep their decoupled rates. Empty at ``m = 1``."""
    from megatron.core.optimizer import ParamKey, ParamWithNamePredicate

    if width_mult == 1.0:
        return {}
    optimizer, lr, min_lr = config.optimizer, config.lr, config.min_lr
    decoupled = config.decoupled_lr is not None

    def decoupled_param(param) -> bool:
        return decoupled and getattr(param, "is_embedding_or_output_parameter", False)

    if optimizer == "sgd":
        key = ParamKey(with_name_predicate=ParamWithNamePredicate(
            name="mup_sgd_vector_like",
            fn=lambda p, n: _vector_like(p, n) and not decoupled_param(p),
        ))  # fmt: skip
        return {key: {"max_lr": lr * width_mult, "min_lr": min_lr * width_mult}}
    rates = {"max_lr": lr / width_mult, "min_lr": min_lr / width_mult}
    eps = {"eps": config.adam_eps / width_mult} if optimizer == "adam" else {}
    hidden = ParamWithNamePredicate(name="mup_hidden", fn=lambda p, n: not _vector_like(p, n))
    if not decoupled:
        return {ParamKey(with_name_predicate=hidden): {**rates, **eps}}
    # The decoupled weights are vector-like here (marked as embeddings), so the hidden
    # matrices are the same set either way; Megatron-LM keys them apart all the same.
    overrides = {ParamKey(with_name_predicate=ParamWithNamePredicate(
        name="mup_hidden_not_decoupled",
        fn=lambda p, n: not _vector_like(p, n) and not decoupled_param(p),
    )): rates}  # fmt: skip
    if eps:
        overrides[ParamKey(with_name_predicate=hidden)] = eps
    return overrides
