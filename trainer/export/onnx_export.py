"""A trained model as ONNX, checked in onnxruntime against PyTorch before it is kept.

The graph maps ``input_ids`` (batch, sequence; int64) to ``logits`` (batch, sequence, vocab)
with both axes dynamic up to the model's context length, for a GPT-2 or a Llama (--arch). vocab
is the tokenizer's: the columns of the ids that pad the model's vocabulary to a multiple of 64
(trainer.model.padded_vocab), never targets, are cut from the graph's output. It carries no key/value cache:
generation with it recomputes the whole prefix for each new token, so it suits scoring and
short continuations; ``python -m trainer.generate`` stays the fast path for long samples.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from trainer.errors import CheckpointError
from trainer.files import TMP_PREFIX

OPSET = 18              # onnxruntime >= 1.14 runs it; torch.onnx's exporter targets it by default
MAX_ABS_DIFF = 1e-4     # an export whose logits differ more than this from PyTorch's is refused


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    size_bytes: int
    opset: int
    max_abs_diff: float      # onnxruntime vs PyTorch logits on the check input


class _Logits(torch.nn.Module):
    """The model as a pure function input_ids -> logits of the first ``vocab_size`` ids (no cache,
    no dict output)."""

    def __init__(self, model: torch.nn.Module, vocab_size: int):
        super().__init__()
        self.model, self.vocab_size = model, vocab_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits[..., :self.vocab_size]


def check_input(vocab_size: int, context: int) -> torch.Tensor:
    """A fixed (2, min(16, context)) batch of token ids: the same check on every export."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, min(16, context)), generator=generator)


def export_onnx(model: torch.nn.Module, out: Path, vocab_size: int | None = None) -> OnnxExport:
    """Write ``out`` (via a temporary file), verified in onnxruntime; raise CheckpointError otherwise.
    ``vocab_size``: the tokenizer's, whose logits the graph outputs (None: the model's, padding included)."""
    import onnxruntime as ort   # noqa: F401 - fail before the slow export when it is missing

    model = model.eval().float()
    context = model.config.max_position_embeddings     # GPT2Config maps the name to n_positions
    vocab_size = vocab_size or model.config.vocab_size
    wrapped = _Logits(model, vocab_size).eval()
    ids = check_input(vocab_size, context)
    out = Path(out)
    tmp = out.with_name(f"{TMP_PREFIX}{out.name}-{os.getpid()}")
    batch, seq = torch.export.Dim("batch", min=1, max=4096), torch.export.Dim("sequence", min=1, max=context)
    try:
        with contextlib.redirect_stdout(io.StringIO()), _quiet_exporter():   # it narrates every pass
            torch.onnx.export(wrapped, (ids,), str(tmp), input_names=["input_ids"], output_names=["logits"],
                              dynamic_shapes={"input_ids": {0: batch, 1: seq}}, opset_version=OPSET,
                              dynamo=True, external_data=False)
        diff = max_abs_diff(wrapped, tmp, ids)
        if not diff <= MAX_ABS_DIFF:
            raise CheckpointError(f"the ONNX export's logits differ from PyTorch's by {diff:.3g} (more than "
                                  f"{MAX_ABS_DIFF:g}); nothing was written to {out}")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return OnnxExport(out, out.stat().st_size, OPSET, diff)


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter warns about torchvision ops and pytree internals that the models never use."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def onnx_session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.log_severity_level = 3      # warnings about unused initializers are noise here
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session, ids: torch.Tensor) -> np.ndarray:
    return session.run(["logits"], {"input_ids": ids.numpy().astype(np.int64)})[0]


def max_abs_diff(wrapped: torch.nn.Module, path: Path, ids: torch.Tensor) -> float:
    with torch.no_grad():
        expected = wrapped(ids).numpy()
    return float(np.abs(onnx_logits(onnx_session(path), ids) - expected).max())
