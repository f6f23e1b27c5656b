"""Bag-aware input embedding: each position is the mean of ``bag_size`` token embeddings.

:class:`BagEmbedding` is a drop-in subclass of megatron-core's ``LanguageModelEmbedding``:
the same submodules and parameter names (``word_embeddings.weight``,
``position_embeddings.weight``), so weight tying, the pipeline's embedding-group
all-reduce and checkpoints see an ordinary embedding. Only the forward changes, and only
while ``bag_size > 1``; with ``bag_size == 1`` the stock forward runs unchanged.

Layout: ``input_ids [b, L * bag_size]`` -> ``[L, b, h]`` (``[L/tp, b, h]`` with sequence
parallelism). Each rank looks its ids up in its vocabulary shard (ids off the shard give
zeros), sums each bag in fp32 and divides by ``bag_size`` *before* the tensor-parallel
reduction, so the reduction moves ``[L, b, h]`` like a plain embedding, not
``[L * bag_size, b, h]``. Collective (over the TP group): one all-reduce of ``[L, b, h]``
fp32, or a reduce-scatter along ``L`` with sequence parallelism. The reduction stays in fp32
so that a bag spread over several shards is summed without bf16 rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)

__all__ = ["BagEmbedding", "bag_mean"]


def bag_mean(embeddings: torch.Tensor, bag_size: int, dim: int) -> torch.Tensor:
    """Mean of each run of ``bag_size`` consecutive rows along ``dim``, in fp32.

    ``[..., L * bag_size, ..., h]`` -> ``[..., L, ..., h]`` fp32.
    """
    shape = list(embeddings.shape)
    if shape[dim] % bag_size != 0:
        raise ValueError(
            f"sequence of {shape[dim]} tokens does not fold into bags of {bag_size}: "
            f"input_ids must hold L * bag_size tokens"
        )
    shape[dim : dim + 1] = [shape[dim] // bag_size, bag_size]
    return embeddings.float().view(shape).sum(dim=dim + 1).div_(bag_size)


class BagEmbedding(LanguageModelEmbedding):
    """``LanguageModelEmbedding`` that averages bags of ``bag_size`` consecutive tokens.

    ``bag_size`` is an attribute the trainer sets at each phase (the superposition phase
    uses the configured bag size, the recovery phase 1); the module's parameters do not
    depend on it. Constructor arguments are ``LanguageModelEmbedding``'s.
    """

    def __init__(self, *args, bag_size: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.bag_size = bag_size

    @classmethod
    def upgrade(cls, embedding: LanguageModelEmbedding) -> BagEmbedding:
        """Turn a built ``LanguageModelEmbedding`` into a ``BagEmbedding`` in place.

        No parameter is re-allocated or re-initialised (and no RNG draw is made), so a
        ``GPTModel`` built by megatron-core keeps exactly the weights it would have had.
        ``BagEmbedding`` adds no parameters or buffers, only the ``bag_size`` attribute.
        """
        if not isinstance(embedding, LanguageModelEmbedding):
            raise TypeError(f"expected a LanguageModelEmbedding, got {type(embedding).__name__}")
        embedding.__class__ = cls
        embedding.bag_size = 1
        return embedding

    @property
    def bag_size(self) -> int:
        return self._bag_size

    @bag_size.setter
    def bag_size(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"bag_size must be a positive integer, got {value!r}")
        self._bag_size = value

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids=None
    ) -> torch.Tensor:
        """``input_ids [b, L * bag_size]``, ``position_ids [b, L]`` -> ``[L, b, h]``; times
        muP's ``mup_embedding_mult`` where the config sets one (a bag's mean is scaled as a
        token's embedding is; the product commutes with the dropout mask)."""
        embeddings = self._embed(input_ids, position_ids, tokentype_ids)
        if getattr(self.config, "use_mup", False) and self.config.mup_embedding_mult != 1.0:
            return embeddings * self.config.mup_embedding_mult
        return embeddings

    def _embed(self, input_ids, position_ids, tokentype_ids) -> torch.Tensor:
        if self.bag_size == 1:
            return super().forward(input_ids, position_ids, tokentype_ids)
        if tokentype_ids is not None:
            raise ValueError("token-type embeddings are not supported with bag_size > 1")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be [batch, L * bag_size], got shape {tuple(input_ids.shape)}"
            )
        batch, num_tokens = input_ids.shape
        if num_tokens % self.bag_size != 0:
            raise ValueError(
                f"input_ids hold {num_tokens} tokens per sample, not a multiple of "
                f"bag_size={self.bag_size}: a superposition sample must be L * bag_size tokens"
            )
        num_bags = num_tokens // self.bag_size
        if position_ids is not None and position_ids.shape[-1] != num_bags:
            raise ValueError(
                f"position_ids cover {position_ids.shape[-1]} positions but input_ids fold "
                f"into L={num_bags} bags of {self.bag_size}: position ids count bags"
            )

        bags = self._local_bag_sums(input_ids)  # [b, L, h] fp32, this shard's part
        bags = bags.transpose(0, 1).contiguous()  # [L, b, h]
        group = self.word_embeddings.tp_group
        if self.config.sequence_parallel and self.scatter_to_sequence_parallel:
            bags = tensor_parallel.reduce_scatter_to_sequence_parallel_region(bags, group=group)
        else:
            bags = tensor_parallel.reduce_from_tensor_model_parallel_region(bags, group=group)
        embeddings = bags.to(self.word_embeddings.weight.dtype)

        if self.add_position_embedding:
            # [b, L, h] -> [L, b, h]; positions count bags, 0..L-1.
            positions = self.position_embeddings(position_ids).transpose(0, 1).contiguous()
            if self.config.sequence_parallel and self.scatter_to_sequence_parallel:
                # Split without communication; the backward all-gathers, so every TP rank
                # gets the full position-embedding gradient, as with the stock embedding.
                positions = tensor_parallel.scatter_to_sequence_parallel_region(
                    positions, group=group
                )
            embeddings = embeddings + positions
        if self.config.fp32_residual_connection:
            embeddings = embeddings.float()
        if self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(embeddings)
        return self.embedding_dropout(embeddings)

    def _local_bag_sums(self, input_ids: torch.Tensor) -> torch.Tensor:
        """This shard's contribution to each bag mean: ``[b, L * bag_size] -> [b, L, h]`` fp32."""
        table = self.word_embeddings
        # The table is read here, not called: run the hooks a call would run first. The
        # distributed optimizer's --overlap-param-gather finishes the table's parameter
        # all-gather in such a hook; without it the bags would read stale rows.
        for key, hook in list(table._forward_pre_hooks.items()):
            if key not in table._forward_pre_hooks_with_kwargs:
                hook(table, (input_ids,))
        if table.tp_group.size() > 1:
            off_shard = (input_ids < table.vocab_start_index) | (input_ids >= table.vocab_end_index)
            local_ids = (input_ids - table.vocab_start_index).masked_fill_(off_shard, 0)
            rows = F.embedding(local_ids, table.weight)
            rows = rows.masked_fill(off_shard.unsqueeze(-1), 0.0)
        else:
            rows = F.embedding(input_ids, table.weight)
        return bag_mean(rows, self.bag_size, dim=1)
