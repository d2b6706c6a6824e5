"""A run's state copied to host memory at an optimizer-step boundary, and put back.

Capturing is the only part of a save that stalls training; a background thread writes the
snapshot. The copies go into host buffers reused from save to save: in a fresh allocation
the page faults cost more than the copy itself.
"""
from __future__ import annotations

import copy
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.checkpoints.format import (FORMAT_VERSION, KEY_CONFIG, KEY_FORMAT, KEY_KIND, KEY_NP_RNG,
                                        KEY_OPTIMIZER_GROUPS, KEY_PY_RNG, KEY_SCALER, KEY_STATE, MODEL_FILE,
                                        OPTIMIZER_FILE, RNG_FILE, CheckpointInfo, Snapshot, read_checkpoint,
                                        write_checkpoint)
from trainer.errors import CheckpointError
from trainer.state import TrainState

ARCHITECTURE_FLAGS = "--arch/--n-layer/--n-embd/--n-head/--block-size/--vocab-size/--tokenizer"


class HostBuffers:
    """Host memory for snapshots, allocated at the first save and reused by the later ones."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}

    def reserve(self, sources: dict[tuple[str, str], torch.Tensor]) -> None:
        """Allocate and touch the buffers for these tensors ahead of the first save (any thread)."""
        for key, t in sources.items():
            self._buffer(key, t).zero_()    # the page faults happen here, not during a save

    def copy(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self._buffer(key, t)
        if t.is_cuda:
            buf.copy_(t, non_blocking=True)           # the caller synchronizes once
        elif t.dtype in (torch.float32, torch.float64, torch.int64, torch.float16):
            # One thread: torch's parallel copy stalls when the cores are shared.
            np.copyto(buf.numpy(), t.numpy())
        else:
            buf.copy_(t)
        return buf

    def _buffer(self, key: tuple[str, str], t: torch.Tensor) -> torch.Tensor:
        buf = self._buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
            self._buffers[key] = buf
        return buf


def capture(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler, state: TrainState, config: dict[str, Any], kind: str,
            buffers: HostBuffers | None = None) -> Snapshot:
    """Copy everything an exact resume needs; ``optimizer=None`` makes a weights-only snapshot."""
    buffers = buffers or HostBuffers()
    files: dict[str, dict[str, torch.Tensor]] = {MODEL_FILE: {}}
    for (file, name), t in tensor_sources(model, optimizer).items():
        files.setdefault(file, {})[name] = buffers.copy((file, name), t)
    groups = copy.deepcopy(optimizer.state_dict()["param_groups"]) if optimizer is not None else None
    if optimizer is not None:
        files.setdefault(OPTIMIZER_FILE, {})
    device = model_device(model)
    if device.type == "cuda":       # a CPU run never touches CUDA, even on a machine with GPUs
        torch.cuda.synchronize(device)    # the non_blocking copies above are complete
    files[RNG_FILE] = _torch_rng_tensors(device)
    meta = {
        KEY_FORMAT: FORMAT_VERSION, KEY_KIND: kind, KEY_STATE: state.to_json(), KEY_CONFIG: dict(config),
        KEY_OPTIMIZER_GROUPS: groups, KEY_SCALER: scaler.state_dict() if scaler.is_enabled() else None,
        KEY_PY_RNG: _python_rng_json(), KEY_NP_RNG: _numpy_rng_json(),
    }
    val_loss = state.last_val_loss if state.evaluated_now else None
    info = CheckpointInfo(step=state.step, epoch=state.epoch, kind=kind, run_id=state.run_id,
                          val_loss=val_loss if val_loss is None or math.isfinite(val_loss) else None,
                          weights_only=optimizer is None)
    return Snapshot(files, meta, info)


def restore(snapshot: Snapshot, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
            scaler: torch.amp.GradScaler, where: str = "checkpoint") -> TrainState:
    """Put a snapshot back into model, optimizer, scaler and the random generators."""
    _load_model(model, snapshot.tensors[MODEL_FILE], where)
    meta = snapshot.state
    if optimizer is not None and OPTIMIZER_FILE in snapshot.tensors:
        sd = {"state": _unflatten_optimizer(snapshot.tensors[OPTIMIZER_FILE]),
              "param_groups": meta[KEY_OPTIMIZER_GROUPS]}
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: the optimizer state does not fit this model ({exc})") from exc
    if meta.get(KEY_SCALER) and scaler.is_enabled():
        scaler.load_state_dict(meta[KEY_SCALER])
    _restore_rng(snapshot.tensors[RNG_FILE], meta, model_device(model))
    return TrainState.from_json(meta[KEY_STATE])


def save_checkpoint(path: Path, **capture_args: Any) -> CheckpointInfo:
    """Capture and write in the calling thread (the trainer writes in the background)."""
    return write_checkpoint(path, capture(**capture_args))


def load_checkpoint(path: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                    scaler: torch.amp.GradScaler) -> tuple[TrainState, dict[str, Any]]:
    """Verify, read and restore a checkpoint into these parts; return its train state and saved config."""
    snapshot = read_checkpoint(Path(path))
    state = restore(snapshot, model=model, optimizer=optimizer, scaler=scaler, where=f"checkpoint {path}")
    return state, snapshot.state[KEY_CONFIG]


# -- model and optimizer tensors -------------------------------------------------------------
def tensor_sources(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
                   ) -> dict[tuple[str, str], torch.Tensor]:
    """Every tensor a snapshot copies, keyed by (file, name in that file)."""
    sources = {(MODEL_FILE, name): t for name, t in unique_state_dict(model).items()}
    if optimizer is not None:
        sources.update({(OPTIMIZER_FILE, f"state.{idx}.{name}"): t
                        for idx, entry in optimizer.state_dict()["state"].items()
                        for name, t in entry.items()})
    return sources


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied weights (lm_head is the token embedding:
    GPT-2's transformer.wte, Llama's model.embed_tokens)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def _load_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    _fit_unpadded_vocab(model, tensors, where)
    expected = unique_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [n for n in expected if n in tensors and tensors[n].shape != expected[n].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"{where}: the weights do not fit this model (missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, other shape {wrong[:3]}); resume with the same {ARCHITECTURE_FLAGS}")
    with torch.no_grad():
        for name, t in expected.items():
            t.copy_(tensors[name])


def _fit_unpadded_vocab(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """A checkpoint written before the vocabulary was padded to a multiple of 64 has the tokenizer's
    rows exactly, fewer than the model built now (trainer.model.padded_vocab): the model takes its
    size, so the run resumes exactly as it would have and its next checkpoints keep that size."""
    from trainer.model import padded_vocab, unpad_vocab

    if not hasattr(model, "get_input_embeddings"):     # not a transformers model
        return
    embedding = model.get_input_embeddings().weight
    name = next(n for n, p in model.named_parameters() if p is embedding)
    saved, rows = tensors.get(name), embedding.shape[0]
    if saved is None or saved.shape[1:] != embedding.shape[1:]:
        return
    if not (saved.shape[0] < rows and padded_vocab(saved.shape[0]) == rows):
        return
    if torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:     # DDP has sized its buckets to the model already
        raise CheckpointError(f"{where} was written before the vocabulary was padded to a multiple of 64 "
                              f"({saved.shape[0]} ids, {rows} now): its run continues in one process only; "
                              "resume it without torchrun, or start a fresh run")
    unpad_vocab(model, saved.shape[0])


def _unflatten_optimizer(tensors: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    return state


# -- random number generators -------------------------------------------------------------
# The run's own GPU's generator only, whatever its index: a checkpoint from a 1-GPU Colab resumes
# exactly on a 2-GPU Kaggle machine or on another index, and restoring never overwrites the
# generator of another trial running on another GPU of the same process.
RNG_CPU, RNG_CUDA = "torch_cpu", "torch_cuda"
RNG_CUDA_PER_INDEX = "torch_cuda_"    # older checkpoints: every GPU's state, torch_cuda_<index>


def model_device(model: torch.nn.Module) -> torch.device:
    """The device the run trains on: where the model's weights are (the CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def _torch_rng_tensors(device: torch.device) -> dict[str, torch.Tensor]:
    out = {RNG_CPU: torch.get_rng_state()}
    if device.type == "cuda":
        out[RNG_CUDA] = torch.cuda.get_rng_state(device)
    return out


def _saved_cuda_rng(tensors: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor | None:
    """The GPU generator state to restore on ``device``: the saved one; from an older checkpoint,
    that of the same index if it was saved, else the first."""
    if RNG_CUDA in tensors:
        return tensors[RNG_CUDA]
    per_index = {k: tensors[k] for k in sorted(tensors) if k.startswith(RNG_CUDA_PER_INDEX)}
    return per_index.get(f"{RNG_CUDA_PER_INDEX}{device.index}", next(iter(per_index.values()), None))


def _python_rng_json() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _numpy_rng_json() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(tensors[RNG_CPU])
    cuda = _saved_cuda_rng(tensors, device) if device.type == "cuda" else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)
    version, internal, gauss = meta[KEY_PY_RNG]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = meta[KEY_NP_RNG]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
