"""ONNX export of detector + head: onnxruntime gives what PyTorch gives, at the traced size
and (dynamic graphs) at another; a part that cannot be exported is named in one line.

Tolerance: the graph computes in float32 like PyTorch, but onnxruntime's GridSample, RoiAlign
and matrix products sum in other orders, so values drift by a few ulps per layer (measured
here: boxes ~1e-5 px, scores ~1e-7, mask logits ~5e-5). The bounds below leave 20x or more
of margin; a size frozen into the graph, or a wrong operator, moves boxes by pixels and
mask logits by units. Labels must be identical.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from frozenseg.detector.frozen import load_detector
from frozenseg.head import HeadConfig, build_mask_head
from frozenseg.head import onnx as onnx_export
from frozenseg.head.onnx import OnnxExportError, check_onnx, export_onnx, run_onnx
from frozenseg.head.scoring import DotProductMask
from tests.tiny import save_detector, tiny_d_fine, tiny_detector
from tests.weights import perturb

pytestmark = pytest.mark.slow  # pytest -m "not slow" leaves this module out

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

TRACE_SIZE = (64, 96)
OTHER_SIZE = (77, 50)  # no side a multiple of 4: ceil and padding arithmetic must follow it
HEAD = HeadConfig(image_encoder_layers=1, box_encoder_layers=1, roi_size=8, mapper_dim=32,
                  ffn_dim=64, num_heads=2)
ATOL = {"boxes": 1e-3, "scores": 1e-5, "mask_logits": 1e-3, "iou": 1e-5}
RTOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny detector (weights off their init) as ``frozenseg convert`` writes it, loaded
    back, and a small random head for it."""
    folder = tmp_path_factory.mktemp("det") / "tiny"
    save_detector(perturb(tiny_detector()), folder, "tiny.pth")
    detector = load_detector(folder, top_k=7, memory_layer=1)
    head = build_mask_head(HEAD, hidden_dim=detector.config.hidden_dim,
                           c1_channels=detector.model.backbone.channels[0],
                           num_levels=detector.config.num_feature_levels)
    return detector, perturb(head, seed=1)


@pytest.fixture(scope="module")
def dynamic_graph(models, tmp_path_factory):
    return export_onnx(*models, tmp_path_factory.mktemp("dyn") / "model.onnx",
                       height=TRACE_SIZE[0], width=TRACE_SIZE[1], dynamic=True)


def image(size, seed):
    return torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(seed))


def pytorch(models, picture) -> dict[str, np.ndarray]:
    """The head on the detector, called as training and inference call them."""
    detector, head = models
    with torch.no_grad():
        detections = detector([picture[0]])
        masks = head(detections)
    return {"boxes": masks.boxes, "scores": masks.scores,
            "labels": detections.labels[masks.batch_index, masks.query_index],
            "mask_logits": masks.mask_logits, "iou": masks.iou_logits.sigmoid()}


def assert_same(actual: dict[str, np.ndarray], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    np.testing.assert_array_equal(actual["labels"], expected["labels"].numpy())
    for name, tolerance in ATOL.items():
        np.testing.assert_allclose(actual[name], expected[name].numpy(), rtol=RTOL,
                                   atol=tolerance, err_msg=name)


def test_fixed_size_graph_gives_pytorch_outputs(models, tmp_path):
    path = export_onnx(*models, tmp_path / "model.onnx", height=TRACE_SIZE[0],
                       width=TRACE_SIZE[1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left
    picture = image(TRACE_SIZE, seed=1)
    expected = pytorch(models, picture)
    assert len(expected["scores"]) == 7 and expected["mask_logits"].shape[1:] == (8, 8)
    assert_same(run_onnx(path, picture), expected)
    # The graph is the export's module run as PyTorch runs it: the same numbers exactly.
    deploy = onnx_export.torch_outputs(*models, picture)
    for name, value in expected.items():
        assert np.array_equal(deploy[name], value.numpy()), name
    with pytest.raises(Exception, match="height|width|dimension|Got"):
        run_onnx(path, image(OTHER_SIZE, seed=2))  # fixed means fixed


def test_dynamic_graph_follows_another_image_size(models, dynamic_graph):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(dynamic_graph),
                                           providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [1, 3, "height", "width"]
    for size, seed in ((OTHER_SIZE, 3), (TRACE_SIZE, 4)):
        picture = image(size, seed)
        assert_same(run_onnx(dynamic_graph, picture), pytorch(models, picture))
    differences = check_onnx(dynamic_graph, *models, image(OTHER_SIZE, seed=5))
    assert set(differences) == {"boxes", "scores", "labels", "mask_logits", "iou"}


def test_check_names_the_outputs_that_disagree(models, dynamic_graph, monkeypatch):
    real = onnx_export.run_onnx

    def shifted(path, picture):
        outputs = real(path, picture)
        return {**outputs, "boxes": outputs["boxes"] + 1.0}

    monkeypatch.setattr(onnx_export, "run_onnx", shifted)
    with pytest.raises(OnnxExportError, match=r"at 77x50 .*boxes differs by up to 1"):
        check_onnx(dynamic_graph, *models, image(OTHER_SIZE, seed=6))


def test_an_unexportable_operator_is_named_in_one_line(models, tmp_path, monkeypatch):
    def bessel_mask(self, queries, rois):  # aten::special_bessel_j0 has no ONNX form
        return torch.special.bessel_j0(torch.einsum("nd,nsd->ns", queries, rois))

    monkeypatch.setattr(DotProductMask, "forward", bessel_mask)
    with pytest.raises(OnnxExportError) as failure:
        export_onnx(*models, tmp_path / "model.onnx", height=TRACE_SIZE[0],
                    width=TRACE_SIZE[1])
    message = str(failure.value)
    assert "\n" not in message
    assert "head.mask (frozenseg.head.scoring.DotProductMask)" in message
    assert "aten::special_bessel_j0" in message and "test_onnx.py" in message
    assert isinstance(failure.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_a_failing_module_is_named(models, tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(type(models[1].query_encoder), "forward", refuse)
    with pytest.raises(OnnxExportError, match=r"^ONNX export failed in head\.query_encoder "
                       r"\(frozenseg\.head\.encoders\.QueryFeatureEncoder\): cannot trace this$"):
        export_onnx(*models, tmp_path / "model.onnx", height=TRACE_SIZE[0],
                    width=TRACE_SIZE[1])
    assert list(tmp_path.iterdir()) == []


def test_opsets_without_grid_sample_are_refused(models, tmp_path):
    with pytest.raises(ValueError, match="opset 15 is too old"):
        export_onnx(*models, tmp_path / "model.onnx", opset=15)


def test_a_d_fine_detector_exports_as_one_graph(tmp_path):
    """D-FINE (HGNetV2, the ELAN hybrid encoder, the FDR decoder with its quality heads)
    through the tracer: a fixed-size and a dynamic graph give PyTorch's outputs."""
    detector = tiny_d_fine()
    perturb(detector.model)
    head = perturb(build_mask_head(HEAD, hidden_dim=32,
                                   c1_channels=detector.model.backbone.channels[0],
                                   num_levels=3), seed=1)
    models = (detector, head)
    fixed = export_onnx(*models, tmp_path / "fixed.onnx", height=96, width=128)
    picture = image((96, 128), seed=1)
    assert_same(run_onnx(fixed, picture), pytorch(models, picture))
    dynamic = export_onnx(*models, tmp_path / "dynamic.onnx", height=96, width=128,
                          dynamic=True)
    picture = image((128, 160), seed=2)
    assert_same(run_onnx(dynamic, picture), pytorch(models, picture))
