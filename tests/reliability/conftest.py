"""Settings shared by the reliability tests."""

from __future__ import annotations

import pytest
import requests
import torch


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while these tests run: server, engine and client share this process.

    A second OpenMP worker competes for the 2 cores with the server's event loop and the client
    (and, without OMP_WAIT_POLICY=PASSIVE, spins after every parallel op). With one thread there
    is no worker to wake or spin.
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
