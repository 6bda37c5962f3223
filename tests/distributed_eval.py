"""Run under torchrun: zero-shot evaluation sharded over a real process group; rank 0 writes the result.

usage: python -m torch.distributed.run --nproc_per_node N tests/distributed_eval.py MODEL DATA_ROOT OUT.json
"""

import json
import sys

from accelerate import Accelerator

from clipa.distributed import leave_process_group
from clipa.evaluate.models import load_model
from clipa.evaluate.zeroshot import zeroshot


def main(model: str, data_root: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)  # initialises the gloo process group from torchrun's environment
    result = zeroshot(load_model(model), "imagefolder", data_root, batch_size=16)
    if accelerator.is_main_process:
        result["world"] = accelerator.num_processes
        with open(out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
    leave_process_group()
