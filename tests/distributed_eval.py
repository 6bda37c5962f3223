"""Run under torchrun: retrieval and the linear probe sharded over a real process group (rank 0 writes both
results), then `clipa zeroshot` through the CLI's own app in the same group (every rank writes its exit code and
what it printed), so one launch serves tests/test_evaluate.py's two-process checks.

usage: python -m torch.distributed.run --nproc_per_node N tests/distributed_eval.py MODEL CSV PROBE_ROOT CACHE OUT.json \
    [ZEROSHOT ARGS...]
"""

import json
import sys

from clipa.distributed import leave_process_group
from clipa.evaluate.linear_probe import linear_probe
from clipa.evaluate.models import load_model
from clipa.evaluate.retrieval import retrieval
from clipa.evaluate.sharding import join_launcher


def main(model: str, csv_path: str, probe_root: str, cache: str, out: str, *zeroshot_args: str) -> None:
    accelerator = join_launcher()  # the gloo process group from torchrun's environment, as the CLI does
    loaded = load_model(model)
    result = {"retrieval": retrieval(loaded, "csv", csv_path, batch_size=4),
              "probe": linear_probe(loaded, "imagefolder", probe_root, cache, batch_size=8),
              "world": accelerator.num_processes}
    if accelerator.is_main_process:
        with open(out, "w") as f:
            json.dump(result, f)
    if zeroshot_args:
        from conftest import run_in_process

        cli = run_in_process("zeroshot", *zeroshot_args)
        with open(f"{out}.cli.rank{accelerator.process_index}.json", "w") as f:
            json.dump({"code": cli.returncode, "stdout": cli.stdout, "stderr": cli.stderr}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    leave_process_group()
