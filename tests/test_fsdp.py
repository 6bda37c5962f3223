"""train.shard = "fsdp" on a real 2-process gloo group: FSDP2 trains like DDP, accumulates exactly, its
sharded checkpoints survive SIGKILL and resume at another number of processes, CPU offload,
evaluation and bf16 work, final/ is a plain open_clip model, and a sharded checkpoint that asks for
code is refused."""

import json
import os
import pickle
import shutil

import open_clip
import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import trajectory
from test_distributed import assert_final_weights_agree

from clipa.model.sharded import SHARDED_DIR

from conftest import MICRO, run_in_process, run_torchrun

# 2 processes x micro-batch 8 x 2 accumulation steps, random patch masks (RNG replayed in pass 2),
# gradients clipped (the micro model's norm starts near 38), 4 steps, a checkpoint every 2.
ARGS = ["-m", "clipa", "pretrain", "tiny/pretrain", MICRO, "train.global_batch_size=32", "train.micro_batch_size=8",
        "train.total_samples=128", "train.log_every_steps=1", "data.num_workers=0", "optim.warmup_steps=1",
        "optim.grad_clip=1.0", "checkpoint.every_steps=2", "checkpoint.keep_last=10", "reduction.image=random",
        "reduction.mask_ratio=0.5"]
FSDP = [*ARGS, "train.shard=fsdp"]

@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    run_torchrun(*FSDP, "--out", out, cwd=out.parent)
    return out


@pytest.mark.slow
def test_fsdp_trains_like_ddp_with_sharded_checkpoints(tmp_path, fsdp_run):
    run_torchrun(*ARGS, "--out", tmp_path / "ddp", cwd=tmp_path)
    fsdp, ddp = trajectory(fsdp_run), trajectory(tmp_path / "ddp")
    assert fsdp.keys() == ddp.keys() == {1, 2, 3, 4}
    # Same math, different reductions (reduce-scatter vs all-reduce): equal to float rounding.
    for step in ddp:
        assert fsdp[step] == pytest.approx(ddp[step], rel=1e-5), step
    # The last update shows only in the final weights: equal to a tenth of its lr (5e-4 here; seen ~5e-7 apart).
    assert_final_weights_agree(fsdp_run, tmp_path / "ddp")
    # Each process wrote its own half of the weights and optimizer state; no model.safetensors.
    step2 = fsdp_run / "checkpoints" / "step_000002"
    shards = sorted(p.name for p in (step2 / SHARDED_DIR).glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"] and not (step2 / "model.safetensors").exists()
    sizes = [(step2 / SHARDED_DIR / name).stat().st_size for name in shards]
    assert max(sizes) < 0.6 * sum(sizes)  # about half each, not one process holding everything
    assert {p.name for p in step2.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}


@pytest.mark.slow
def test_sigkill_while_checkpointing_then_resume_gives_the_uninterrupted_run(tmp_path, fsdp_run):
    out = tmp_path / "run"
    # Process 0 dies after every process wrote its shards of the last step's checkpoint (4), before it
    # is renamed; step 2's is the one to resume from.
    killed = run_torchrun(*FSDP, "--out", out, cwd=tmp_path, env={"CLIPA_CRASH_AT": "checkpoint-write:4"},
                          check=False)
    assert killed.returncode != 0 and "Signal 9 (SIGKILL)" in killed.stderr
    assert not (out / "final").exists() and (out / "checkpoints" / ".tmp-step_000004").is_dir()
    resumed = run_torchrun(*FSDP, "--out", out, cwd=tmp_path)
    assert "resuming from" in resumed.stdout and "step 2/4" in resumed.stdout
    assert trajectory(out) == trajectory(fsdp_run)  # gloo and FSDP's reductions are deterministic on CPU
    assert not list((out / "checkpoints").glob(".tmp-*"))


@pytest.mark.slow
def test_resume_on_one_process_with_offload_and_evaluation_then_bf16(tmp_path, fsdp_run):
    # Two processes' shards resumed by one process (DCP reshards on load), with the options that move
    # memory, not numbers (CPU offload, no resharding after forward), and a zero-shot evaluation at the
    # end: steps 3 and 4 replay the 2-process run.
    one = tmp_path / "one"
    result = run_one(*FSDP, "train.micro_batch_size=16", "train.fsdp.cpu_offload=true",
                     "train.fsdp.reshard_after_forward=false", 'eval.zeroshot=["synthetic"]', "--out", one,
                     "--resume", fsdp_run / "checkpoints" / "step_000002")
    assert "at step 2/4" in result.stdout
    straight, resumed = trajectory(fsdp_run), trajectory(one)
    assert resumed.keys() == {3, 4}
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5)
    assert sorted(p.name for p in (one / "checkpoints" / "step_000004" / SHARDED_DIR).glob("*.distcp")) == \
        ["__0_0.distcp"]
    # The evaluation saw the whole final weights (gathered from the shards): it equals one of final/.
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot

    rows = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "zeroshot/synthetic/acc1" in r]
    assert [r["step"] for r in evals] == [4]
    final = zeroshot(load_model(str(one / "final")), "synthetic")["metrics"]
    for metric in ("acc1", "acc5", "mean_per_class_recall"):
        assert evals[-1][f"zeroshot/synthetic/{metric}"] == pytest.approx(final[metric], abs=1e-6)
    # bf16 autocast under FSDP (one process, a group of one): finite and within bf16's rounding of the
    # fp32 run over 2 steps; the weights stay fp32.
    bf16 = tmp_path / "bf16"
    run_one(*FSDP, "train.micro_batch_size=16", "train.total_samples=64", "train.precision=bf16",
            "checkpoint.every_steps=0", "--out", bf16)
    low = trajectory(bf16)
    assert low.keys() == {1, 2}
    for step in low:
        assert abs(low[step] - straight[step]) < 0.05, (step, low[step], straight[step])
    assert load_file(str(bf16 / "final" / "open_clip_model.safetensors"))["logit_scale"].dtype == torch.float32


def run_one(*args):
    """A run on one process, in this one: FSDP makes its own process group of one and leaves it at the end."""
    assert args[:2] == ("-m", "clipa"), args
    result = run_in_process(*args[2:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert not torch.distributed.is_initialized()  # the tests after this one in this process run alone
    return result


@pytest.mark.slow
def test_final_is_plain_open_clip_and_equals_the_sharded_checkpoint(tmp_path, fsdp_run, cli):
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{fsdp_run / 'final'}")
    # The last checkpoint's shards, read without a process group by `clipa export`, are the same weights.
    assert cli("export", fsdp_run / "checkpoints" / "step_000004", tmp_path / "export").returncode == 0
    exported = load_file(str(tmp_path / "export" / "open_clip_model.safetensors"))
    state = model.state_dict()
    assert state.keys() == exported.keys()
    for name, value in state.items():
        assert torch.equal(value, exported[name]), name


class _Payload:
    """Unpickling this runs os.system: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_sharded_checkpoint_that_asks_for_code_is_refused(tmp_path, fsdp_run, cli):
    bad = tmp_path / "step_000004"
    shutil.copytree(fsdp_run / "checkpoints" / "step_000004", bad)
    marker = tmp_path / "ran"
    (bad / SHARDED_DIR / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    result = cli("export", bad, tmp_path / "export")
    assert result.returncode == 2 and "refused to load" in result.stderr and "posix.system" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not marker.exists()
    # The optimizer's non-tensor values are read with weights_only=True, never plain unpickling.
    import io

    from clipa.model.sharded import SafeLoadPlanner

    with pytest.raises(pickle.UnpicklingError):
        SafeLoadPlanner().load_bytes(None, io.BytesIO(pickle.dumps(_Payload(marker), protocol=2)))
    assert not marker.exists()


@pytest.mark.slow
def test_truncated_shard_is_damage_and_never_chosen(tmp_path, fsdp_run, cli):
    from clipa.train.checkpoint import CheckpointManager

    copy = tmp_path / "checkpoints"
    shutil.copytree(fsdp_run / "checkpoints", copy)
    shard = copy / "step_000004" / SHARDED_DIR / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.warns(UserWarning, match="__1_0.distcp is truncated"):
        assert CheckpointManager(copy).latest().name == "step_000002"
    result = cli("export", copy / "step_000004", tmp_path / "export")
    assert result.returncode == 2 and "is damaged" in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("overrides, key", [
    (["train.shard=zero"], "train.shard: unknown value"),
    (["train.fsdp.cpu_offload=true"], "train.fsdp.cpu_offload: applies only with train.shard"),
    (["train.shard=fsdp", "train.precision=fp16"], 'train.precision: "fp16" with train.shard = "fsdp"'),
    (["train.shard=fsdp", "train.compile=true"], "train.compile: true with train.shard"),
    (["train.shard=fsdp", "loss.queue.kind=momentum", "loss.queue.size=256"], 'loss.queue.kind: "momentum"'),
])
def test_fsdp_recipe_errors_exit_2_with_one_line(cli, overrides, key):
    result = cli("validate", "tiny/pretrain", *overrides)
    assert result.returncode == 2 and key in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_fsdp_is_fixed_on_resume(tmp_path, fsdp_run, cli):
    result = cli("pretrain", *ARGS[3:], "--out", tmp_path / "ddp", "--resume",
                 fsdp_run / "checkpoints" / "step_000002")
    assert result.returncode == 2 and "train.shard: the checkpoint" in result.stderr, result.stderr

