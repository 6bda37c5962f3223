"""Run under torchrun: several helper checks, one after the other, in one process group.

usage: python -m torch.distributed.run --nproc_per_node 2 tests/distributed_run.py HELPER ARGS... [-- HELPER ARGS...]

HELPER is a module beside this file with a `main(*args)` (distributed_grads, distributed_queue). A launch
costs three process starts (~4 CPU-s of imports each); a check a fraction of a second. The group is left
once, after the last check.
"""

import importlib
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from clipa.distributed import leave_process_group  # noqa: E402

if __name__ == "__main__":
    checks = [[]]
    for arg in sys.argv[1:]:
        checks.append([]) if arg == "--" else checks[-1].append(arg)
    for helper, *args in checks:
        importlib.import_module(helper).main(*args)
    leave_process_group()
