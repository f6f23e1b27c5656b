"""The flags Megatron-LM added after 0.16.1 (releases 0.17 to 0.19), each with why (the rest
of :mod:`tst.megatron_flags`).

This trainer runs on megatron-core 0.16.1, but launch scripts written for a later
Megatron-LM pass its newer flags. Every flag Megatron-LM 0.19.0's ``pretrain_gpt.py`` has
and 0.16.1's lacks is known here: implemented by a config field (the batch-size schedule,
integrity-hashed checkpoints, the evaluation batch, the async writer's name, muP, ...), an alias,
accepted with the reason it changes nothing, or refused in one line naming why. Most
refusals come in the families of :mod:`tst.megatron_flags_upstream` (inference and RL,
other architectures, Megatron FSDP, CUDA graphs, Muon, fault-tolerance tooling); one more
family names the features built on a megatron-core newer than the one this trainer runs
on. tests/data/megatron_lm_0.19.0_flags.txt lists the whole flag set and
tests/unit/test_megatron_flag_tables.py checks that none is unknown.
"""

from __future__ import annotations

from tst.megatron_flags_upstream import by_family

__all__ = ["LATER_ACCEPTED", "LATER_ALIASES", "LATER_REFUSED"]

LATER_ALIASES: dict[str, list[str]] = {
    # Megatron-LM spells each "--no-" switch of its configuration classes "--disable-" too.
    "--disable-ckpt-load-validate-sharding-integrity": [
        "--no-ckpt-load-validate-sharding-integrity"
    ],
    "--disable-pad-vocab-size": ["--no-pad-vocab-size"],
    "--disable-align-grad-reduce": ["--no-align-grad-reduce"],
}

# flag -> (nargs, reason)
LATER_ACCEPTED: dict[str, tuple[int | str, str]] = {
    "--exit-signal-handler-for-training": (
        0,
        "SIGTERM / SIGUSR1 / SIGUSR2 and Ctrl-C always stop training here (a save at the next "
        "step, then a clean exit)",
    ),
    "--async-ckpt-use-cpu-shm": (
        0,
        "the async writer here receives host copies of the shards already (megatron-core's "
        "FileSystemWriterAsync copies them to the host before the forked writer runs): no "
        "CUDA IPC handle reaches the writer either way",
    ),
    "--async-ckpt-cpu-priority": (
        1,
        "a scheduling hint for NVIDIA's resiliency-extension writer process (nvrx); megatron-"
        "core's writer, which writes here, runs at the trainer's priority",
    ),
    "--async-ckpt-io-priority": (
        1,
        "a scheduling hint for NVIDIA's resiliency-extension writer process (nvrx); megatron-"
        "core's writer, which writes here, runs at the trainer's I/O priority",
    ),
    "--dist-ckpt-workers": (
        1,
        "the worker count of NVIDIA's resiliency-extension async writer (nvrx); megatron-core's "
        "writer, which writes here, runs one forked process per rank",
    ),
    "--pytorch-profiler-collect-shapes": (
        0,
        "--profile's trace records the operators' input shapes always",
    ),
    "--yarn-correction-range-round-to-int": (
        0,
        "YaRN's correction range is rounded to integers by default "
        "(--no-yarn-correction-range-round-to-int keeps it unrounded)",
    ),
    "--record-shapes": (
        0,
        "the shapes of Megatron-LM's Nsight Systems path (emit_nvtx); --profile here records "
        "a torch profiler trace, which holds the operators' input shapes always",
    ),
    "--disable-stream-ckpt-dequant": (
        0,
        "streamed dequantisation applies to checkpoints holding quantised (FP8 / NVFP4) "
        "parameters; the checkpoints here hold the weights in the run's dtype",
    ),
    "--no-stream-ckpt-dequant": (
        0,
        "streamed dequantisation applies to checkpoints holding quantised (FP8 / NVFP4) "
        "parameters; the checkpoints here hold the weights in the run's dtype",
    ),
}

_NEWER = (
    "a Megatron-LM 0.17+ option built on a newer megatron-core than the 0.16.1 this trainer "
    "runs on: drop it"
)
_KD = (
    "Megatron-LM's saving of top-k logits and its distillation from saved logits: this "
    "trainer pretrains on next-token (and bag) targets only; drop it"
)

_FAMILIES: dict[str, dict[str, int | str]] = {
    "rl": {
        "--inference-cuda-graph-all-prefills": 0,
        "--inference-cuda-graph-max-tokens": 1,
        "--inference-cuda-graph-scope": 1,
        "--inference-disable-ep-consensus": 0,
        "--no-inference-disable-ep-consensus": 0,
        "--inference-disable-triton-nvls-kernels": 0,
        "--inference-dynamic-batching-async-sched-mode": 1,
        "--inference-dynamic-batching-cuda-graph-sizing-distribution": 1,
        "--inference-dynamic-batching-logprobs-mode": 1,
        "--inference-dynamic-batching-mamba-memory-ratio": 1,
        "--inference-dynamic-batching-prefix-caching": 0,
        "--no-inference-dynamic-batching-prefix-caching": 0,
        "--inference-dynamic-batching-prefix-caching-coordinator-policy": 1,
        "--inference-dynamic-batching-prefix-caching-eviction-policy": 1,
        "--inference-dynamic-batching-prefix-caching-mamba-gb": 1,
        "--inference-dynamic-batching-prefix-caching-routing-alpha": 1,
        "--inference-dynamic-batching-sampling-backend": 1,
        "--inference-dynamic-batching-track-generated-token-events": 0,
        "--inference-grouped-gemm-backend": 1,
        "--inference-moe-disable-fused-quant-kernels": 0,
        "--inference-moe-token-dispatcher-type": 1,
        "--inference-shards": 1,
        "--inference-text-gen-server-logging": 0,
        "--no-inference-text-gen-server-logging": 0,
        "--inference-use-synchronous-zmq-collectives": 0,
        "--no-inference-use-synchronous-zmq-collectives": 0,
        "--mamba-inference-conv-states-dtype": 1,
        "--mamba-inference-ssm-states-dtype": 1,
        "--num-speculative-tokens": 1,
        "--use-same-sampling-seed-across-dp-ranks": 0,
        "--rl-consumption-granularity": 1,
        "--rl-generation-lag": 1,
        "--rl-inference-parsers": "+",
        "--rl-kv-cache-management-mode": 1,
        "--rl-persist-cuda-graphs": 0,
        "--no-rl-persist-cuda-graphs": 0,
        "--rl-profile": 0,
        "--rl-profile-dir": 1,
        "--rl-submission-granularity": 1,
    },
    "sft": {
        "--chat-template": 1,
    },
    "arch": {
        "--hybrid-layer-pattern": 1,
        "--mtp-hybrid-override-pattern": 1,
        "--mamba-training-ssm-states-dtype": 1,
        "--dsa-indexer-k-norm-epsilon": 1,
        "--dsa-indexer-k-norm-fp32": 0,
        "--dsa-indexer-rope-interleaved": 0,
        "--dsa-indexer-skip-topk-offset": 1,
        "--dsa-indexer-topk-freq": 1,
        "--dsa-kernel-backend": 1,
        "--disable-dsa-indexer-rotate-activation": 0,
        "--no-dsa-indexer-rotate-activation": 0,
        "--disable-dsa-indexer-scoring-relu": 0,
        "--no-dsa-indexer-scoring-relu": 0,
    },
    "fsdp": {
        "--megatron-fsdp-enable-fine-grained-param-gather": 0,
        "--megatron-fsdp-grad-comm-dtype": 1,
        "--megatron-fsdp-main-grads-dtype": 1,
        "--megatron-fsdp-main-params-dtype": 1,
        "--megatron-fsdp-max-pool-double-buffer": 0,
        "--fsdp-db-use-persist-buf-on-alloc-fail": 0,
    },
    "cudagraph": {
        "--cuda-graph-modules": "+",
        "--optimizer-cuda-graph": 0,
        "--delay-offload-until-cuda-graph": 0,
    },
    "ops": {
        "--fault-injector-delay-start-iteration": 1,
        "--fault-injector-fault-delay": 1,
        "--fault-injector-fault-probabilities": 1,
        "--fault-injector-fault-types": 1,
        "--fault-injector-mtti-seconds": 1,
        "--fault-injector-num-ranks": 1,
        "--fault-injector-offset-seconds": 1,
        "--fault-injector-ranks": 1,
        "--fault-injector-seed": 1,
        "--gpu-sniff-test-interval": 1,
        "--flight-recorder-dump-path": 1,
        "--flight-recorder-include-stack-trace": 0,
        "--flight-recorder-trace-buffer-size": 1,
        "--disable-flight-recorder-dump-on-timeout": 0,
        "--no-flight-recorder-dump-on-timeout": 0,
        "--disable-flight-recorder-extra-dump-on-exec": 0,
        "--no-flight-recorder-extra-dump-on-exec": 0,
        "--disable-flight-recorder-include-only-active": 0,
        "--no-flight-recorder-include-only-active": 0,
    },
    "muon": {
        "--muon-coefficient-type": 1,
        "--muon-nesterov": 0,
        "--muon-scalar-optimizer": 1,
        "--no-use-layer-wise-param-layout": 0,
    },
    "notyet": {
        "--null-tokenizer-eod-id": 1,
        "--null-tokenizer-pad-id": 1,
        "--disable-tokenizer-sentencepiece-ignore-extra-whitespaces": 0,
        "--no-tokenizer-sentencepiece-ignore-extra-whitespaces": 0,
        "--cpu-offloading-retain-pinned-cpu-buffers": 0,
    },
}

_NEWER_FLAGS: dict[str, int | str] = {
    "--lion-beta1": 1,
    "--lion-beta2": 1,
    "--mtp-use-repeated-layer": 0,
    "--mtp-detach-heads": 0,
    "--moe-paged-stash": 0,
    "--moe-paged-stash-buffer-size-factor-cpu": 1,
    "--moe-paged-stash-buffer-size-factor-cuda": 1,
    "--moe-paged-stash-page-size": 1,
    "--moe-flex-dispatcher-num-sms": 1,
    "--moe-hybridep-num-blocks-permute": 1,
    "--moe-hybridep-num-blocks-unpermute": 1,
    "--moe-hybridep-num-sms-preprocessing": 1,
    "--moe-hybridep-pad-uneven-dispatch-inputs": 0,
    "--moe-permute-fusion-into-hybridep": 0,
    "--moe-ncclep-static-shape": 0,
    "--moe-ncclep-zero-copy": 0,
    "--moe-expert-rank-capacity-factor": 1,
    "--moe-router-force-biased": 1,
    "--moe-router-quantile-balancing-ema": 1,
    "--moe-mlp-glu-interleave-size": 1,
    "--moe-shared-expert-glu-interleave-size": 1,
    "--moe-single-grouped-bias": 0,
    "--moe-single-grouped-weight": 0,
    "--moe-routing-trace-capture-hidden-states": 0,
    "--moe-routing-trace-capture-logits": 0,
    "--moe-routing-trace-dump-weights": 0,
    "--moe-routing-trace-max-training-iters": 1,
    "--moe-routing-trace-path": 1,
    "--tensor-parallel-num-weight-shards": 1,
    "--expert-tensor-parallel-num-weight-shards": 1,
    "--fused-residual-rmsnorm": 0,
    "--mla-down-proj-fusion": 0,
    "--use-transformer-engine-op-fuser": 0,
    "--use-grouped-gemm-for-dense-mlp": 0,
    "--use-grouped-gemm-for-shared-expert": 0,
    "--fp8-output-proj": 0,
    "--flash-attention-version": 1,
    "--high-priority-a2a-comm-stream": 0,
    "--overlap-dispatch-backward-with-experts-wgrad": 0,
    "--mlp-chunks-for-training": 1,
    "--activation-offload-fraction": 1,
    "--delta-offload-bytes-across-pp-ranks": 1,
    "--fine-grained-offloading-max-inflight-offloads": 1,
    "--ddp-param-name-patterns-for-fp32-local-accumulation": "+",
    "--ckpt-fully-parallel-save-process-group": 1,
    "--ckpt-fully-parallel-load-process-group": 1,
    "--dataloader-inter-document-masking": 0,
}

LATER_REFUSED: dict[str, tuple[int | str, str]] = by_family(_FAMILIES)
LATER_REFUSED.update({flag: (nargs, _NEWER) for flag, nargs in _NEWER_FLAGS.items()})
LATER_REFUSED.update({
    flag: (nargs, _KD) for flag, nargs in {
        "--logits-load-decode-threads": 1, "--logits-load-dir": 1, "--logits-load-ignore-errors": 0,
        "--logits-load-kd-loss-alpha": 1, "--logits-load-msc-prefetch-depth": 1,
        "--logits-load-prefetch-factor": 1, "--logits-save-dir": 1, "--logits-save-dtype": 1,
        "--logits-save-top-k": 1, "--logits-save-top-p": 1, "--logits-save-top-p-min-k": 1,
    }.items()
})  # fmt: skip
LATER_REFUSED["--freeze-all-layers"] = (
    0,
    "freezes every weight, for Megatron-LM's post-training logit saving (--logits-save-dir, "
    "refused here too); a pretraining run trains its model: drop it",
)
LATER_REFUSED["--enable-msc"] = (
    0,
    "the Multi-Storage Client (object storage) is not used here: data and checkpoints are read "
    "from and written to filesystem paths; drop it",
)
LATER_REFUSED["--tokenizer-hf-no-use-fast"] = (
    0,
    "a Hugging Face tokenizer.json is read here by the tokenizers library, which is the fast "
    "tokenizer; the slow (Python) tokenizers are not used: drop it",
)
LATER_REFUSED["--tokenizer-hf-no-include-special-tokens"] = (
    0,
    "what the tokenizer.json's post-processor adds (a Llama-3 BOS) is always included here, as "
    "Megatron-LM's legacy tokenizer does: drop it",
)
