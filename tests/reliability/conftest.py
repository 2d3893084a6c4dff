"""Settings shared by the reliability tests."""

from __future__ import annotations

import pytest
import requests
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run: server, engine and client share this process.

    tests/conftest.py imports torch before lmql_backends sets OMP_WAIT_POLICY=PASSIVE, so idle
    OpenMP workers spin after every parallel op and starve the server's event loop (HTTP
    round trips ~10x slower on 2 cores). With one thread there is no worker to spin.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def session():
    """One keep-alive HTTP session for a module's requests (the fuzz tests send thousands)."""
    with requests.Session() as session:
        yield session
