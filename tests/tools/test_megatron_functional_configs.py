"""Megatron-LM's own GPT / MoE / Mixtral functional-test configurations (165 of them at
core_v0.16.1, tests/data/megatron_lm_functional_tests.json says how they were taken), each
given to ``pretrain_tst.py --dry-run`` as Megatron-LM's test runner passes it: every one is
laid out for its GPU count, or refused by name for one of the reasons below. A launch script
nobody here wrote: a flag or rule that differs from Megatron-LM's shows up as a refusal not
listed here (found this way: sinkhorn routing turned off, ETP on dense models, interleaved
groups, recompute flags without a granularity, --attention-backend flash in deterministic
mode, ModelOpt's flags).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings

import pytest

import pretrain_tst
from tst.errors import TSTError

DATA = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data",
                    "megatron_lm_functional_tests.json")  # fmt: skip

FSDP = "Megatron FSDP is not supported"
# Megatron-LM refuses these as published too (save_retain_interval % save_interval).
RETAIN = "--save-retain-interval 2500 must be a multiple of --save-interval"
# case -> a part of its one-line refusal: what is refused here, and why.
REFUSED = {
    "gpt/gpt3_15b_8t_release_sm": RETAIN,
    "mixtral/deepseekv3_proxy_flex_tp1pp4emp16etp1cp1_gb_200_release_sm": RETAIN,
    "mixtral/deepseekv3_proxy_flex_tp1pp4emp16etp1cp1_release_sm": RETAIN,
    # Megatron-LM 0.16.1 refuses this one too (tied embeddings, and --fp16, with FSDP2).
    "gpt/gpt3_mcore_tp1_pp1_fsdp2_resume_torch_dist_te":
        "--use-torch-fsdp2 shards the input embedding and the output layer apart",
    "gpt/gpt3_mcore_te_tp2_zp_z3_resume_fsdp_dtensor": FSDP,
    "gpt/gpt3_weekly_dgx_b200_mcore_tp4_cp2_current_scaling_native_fp8_tp_fsdp": FSDP,
    "gpt/gpt3_weekly_dgx_h100_mcore_tp4_cp2_current_scaling_native_fp8_tp_fsdp": FSDP,
    "moe/gpt3_mcore_te_tp2_zp_z3_resume_torch_dist_te_8experts2parallel_top2router": FSDP,
    "gpt/gpt3_mcore_te_tp2_pp1_gdn": "another Megatron-LM architecture",  # gated delta net
    "gpt/gpt3_mcore_te_tp2_pp1_modelopt_distill_resume": "a Megatron-LM ModelOpt flag",
    "moe/gpt3_mcore_te_tp2_pp2_ep4_etp1_resume_torch_dist_attn_cudagraph":
        "CUDA graphs are not supported yet",
    "moe/gpt3_moe_mcore_te_tp4_ep2_etp2_pp2_scoped_cudagraph": "CUDA graphs are not supported yet",
    "moe/gpt3_moe_mcore_te_ep8_resume_torch_dist_dist_muon": "the Muon optimizer",
    "moe/gpt3_moe_mcore_te_ep8_resume_torch_dist_muon": "the Muon optimizer",
}  # fmt: skip


def _dry_run(argv: list[str], world: int) -> tuple[int, str]:
    """pretrain_tst.main's dry run of ``argv`` laid out for ``world`` ranks: (rc, stdout)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rc = pretrain_tst.main([*argv, "--dry-run", "--dry-run-world-size", str(world)])
    return rc, out.getvalue()


def _configs() -> dict[str, dict]:
    with open(DATA) as f:
        return json.load(f)["configs"]


def _lay_out_all(configs: dict[str, dict], refused: dict[str, str]) -> tuple[int, set[str]]:
    """Dry-run every configuration: (how many laid out, the ``refused`` keys that matched).
    ``refused`` maps a name, or a pattern ending in ``*``, to a part of its one-line refusal;
    any other refusal, a refusal of more than one line, or a listed one that lays out, fails."""
    import fnmatch

    laid_out, wrong, matched = 0, [], set()
    for name, case in configs.items():
        keys = [k for k in refused if fnmatch.fnmatchcase(name, k)]
        expected = refused[keys[0]] if keys else None
        matched.update(keys)
        try:
            rc, out = _dry_run(case["argv"], case["world"])
        except TSTError as error:
            message = str(error)
            if expected is None or expected not in message or "\n" in message:
                wrong.append(f"{name}: refused: {message[:300]}")
            continue
        if rc != 0 or f"layout for a world of {case['world']}:" not in out:
            wrong.append(f"{name}: rc {rc}")
        elif expected is not None:
            wrong.append(f"{name}: laid out, but expected refused ({expected})")
        else:
            laid_out += 1
    assert not wrong, "\n".join(wrong)
    return laid_out, matched


def test_every_functional_test_config_runs_unchanged_or_is_refused_by_name():
    configs = _configs()
    assert len(configs) == 165
    laid_out, _ = _lay_out_all(configs, REFUSED)
    assert laid_out == len(configs) - len(REFUSED) == 151


DATA_0_19 = os.path.join(os.path.dirname(DATA), "megatron_lm_functional_tests_0.19.0.json")
NEWER = "built on a newer megatron-core"
# Megatron-LM 0.19.0's configurations (the newest release: scripts written for it run here
# too): name (or, ending in "*", its start) -> a part of its one-line refusal.
REFUSED_0_19 = {
    "moe/gpt3_mcore_te_tp1_pp1_te_4experts_groupedGEMM_op_fuser": NEWER,  # TE's op fuser
    # Megatron-LM's runner passes the spaced value "2 2" as one word: its parser refuses it too.
    "gpt/gpt3_mcore_te_tp1_pp2_cp4_a2a_p2p_nondeterministic":
        "--hierarchical-context-parallel-sizes: invalid int value: '2 2'",
    "gpt/gpt3_mcore_tp1_pp1_fsdp2_resume_torch_dist_te":
        "--use-torch-fsdp2 shards the input embedding and the output layer apart",
    "gpt/gpt3_mcore_te_tp2_zp_z3_resume_fsdp_dtensor*": FSDP,
    "moe/deepseek_proxy_fsdp_*": FSDP,
    "moe/gpt3_mcore_te_tp2_zp_z3_resume_torch_dist_te_8experts2parallel_top2router": FSDP,
    "gpt/gpt3_mcore_te_tp2_pp1_gdn*": "another Megatron-LM architecture",  # gated delta net
    "gpt/gpt3_mcore_te_tp2_pp2_dsa": "another Megatron-LM architecture",  # sparse attention
    "gpt/gpt3_mcore_te_tp2_pp1_modelopt_distill_resume*": "a Megatron-LM ModelOpt flag",
    "moe/gpt3_mcore_te_tp2_pp2_ep4_etp1_resume_torch_dist_attn_cudagraph":
        "CUDA graphs are not supported yet",
    "moe/gpt3_moe_mcore_te_tp4_ep2_etp2_pp2_scoped_cudagraph*": "CUDA graphs are not supported yet",
    "moe/gpt3_moe_mcore_te_ep8_resume_torch_dist_*muon*": "the Muon optimizer",
}  # fmt: skip


def test_megatron_lm_0_19_configs_run_unchanged_or_are_refused_by_name():
    """The 220 GPT / MoE / Mixtral configurations of Megatron-LM 0.19.0 (its newer flags:
    --step-batch-size-schedule, --verify-integrity, --async-strategy, --eval-global-batch-
    size, ...), each laid out for its GPU count or refused for a reason listed above."""
    with open(DATA_0_19) as f:
        configs = json.load(f)["configs"]
    assert len(configs) == 220
    laid_out, matched = _lay_out_all(configs, REFUSED_0_19)
    assert matched == set(REFUSED_0_19)
    assert laid_out == 194


@pytest.mark.parametrize("name", ["moe/gpt3_mcore_tp2_pp2_ep2_te_4experts2parallel",
                                  "gpt/gpt3_mcore_te_tp2_pp2_cp2_etp4_dp_last",
                                  "gpt/gpt3_mcore_te_tp1_pp4_vp1_tunable_overlap"])  # fmt: skip
def test_configs_that_found_differences_lay_out_what_megatron_lm_builds(name, capsys):
    """Three of the differences found: sinkhorn top-1 routing kept, expert-TP 4 on a dense
    model with the tp-pp-dp order, 5 micro-batches in one interleaved group on PP 4."""
    case = _configs()[name]
    argv = [*case["argv"], "--dry-run", "--dry-run-world-size", str(case["world"])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert pretrain_tst.main(argv) == 0
    out = capsys.readouterr().out
    assert f"layout for a world of {case['world']}:" in out


def _sweep_module():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "bench",
                        "functional_sweep.py")  # fmt: skip
    spec = importlib.util.spec_from_file_location("functional_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    return sweep


def test_the_sweep_counts_only_the_trainers_own_errors_as_refusals():
    """A ValueError from inside torch (an optimizer state that does not fit, on resume) is a
    finding, not a refusal: it once hid a resume that died as "refused"."""
    import torch

    from tst.config import parse_args

    sweep = _sweep_module()
    with pytest.raises(TSTError) as ours:
        parse_args(["--num-layers", "2"])
    assert sweep._is_refusal(ours.value)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError) as theirs:
        optimizer.load_state_dict({"state": {}, "param_groups": []})
    assert not sweep._is_refusal(theirs.value)
    assert not sweep._is_refusal(RuntimeError("a collective failed"))


def test_the_sweep_keeps_a_failed_worlds_whole_message(tmp_path, monkeypatch):
    """A world that times out (or fails) ends its configuration as FAILED with the message's
    first line in the table and the whole message, the hung ranks' stacks included, in the
    configuration's error.txt; the sweep exits 1."""
    import distributed

    sweep = _sweep_module()
    message = ("_run_on_rank: ranks [0] did not finish within 5 s (world of 8)\n"
               "--- rank 0, stacks at the timeout ---\n  File \"x.py\", line 1 in wait_here")  # fmt: skip

    class HungWorld:
        closed = False

        def __init__(self, *args, **kwargs):
            pass

        def run(self, *args, **kwargs):
            self.closed = True
            raise TimeoutError(message)

        def close(self, force=False):
            pass

    monkeypatch.setattr(distributed, "ProcessWorld", HungWorld)
    name = "gpt/gpt3_mcore_tp1_pp2_fp16"  # one configuration, not a resume case
    assert sweep.main(["--only", name, "--out", str(tmp_path)]) == 1
    with open(tmp_path / "summary.json") as f:
        rows = json.load(f)["rows"]
    assert [(r["name"], r["outcome"]) for r in rows] == [(name, "FAILED")], rows
    folder = tmp_path / name.replace("/", "__")
    assert (folder / "error.txt").read_text() == message
    assert rows[0]["detail"] == message.splitlines()[0] + " (see error.txt)"


def test_the_sweeps_cpu_sized_configurations_lay_out_on_8_ranks(tmp_path):
    """bench/functional_sweep.py trains every configuration shrunk to CPU size on 8 ranks;
    its shrinking keeps each one valid: the shrunk flags lay out at 8 ranks (the dry run),
    or are refused in one line as the originals are, or for a GPU-only flag the sweep drops
    here (FP8 once Transformer Engine's spec became the local one), and only the layout that
    needs more than 8 ranks for TP x PP x CP is left out."""
    sweep = _sweep_module()
    laid_out, refused, gpu_only, skipped, wrong = 0, 0, 0, [], []
    for name, case in _configs().items():
        first, again, note = sweep.shrink(name, case, str(tmp_path))
        if not first:
            skipped.append(name)
            continue
        assert ("resume" in name) == bool(again), name
        try:
            rc, out = _dry_run(first, sweep.WORLD)
        except TSTError as error:
            # Refused as the original is, or GPU-only on this machine (the sweep drops it).
            if name in REFUSED:
                refused += 1
            elif sweep._gpu_only(str(error)) is not None:
                gpu_only += 1
            else:
                wrong.append(f"{name}: refused: {str(error)[:300]}")
            continue
        if rc != 0 or f"layout for a world of {sweep.WORLD}:" not in out:
            wrong.append(f"{name}: rc {rc}")
        else:
            laid_out += 1
    assert not wrong, "\n".join(wrong)
    assert skipped == ["mixtral/mixtral_8x22b_tp2pp8ep8vpp1_release"]
    assert (laid_out, refused, gpu_only) == (138, 11, 15), (laid_out, refused, gpu_only)


def test_the_sweeps_exact_mode_compares_a_resume_with_the_unbroken_run(tmp_path, monkeypatch):
    """--exact: a resume case is trained a third time without the stop, in a folder of its
    own (its checkpoints must not meet the stopped run's), and the stopped-and-resumed losses
    must be that run's; a difference past rel 1e-6 fails the configuration naming the step.
    Flags that restart something by design (--finetune, --no-load-optim, --no-load-rng) are
    not compared, and the table says so."""
    import distributed

    sweep = _sweep_module()
    want = {1: 8.5, 2: 8.25, 3: 8.0, 4: 7.75}
    runs = []

    class World:
        closed = False

        def __init__(self, *args, **kwargs):
            pass

        def run(self, fn, argv, log):
            runs.append((argv, log))
            if log.endswith(".u"):  # the unbroken run: steps 1-4, step 4 as set below
                steps = {**want, 4: want[4] * (1 + setting["rel"])}
            elif "--exit-interval" in argv:
                steps = {i: want[i] for i in (1, 2)}
            else:
                steps = {i: want[i] for i in (3, 4)}
            first = {"rank": 0, "rc": 0, "losses": sorted(steps.items())}
            return [first] + [{"rank": r, "rc": 0} for r in range(1, sweep.WORLD)]

        def close(self, force=False):
            pass

    monkeypatch.setattr(distributed, "ProcessWorld", World)
    name = "gpt/gpt3_mcore_te_tp1_pp1_resume_torch_dist_uniform_full_recompute"
    setting = {}
    for setting["rel"], outcome in ((1e-7, "trained"), (1e-5, "FAILED")):
        runs.clear()
        out = tmp_path / outcome
        rc = sweep.main(["--only", name, "--out", str(out), "--exact"])
        with open(out / "summary.json") as f:
            (row,) = json.load(f)["rows"]
        assert (row["outcome"], rc) == (outcome, int(outcome == "FAILED")), row
        assert len(runs) == 3 and runs[2][1].endswith(".u"), runs
        unbroken, resumed = runs[2][0], runs[1][0]
        folder = str(out / name.replace("/", "__"))
        for flag, path in (("--save", "ckpt"), ("--load", "ckpt"), ("--tensorboard-dir", "tb")):
            assert unbroken[unbroken.index(flag) + 1] == os.path.join(folder, "unbroken", path)
            assert resumed[resumed.index(flag) + 1] != unbroken[unbroken.index(flag) + 1]
        assert "--exit-interval" not in unbroken
        if outcome == "FAILED":
            assert row["detail"].startswith("the resumed run differs from the unbroken run at "
                                            "step 4: 7.75 vs")  # fmt: skip
        else:
            assert row["detail"] == "resumed = unbroken run"
    # A flag that restarts the optimizer by design: trained, not compared, and said so.
    assert sweep._not_exact(["--no-load-optim"]) == "--no-load-optim starts the optimizer again"
    assert sweep._not_exact(["--lr", "1"]) == ""
