"""Dropout whose masks belong to a micro-batch, not to the order in which micro-batches run.

`torch.nn.Dropout` draws from the process's global generator, so two micro-batches computed side by side in two
threads (or in another order, or on another process) would get other masks. The training loop instead gives each
micro-batch its own generator, seeded by (seed, optimizer step, micro-batch index), and runs its forward pass inside
`micro_batch_rng(generator)`; `seed_dropout(model)` swaps the model's `nn.Dropout` modules (peft's LoRA dropout
included) for `MicroBatchDropout`, which draws from that generator. Outside such a block it is plain dropout.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Iterator

import torch
from torch import Tensor, nn

_local = threading.local()


def micro_batch_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The CPU generator of micro-batch `index` (its position in the global batch) of optimizer step `step`."""
    digest = hashlib.blake2b(f"{seed}:{step}:{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


@contextlib.contextmanager
def micro_batch_rng(generator: torch.Generator | None) -> Iterator[None]:
    """Dropout in this thread draws from `generator` inside the block (None: the global generator)."""
    previous = getattr(_local, "generator", None)
    _local.generator = generator
    try:
        yield
    finally:
        _local.generator = previous


def active_generator() -> torch.Generator | None:
    """The generator set by `micro_batch_rng` in this thread, if any."""
    return getattr(_local, "generator", None)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout of `x` with the active micro-batch generator (else `F.dropout`)."""
    generator = active_generator()
    if not training or p == 0.0 or generator is None:
        return nn.functional.dropout(x, p, training)
    scale = torch.empty(x.shape, dtype=x.dtype).bernoulli_(1.0 - p, generator=generator).div_(1.0 - p)
    return x * scale.to(x.device)  # one product to differentiate


class MicroBatchDropout(nn.Dropout):
    """`nn.Dropout` drawing its mask from the micro-batch's generator (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def seed_dropout(model: nn.Module) -> int:
    """Replace every `nn.Dropout` with p > 0 in `model` by a `MicroBatchDropout`; return how many were replaced."""
    replaced = 0
    for module in model.modules():
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout and child.p > 0:
                setattr(module, name, MicroBatchDropout(child.p, inplace=child.inplace))
                replaced += 1
    return replaced
