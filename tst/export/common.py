"""Names shared by the export modules: the error, the info file, the target classes."""

from __future__ import annotations

import torch

from tst.errors import InputError

EXPORT_INFO = "tst_export.json"
LLAMA, QWEN3, QWEN3_MOE, MIXTRAL = (
    "LlamaForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
    "MixtralForCausalLM",
)
MODEL_TYPES = {LLAMA: "llama", QWEN3: "qwen3", QWEN3_MOE: "qwen3_moe", MIXTRAL: "mixtral"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ExportError(InputError):
    """A checkpoint that cannot be exported as asked; the message names the flag or file."""
