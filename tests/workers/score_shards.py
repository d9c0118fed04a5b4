"""Score a tiny float64 model over fixed calibration batches, sharded over however many ranks run this.

Usage: score_shards.py OUT_DIR CRITERION...  (under torchrun, or plain python for one process)
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file

import earlycrop
from pipeline.distributed import check_same_on_all_ranks, score_sharded, world
from tests.tiny_models import batches, build

out, criteria = sys.argv[1], sys.argv[2:]
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    dist.init_process_group("gloo")
rank, size = world()
model = build("llama").double()
for criterion in criteria:
    scores = score_sharded(model, earlycrop.make_criterion(criterion), batches("llama", n=4))
    plan = earlycrop.make_plan(model, scores, earlycrop.SelectionConfig(heads=0.5, mlp=0.5, layout="global"))
    check_same_on_all_ranks(plan.to_json(), "plan")
    save_file(scores.to_tensors(), os.path.join(out, f"{criterion}_scores_{size}_{rank}.safetensors"))
    with open(os.path.join(out, f"{criterion}_plan_{size}_{rank}.json"), "w") as f:
        json.dump(plan.to_dict(), f)
if dist.is_initialized():
    dist.barrier()
    dist.destroy_process_group()
