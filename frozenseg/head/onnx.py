"""ONNX export of the frozen detector and the mask head as one graph, and an onnxruntime runner.

The graph takes one float RGB image in [0, 1], ``image`` (1, 3, H, W), unnormalised and
already resized as for the detector, and returns the head's detections:

  boxes        (K, 4)     float, absolute (x0, y0, x1, y1) in pixels of the input image
  scores       (K,)       float, the final score (detector score x predicted mask IoU)
  labels       (K,)       int64, the detector's class index
  mask_logits  (K, S, S)  float, mask logits in each box's RoI frame (the training-free head
                          without RoIAlign: (K, ceil(H/4), ceil(W/4)) over the image)
  iou          (K,)       float, sigmoid of the predicted mask IoU (heads with mask scoring)

Exporter: the TorchScript tracer (``torch.onnx.export(..., dynamo=False)``), present from
torch 2.3 on. torch.export (the dynamo exporter) now takes the detector (level shapes are
ints read off the maps, the deformable attention one registered op), but stops in the head:
each image's valid size and the number of kept detections are read back from tensors
(data-dependent sizes: the first is ``encoders.upsample_to``'s crop). The tracer records
those as computed values (``frozenseg.ops.tracing``) and level shapes as shape arithmetic.
Under the tracer the deformable attention is the grid_sample fallback's PyTorch ops (the
registered op has no ONNX translation there; ``FROZENSEG_OPS=fallback`` for the duration),
RoIAlign is ONNX ``RoiAlign`` with half-pixel coordinates: both need opset 16.

K is fixed: the detector's top_k (at most queries x classes). With ``dynamic=True`` H and W
are free, except that a two-stage detector needs at least ``num_queries`` encoder positions
(the traced proposal top-k takes that many; an image has about H * W / 48 of them).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from frozenseg.detector.config import normalize
from frozenseg.detector.frozen import FrozenDetector
from frozenseg.detector.output import DetectorOutput
from frozenseg.ops.functional import BACKEND_ENV
from frozenseg.ops.levels import shapes_tensor

INPUT_NAME = "image"
OUTPUT_NAMES = ("boxes", "scores", "labels", "mask_logits", "iou")
# A COCO-sized input (shorter side 800) whose sides are multiples of 32.
DEFAULT_SIZE = (800, 1216)
MIN_OPSET = 16  # GridSample and RoiAlign's half_pixel mode arrive in opset 16
# check_onnx: float32 kernels that sum in another order drift by ~1e-5 per layer; a size or
# an operator the graph gets wrong moves boxes by pixels and mask logits by units.
CHECK_RTOL = 1e-3
CHECK_ATOL = {"boxes": 1e-2, "scores": 1e-4, "mask_logits": 1e-2, "iou": 1e-4}


class OnnxExportError(ValueError):
    """The model could not be exported; the message names the part that failed."""


class DeployModel(nn.Module):
    """``head(detector([image[0]]))`` as one module with plain tensor outputs.

    forward(image (1, 3, H, W) float RGB in [0, 1]) -> (boxes, scores, labels, mask_logits)
    plus iou when the head scores its masks; shapes in the module docstring.
    """

    def __init__(self, detector: FrozenDetector, head: nn.Module) -> None:
        super().__init__()
        self.detector, self.head = detector, head

    @property
    def output_names(self) -> tuple[str, ...]:
        scored = getattr(self.head, "scoring", None) is not None
        return OUTPUT_NAMES if scored else OUTPUT_NAMES[:-1]

    def forward(self, image: Tensor) -> tuple[Tensor, ...]:
        detections = self.detect(image)
        masks = self.head(detections)
        labels = detections.labels[masks.batch_index, masks.query_index]
        outputs = (masks.boxes, masks.scores, labels, masks.mask_logits)
        if masks.iou_logits is not None:
            outputs += (masks.iou_logits.sigmoid(),)
        return outputs

    def detect(self, image: Tensor) -> DetectorOutput:
        """``detector([image[0]])``, with the batch of one built in place of its preprocess:
        that reads each image's size back as Python ints, which a trace would freeze."""
        if not torch.jit.is_tracing():
            check_image(image)
        det = self.detector
        batch = normalize(image[:1].float(), None, det.mean, det.std)
        padding = torch.zeros_like(batch[:, 0], dtype=torch.bool)  # one image: no padding
        with torch.set_grad_enabled(torch.is_grad_enabled() and not det.frozen):
            encoded = det.model.encode(batch, padding)
            return det._detect(encoded, shapes_tensor([image.shape[-2:]], device=image.device))


def check_image(image: Tensor) -> None:
    if image.dim() != 4 or image.shape[0] != 1 or image.shape[1] != 3:
        raise ValueError(f"image has shape {tuple(image.shape)}, expected (1, 3, H, W)")
    if not image.is_floating_point():
        raise ValueError(f"image is {image.dtype}, expected float RGB in [0, 1]")


def export_onnx(detector: FrozenDetector, head: nn.Module, path: str | Path, *,
                height: int | None = None, width: int | None = None, dynamic: bool = False,
                opset: int = 17, image: Tensor | None = None) -> Path:
    """Write detector + head as one ONNX graph to ``path`` and return it.

    The graph is traced on ``image`` ((1, 3, H, W) or (3, H, W) in [0, 1]; height and width
    are then its own) or else on a random image of height x width (default DEFAULT_SIZE).
    Without ``dynamic`` the graph accepts that size only; with it, any H and W. The file
    appears whole or not at all. Raises OnnxExportError naming the module and operator that
    could not be exported.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset {opset} is too old: grid_sample and RoIAlign need {MIN_OPSET}")
    require("onnx")  # torch's exporter writes the file through it
    example = _example_image(detector, image, height, width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # same folder: os.replace is atomic
    try:
        with _eval_mode(DeployModel(detector, head)) as model:
            _export(model, example, str(temp), dynamic=dynamic, opset=opset)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model`` in eval mode (no dropout), its submodules' own modes restored afterwards."""
    modes = {module: module.training for module in model.modules()}
    try:
        yield model.eval()
    finally:
        for module, training in modes.items():
            module.train(training)


def _example_image(detector: FrozenDetector, image: Tensor | None, height: int | None,
                   width: int | None) -> Tensor:
    device = detector.device
    if image is not None:
        image = image[None] if image.dim() == 3 else image
        check_image(image)
        return image.to(device)
    h, w = height or DEFAULT_SIZE[0], width or DEFAULT_SIZE[1]
    generator = torch.Generator().manual_seed(0)
    return torch.rand(1, 3, h, w, generator=generator).to(device)


def _export(model: DeployModel, example: Tensor, target: str, *, dynamic: bool,
            opset: int) -> None:
    names = model.output_names
    axes = None
    if dynamic:
        axes = {INPUT_NAME: {2: "height", 3: "width"}, **{n: {0: "detections"} for n in names}}
    options = {"dynamo": False} if _has_dynamo_switch() else {}  # torch < 2.5 has no switch
    tracker = ModuleTracker(model)
    try:
        with _export_context(), tracker, _stdout_discarded():
            torch.onnx.export(model, (example,), target, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(names),
                              dynamic_axes=axes, do_constant_folding=True, **options)
    except Exception as err:
        part = tracker.failed_part() or _traced_part(model, example, err)
        raise OnnxExportError(f"ONNX export failed in {part}: {_first_line(err)}") from err


def _has_dynamo_switch() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


@contextlib.contextmanager
def _export_context():
    """No gradients, the grid_sample deformable attention, and no tracer warning flood."""
    previous = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = "fallback"
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for category in (DeprecationWarning, FutureWarning, UserWarning):
                warnings.filterwarnings("ignore", category=category, module=r"torch\.(onnx|jit)")
            # Attributed to our call: the choice of this exporter is deliberate (module docstring).
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export",
                                    category=DeprecationWarning)
            yield
    finally:
        if previous is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = previous


@contextlib.contextmanager
def _stdout_discarded():
    """File descriptor 1 to the null device: when the TorchScript exporter fails it prints the
    whole graph there from C++ (thousands of lines), whatever Python's sys.stdout is."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no descriptor 1 to redirect
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


class ModuleTracker:
    """Which submodule's forward was running when an exception escaped it.

    Forward pre-hooks push the module's name, forward hooks pop it; an exception skips the
    pop, so afterwards the stack ends at the innermost module that failed.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model, self.stack, self.handles = model, [], []

    def __enter__(self) -> ModuleTracker:
        for name, module in self.model.named_modules():
            if name:
                self.handles.append(module.register_forward_pre_hook(self._push(name)))
                self.handles.append(module.register_forward_hook(self._pop))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()

    def _push(self, name: str):
        def hook(module, args):
            self.stack.append(name)
        return hook

    def _pop(self, module, args, output) -> None:
        self.stack.pop()

    def failed_part(self) -> str | None:
        return _describe(self.model, self.stack[-1]) if self.stack else None


def _traced_part(model: nn.Module, example: Tensor, err: Exception) -> str:
    """The module (and source line) of the first traced node of the operator ``err`` names:
    the tracer finished, the conversion to ONNX operators failed."""
    match = re.search(r"\b((?:aten|prim|torchvision|quantized)::\w+)", str(err))
    if match is None:
        return "the conversion to ONNX"
    operator = match.group(1)
    try:
        with _export_context():
            graph = torch.jit.trace(model, (example,), check_trace=False).inlined_graph
    except Exception:  # the operator's name is still worth reporting
        return operator
    for node in graph.nodes():
        if node.kind() == operator:
            scope = node.scopeName().rsplit("/", 1)[-1].removeprefix("__module.")
            where = node.sourceRange().split("\n", 1)[0]
            described = _describe(model, scope) if scope else type(model).__name__
            return f"{described}, {operator} at {where}" if where else described
    return operator


def _describe(model: nn.Module, name: str) -> str:
    """'head.mask (frozenseg.head.scoring.DotProductMask)'."""
    module = dict(model.named_modules()).get(name)
    if module is None:
        return name
    kind = type(module)
    return f"{name} ({kind.__module__}.{kind.__qualname__})"


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = lines[0] if lines else type(err).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def require(package: str):
    """Import an optional dependency, or say how to install it."""
    if importlib.util.find_spec(package) is None:
        raise OnnxExportError(f"{package} is not installed: pip install 'frozenseg[onnx]'")
    return importlib.import_module(package)


def run_onnx(path: str | Path, image: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Run an exported graph with onnxruntime on the CPU: {output name: array}.

    image: (1, 3, H, W) or (3, H, W) float RGB in [0, 1].
    """
    onnxruntime = require("onnxruntime")
    array = image.detach().cpu().numpy() if isinstance(image, Tensor) else np.asarray(image)
    array = array[None] if array.ndim == 3 else array
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, {INPUT_NAME: array.astype(np.float32)}),
                    strict=True))


def torch_outputs(detector: FrozenDetector, head: nn.Module,
                  image: Tensor) -> dict[str, np.ndarray]:
    """What the exported graph should give for ``image``, computed by PyTorch: the same
    names as :func:`run_onnx`."""
    image = image[None] if image.dim() == 3 else image
    with _eval_mode(DeployModel(detector, head)) as model, torch.no_grad():
        outputs = model(image.to(detector.device))
    return {name: out.cpu().numpy() for name, out in zip(model.output_names, outputs,
                                                         strict=True)}


def check_onnx(path: str | Path, detector: FrozenDetector, head: nn.Module, image: Tensor, *,
               rtol: float = CHECK_RTOL, atol: dict[str, float] | None = None
               ) -> dict[str, float]:
    """Run the exported graph and PyTorch on ``image``; {output: max absolute difference}.

    Raises OnnxExportError naming the outputs whose shapes or labels differ, or whose values
    differ by more than ``atol[name] + rtol * |PyTorch's value|`` (default CHECK_ATOL).
    """
    atol = {**CHECK_ATOL, **(atol or {})}
    expected, actual = torch_outputs(detector, head, image), run_onnx(path, image)
    size = "x".join(str(n) for n in image.shape[-2:])
    differences, wrong = {}, []
    for name, want in expected.items():
        got = actual.get(name)
        if got is None or got.shape != want.shape:
            wrong.append(f"{name} has shape {None if got is None else got.shape}, "
                         f"PyTorch {want.shape}")
            continue
        differences[name] = float(np.abs(got.astype(np.float64) - want).max(initial=0.0))
        close = (np.array_equal(got, want) if name == "labels"
                 else np.allclose(got, want, rtol=rtol, atol=atol.get(name, 0.0)))
        if not close:
            wrong.append(f"{name} differs by up to {differences[name]:.3g}")
    if wrong:
        raise OnnxExportError(f"{path}: at {size} onnxruntime and PyTorch disagree: "
                              + "; ".join(wrong))
    return differences
