"""Shared test fixtures."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: intra-op threads only add wake-up latency (a lot of it on a busy machine). Module
    scope, so it is in force before the module's model fixture trains or builds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
