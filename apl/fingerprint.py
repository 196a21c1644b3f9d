"""Cheap, content-based fingerprints of model weights, used to key on-disk caches."""

from __future__ import annotations

import hashlib

from torch import nn


def module_fingerprint(module: nn.Module, samples_per_tensor: int = 4096) -> str:
    """sha256 over names, shapes, dtypes and an evenly strided sample of every tensor's values.

    Hashing all 1B weights of SD would take seconds; a strided sample of each tensor changes whenever the weights
    of any real fine-tune differ, which is what a cache key needs.
    """
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        flat = t.detach().reshape(-1)
        stride = max(1, flat.numel() // samples_per_tensor)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(flat[::stride].float().cpu().numpy().tobytes())
    return h.hexdigest()[:24]
