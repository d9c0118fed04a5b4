"""Score a saved tiny model partitioned by DeepSpeed ZeRO-3 over the ranks that run this (under torchrun), on the
fixed calibration batches tests/test_sharded.py scores the whole model on.

Usage: score_zero3.py OUT_DIR MODEL_DIR DTYPE CRITERION[:HVP]...
Writes <criterion>_scores_<world>_<rank>.safetensors and checks_<rank>.json: what the worker saw of
the partitions (every weight held only as this rank's share, restored bit-identically after scoring) and the
messages of two refused calls (hvp: exact; batches that do not divide over the ranks).
"""

import json
import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from safetensors.torch import save_file

import earlycrop
from pipeline.distributed import world
from pipeline.sharded import load_partitioned, score_partitioned
from tests.tiny_models import batches

out, folder, dtype, *names = sys.argv[1:]
data = batches("llama", n=4)
torch.set_num_threads(1)


def criterion(name: str) -> earlycrop.Criterion:
    base, _, hvp = name.partition(":")
    return earlycrop.make_criterion(base, hvp=hvp) if hvp else earlycrop.make_criterion(base)


deepspeed.init_distributed(dist_backend="gloo")
rank, size = world()
engine = load_partitioned(folder, dtype=getattr(torch, dtype))
weights = list(engine.module.parameters())
before = [p.ds_tensor.clone() for p in weights]
for name in names:
    scores = score_partitioned(engine, criterion(name), data)
    save_file(scores.to_tensors(), os.path.join(out, f"{name.replace(':', '-')}_scores_{size}_{rank}.safetensors"))
refusals = []
for name, shard in (("earlycrop:exact", data), ("snip", data[:3])):
    try:
        score_partitioned(engine, criterion(name), shard)
    except ValueError as err:
        refusals.append(str(err))
checks = {
    "refusals": refusals,
    "numel_held": sum(p.numel() for p in weights),
    "partition_numel": sum(p.ds_tensor.numel() for p in weights),
    "full_numel": sum(p.ds_numel for p in weights),
    "restored": all(torch.equal(a, p.ds_tensor) for a, p in zip(before, weights)),
}
with open(os.path.join(out, f"checks_{rank}.json"), "w") as f:
    json.dump(checks, f)
dist.barrier()
dist.destroy_process_group()
