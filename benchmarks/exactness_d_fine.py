"""How close converted D-FINE, DEIM and DEIMv2 models come to transformers' own outputs.

For every variant of ``tests/test_convert_d_fine.py``, ``tests/test_convert_deimv2.py`` (its
HGNetV2 models with the hybrid and with the lite encoder) and
``tests/test_convert_deimv2_dinov3.py`` (DEIMv2 S-X's DINOv3 backbone; small random-weight
models with noise, no tied scores): convert the model's state dict,
run both on the tests' two 96x128 images (fp32, CPU) and print the largest absolute
difference of every decoder layer's state, the last layer's logits and its boxes. Then the
released configs in the official layout (``tests/test_convert_d_fine_official.py``):
D-FINE's and DEIM's points [3, 6, 3], DEIM's SiLU decoder and heads (its reference:
transformers' D-FINE with DEIM's heads swapped in), converted from the state dict and YAML.
The official DEIMv2 rows (``tests/test_convert_deimv2_official.py``): HGNetV2, lite and
DINOv3 models in the official solver's layout with their YAML, against transformers' DEIMv2
made to compute as the official code does (``as_official``: no ``enc_output``, SiLU heads,
one query_pos for every layer, AIFI's transposed grid, the ViT-Tiny without a final norm);
``benchmarks/exactness_deimv2_official.py`` runs the official code itself.
The tests require 1e-4.

Run (from the repository root):
    PYTHONPATH=.:tests python benchmarks/exactness_d_fine.py

The output is a markdown table.
"""

from __future__ import annotations

import test_convert_d_fine
import test_convert_deimv2
import test_convert_deimv2_dinov3
import test_convert_deimv2_official
import torch
from test_convert_d_fine_official import official
from test_convert_rt_detr import images

from frozenseg.convert import convert_state_dict
from frozenseg.detector.model import build_detector


def differences(hf, args: dict, state_dict: dict | None = None
                ) -> tuple[float, float, float]:
    """Against ``hf``, the conversion of ``state_dict`` (default: hf's) with ``args``."""
    converted, report = convert_state_dict(
        hf.state_dict() if state_dict is None else state_dict, args=args)
    ours = build_detector(report.config).eval()
    ours.load_state_dict(converted, strict=True)
    with torch.no_grad():
        expected = hf(pixel_values=images())
        got = ours(images(), torch.zeros(2, 96, 128, dtype=torch.bool))
    return ((torch.stack(got.decoder_states) - expected.intermediate_hidden_states).abs().max(),
            (got.logits[-1] - expected.logits).abs().max(),
            (got.boxes[-1] - expected.pred_boxes).abs().max())


def main() -> None:
    print("| family | variant | decoder states | logits | boxes |\n| --- | --- | --- | --- | --- |")
    deimv2, dinov3 = test_convert_deimv2, test_convert_deimv2_dinov3
    for family, variants, model in (
            ("D-FINE", test_convert_d_fine.VARIANTS, test_convert_d_fine.random_hf_model),
            ("DEIMv2", deimv2.VARIANTS, deimv2.random_hf_model),
            ("DEIMv2 lite", deimv2.LITE, deimv2.lite_hf_model),
            ("DEIMv2 DINOv3", dinov3.VARIANTS, dinov3.random_hf_model)):
        for name, variant in variants.items():
            row(family, name, differences(*model(**variant)))
    for family in ("D-FINE", "DEIM"):
        hf, layout, yaml = official("released-points", family)
        row(f"{family} (official layout)", "released-points", differences(hf, yaml, layout))
    for variant in test_convert_deimv2_official.VARIANTS:
        hf, layout, yaml = test_convert_deimv2_official.official(variant)
        row("DEIMv2 (official layout)", variant, differences(hf, yaml, layout))


def row(family: str, variant: str, figures) -> None:
    print(f"| {family} | {variant} | " + " | ".join(f"{float(x):.1e}" for x in figures) + " |")


if __name__ == "__main__":
    main()
