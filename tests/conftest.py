"""Shared fixtures: the tiny SD-v1-shaped config and a seeded random model built from it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from ldm.util import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-sd.yaml"
SD_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
TINY_SDXL_CONFIG = ROOT / "configs" / "tiny" / "tiny-sdxl.yaml"


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Tiny models gain nothing from a second thread, and OpenMP's spin-waiting makes two threads many times slower
    # whenever another process shares the 2 cores. Full-size tests ask for more threads themselves.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config() -> dict:
    return load_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def sd_config() -> dict:
    return load_config(SD_CONFIG)


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Give every parameter random values (also those PyTorch initialises to 0/1, e.g. norms and biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="session")
def tiny_model(tiny_config):
    from ldm.checkpoint import build_model

    torch.manual_seed(0)
    return randomize_(build_model(copy.deepcopy(tiny_config))).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_sdxl_config() -> dict:
    return load_config(TINY_SDXL_CONFIG)


@pytest.fixture(scope="session")
def tiny_sdxl(tiny_sdxl_config):
    """The tiny SDXL with seeded random weights."""
    from ldm.checkpoint import build_model

    torch.manual_seed(0)
    # std 0.1: at 0.05 the context and y move this deeper UNet by only ~1e-3, too little for a 1e-4 comparison.
    return randomize_(build_model(copy.deepcopy(tiny_sdxl_config)), std=0.1).eval().requires_grad_(False)
