"""clipa/evaluate/sharding.py in a real 2-process gloo group: an uneven split (3 items over 2
processes), a process with nothing to do (1 item over 2), and results gathered back in order."""

import json

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    from clipa.evaluate.sharding import all_true, gather_batches, shard, shard_range, sum_over_processes

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        result = {"three": list(shard(list(range(3)))), "one": list(shard(["only"])), "range": list(shard_range(5))}
        # each process encodes its own items as (index, value = 10 * index); the rank with none sends nothing
        mine = [i for i in shard_range(3)]
        batches = ([torch.tensor(mine)], [torch.tensor(mine) * 10.0]) if rank == 0 else ([], [])
        if rank == 1:  # this rank's one item arrives as a batch of its own
            batches = ([torch.tensor([1])], [torch.tensor([10.0])])
        index, values = gather_batches(*batches)
        result["gathered"] = [index.tolist(), values.tolist()]
        empty = gather_batches([], [])
        result["nothing_anywhere"] = empty is None
        one_sided = gather_batches(*(([torch.tensor([0])], [torch.tensor([5.0])]) if rank == 0 else ([], [])))
        result["one_sided"] = [one_sided[0].tolist(), one_sided[1].tolist()]
        result["sum"] = sum_over_processes(torch.tensor([rank + 1.0]), "cpu").tolist()
        result["all_true_mixed"] = all_true(rank == 0)
        result["all_true_both"] = all_true(True)
    finally:
        dist.destroy_process_group()
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)


def test_uneven_and_empty_shards_gather_in_order_over_two_processes(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["three"], r1["three"]) == ([0, 2], [1])
    assert (r0["one"], r1["one"]) == (["only"], [])  # the second process has nothing to do
    assert (r0["range"], r1["range"]) == ([0, 2, 4], [1, 3])
    for r in (r0, r1):  # every process gets every result, in the original order
        assert r["gathered"] == [[0, 1, 2], [0.0, 10.0, 20.0]]
        assert r["nothing_anywhere"] is True
        assert r["one_sided"] == [[0], [5.0]]  # one process produced everything, the other none
        assert r["sum"] == [3.0]
        assert r["all_true_mixed"] is False and r["all_true_both"] is True
