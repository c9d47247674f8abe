"""Where the uint8 training images live during training, and how each shuffled batch reaches the device.

On a CPU the images are used where they are. On a GPU they are copied there once when they take at most
`DEVICE_DATA_FRACTION` of its free memory (50,000 images at 224 px are 7.5 GB: an 80 GB GPU holds them;
ImageNet's 1.28 M are 193 GB: none does). Otherwise they stay in host memory and batches stream: each is gathered
into pinned memory and copied without blocking, as DataLoader's `pin_memory` does. Only the batch is pinned, not
the whole set, so the page-locked memory stays small; PyTorch's caching host allocator reuses a batch buffer once
its copy has finished.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch

from kdq.data import shuffled_batches

# Share of a GPU's free memory the training images may take; the rest is the model's (weights, activations,
# optimizer state, the teacher when distilling online).
DEVICE_DATA_FRACTION = 0.5


def fits_on(images: torch.Tensor, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return images.numel() * images.element_size() <= DEVICE_DATA_FRACTION * free


class TrainImages:
    """The training images and their batches on `device`; `stream` (default: when they do not fit) keeps them
    in host memory."""

    def __init__(self, images: torch.Tensor, device: torch.device, stream: bool | None = None):
        self.device = device
        self.stream = not fits_on(images, device) if stream is None else stream
        if stream is None and self.stream:
            print(f"[data] {images.numel() / 1e9:.1f} GB of images > {DEVICE_DATA_FRACTION:.0%} of the GPU's free "
                  "memory: batches stream from host memory", file=sys.stderr)  # fmt: skip
        self.images = images if self.stream else images.to(device)

    def __len__(self) -> int:
        return len(self.images)

    def epoch(self, batch_size: int, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices on the device, uint8 images on the device) of each batch of one shuffled epoch
        (`kdq.data.shuffled_batches`: the order depends on the generator only, not on where the images are)."""
        batches = list(shuffled_batches(len(self.images), batch_size, generator))
        if not self.stream:
            yield from ((idx, self.images[idx]) for idx in batches)
            return
        # One copy of the epoch's order to the host: per batch it would wait for the GPU to finish every step.
        on_host = torch.cat(batches).cpu().split(batch_size) if batches else ()
        for idx, host_idx in zip(batches, on_host, strict=True):
            pinned = torch.empty((len(host_idx), *self.images.shape[1:]), dtype=self.images.dtype,
                                 pin_memory=self.device.type == "cuda")  # fmt: skip
            torch.index_select(self.images, 0, host_idx, out=pinned)
            yield idx, pinned.to(self.device, non_blocking=True)
