"""A real 2-process gloo group (torchrun) trains exactly like one process with the same global batch."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_checkpoint import trajectory

from conftest import MICRO, run_in_process, run_torchrun

RUNNER = str(__import__("pathlib").Path(__file__).with_name("distributed_run.py"))

COMMON = [MICRO, "train.global_batch_size=64", "train.total_samples=192", "train.log_every_steps=1", "data.num_workers=0",
          "checkpoint.every_steps=0", "optim.warmup_steps=1", "reduction.image=random", "reduction.mask_ratio=0.5"]


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_with_accumulation_match_one_process(tmp_path):
    # 2 processes x micro 16 x 2 accumulation steps  vs  1 process x micro 64
    two = run_torchrun("-m", "clipa", "pretrain", "tiny/pretrain", *COMMON, "train.micro_batch_size=16",
                       "--out", tmp_path / "two", cwd=tmp_path)
    assert two.stdout.count("pretrain finished") == 1  # only rank 0 reports
    # The one-process reference runs in this process (a process start is ~4 CPU-s of imports).
    one = run_in_process("pretrain", "tiny/pretrain", *COMMON, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stdout[-2000:] + one.stderr[-3000:]
    for a, b in zip(losses(tmp_path / "two"), losses(tmp_path / "one"), strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (a, b)
    # The losses show every step but the last; the final weights show the last update, which moves
    # weights by up to about the last step's lr (1e-3 here): they must agree to a tenth of it (a missing
    # or different final step fails every tensor). Rounding noise in gradients that are mathematically zero
    # (attention key biases) reaches AdamW as about noise/eps of an lr step: ~1e-5 here.
    assert_final_weights_agree(tmp_path / "two", tmp_path / "one")


def assert_final_weights_agree(run, reference):
    """final/ weights equal to a tenth of the last step's learning rate (test_fsdp uses it too)."""
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    last_lr = [row["lr"] for row in rows if "lr" in row][-1]
    ours = load_file(str(run / "final" / "open_clip_model.safetensors"))
    theirs = load_file(str(reference / "final" / "open_clip_model.safetensors"))
    assert ours.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=0, atol=last_lr / 10, msg=lambda m: f"{name}: {m}")


# The gradient checks' configurations: (micro-batch, loss, masked, sharding).
GRADS = {("infonce", "1"): ("8", "infonce", "1", "ddp"), ("siglip", "0"): ("8", "siglip", "0", "ddp"),
         "fsdp": ("8", "infonce", "1", "fsdp")}


@pytest.fixture(scope="module")
def group_checks(tmp_path_factory):
    """One 2-process launch (tests/distributed_run.py) for the helper checks: rank 0's gradients of every
    configuration in GRADS (distributed_grads.py), both ranks' queues (distributed_queue.py), and FSDP
    training runs with a locked tower, the memory bank and SigLIP (distributed_fsdp_extras.py)."""
    folder = tmp_path_factory.mktemp("group")
    files = {key: folder / f"grads-{i}.pt" for i, key in enumerate(GRADS)}
    args = [arg for key in GRADS for arg in ("--", "distributed_grads", files[key], *GRADS[key])]
    run_torchrun(RUNNER, *args[1:], "--", "distributed_queue", folder / "queues.pt",
                 "--", "distributed_fsdp_extras", folder / "fsdp_extras", cwd=folder)
    return {**{key: torch.load(path, weights_only=False) for key, path in files.items()},
            "queues": torch.load(folder / "queues.pt", weights_only=False), "fsdp_extras": folder / "fsdp_extras"}


@pytest.mark.parametrize("loss_kind, masked", [("infonce", "1"), ("siglip", "0")])
@pytest.mark.slow
def test_two_process_gradients_equal_one_process(group_checks, loss_kind, masked):
    from test_accumulation import assert_same_gradients, global_batch, gradients, split

    saved = group_checks[(loss_kind, masked)]
    assert saved["world"] == 2
    # 32 rows per process in micro-batches of 8: four micro-steps, gradients all-reduced on the last
    # only (three skipped by no_sync); equal gradients below show that one sync carried everything.
    assert saved["micro_steps"] == 4 and saved["synced_backwards"] == 1
    loss, expected = gradients(split(global_batch(64, masked == "1"), 64), loss_kind, masked == "1")
    assert saved["loss"] == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(saved["grads"], expected)


@pytest.mark.slow
def test_fsdp_accumulated_gradients_equal_one_process(group_checks):
    from test_accumulation import assert_same_gradients, global_batch, gradients, split

    saved = group_checks["fsdp"]
    # 32 rows per process in micro-batches of 8: gradients reduce-scattered on the last of 4 only.
    assert saved["world"] == 2 and saved["micro_steps"] == 4 and saved["sharded"] > 0
    loss, expected = gradients(split(global_batch(64, True), 64), "infonce", True)
    assert saved["loss"] == pytest.approx(loss, rel=1e-6)
    assert_same_gradients(saved["grads"], expected)
    # The norm clipa clips with is DTensor's total norm, and the one-process norm.
    whole = torch.linalg.vector_norm(torch.stack([g.norm() for g in expected.values()])).item()
    assert saved["norm"] == pytest.approx(saved["dtensor_norm"], rel=1e-6)
    assert saved["norm"] == pytest.approx(whole, rel=1e-5)


@pytest.mark.slow
def test_two_processes_enqueue_every_process_keys(group_checks):
    states = group_checks["queues"]
    local = [state["local"] for state in states]  # each rank's own keys / online features, never gathered
    assert not torch.allclose(local[0]["momentum"][0], local[1]["momentum"][0])  # the ranks saw different data
    for state in states:  # both processes hold the same queues: rank 0's rows, then rank 1's
        for kind in ("momentum", "memory_bank"):
            queue = state[kind]
            for column, name in enumerate(("images", "texts")):
                expected = torch.cat([local[0][kind][column], local[1][kind][column]])
                torch.testing.assert_close(queue[name][:8], expected)
                assert not queue[name][8:].any()
            assert queue["filled"] == 8 and queue["pointer"] == 8


@pytest.mark.slow
def test_fsdp_with_a_locked_tower_the_memory_bank_and_siglip_trains_saves_and_resumes(group_checks, tmp_path):
    """train.shard=fsdp, 2 processes (tests/distributed_fsdp_extras.py, in the group launch): 4 steps, then the
    run as it was at step 2 resumed in the same processes."""
    from safetensors.torch import load_file

    from clipa.train.checkpoint import export_checkpoint

    for case in ("locked_bank", "siglip"):
        runs = group_checks["fsdp_extras"] / case
        seen = [json.loads((runs / f"seen.rank{r}.json").read_text()) for r in (0, 1)]
        assert seen[0] == seen[1], case  # the queue and the whole scalars are the same on both processes
        seen = seen[0]
        assert seen["resumed_start"]["step"] == 2 and seen["resumed_end"] == seen["straight_end"], case
        # The resume replays steps 3 and 4 bitwise and ends with the uninterrupted run's weights.
        assert trajectory(runs / "resumed") == trajectory(runs / "straight") and len(trajectory(runs / "straight")) == 4
        initial = load_file(str(runs / "initial.safetensors"))
        final = load_file(str(runs / "straight" / "final" / "open_clip_model.safetensors"))
        resumed = load_file(str(runs / "resumed" / "final" / "open_clip_model.safetensors"))
        assert final.keys() == resumed.keys() == initial.keys()
        for name in final:
            assert torch.equal(final[name], resumed[name]), (case, name)
        assert not torch.equal(final["text_projection"], initial["text_projection"])  # it trained
        step2 = runs / "straight" / "checkpoints" / "step_000002"
        if case == "locked_bank":
            # The locked image tower: never in the optimizer, every weight as it started, through a resume.
            assert seen["straight_end"]["visual_in_optimizer"] == 0
            visual = [name for name in initial if name.startswith("visual.")]
            assert len(visual) > 10
            for name in visual:
                assert torch.equal(final[name], initial[name]) and torch.equal(resumed[name], initial[name]), name
            # The memory bank: full after 2 steps of 32, and restored exactly as step 2's checkpoint holds it.
            saved = torch.load(step2 / "state.pt", weights_only=True)["queue"]["queues"]
            queue = seen["resumed_start"]["queue"]
            assert (queue["pointer"], queue["filled"]) == (int(saved["pointer"]), int(saved["filled"])) == (0, 64)
            assert torch.equal(torch.tensor(queue["images"]), saved["images"])
            assert torch.equal(torch.tensor(queue["texts"]), saved["texts"]) and saved["texts"].abs().sum() > 0
            assert queue != seen["straight_end"]["queue"]  # steps 3-4 replaced its rows
        else:
            # SigLIP's bias (0-dim, whole on every process under FSDP): trained, saved in the sharded
            # checkpoint, restored from it on resume.
            step2_weights = load_file(str(export_checkpoint(step2, tmp_path / "export") / "open_clip_model.safetensors"))
            assert initial["logit_bias"].item() == -10.0 and final["logit_bias"].item() != -10.0
            assert seen["resumed_start"]["logit_bias"] == step2_weights["logit_bias"].item() != -10.0
            assert seen["resumed_start"]["logit_bias"] != seen["straight_end"]["logit_bias"]
            assert seen["resumed_end"]["logit_bias"] == final["logit_bias"].item()
