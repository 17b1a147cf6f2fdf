"""Adamax, the recipe's optimizer, with its step fused into one pass per tensor.

hvae_fast.optim.Adamax is torch.optim.Adamax (same arguments, state and state_dict, so
checkpoints move between the two) whose step runs hvae_fast.ops.adamax_: one call for all
parameters of a device and dtype, one read and one write of each tensor. torch's step runs
about six ops per parameter and allocates a |grad| temporary for each; on a CPU, for a
model of small layers the per-op overhead dominates, for a large layer the temporary's page
faults. Options the fused step does not cover (maximize, capturable, differentiable,
foreach/fused requests, sparse, complex or non-contiguous tensors) run torch's own step.
"""
from collections import defaultdict

import torch

from . import ops  # noqa: F401  (defines torch.ops.hvae_fast.adamax_ without the compiled module)

__all__ = ["Adamax"]


class Adamax(torch.optim.Adamax):

    def _fusable(self, group):
        return not (group["maximize"] or group["capturable"] or group["differentiable"]
                    or group.get("foreach") or group.get("fused"))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rest = []
        for group in self.param_groups:
            if not self._fusable(group):
                rest.append(group)
                continue
            beta1, beta2 = group["betas"]
            batches = defaultdict(lambda: ([], [], [], [], []))
            slow = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if g.is_sparse or p.is_complex() or not (p.is_contiguous() and g.is_contiguous()):
                    slow.append(p)
                    continue
                state = self.state[p]
                if len(state) == 0:  # torch.optim.Adamax's state, so that state_dicts are interchangeable
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_inf"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if not (state["exp_avg"].is_contiguous() and state["exp_inf"].is_contiguous()):
                    slow.append(p)
                    continue
                state["step"] += 1
                b = batches[(p.device, p.dtype)]
                b[0].append(p)
                b[1].append(g)
                b[2].append(state["exp_avg"])
                b[3].append(state["exp_inf"])
                b[4].append(-group["lr"] / (1 - beta1 ** state["step"].item()))
            for params, grads, exp_avgs, exp_infs, neg_clrs in batches.values():
                # the raw op: its kernel checks these lists (ops.adamax_'s Python checks would
                # add ~5 us per parameter to every step)
                torch.ops.hvae_fast.adamax_(params, grads, exp_avgs, exp_infs, neg_clrs, float(beta1), float(beta2),
                                            float(group["eps"]), float(group["weight_decay"]))
            if slow:
                rest.append({**group, "params": slow})
        if rest:
            torch_step = torch.optim.Adamax.step
            if getattr(torch_step, "hooked", False):  # run the step hooks once, around this step
                torch_step = torch_step.__wrapped__
            groups, self.param_groups = self.param_groups, rest
            try:
                torch_step(self)
            finally:
                self.param_groups = groups
        return loss
