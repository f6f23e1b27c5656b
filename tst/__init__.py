"""Token Superposition Training on megatron-core.

Library map (each module one job):

- ``tst.losses``      vocab-parallel multi-hot cross-entropy (MCE, MCEAlt) and slot weights
- ``tst.embedding``   bag-aware input embedding (a ``LanguageModelEmbedding`` subclass)
- ``tst.data``        raw token chunks -> TST batches; datasets for both phases
- ``tst.model``       GPT / MoE models from layer specs, with the bag embedding
- ``tst.megatron_config``  flags -> megatron-core ``TransformerConfig`` for the device
- ``tst.init``        layout-independent weight initialisation
- ``tst.phases``      the phase schedule, ``phase_at(iteration)``
- ``tst.trainer``     the training loop; ``tst.checkpointing``, ``tst.metrics`` beside it
- ``tst.config``      one dataclass per concern; the command line is built from them
- ``tst.dry_run``, ``tst.export``   meta-device sizing; Hugging Face export
- ``tst.platform``    device, backend, megatron-core parallel state, seeds
- ``tst.cpu_compat``  the patches megatron-core needs where CUDA is absent
- ``tst.megatron_import``  megatron-core's first import, its fusions not compiled on CPU

The pure TST math (``tst.losses``, ``tst.data.batch``) imports only torch.
"""

__version__ = "0.1.0"

from tst import megatron_import as _megatron_import  # noqa: E402

_megatron_import.install()
