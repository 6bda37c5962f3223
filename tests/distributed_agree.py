"""Run under torchrun: clipa.distributed's collectives in a real 2-process gloo group.

Each rank writes what it saw to OUT.rank{R}.json: the agreed minimum of different values, rank 0's
broadcast decision, and the error every rank raised when only rank 1 failed inside `agreed()`.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_agree.py OUT
"""

import json
import sys

import torch

from clipa.distributed import agreed, agreed_min, broadcast_value, leave_process_group
from clipa.errors import ClipaError


def main(out: str) -> None:
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    seen = {"min": agreed_min(5 - 2 * rank),  # 5 on rank 0, 3 on rank 1
            "decision": broadcast_value("step_000004" if rank == 0 else "rank 1's own idea")}
    try:
        with agreed():
            if rank == 1:
                raise ClipaError("data.train: /only/on/node0.tar does not exist")
        seen["error"] = None
    except ClipaError as err:
        seen["error"] = str(err)
    with agreed():  # nothing failed: nobody raises
        pass
    with open(f"{out}.rank{rank}.json", "w") as f:
        json.dump(seen, f)
    leave_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
