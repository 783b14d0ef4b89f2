from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from platemask.roi_pool import SplitRoIAlign


def _boxes(g, n, w, h):
    xy = torch.rand(n, 2, generator=g) * torch.tensor([w - 8.0, h - 8.0])
    wh = 2 + torch.rand(n, 2, generator=g) * torch.tensor([w / 2, h / 3])
    return torch.cat([xy, torch.minimum(xy + wh, torch.tensor([w - 1.0, h - 1.0]))], 1)


@pytest.mark.parametrize("parts", [2, 3])
@pytest.mark.parametrize("counts", [[200, 200, 37, 1], [0, 9, 0, 5], [3], [0, 0]])
@pytest.mark.parametrize("size", [7, 14])
def test_split_pooling_equals_torchvision(parts, counts, size):
    """Every box is pooled exactly as MultiScaleRoIAlign pools it, in the same order, whatever the
    split: boxes on every level, images with none, fewer boxes than parts."""
    g = torch.Generator().manual_seed(sum(counts) + parts)
    w, h = 448, 256
    feats = {k: torch.randn(len(counts), 8, h // s, w // s, generator=g) for k, s in (("0", 4), ("1", 8), ("2", 16))}
    shapes = [(h, w)] * len(counts)
    boxes = [_boxes(g, n, w, h) for n in counts]
    plain = MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=size, sampling_ratio=2)
    with ThreadPoolExecutor(parts - 1) as ex:
        split = SplitRoIAlign(MultiScaleRoIAlign(featmap_names=["0", "1", "2"], output_size=size, sampling_ratio=2),
                              ex, parts)
        first = split(feats, boxes, shapes)  # the first call sets the pooler's scales, unsplit
        again = split(feats, boxes, shapes)
    want = plain(feats, boxes, shapes)
    assert first.shape == want.shape == (sum(counts), 8, size, size)
    assert torch.equal(first, want) and torch.equal(again, want)
