"""RoIAlign over every core, on a CPU.

torchvision's CPU RoIAlign kernel runs on one thread, and in this detector it is the largest single
cost after the trunk: 200 proposals a view, pooled 7 x 7 from a feature map of up to 96 x 126 x 224
(24 ms of a photo's ~165 ms on two cores, the other core idle meanwhile). Each box is pooled on its
own, so the boxes can be split into one part per thread and pooled at once: the same numbers, in
the same order (tested against the plain pooler; in theory a box exactly on the boundary between two
feature levels could be assigned by a last-bit different ``log2`` in a different split).
The worker threads do not inherit the caller's thread-local torch state (inference mode, autocast);
RoIAlign uses neither.
"""
from __future__ import annotations

from concurrent.futures import Executor

import torch
from torch import Tensor, nn


class SplitRoIAlign(nn.Module):
    """Stands in for a ``MultiScaleRoIAlign``: pools ``parts`` slices of each image's boxes at once,
    one in the calling thread and the others on ``executor`` (torch lets go of the interpreter lock
    inside the kernel)."""

    def __init__(self, pool: nn.Module, executor: Executor, parts: int):
        super().__init__()
        self.pool = pool
        self.executor = executor
        self.parts = max(1, int(parts))

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        total = sum(len(b) for b in boxes)
        if self.parts < 2 or total < 2 * self.parts or getattr(self.pool, "scales", None) is None:
            return self.pool(x, boxes, image_shapes)  # small, or the first call (it sets the pooler's scales)
        slices = [list(part) for part in zip(*(b.tensor_split(self.parts) for b in boxes))]  # [part][image]
        futures = [self.executor.submit(self.pool, x, s, image_shapes) for s in slices[1:]]
        pooled = [self.pool(x, slices[0], image_shapes)] + [f.result() for f in futures]
        # each result holds its slice of image 0's boxes, then of image 1's, ...: put them back in order
        per_part = [list(p.split([len(s) for s in part])) for p, part in zip(pooled, slices)]
        return torch.cat([per_part[k][i] for i in range(len(boxes)) for k in range(self.parts)])
