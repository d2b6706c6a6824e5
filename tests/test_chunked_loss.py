"""The chunked next-token loss (trainer.loss) against the full one it replaces: the same loss and
gradients, in fp32 and under bf16 autocast, with gradient checkpointing, and never a whole
(tokens, vocabulary) tensor."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from trainer.loss import chunked_cross_entropy
from trainer.memory import enable_gradient_checkpointing
from trainer.model import LanguageModelLoss, next_token_loss

VOCAB, WIDTH, B, T = 1000, 32, 3, 32     # 96 tokens a batch
TOKENS = B * T


def make_model(dropout: float = 0.0) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=WIDTH, n_layer=2, n_head=4, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T + 1), generator=torch.Generator().manual_seed(1))


def loss_and_grads(model, batch, chunk_tokens, reduction="mean", autocast=contextlib.nullcontext, seed=0):
    """The loss and every parameter's gradient; the backward gets a factor as the loss scaler's."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)           # the same dropout masks for both paths
    loss = next_token_loss(model, batch, autocast, reduction, chunk_tokens)
    (loss * 0.37).backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_close_fp32(grad: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Equal within fp32 rounding (sums of products taken in another order): the absolute
    tolerance is relative to the tensor's largest gradient, as a sum reduction makes them large."""
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item(), msg=name)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_tokens", [7, 32, 40, TOKENS, 1000])   # 7 and 40 do not divide 96
def test_chunked_loss_and_gradients_equal_the_full_ones_in_fp32(batch, chunk_tokens, reduction):
    model = make_model()
    full_loss, full_grads = loss_and_grads(model, batch, 0, reduction)
    loss, grads = loss_and_grads(model, batch, chunk_tokens, reduction)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    assert grads.keys() == full_grads.keys()
    for name, grad in grads.items():
        assert_close_fp32(grad, full_grads[name], name)


def test_without_gradients_the_chunked_sum_is_the_full_sum(batch):
    model = make_model().eval()      # as evaluation runs it: no_grad, reduction="sum"
    with torch.no_grad():
        full = next_token_loss(model, batch, reduction="sum", chunk_tokens=0)
        chunked = next_token_loss(model, batch, reduction="sum", chunk_tokens=40)
    assert chunked.item() == pytest.approx(full.item(), rel=1e-6)


def test_under_bf16_autocast_the_chunked_loss_is_the_full_paths(batch):
    """Both paths round the same products to bf16 (8 bits of mantissa): the logits are the same bf16
    values, so the fp32 losses differ only by the order of summation (1e-6 relative). The gradients
    are rounded to bf16 at other points (the logits' gradient before the 1/N and scaler factors
    rather than after them; the output weight's gradient summed over chunks in fp32), so the two
    paths' gradients are two bf16 roundings of the same fp32 ones: each must be as close to the fp32
    gradient as the other (measured 1.33x at most; allowed 2x), and the two within 2% of each other
    (measured 0.65%)."""
    model = make_model()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    full_loss, full_grads = loss_and_grads(model, batch, 0, autocast=bf16)
    _, fp32_grads = loss_and_grads(model, batch, 0)
    loss, grads = loss_and_grads(model, batch, 40, autocast=bf16)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    for name, grad in grads.items():
        assert relative(grad, fp32_grads[name]) <= 2 * relative(full_grads[name], fp32_grads[name]), name
        assert relative(grad, full_grads[name]) < 2e-2, name


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(batch):
    model = make_model(dropout=0.1)
    full_loss, full_grads = loss_and_grads(model, batch, 0, seed=5)
    enable_gradient_checkpointing(model)
    loss, grads = loss_and_grads(model, batch, 40, seed=5)      # blocks recomputed with their masks
    assert loss.item() == pytest.approx(full_loss.item(), rel=1e-6)
    for name, grad in grads.items():
        assert_close_fp32(grad, full_grads[name], name)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an operation creates, forward and backward (deterministic:
    it counts shapes, not bytes from an allocator)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def largest_tensor_of_loss(model, batch, chunk_tokens) -> tuple[int, int]:
    """(largest tensor created, largest tensor saved for backward) by the loss's forward and backward."""
    saved = []
    with LargestTensor() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t):
        next_token_loss(model, batch, chunk_tokens=chunk_tokens).backward()
    return mode.largest, max(saved)


def test_the_chunked_loss_never_holds_the_whole_logits(batch):
    model = make_model()
    assert VOCAB * WIDTH < 40 * VOCAB     # so that the output weight is smaller than a chunk's logits
    full_created, full_saved = largest_tensor_of_loss(model, batch, 0)
    assert full_created >= TOKENS * VOCAB and full_saved >= TOKENS * VOCAB    # the counter sees them
    created, saved = largest_tensor_of_loss(model, batch, 40)
    assert created == 40 * VOCAB          # one chunk's logits, the largest tensor of the whole pass
    assert saved <= VOCAB * WIDTH         # kept for backward: the gradients, never logits


def test_chunked_cross_entropy_refuses_a_reduction_it_cannot_chunk():
    with pytest.raises(ValueError, match="reduction 'none'"):
        chunked_cross_entropy(torch.zeros(4, 2), torch.zeros(3, 2), torch.zeros(4, dtype=torch.long), 2, "none")


def test_language_model_loss_is_the_models_loss_and_keeps_the_model(batch):
    model = make_model()
    module = LanguageModelLoss(model, chunk_tokens=40)
    assert module.lm is model
    assert [p for p in module.parameters()] == [p for p in model.parameters()]    # DDP syncs the model's
    assert module(batch).item() == pytest.approx(next_token_loss(model, batch, chunk_tokens=0).item(), rel=1e-6)
    with torch.no_grad():
        assert module(batch, reduction="sum").item() == pytest.approx(
            next_token_loss(model, batch, reduction="sum", chunk_tokens=0).item(), rel=1e-6)
