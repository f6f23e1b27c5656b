"""Layout-independent weight initialisation.

megatron-core draws initial weights from a generator whose state depends on which layers a
pipeline stage builds, so the same seed gives different models under PP=1 and PP=2. Here
every parameter is drawn from a generator seeded by the seed and the parameter's *global*
name (layer numbers and expert ids as in the unsplit model), for its *full* shape, and each
rank keeps its tensor-parallel shard. The model is then the same under any TP / PP / VPP /
EP layout, which makes layouts comparable and lets tests check them against each other.

Distributions follow megatron-core's defaults: normal(0, std) for weights,
normal(0, std / sqrt(2 * num_layers)) for the output projections of each block
(``linear_proj``, ``linear_fc2``, and ``fc2_latent_proj`` of a latent MoE), ones for norm
weights, zeros for biases. The embeddings take ``--embedding-init-method-std`` where given;
with ``--init-method-xavier-uniform`` every weight matrix is uniform in
+-sqrt(6 / (fan_in + fan_out)) of its whole, unsplit shape
(megatron-core applies Xavier to each rank's shard, which makes the model depend on the
layout), the embeddings too unless their std is given.
"""

from __future__ import annotations

import math
import re
import zlib

import torch

__all__ = ["global_parameter_name", "initialize_layout_independent"]

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT = re.compile(r"local_experts\.(\d+)\.")


def global_parameter_name(name: str, layer_offset: int, expert_offset: int) -> str:
    """Rename a stage-local parameter to its name in the unsplit model.

    ``decoder.layers.{i}`` -> ``decoder.layers.{i + layer_offset}`` and
    ``local_experts.{j}`` -> ``local_experts.{j + expert_offset}``.
    """
    if not name.startswith("mtp."):  # the MTP block's layers are numbered on their own
        name = _LAYER.sub(
            lambda m: m.group(0).replace(m.group(1), str(int(m.group(1)) + layer_offset)),
            name,
            count=1,
        )
    return _EXPERT.sub(lambda m: f"local_experts.{int(m.group(1)) + expert_offset}.", name)


def _full_shape_and_shard(param, tp_rank: int, tp: int):
    """Full tensor shape, and a function that cuts this rank's shard out of it."""
    shape = list(param.shape)
    if not getattr(param, "tensor_model_parallel", False) or tp == 1:
        return shape, lambda full: full
    dim = param.partition_dim
    stride = getattr(param, "partition_stride", 1)
    shape[dim] *= tp

    def shard(full):
        # megatron-core's split rule: stride-interleaved pieces, every tp-th to this rank.
        piece = param.shape[dim] // stride
        pieces = torch.split(full, piece, dim=dim)
        return torch.cat(pieces[tp_rank::tp], dim=dim)

    return shape, shard


_EMBEDDINGS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight")
_OUTPUT_LAYER = "output_layer.weight"


class Draw:
    """How weights are drawn: the TransformerConfig's std, embedding std and init method.

    With muP (``config.use_mup``, width multiplier ``m``; Megatron-LM 0.19's rules) the hidden
    weights' std is divided by ``sqrt(m)``, the output projections' too (after the usual
    ``sqrt(2 L)``), while the embeddings, and an untied output layer, keep the unscaled
    (embedding) std. Xavier's init ignores muP's scaling, as Megatron-LM's custom
    ``init_method`` does.
    """

    def __init__(self, config):
        self.std = config.init_method_std
        self.num_layers = config.num_layers
        self.xavier = config.init_method is torch.nn.init.xavier_uniform_
        embedding_std = getattr(config, "embedding_init_method_std", None)
        self.width_mult = getattr(config, "mup_width_mult", 1.0) if getattr(
            config, "use_mup", False) else None  # fmt: skip
        if self.width_mult is not None and not self.xavier:
            # muP: the embeddings (and an untied output layer) keep the unscaled std.
            self.embedding_std = embedding_std if embedding_std is not None else self.std
        else:
            # megatron-core: the embeddings follow init_method unless their own std differs.
            self.embedding_std = embedding_std if embedding_std not in (None, self.std) else None

    def __call__(self, name: str, shape, seed: int) -> torch.Tensor:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "bias" or name.endswith("_bias"):
            return torch.zeros(shape)
        if "norm" in name and leaf == "weight":
            return torch.ones(shape)
        gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
        embedding = name.endswith(_EMBEDDINGS)
        if self.width_mult is not None and name.endswith(_OUTPUT_LAYER):
            embedding = True  # muP draws an untied output layer as an embedding
        if embedding and self.embedding_std is not None:
            return torch.randn(shape, generator=gen) * self.embedding_std
        if self.xavier and len(shape) == 2:
            bound = math.sqrt(6.0 / (shape[0] + shape[1]))
            return torch.empty(shape).uniform_(-bound, bound, generator=gen)
        std = self.std
        if "linear_proj" in name or "linear_fc2" in name or "fc2_latent_proj" in name:
            std = std / math.sqrt(2.0 * self.num_layers)
        if self.width_mult is not None:
            std = std / math.sqrt(self.width_mult)
        return torch.randn(shape, generator=gen) * std


_EMBEDDING = "embedding.word_embeddings.weight"


def _global_name(name: str, param, layer_offset: int, expert_offset: int) -> str:
    """The parameter's name in the unsplit model; a tied output copy is named as the embedding.

    Under pipeline parallelism a tied output layer is a second tensor on the last stage
    (megatron-core marks it ``shared_embedding`` and starts it as a copy of the embedding,
    then keeps the two equal by summing their gradients). It must be drawn as the embedding,
    or the two copies would start, and stay, different: an untied model in disguise.
    """
    global_name = global_parameter_name(name, layer_offset, expert_offset)
    while global_name.startswith("module."):
        global_name = global_name[len("module.") :]
    if global_name.endswith("output_layer.weight") and getattr(param, "shared_embedding", False):
        return global_name[: -len("output_layer.weight")] + _EMBEDDING
    return global_name


@torch.no_grad()
def initialize_layout_independent(model_chunks, config, seed: int, layout, only=None) -> int:
    """Overwrite every parameter of ``model_chunks`` with its layout-independent value.

    ``config`` is the TransformerConfig (``init_method_std``, ``num_layers``,
    ``num_moe_experts``); ``layout`` a :class:`tst.platform.Layout`. Expert weights are
    sharded over the expert-tensor-parallel group, the rest over the TP group. A tied output
    weight gets the embedding's value on every layout (the same tensor under PP = 1, an
    equal copy on the last stage under PP > 1). ``only(global_name) -> bool`` limits the
    write to some parameters (the switch controls re-initialise the embeddings only).
    Returns the number of parameters written.
    """
    from megatron.core import parallel_state as ps

    etp_rank = ps.get_expert_tensor_parallel_rank()
    etp = ps.get_expert_tensor_parallel_world_size()
    num_experts = config.num_moe_experts or 0
    local_experts = num_experts // layout.ep
    draw = Draw(config)
    written = 0
    for chunk in model_chunks:
        layer_offset = _layer_offset(chunk)
        for name, param in chunk.named_parameters():
            global_name = _global_name(name, param, layer_offset, layout.ep_rank * local_experts)
            if only is not None and not only(global_name):
                continue
            is_expert = not getattr(param, "allreduce", True)
            rank, size = (etp_rank, etp) if is_expert else (layout.tp_rank, layout.tp)
            shape, shard = _full_shape_and_shard(param, rank, size)
            full = draw(global_name, shape, seed)
            param.copy_(shard(full).to(param.dtype))
            written += 1
    return written


def _layer_offset(chunk) -> int:
    """Global index of this chunk's first transformer layer (0 when it has none)."""
    for module in chunk.modules():
        number = getattr(module, "layer_number", None)
        if isinstance(number, int) and hasattr(module, "self_attention"):
            # layer_number is 1-based and global; local index 0 is the first built here.
            return number - 1
    return 0
