"""Megatron-LM 0.16.1 flags outside what this trainer does, each with why (the rest of
:mod:`tst.megatron_flags`).

Every flag of Megatron-LM 0.16.1's ``pretrain_gpt.py`` is known here: implemented by a
config field, an alias, accepted with the reason it changes nothing, or refused in one line
naming why. The refusals below come in families (reinforcement learning and inference, other
model families, FSDP, CUDA graphs, NVIDIA's fault-tolerance integrations, ...) and one
family of options not wired yet; tests/data/megatron_lm_0.16.1_flags.txt lists the whole
flag set and tests/unit/test_megatron_flag_tables.py checks that none is unknown.
"""

from __future__ import annotations

__all__ = ["REASONS", "UPSTREAM_ACCEPTED", "UPSTREAM_ALIASES", "UPSTREAM_REFUSED", "by_family"]

UPSTREAM_ALIASES: dict[str, list[str]] = {
    "--disable-log-loss-scale-to-tensorboard": ["--no-log-loss-scale-to-tensorboard"],
    "--dist-ckpt-format": ["--ckpt-format"],
    "--moe-router-padding-for-quantization": ["--moe-router-padding-for-fp8"],
    # Megatron-LM spells each "--no-" switch of its configuration classes "--disable-" too.
    "--disable-manual-gc-eval": ["--no-manual-gc-eval"],
    "--disable-ckpt-fully-parallel-save": ["--no-ckpt-fully-parallel-save"],
    # Megatron-LM's deprecated spelling of --tokenizer-special-tokens.
    "--tiktoken-special-tokens": ["--tokenizer-special-tokens"],
    "--disable-use-tokenizer-model-from-checkpoint-args": [
        "--no-use-tokenizer-model-from-checkpoint-args"
    ],
    # Megatron-LM 0.16.1's second name of --save-interval (persistent, beside the local
    # non-persistent checkpoints).
    "--persistent-save-interval": ["--save-interval"],
    "--disable-fp8-wgrad": ["--no-fp8-wgrad"],
    "--disable-tp-comm-bulk-wgrad": ["--no-tp-comm-bulk-wgrad"],
    "--disable-tp-comm-bulk-dgrad": ["--no-tp-comm-bulk-dgrad"],
    "--disable-tp-comm-overlap-ag": ["--no-tp-comm-overlap-ag"],
    "--disable-tp-comm-overlap-rs": ["--no-tp-comm-overlap-rs"],
    "--disable-tp-comm-split-ag": ["--no-tp-comm-split-ag"],
    "--disable-tp-comm-split-rs": ["--no-tp-comm-split-rs"],
}

# flag -> (nargs, reason)
UPSTREAM_ACCEPTED: dict[str, tuple[int | str, str]] = {
    "--allow-ambiguous-pad-tokens": (
        0,
        "no token is masked out of the loss as padding here (documents are packed whole, "
        "nothing is padded), which is what the flag asks for a pad id shared with another token",
    ),
    "--load-main-params-from-ckpt": (
        0,
        "with --no-load-optim (Megatron-LM's rule, checked) the fp32 main weights start from "
        "the checkpoint's weights, as they do here without it: a torch_dist checkpoint's "
        "weights are read in the run's own dtype, so the checkpoint holds nothing more precise "
        "to take",
    ),
    "--mtp-standalone": (
        0,
        "megatron-core sets it from --pipeline-model-parallel-layout (an m on a pipeline "
        "rank before the last, which runs here too); given by itself it only makes the "
        "pipeline send each tensor's shape before the tensor",
    ),
    "--dist-ckpt-save-pre-mcore-014": (
        0,
        "Megatron-LM 0.16.1 parses it and nothing reads it (its checkpoints, like these, are "
        "saved in megatron-core 0.14's format)",
    ),
    "--no-scatter-gather-tensors-in-pipeline": (
        0,
        "Megatron-LM 0.16.1 parses it and nothing reads it (megatron-core's pipeline sends "
        "whole tensors either way)",
    ),
    "--exit-signal-handler-for-dataloader": (
        0,
        "Megatron-LM 0.16.1 parses it and nothing reads it; here the data workers ignore the "
        "stop signals already and the trainer saves and exits on them",
    ),
    "--apply-residual-connection-post-layernorm": (
        0,
        "megatron-core's transformer layers never read it: Megatron-LM trains pre-LayerNorm "
        "residuals with it too",
    ),
    "--moe-enable-routing-replay": (
        0,
        "megatron-core records or replays routing decisions only when code outside the "
        "training loop (RL rollouts, inference) sets its actions; Megatron-LM 0.16.1's "
        "training sets none, so a run routes as without it",
    ),
    "--moe-extended-tp": (
        0,
        "deprecated since megatron-core 0.10 and ignored in Megatron-LM too (expert-TP is --expert-tensor-parallel-size)",
    ),
    "--disable-async-tensor-model-parallel-allreduce": (
        0,
        "deprecated and ignored in Megatron-LM too",
    ),
    "--fp8-interval": (1, "deprecated since Transformer Engine 1.8 and ignored in Megatron-LM too"),
    "--no-initialization": (
        0,
        "weights are always drawn (on the host, the same at every layout); --load then replaces them",
    ),
    "--no-clone-scatter-output-in-embedding": (
        0,
        "a memory detail of megatron-core's embedding output under sequence parallelism; the clone is kept",
    ),
    "--disable-clone-scatter-output-in-embedding": (
        0,
        "a memory detail of megatron-core's embedding output under sequence parallelism; the clone is kept",
    ),
    "--use-pytorch-profiler": (
        0,
        "--profile always records a torch profiler trace (into --tensorboard-dir)",
    ),
    "--config-logger-dir": (1, "the run's resolved flags are written to run_manifest.json"),
    "--disable-msc": (
        0,
        "the Multi-Storage Client (object storage) is never used here: data and checkpoints are "
        "read from and written to filesystem paths",
    ),
    "--trust-remote-code": (
        0,
        "a Hugging Face tokenizer.json is read by the tokenizers library only: no code runs",
    ),
    "--tokenizer-hf-use-fast": (
        0,
        "the tokenizers library read here is Hugging Face's fast tokenizer",
    ),
    "--tokenizer-hf-include-special-tokens": (
        0,
        "what the tokenizer.json's post-processor adds (a Llama-3 BOS) is always included, as "
        "Megatron-LM's legacy tokenizer does",
    ),
}

REASONS = {
    "rl": "a Megatron-LM reinforcement-learning / inference-server flag: this trainer pretrains GPT and MoE models; drop it",
    "vision": "a Megatron-LM vision-model flag: this trainer pretrains GPT and MoE language models; drop it",
    "bert": "a Megatron-LM BERT / retrieval-model flag: this trainer pretrains GPT and MoE models; drop it",
    "sft": "a Megatron-LM SFT data flag: this trainer pretrains on plain documents (fill-in-the-middle data is --fim-data); drop it",
    "arch": "another Megatron-LM architecture (Mamba or hybrid, linear or sparse attention, T5, BERT): only GPT and MoE transformers are built here; drop it",
    "fsdp": "a Megatron FSDP flag: Megatron FSDP is not supported; drop it (PyTorch FSDP2 is --use-torch-fsdp2, ZeRO-1 --use-distributed-optimizer)",
    "localckpt": "node-local checkpoints (NVIDIA's resiliency extension) are not supported: checkpoints are torch_dist under --save (frequent ones: --non-persistent-ckpt-type global); drop it",
    "cudagraph": "CUDA graphs are not supported yet: drop the flag",
    "ops": "an integration with NVIDIA's fault-tolerance / telemetry packages, not wired here: drop it (signal saves, --exit-duration-in-mins and resumable checkpoints cover restarts)",
    "muon": "the Muon optimizer is not supported yet: drop it (--optimizer adam or sgd)",
    "notyet": "a Megatron-LM option this trainer does not wire yet: drop it",
    "modelopt": "a Megatron-LM ModelOpt flag (quantization, distillation, export; "
    "pretrain_gpt.py takes them when nvidia-modelopt is installed): this trainer pretrains "
    "without ModelOpt; drop it",
}

# family -> {flag: nargs}
_FAMILIES: dict[str, dict[str, int | str]] = {
    "rl": {
        "--flash-decode": 0,
        "--inference-fuse-tp-communication": 0,
        "--mlp-chunks-for-prefill": 1,
        "--perform-rl-step": 0,
        "--rl-prompts-per-eval": 1,
        "--grpo-prompts-per-step": 1,
        "--grpo-group-size": 1,
        "--grpo-iterations": 1,
        "--grpo-clamp-eps-lower": 1,
        "--grpo-clamp-eps-upper": 1,
        "--grpo-kl-beta": 1,
        "--grpo-entropy-term-weight": 1,
        "--grpo-filter-groups-with-same-reward": 0,
        "--langrl-inference-server-type": 1,
        "--langrl-inference-server-conversation-template": 1,
        "--langrl-external-server": 0,
        "--no-langrl-external-server": 0,
        "--langrl-env-config": 1,
        "--rl-default-temperature": 1,
        "--rl-default-top-p": 1,
        "--rl-default-top-k": 1,
        "--rl-offload-optimizer-during-inference": 0,
        "--rl-offload-kv-cache-during-training": 0,
        "--no-rl-offload-kv-cache-during-training": 0,
        "--rl-remove-kv-cache-during-training": 0,
        "--no-rl-remove-kv-cache-during-training": 0,
        "--rl-reset-cuda-graphs": 0,
        "--no-rl-reset-cuda-graphs": 0,
        "--rl-partial-rollouts": 0,
        "--no-rl-partial-rollouts": 0,
        "--rl-inference-logprobs-is-correction": 0,
        "--no-rl-inference-logprobs-is-correction": 0,
        "--rl-importance-sampling-truncation-coef": 1,
        "--rl-use-sequence-packing": 0,
        "--no-rl-use-sequence-packing": 0,
        "--rl-sequence-packing-max-sequences-per-bin": 1,
        "--rl-sequence-packing-algo": 1,
        "--rl-training-cuda-graphs": 0,
        "--no-rl-training-cuda-graphs": 0,
        "--rl-inference-tensor-model-parallel-size": 1,
        "--rl-inference-pipeline-model-parallel-size": 1,
        "--rl-inference-expert-model-parallel-size": 1,
        "--rl-inference-expert-tensor-model-parallel-size": 1,
        "--rl-inference-model-unified-memory-level": 1,
        "--rl-offload-inference-model-weights-when-idle": 0,
        "--no-rl-offload-inference-model-weights-when-idle": 0,
        "--refit-method": 1,
        "--rl-verify-model-weights-swap": 0,
        "--no-rl-verify-model-weights-swap": 0,
        "--rl-parallel-generation-tasks": 1,
        "--rl-skip-bos-token": 0,
        "--no-rl-skip-bos-token": 0,
        "--inference-rng-tracker": 0,
        "--indexer-batch-size": 1,
        "--indexer-log-interval": 1,
        "--run-workload-inspector-server": 0,
        "--inference-batch-times-seqlen-threshold": 1,
        "--max-tokens-to-oom": 1,
        "--use-legacy-static-engine": 0,
        "--inference-max-requests": 1,
        "--inference-max-seq-length": 1,
        "--inference-max-batch-size": 1,
        "--inference-dynamic-batching": 0,
        "--inference-dynamic-batching-buffer-size-gb": 1,
        "--inference-dynamic-batching-paused-buffer-size-gb": 1,
        "--inference-dynamic-batching-block-size": 1,
        "--inference-dynamic-batching-max-requests": 1,
        "--inference-dynamic-batching-max-tokens": 1,
        "--inference-dynamic-batching-num-cuda-graphs": 1,
        "--inference-dynamic-batching-track-paused-request-events": 0,
        "--decode-only-cuda-graphs": 0,
        "--inference-dynamic-batching-unified-memory-level": 1,
        "--nccl-all-reduce-for-prefill": 0,
        "--enable-chunked-prefill": 0,
        "--disable-chunked-prefill": 0,
        "--inference-dynamic-batching-cuda-graph-max-tokens": 1,
        "--inference-dynamic-batching-cuda-graph-mixed-prefill-count": 1,
        "--inference-logging-step-interval": 1,
        "--inference-wandb-logging": 0,
        "--no-inference-wandb-logging": 0,
        "--inference-coordinator-port": 1,
    },
    "vision": {
        "--num-classes": 1,
        "--img-h": 1,
        "--img-w": 1,
        "--num-channels": 1,
        "--patch-dim": 1,
        "--classes-fraction": 1,
        "--data-per-class-fraction": 1,
        "--no-data-sharding": 0,
        "--head-lr-mult": 1,
        "--vision-pretraining": 0,
        "--vision-pretraining-type": 1,
        "--vision-backbone-type": 1,
        "--swin-backbone-type": 1,
        "--mask-type": 1,
        "--mask-factor": 1,
        "--iter-per-epoch": 1,
        "--dino-local-img-size": 1,
        "--dino-local-crops-number": 1,
        "--dino-head-hidden-size": 1,
        "--dino-bottleneck-size": 1,
        "--dino-freeze-last-layer": 1,
        "--dino-norm-last-layer": 0,
        "--dino-warmup-teacher-temp": 1,
        "--dino-teacher-temp": 1,
        "--dino-warmup-teacher-temp-epochs": 1,
    },
    "bert": {
        "--sample-rate": 1,  # subsamples the ORQA / retrieval dataset only
        "--bert-no-binary-head": 0,
        "--mask-prob": 1,
        "--short-seq-prob": 1,
        "--ict-head-size": 1,
        "--biencoder-projection-dim": 1,
        "--biencoder-shared-query-context-model": 0,
        "--ict-load": 1,
        "--bert-load": 1,
        "--titles-data-path": 1,
        "--query-in-block-prob": 1,
        "--use-one-sent-docs": 0,
        "--evidence-data-path": 1,
        "--retriever-report-topk-accuracies": "+",
        "--retriever-score-scaling": 0,
        "--block-data-path": 1,
        "--embedding-path": 1,
        "--output-bert-embeddings": 0,
        "--bert-embedder-type": 1,
    },
    "sft": {
        "--sft": 0,
        "--sft-tokenizer-prompt-format": 1,
    },
    "arch": {
        "--experimental-attention-variant": 1,
        "--dsa-indexer-n-heads": 1,
        "--dsa-indexer-head-dim": 1,
        "--dsa-indexer-topk": 1,
        "--dsa-indexer-loss-coeff": 1,
        "--dsa-indexer-use-sparse-loss": 0,
        "--linear-conv-kernel-dim": 1,
        "--linear-key-head-dim": 1,
        "--linear-value-head-dim": 1,
        "--linear-num-key-heads": 1,
        "--linear-num-value-heads": 1,
        "--mrope-section": "+",
        "--is-hybrid-model": 0,
        "--mamba-state-dim": 1,
        "--mamba-head-dim": 1,
        "--mamba-num-groups": 1,
        "--mamba-num-heads": 1,
        "--disable-mamba-mem-eff-path": 0,
        "--encoder-num-layers": 1,
        "--decoder-num-layers": 1,
        "--relative-attention-num-buckets": 1,
        "--relative-attention-max-distance": 1,
        "--onnx-safe": 1,
        "--encoder-seq-length": 1,
        "--decoder-seq-length": 1,
        "--linear-attention-freq": 1,
        "--heterogeneous-layers-config-path": 1,
        "--heterogeneous-layers-config-encoded-json": 1,
        "--hybrid-attention-ratio": 1,
        "--hybrid-mlp-ratio": 1,
        "--hybrid-override-pattern": 1,
    },
    "fsdp": {
        "--no-strict-fsdp-dtensor-load": 0,
        "--disable-strict-fsdp-dtensor-load": 0,
        "--fsdp-manual-registration": 0,
        "--data-parallel-sharding-strategy": 1,
        "--outer-dp-sharding-strategy": 1,
        "--fsdp-double-buffer": 0,
        "--suggested-communication-unit-size": 1,
        "--keep-fp8-transpose-cache": 0,
        "--enable-full-sharding-in-hsdp": 0,
    },
    "localckpt": {
        "--non-persistent-local-ckpt-dir": 1,
        "--non-persistent-local-ckpt-algo": 1,
        "--replication": 0,
        "--replication-jump": 1,
        "--replication-factor": 1,
    },
    "cudagraph": {
        "--cuda-graph-warmup-steps": 1,
        "--external-cuda-graph": 0,
        "--te-rng-tracker": 0,
        "--moe-pad-experts-for-cuda-graph-inference": 0,
        "--cuda-graph-scope": "+",
    },
    "ops": {
        "--adlr-autoresume": 0,
        "--adlr-autoresume-interval": 1,
        "--log-straggler": 0,
        "--straggler-ctrlr-port": 1,
        "--straggler-minmax-count": 1,
        "--disable-straggler-on-startup": 0,
        "--no-one-logger": 0,
        "--one-logger-project": 1,
        "--one-logger-run-name": 1,
        "--one-logger-async": 0,
        "--app-tag-run-name": 1,
        "--app-tag-run-version": 1,
        "--inprocess-restart": 0,
        "--inprocess-max-iterations": 1,
        "--inprocess-monitor-thread-interval": 1,
        "--inprocess-monitor-process-interval": 1,
        "--inprocess-progress-watchdog-interval": 1,
        "--inprocess-heartbeat-interval": 1,
        "--inprocess-soft-timeout": 1,
        "--inprocess-hard-timeout": 1,
        "--inprocess-heartbeat-timeout": 1,
        "--inprocess-barrier-timeout": 1,
        "--inprocess-completion-timeout": 1,
        "--inprocess-last-call-wait": 1,
        "--inprocess-termination-grace-time": 1,
        "--inprocess-granularity": 1,
        "--inprocess-active-world-size": 1,
        "--inprocess-empty-cuda-cache": 0,
        "--enable-ft-package": 0,
        "--calc-ft-timeouts": 0,
        "--ft-num-warmup-iters": 1,
    },
    "muon": {
        "--muon-momentum": 1,
        "--muon-no-split-qkv": 0,
        "--muon-use-nesterov": 0,
        "--muon-scale-mode": 1,
        "--muon-fp32-matmul-prec": 1,
        "--muon-num-ns-steps": 1,
        "--muon-tp-mode": 1,
        "--muon-extra-scale-factor": 1,
    },
    # megatron/post_training/arguments.py (add_modelopt_args, pretrain_gpt.py's extra
    # arguments when nvidia-modelopt is importable; not in the parser's own flag list).
    "modelopt": {
        "--export-model-type": 1,
        "--export-legacy-megatron": 0,
        "--export-te-mcore-model": 0,
        "--export-kv-cache-quant": 1,
        "--export-real-quant-cfg": 1,
        "--export-quant-cfg": 1,
        "--export-kd-teacher-load": 1,
        "--export-kd-teacher-model-config": 1,
        "--export-kd-teacher-ckpt-format": 1,
        "--export-kd-cfg": 1,
        "--finetune-hf-dataset": 1,
        "--finetune-data-split": 1,
        "--export-qk-l2-norm": 0,
        "--export-moe-apply-probs-on-input": 0,
        "--export-offline-model": 0,
        "--modelopt-enabled": 0,
    },
    "notyet": {
        "--max-seqlen-per-dp-cp-rank": 1,
        "--hybrid-context-parallel": 0,
        "--cpu-offloading-num-layers": 1,
        "--fp8-quantizer-factory": 1,
        "--use-kitchen-attention": 0,
        "--kitchen-attention-backend": 1,
        "--fp4-format": 1,
        "--fp4-recipe": 1,
        "--fp4-param-gather": 0,
        "--fp4-quantizer-factory": 1,
        "--moe-use-legacy-grouped-gemm": 0,
        "--batch-invariant-mode": 0,
        "--use-te-activation-func": 0,
        "--symmetric-ar-type": 1,
        "--reuse-grad-buf-for-mxfp8-param-ag": 0,
        "--te-precision-config-file": 1,
    },
}


def by_family(families: dict[str, dict[str, int | str]]) -> dict[str, tuple[int | str, str]]:
    """flag -> (nargs, its family's reason) for ``{family: {flag: nargs}}``."""
    return {flag: (nargs, REASONS[family]) for family, flags in families.items()
            for flag, nargs in flags.items()}  # fmt: skip


# flag -> (nargs, reason)
UPSTREAM_REFUSED: dict[str, tuple[int | str, str]] = by_family(_FAMILIES)
UPSTREAM_REFUSED["--use-ring-exchange-p2p"] = (
    0,
    "needs a custom PyTorch build with torch.distributed.ring_exchange (Megatron-LM's note), "
    "which stock PyTorch lacks: drop it (pipeline p2p is batched or overlapped)",
)
UPSTREAM_REFUSED["--fake-process-group"] = (
    0,
    "Megatron-LM's way to profile a large layout's memory on one GPU; here --dry-run (with "
    "--dry-run-world-size) lays out each rank's parameters, gradients and optimizer state "
    "without any process group: use it instead",
)
UPSTREAM_REFUSED["--lazy-mpu-init"] = (
    1,
    "for programs that embed Megatron-LM's initialize_megatron and finish its set-up "
    "themselves; pretrain_tst.py sets up its own process groups: drop it",
)
UPSTREAM_REFUSED["--create-all-gather-group"] = (
    0,
    "a second data-parallel group for Megatron FSDP's parameter all-gathers (megatron-core "
    "0.16.1 reads it there only); FSDP is not supported here: drop it (the distributed "
    "optimizer's gathers overlap with --overlap-param-gather)",
)
UPSTREAM_REFUSED["--ckpt-convert-update-legacy-dist-opt-format"] = (
    0,
    "rewrites Megatron-LM's legacy torch-format distributed-optimizer files while converting "
    "them; checkpoints here are torch_dist only and that format is not read: drop it",
)
UPSTREAM_REFUSED["--object-storage-cache-path"] = (
    1,
    "caches the index files of datasets on S3 / the Multi-Storage Client; datasets here are "
    "read from filesystem paths only: copy the .bin / .idx files to one and drop it",
)
UPSTREAM_REFUSED["--tokenizer-metadata"] = (
    1,
    "a JSON file read by Megatron-LM 0.16.1's new tokenizer system only (its model type, library "
    "and chat template); the tokenizers here are chosen by --tokenizer-type and its files: drop it",
)
UPSTREAM_REFUSED["--tokenizer-sentencepiece-legacy"] = (
    0,
    "Megatron-LM 0.16.1's new tokenizer system's way to add --tokenizer-special-tokens to a "
    "SentencePiece model (that tokenizer then has no EOD id, which its GPT dataset needs); the "
    "SentencePiece types here use the model's own pieces: drop it",
)
UPSTREAM_REFUSED["--checkpoint-activations"] = (
    0,
    "no longer valid in Megatron-LM: use --recompute-activations (or --recompute-granularity)",
)
UPSTREAM_REFUSED["--batch-size"] = (
    1,
    "an old Megatron-LM flag it refuses too: use --micro-batch-size",
)
UPSTREAM_REFUSED["--warmup"] = (
    1,
    "an old Megatron-LM flag it refuses too: use --lr-warmup-iters / --lr-warmup-fraction / --lr-warmup-samples",
)
UPSTREAM_REFUSED["--model-parallel-size"] = (
    1,
    "an old Megatron-LM flag it refuses too: use --tensor-model-parallel-size",
)
# Two ModelOpt flags that change the architecture its model builder makes (Megatron-LM's
# post_training/model_builder.py, used only with --modelopt-enabled): name the flags that
# make the same model in pretraining.
UPSTREAM_REFUSED["--export-qk-l2-norm"] = (
    0,
    "a Megatron-LM ModelOpt flag: its model builder (--modelopt-enabled) turns on the "
    "queries' and keys' L2 norm from it (Llama-4); pretraining sets that with --qk-l2-norm: "
    "use it instead",
)
UPSTREAM_REFUSED["--export-moe-apply-probs-on-input"] = (
    0,
    "a Megatron-LM ModelOpt flag: its model builder (--modelopt-enabled) scales the experts' "
    "inputs by the router's weights from it (Llama-4); pretraining sets that with "
    "--moe-apply-probs-on-input: use it instead",
)
