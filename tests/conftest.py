"""Shared test fixtures: seeded generators, the devices to run on, the real bitsandbytes."""

from __future__ import annotations

import zlib

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def rng(request) -> torch.Generator:
    """A CPU generator seeded from the test's id: every case draws its own reproducible inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def bnb_ref():
    """The real bitsandbytes package (its CPU path), or skip with the reason."""
    return pytest.importorskip("bitsandbytes", reason="bitsandbytes==0.50.2 is a test dependency (.[test])")


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param
