"""Muon for the transformer blocks' hidden matrices, AdamW for everything else, in one optimizer.

``--optimizer muon`` (trainer.model.build_optimizer) puts the 2-D weights of the blocks' linear
layers in Muon groups and the embeddings, the (tied) output layer, the norms and the biases in AdamW
groups of one ``MuonWithAdamW`` (the shape of modded-nanogpt's MuonWithAuxAdam): one object, so the
checkpoints (both states in one state_dict, every entry a tensor), the gradient scaler, accumulation,
DDP, the OOM ladder and resume treat it as they treat AdamW.

Muon follows torch.optim.Muon (torch 2.13): Nesterov momentum, five Newton-Schulz steps with Keller
Jordan's coefficients, and its learning-rate adjustment sqrt(max(1, out / in)). GPT-2's weights are
transformers' Conv1D, stored (in, out), the transpose of nn.Linear's (out, in): they are
orthogonalised and their lr adjusted on the (out, in) view, so a Conv1D weight moves exactly as the
same nn.Linear would (Llama's are nn.Linear already). The iteration runs in ``ns_dtype``, which
trainer.device.newton_schulz_dtype decides from the device: torch always uses bf16, emulated (slow)
on a T4, a P100 and most CPUs.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, NamedTuple

import torch
from torch.optim.adamw import adamw
from transformers.pytorch_utils import Conv1D

MUON, ADAMW = "muon", "adamw"        # a param group's "algorithm"
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)     # torch.optim.Muon's (Keller Jordan's) quintic
NS_STEPS = 5
NS_EPS = 1e-7                                   # floor of the norm the update is divided by
# On a CPU, matrices up to this many entries are orthogonalised on one thread. Each of the iteration's
# small matrix products ends at a barrier of torch's thread pool; on a machine whose other cores are busy
# (a study's other worker, another process) a descheduled thread holds every barrier for a time slice.
# Measured on this project's 2-core CPU with its other core busy: 281 ms for a 384 x 128 update on 2
# threads, 2.7 ms on one (a study's trial went from 6 s a step to 0.12 s). Idle, one thread costs a
# little: the optimizer step at quick's size (2 x 128, Llama) 22.0 ms against 20.5 (medians of 6 rounds),
# about 1% of a training step. Larger matrices keep every thread.
CPU_ONE_THREAD_ENTRIES = 1 << 20


class Matrix(NamedTuple):
    name: str
    param: torch.nn.Parameter
    in_out: bool          # stored (in, out): transformers' Conv1D; nn.Linear is (out, in)


def hidden_matrices(model: torch.nn.Module) -> list[Matrix]:
    """The weights Muon trains: those of the model's linear layers (nn.Linear and Conv1D), the
    embeddings and the (tied) output layer excepted. For GPT-2: each block's attn.c_attn, attn.c_proj,
    mlp.c_fc and mlp.c_proj; for Llama: each layer's self_attn.q_proj, k_proj, v_proj, o_proj and
    mlp.gate_proj, up_proj, down_proj (its RMSNorm gains are 1-D: AdamW's)."""
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    found = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight.requires_grad \
                and id(module.weight) not in embeddings:
            found.append(Matrix(f"{name}.weight", module.weight, isinstance(module, Conv1D)))
    return found


def orthogonalise(update: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's approximation of U V^T for ``update`` = U S V^T, a 2-D (out, in) tensor,
    computed in ``dtype``; its singular values land near 1 (about 0.7 to 1.2), not on it.

    In bf16 it is torch's ``_zeropower_via_newtonschulz`` operation for operation (identical
    results). In fp16 the division by the norm is done in fp32 first: the entries are then at most
    1, whereas a norm past 65504 would overflow fp16 to inf and the update to NaN.
    """
    a, b, c = NS_COEFFICIENTS
    x = update.contiguous()          # the (out, in) view of a Conv1D weight laid out as nn.Linear's
    if dtype == torch.float16:
        x = (x.float() / x.float().norm().clamp(min=NS_EPS)).half()
    else:
        x = x.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.mT                     # the Gram matrix of the shorter side: (min, min)
    if dtype != torch.float16:
        x = x / x.norm().clamp(min=NS_EPS)      # spectral norm <= Frobenius norm = 1
    for _ in range(NS_STEPS):
        gram = x @ x.mT
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)      # b G + c G^2
        x = torch.addmm(x, poly, x, beta=a)                         # a X + (b G + c G^2) X
    return x.mT if tall else x


def adjusted_lr(lr: float, out_features: int, in_features: int) -> float:
    """torch.optim.Muon's default ("original") adjustment: a tall matrix's orthogonal update has a
    smaller RMS, so it takes a larger step."""
    return lr * math.sqrt(max(1, out_features / in_features))


class MuonWithAdamW(torch.optim.Optimizer):
    """One optimizer whose param groups each name their ``algorithm``.

    Muon groups: ``lr``, ``momentum`` (Nesterov), ``weight_decay`` (decoupled, lr x wd a step, as
    torch's), ``in_out`` (the params are stored (in, out)). AdamW groups: ``lr``, ``betas``, ``eps``,
    ``weight_decay``, ``fused``, stepped by torch's functional AdamW. State: Muon's
    ``momentum_buffer``; AdamW's ``step``, ``exp_avg``, ``exp_avg_sq``, as torch.optim.AdamW keeps them.
    ``ns_dtype`` is not a group setting: it belongs to the device, not to the checkpoint.
    """

    def __init__(self, param_groups: list[dict], ns_dtype: torch.dtype = torch.float32):
        for group in param_groups:
            if group.get("algorithm") not in (MUON, ADAMW):
                raise ValueError(f"each param group needs 'algorithm': {MUON!r} or {ADAMW!r}")
            if group["algorithm"] == MUON and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon takes 2-D matrices only")
        super().__init__(param_groups, defaults={})
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["algorithm"] == ADAMW:
                self._adamw(group, params)
                continue
            with one_thread_if_small(params):
                self._muon(group, params)
        return loss

    def _muon(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum = group["lr"], group["momentum"]
        for p in params:
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - momentum)              # buf = momentum * buf + (1 - momentum) * grad
            update = p.grad.lerp(buf, momentum)          # Nesterov: look one momentum step ahead
            if group["in_out"]:
                update = update.mT                       # (out, in), as the math and the lr rule mean it
            out_features, in_features = update.shape
            ortho = orthogonalise(update, self.ns_dtype)
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(ortho.mT if group["in_out"] else ortho, alpha=-adjusted_lr(lr, out_features, in_features))

    def _adamw(self, group: dict, params: list[torch.Tensor]) -> None:
        for p in params:
            state = self.state[p]
            if not state:       # as torch.optim.AdamW: the fused kernel wants the step on the device
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if group["fused"] else "cpu")
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw(params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
              [], [s["step"] for s in states], fused=group["fused"], amsgrad=False, beta1=beta1, beta2=beta2,
              lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


@contextlib.contextmanager
def one_thread_if_small(params: list[torch.Tensor]) -> Iterator[None]:
    """torch's CPU thread pool narrowed to one thread while small CPU matrices are orthogonalised
    (CPU_ONE_THREAD_ENTRIES says why); a GPU's, and large matrices, are left as they are."""
    threads = torch.get_num_threads()
    small = all(p.device.type == "cpu" and p.numel() <= CPU_ONE_THREAD_ENTRIES for p in params)
    if not small or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def same_optimizer_only(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` refusing to load the state of the other --optimizer, naming the flag (torch would
    say only that the number of groups differs). AdamW's groups have no 'algorithm'."""
    def kind(groups: list[dict]) -> str:
        return MUON if any(g.get("algorithm") == MUON for g in groups) else ADAMW

    def check(opt: torch.optim.Optimizer, state_dict: dict) -> None:
        saved, mine = kind(state_dict["param_groups"]), kind(opt.param_groups)
        if saved != mine:
            raise ValueError(f"it was saved by --optimizer {saved} and this run has --optimizer {mine}; resume "
                             f"with --optimizer {saved}, or start a fresh run")
    optimizer.register_load_state_dict_pre_hook(check)
    return optimizer
