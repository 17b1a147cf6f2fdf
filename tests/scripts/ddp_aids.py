"""Under torchrun: a short run with the training aids on, rank 1's loss NaN at its second
batch; rank 0 saves every rank's history and final model to argv[1] (the test checks the
ranks skipped the same update and ended with the same weights)."""
import sys

import torch.distributed as dist

from hvae_fast import distributed as D
from hvae_fast import train as T

ctx = D.setup()
if ctx.rank == 1:
    forward, calls = T._Objective.forward, [0]

    def poisoned(self, xb, beta):
        calls[0] += 1
        out = forward(self, xb, beta)
        return tuple(o * float("nan") for o in out) if calls[0] == 2 else out

    T._Objective.forward = poisoned

config = T.TrainConfig(hidden=16, max_train=512, epochs=2, progress=False, seed=3, skip_threshold=1e6,
                       grad_clip=100.0, ema=0.9, lr_schedule="cosine", lr_warmup_steps=2, kl_warmup_steps=5,
                       free_bits=0.1, kl_balance=True)
res = T.train(config, ctx=ctx, log=None)
gathered = [None] * ctx.world
dist.all_gather_object(gathered, {"history": res["history"], "model": res["model"].state_dict()})
if ctx.is_main:
    import torch
    torch.save(gathered, sys.argv[1])
D.teardown(ctx)
