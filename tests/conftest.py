import os

import pytest
import torch

# Tests never reach a model hub: everything they load, they make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter, which executes every line of
# them on the CPU. Triton reads the switch when it is imported: set it before anything is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small models or tensors: as fast, and unaffected
    by a busy shared CPU (more threads only oversubscribe it). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
