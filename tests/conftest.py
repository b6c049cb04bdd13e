import pytest
import torch

# Tiny test tensors run fastest on one thread, and one thread does not stall when other work shares the 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
