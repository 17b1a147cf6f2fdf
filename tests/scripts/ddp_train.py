"""Under torchrun: one short training run per rank (the recipe's networks, small), then
rank 0 saves what the test checks to argv[1]: every rank's first noise draw and its
BatchNorm buffers after training. With argv[2] == "nan", the run writes into argv[3] and
rank 1's loss turns NaN at its second batch of epoch 2; each rank then saves the message
it stopped with."""
import sys

import torch
import torch.distributed as dist

from hvae_fast import distributed as D
from hvae_fast import train as T

ctx = D.setup()
first_noise = []
randn_like = torch.randn_like


def recording_randn_like(t, *a, **k):
    out = randn_like(t, *a, **k)
    if not first_noise:
        first_noise.append(out.detach().clone())
    return out


torch.randn_like = recording_randn_like
nan = len(sys.argv) > 2 and sys.argv[2] == "nan"
if nan and ctx.rank == 1:
    forward, calls = T._Objective.forward, [0]

    def poisoned(self, xb, beta):
        calls[0] += 1
        loss = forward(self, xb, beta)
        return loss * float("nan") if calls[0] == 4 + 2 else loss  # 512 rows, 2 x 64 a step: 4 steps an epoch

    T._Objective.forward = poisoned

config = T.TrainConfig(hidden=16, max_train=512, epochs=2 if nan else 1, progress=False, seed=3)
result = {}
try:
    res = T.train(config, ctx=ctx, log=None, out=sys.argv[3] if nan else None)
    result["buffers"] = {k: v for k, v in res["model"].state_dict().items() if "running" in k}
except T.TrainingDiverged as e:
    result["stopped"] = str(e)
gathered = [None] * ctx.world
dist.all_gather_object(gathered, {"noise": first_noise[0], **result})
if ctx.is_main:
    torch.save(gathered, sys.argv[1])
D.teardown(ctx)
