"""Packed token blocks: the token stream cut into sequences of block_size + 1 tokens.

The order of the blocks in an epoch is a pure function of (seed, epoch), so a position in
the data is just (epoch, sequences consumed): nothing else to save for an exact resume.
"""
from __future__ import annotations

import numpy as np
import torch


class PackedBlocks:
    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens = tokens
        self.block_size = block_size
        # Each block needs one token more than its length: the last target.
        self.n_blocks = max(0, (len(tokens) - 1) // block_size)
        self._offsets = np.arange(block_size + 1)

    def __len__(self) -> int:
        return self.n_blocks

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        return np.random.default_rng([seed, epoch]).permutation(self.n_blocks)

    def get(self, block_ids: np.ndarray) -> torch.Tensor:
        """Blocks as a (len(block_ids), block_size + 1) int64 tensor of token ids."""
        index = block_ids[:, None] * self.block_size + self._offsets
        return torch.from_numpy(self.tokens[index].astype(np.int64))

    def sequential(self, micro_batch: int, max_batches: int) -> list[np.ndarray]:
        """Block ids in order, cut into micro-batches: the fixed validation set."""
        ids = np.arange(self.n_blocks)
        batches = [ids[i:i + micro_batch] for i in range(0, self.n_blocks, micro_batch)]
        return batches[:max_batches] if max_batches else batches


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on ``device``. To a GPU through pinned memory, without waiting: the copy
    queues behind the work already queued, and the host goes on to the next batch."""
    if device.type != "cuda":
        return batch
    return batch.pin_memory().to(device, non_blocking=True)
