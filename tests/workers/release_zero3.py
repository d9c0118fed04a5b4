"""Two ZeRO-3 training engines on a tiny model (one rank, under torchrun); one is dropped plainly, the other
released with `pipeline.distributed.release_zero3`. Prints, as JSON, whether each engine's optimizer (its fp32
partitions and Adam moments) is still alive after the last reference to the engine is gone.

Usage: release_zero3.py
"""

import gc
import json
import weakref

import deepspeed
import torch

from pipeline.distributed import release_zero3
from pipeline.sharded import zero3_config
from tests.tiny_models import build

deepspeed.init_distributed(dist_backend="gloo")
torch.set_num_threads(1)


def engine_and_optimizer_ref():
    model = build("llama")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config=zero3_config(1))
    return engine, weakref.ref(engine.optimizer)


alive = {}
for how in ("dropped", "released"):
    engine, optimizer = engine_and_optimizer_ref()
    if how == "released":
        release_zero3(engine)
    del engine
    gc.collect()
    alive[how] = optimizer() is not None
print(json.dumps(alive))
