"""Block sizing for every Triton launcher: one rule for GPU and interpreter programs.

A program handles BLOCK items (elements, pixels or lanes). On a GPU the launcher names the BLOCK
that suits its kernel's registers; under the interpreter (CPU tensors, TRITON_INTERPRET=1) the
cost is mostly per program instance, so programs are made as large as the problem allows.
"""

from __future__ import annotations

import torch
import triton

INTERPRETER_BLOCK = 1 << 16


def block_size(items: int, device: torch.device, gpu_block: int, least: int = 16) -> int:
    """BLOCK for `items` work items on `device`: `gpu_block` on CUDA, large when interpreting,
    never more than the next power of two of `items` and never less than `least`.

    Args:
        items: work items one launch covers per image (or in all).
        device: where the kernel runs.
        gpu_block: the kernel's BLOCK on a GPU (a power of two).
        least: the smallest BLOCK the kernel accepts (a power of two).
    """
    block = gpu_block if device.type == "cuda" else INTERPRETER_BLOCK
    return max(least, min(block, triton.next_power_of_2(max(items, 1))))


def grid(items: int, device: torch.device, gpu_block: int, least: int = 16) -> tuple[int, int]:
    """(BLOCK, programs) covering `items` work items, BLOCK as `block_size` chooses it."""
    block = block_size(items, device, gpu_block, least)
    return block, triton.cdiv(items, block)
