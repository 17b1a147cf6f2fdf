"""One optimizer step of the one-level VAE (no BatchNorm), noise-free, on a fixed batch.

Under torchrun each rank takes its slice of the batch through hvae_fast.distributed;
run plainly it takes the whole batch. Rank 0 (or the single process) saves the
parameters to argv[1]."""
import sys

import torch

from hvae_fast import OneLevelVAE
from hvae_fast import distributed as D

torch.randn_like = torch.zeros_like  # noise-free: the ranks draw no comparable noise
ctx = D.setup()
torch.manual_seed(0)
model = OneLevelVAE.from_config()
x = torch.randint(0, 17, (32, 64), generator=torch.Generator().manual_seed(1)).float()
net = model if ctx is None else D.wrap(model, ctx)
opt = torch.optim.SGD(net.parameters(), lr=0.1)  # linear in the gradient: Adamax's first step is ~sign(g)
loss = net(x if ctx is None else D.shard(x, ctx))
loss.backward()
opt.step()
if ctx is None or ctx.is_main:
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[1])
D.teardown(ctx)
