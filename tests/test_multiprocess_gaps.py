"""What a 2-process run does besides training (issue 32, gaps): SIGTERM to one process stops both at the
same step with a checkpoint and exit 0, and the resume ends where an uninterrupted run ends; only rank 0
writes trackers; the in-training evaluation runs over both processes, once, with a 1-process evaluation's
numbers; and a two-node launch (two torchrun agents, static rendezvous on localhost) gives each node its
rank and its own share of the shards; an explicit --resume on two nodes replays the run bitwise.

Three launches of two processes: an uninterrupted run (one node, two processes) as the reference, a
two-node run stopped by SIGTERM to node 1's process, and its resume (--resume the checkpoint it saved).
Each process's data command logs the launcher's environment it saw and the shard it read.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_checkpoint import trajectory, wait_for_logged_steps
from test_trackers import _approx, _expected, _tensorboard

from clipa.train import trackers

from conftest import MICRO, run_in_process, run_torchrun

pytestmark = pytest.mark.slow  # real 2-process groups, as tests/test_agree.py

SHARDS, PER_SHARD, STEPS, BATCH = 12, 16, 6, 32  # one epoch: every process reads 6 shards of 16

# Appends "node-rank local-rank rank local-world-size world-size shard" to $READS.$RANK, then streams the shard.
READER = 'echo "$GROUP_RANK $LOCAL_RANK $RANK $LOCAL_WORLD_SIZE $WORLD_SIZE $(basename "$1")" >> "$READS.$RANK"\n' \
         'exec cat "$1"\n'


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    result = run_in_process("data", "synth", root / "synth", "--num-samples", SHARDS * PER_SHARD, "--shard-size",
                            PER_SHARD, "--image-size", 32, "--eval-per-class", 20)
    assert result.returncode == 0, result.stderr
    (root / "read.sh").write_text(READER)
    return root


def args(data, out):
    # clipa-micro: what is tested here (stops, ranks, shards, trackers, evaluation) does not depend on the model's size
    return ["-m", "clipa", "pretrain", "tiny/pretrain", MICRO, f"train.global_batch_size={BATCH}",
            f"train.total_samples={BATCH * STEPS}", "train.log_every_steps=1", "optim.warmup_steps=1",
            f"data.train=pipe:sh {data / 'read.sh'} {data / 'synth' / 'train'}/{{00000..{SHARDS - 1:05d}}}.tar",
            "data.num_workers=0", "data.shuffle_buffer=0", "data.interleave=1", "checkpoint.every_steps=2",
            "checkpoint.keep_last=10", "eval.every_steps=2", 'eval.zeroshot=["imagefolder"]',
            f"eval.data_root={data / 'synth' / 'eval'}", 'log.trackers=["tensorboard"]', "train.dist_timeout_s=120",
            "--out", out]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(command, cwd, reads):
    """Two torchrun agents, one process each, joined by a static rendezvous on localhost (node ranks as given)."""
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", READS=str(reads))
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                              "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
                              *map(str, command)], cwd=cwd, env=env, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE) for node in (0, 1)]


def worker_of(agent: subprocess.Popen, timeout=120) -> int:
    """The pid of the training process a torchrun agent started."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
        for pid in children:
            if "clipa" in Path(f"/proc/{pid}/cmdline").read_text():
                return int(pid)
        time.sleep(0.05)
    raise TimeoutError("torchrun started no clipa process")


def finish(agents, timeout=400):
    outs = [agent.communicate(timeout=timeout) for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], [o[1][-3000:] for o in outs]
    return [o[0] for o in outs]


def reads(prefix: Path, rank: int) -> list[tuple[str, str]]:
    """(launcher environment, shard) per read of one process; the environment as "node local rank lws ws"."""
    lines = Path(f"{prefix}.{rank}").read_text().split("\n")
    return [(line.rsplit(" ", 1)[0], line.rsplit(" ", 1)[1]) for line in lines if line]


def training_shards(rows) -> list[str]:
    # Before training each process checks that the source yields a sample: its first read is the first shard.
    assert rows[0][1] == "00000.tar", rows
    return [shard for _, shard in rows[1:]]


def eval_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: {k: v for k, v in row.items() if k.startswith("zeroshot/")}
            for row in rows if "zeroshot/imagefolder/acc1" in row}


def test_sigterm_trackers_evaluation_and_two_nodes(tmp_path, data):
    from clipa.evaluate.models import load_model
    from clipa.evaluate.zeroshot import zeroshot

    # 1. The reference: one node, two processes, uninterrupted.
    straight = tmp_path / "straight"
    result = run_torchrun(*args(data, straight), cwd=tmp_path, env={"READS": str(tmp_path / "reads-straight")})
    assert result.stdout.count("pretrain finished") == 1  # only rank 0 reports
    assert "x 2 process(es), cpu" in " ".join(result.stdout.split())  # one node: no node count
    expected = trajectory(straight)
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, STEPS + 1))  # one row per step, not two

    # Evaluation during training: every 2 steps and at the end, one row each (not one per process), with the
    # numbers a 1-process evaluation of that step's weights gives (each process evaluated half the images).
    evals = eval_rows(straight)
    lines = (straight / "metrics.jsonl").read_text().splitlines()
    assert sorted(evals) == [2, 4, 6] and sum("zeroshot/" in line for line in lines) == 3
    assert result.stdout.count("zero-shot imagefolder") == 3
    for step, weights in ((2, straight / "checkpoints" / "step_000002"), (6, straight / "final")):
        alone = zeroshot(load_model(str(weights)), "imagefolder", str(data / "synth" / "eval"))["metrics"]
        for metric in ("acc1", "acc5", "mean_per_class_recall"):
            assert evals[step][f"zeroshot/imagefolder/{metric}"] == pytest.approx(alone[metric], abs=1e-9), (step, metric)
    assert len({tuple(row.values()) for row in evals.values()}) > 1, evals  # each saw its own step's weights

    # Trackers: rank 0 alone writes them. TensorBoard holds exactly metrics.jsonl's numbers, each (tag, step)
    # once (_tensorboard raises on a second), from one writer. (Three things keep rank 1 out: the trainer
    # starts trackers on rank 0 only, RunLog drops rows on other ranks, and accelerate's own trackers act on
    # its main process only; this checks the outcome, and fails when RunLog writes on every rank.)
    _approx(_tensorboard(straight), _expected(straight))
    assert len(list((straight / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 1

    # 2. Two nodes: node 1's process alone gets SIGTERM after step 1. Both stop after the same step and exit 0.
    run = tmp_path / "two-nodes"
    agents = launch_two_nodes(args(data, run), tmp_path, tmp_path / "reads-first")
    wait_for_logged_steps(run, 1)
    os.kill(worker_of(agents[1]), signal.SIGTERM)
    out0, out1 = finish(agents)
    assert out1.strip() == ""  # rank 1 reports nothing
    stopped = [line for line in out0.splitlines() if line.startswith("stopped by SIGTERM after step")]
    assert len(stopped) == 1, out0
    step = int(stopped[0].split("after step ")[1].split("/")[0])
    assert 1 <= step < STEPS and not (run / "final").exists()
    saved = run / "checkpoints" / f"step_{step:06d}"
    assert (run / "checkpoints" / "LATEST").read_text().strip() == saved.name
    # Both processes saved at that step (each writes its own RNG state into the same checkpoint).
    assert {p.name for p in saved.glob("rng_rank*.pt")} == {"rng_rank0.pt", "rng_rank1.pt"}
    state = torch.load(saved / "state.pt", weights_only=True)
    assert state["step"] == step and state["data_position"]["processes"] == 2
    assert f"{STEPS} steps of {BATCH} = 16 x 1 accumulation x 2 process(es) on 2 nodes (1 per node)," \
        in " ".join(out0.split())

    # 3. An explicit --resume of that checkpoint on both nodes ends where the uninterrupted run ended: steps
    # after it (random patch masks, each rank's data position) replay bitwise. (The same command without
    # --resume resumes a 2-process run in tests/test_agree.py.)
    agents = launch_two_nodes([*args(data, run), "--resume", saved], tmp_path, tmp_path / "reads-resume")
    out0, _ = finish(agents)
    assert f"resuming from {saved} (--resume) at step {step}/{STEPS}" in " ".join(out0.split())
    assert trajectory(run) == expected  # every step's loss, bitwise (gloo is deterministic on CPU)
    assert eval_rows(run) == evals
    # After a stop and a resume: two TensorBoard writers (one per launch, rank 0's), each step once.
    _approx(_tensorboard(run), _expected(run))
    assert len(list((run / trackers.TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2

    # Each node's process: its node rank, local rank 0, one process per node, two in all; under one node,
    # both processes are node 0 with local ranks 0 and 1.
    env = {"first": [reads(tmp_path / "reads-first", r) for r in (0, 1)],
           "resume": [reads(tmp_path / "reads-resume", r) for r in (0, 1)],
           "straight": [reads(tmp_path / "reads-straight", r) for r in (0, 1)]}
    for launch in ("first", "resume"):
        assert {e for e, _ in env[launch][0]} == {"0 0 0 1 2"} and {e for e, _ in env[launch][1]} == {"1 0 1 1 2"}
    assert {e for e, _ in env["straight"][0]} == {"0 0 0 2 2"} and {e for e, _ in env["straight"][1]} == {"0 1 1 2 2"}
    # Each node read its own shards: disjoint, together every shard once (one epoch), the same share as
    # the same rank read under one node.
    straight_shares = [training_shards(env["straight"][r]) for r in (0, 1)]
    assert all(len(share) == len(set(share)) == SHARDS // 2 for share in straight_shares)
    assert set(straight_shares[0]) | set(straight_shares[1]) == {f"{i:05d}.tar" for i in range(SHARDS)}
    for rank in (0, 1):
        node_share = set(training_shards(env["first"][rank])) | set(training_shards(env["resume"][rank]))
        assert node_share == set(straight_shares[rank]), rank
