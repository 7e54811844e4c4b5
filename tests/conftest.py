import os

import pytest
import torch

# Tests never reach a model hub: everything they load, they make.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Without a GPU, Triton kernels run in Triton's interpreter, which executes every line of
# them on the CPU. Triton reads the switch when it is imported: set it before anything is.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# frozenseg (and what it imports) only now, below the switches above.
import frozenseg  # noqa: E402
from tests.tiny import recipe, save_detector, tiny_detector  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of small models or tensors: as fast, and unaffected
    by a busy shared CPU (more threads only oversubscribe it). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A synthetic COCO-format dataset of 10 images (a module may define its own)."""
    root = tmp_path_factory.mktemp("synth")
    frozenseg.synth(root, images=10, seed=2)
    return root


@pytest.fixture(scope="module")
def detector_dir(tmp_path_factory):
    """A tiny random-weight detector's folder, as frozenseg convert writes it."""
    return save_detector(tiny_detector(), tmp_path_factory.mktemp("det") / "d", "tiny.pth")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data, detector_dir):
    """A head trained for 2 steps on ``data`` and ``detector_dir``: its last.pt (which
    carries the recipe)."""
    from frozenseg.engine.train import Trainer

    folder = tmp_path_factory.mktemp("head")
    Trainer(recipe(folder, data, detector_dir, "train.iterations=2"), log=lambda _: None,
            evaluate=False).run()
    return folder / "run" / "last.pt"
