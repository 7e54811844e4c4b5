"""Official H-Deformable-DETR checkpoints (HDETR/H-Deformable-DETR, main.py).

The layout is Deformable DETR's (see :mod:`frozenseg.formats.deformable_detr`), plus:

* ``query_embed``: (num_queries_one2one + num_queries_one2many) rows. With
  ``--mixed_selection`` (two-stage) they are C-wide content queries (-> canonical
  ``transformer.tgt_embed``), single-stage they are 2C-wide (query_pos, content) pairs.
  Inference uses only the first ``num_queries_one2one`` rows (its engine.evaluate); that number
  lives only in ``ckpt['args']`` (default 300), and the one-to-many rows are dropped.
* Swin backbones (``backbone.0.body.patch_embed.*``, ``layers.*``, ``norm1..3``) as well as
  ResNet. ``--look_forward_twice`` changes only training gradients.

At inference H-DETR is two-stage Deformable DETR whose proposals are scored on class 0 and
give query_pos through ``pos_trans`` and, with mixed selection, learned content queries.
"""

from __future__ import annotations

from frozenseg.detector.backbones.swin import swin_config_from_state_dict
from frozenseg.detector.config import DetectorConfig
from frozenseg.formats import deformable_detr as dd
from frozenseg.formats.base import CheckpointFormat, Renamed, StateDict, positive


def swin_backbone(sd: StateDict) -> tuple[dict, list[int]]:
    """The Swin config read off the body's shapes, and its four stage widths."""
    body = {k[len(dd.BODY):]: v for k, v in sd.items() if k.startswith(dd.BODY)}
    spec = swin_config_from_state_dict(body)
    return {"name": "swin", **spec}, [spec["embed_dim"] * 2**i for i in range(4)]


def one_to_one_queries(sd: StateDict, args: dict, notes: list[str]) -> int:
    """num_queries_one2one (args only; default 300), checked against query_embed's rows."""
    n = positive("num_queries_one2one", dd.arg(args, "num_queries_one2one", 300, notes))
    rows = sd["query_embed.weight"].shape[0] if "query_embed.weight" in sd else n
    if rows < n:
        raise ValueError(f"query_embed has {rows} rows, fewer than the {n} one-to-one queries")
    if rows > n:
        notes.append(f"query_embed: keeping the first {n} of {rows} rows (the one-to-one "
                     "queries; the rest are training-only one-to-many queries)")
    return n


def derive_config(sd: StateDict, args: dict) -> tuple[DetectorConfig, list[str]]:
    notes: list[str] = []
    two_stage, box_refine = dd.stage_flags(sd, args, notes)
    if f"{dd.BODY}patch_embed.proj.weight" in sd:
        backbone, channels = swin_backbone(sd)
    else:
        backbone, channels = dd.resnet_backbone(sd, args), dd.RESNET_CHANNELS
    # Two-stage: with --mixed_selection the content queries are learned (query_embed).
    query_init = "mixed" if "query_embed.weight" in sd else "proposals"
    config = DetectorConfig(
        variant="h_deformable_detr", backbone=backbone,
        **dd.transformer_config(sd, args, notes, channels),
        num_queries=one_to_one_queries(sd, args, notes),
        query_init=query_init if two_stage else "learned", box_refine=box_refine,
        proposal_score="first_class", ref_point_head=False, decoder_norm=False,
        pos_temperature=10000.0, pos_offset=-0.5, inverse_sigmoid_eps=1e-5,
        num_select=int(args.get("topk") or 100),  # PostProcess(topk=args.topk)
    )
    return config, notes


def rename(sd: StateDict, config: DetectorConfig) -> Renamed:
    """Deformable DETR's renaming, with query_embed cut to the one-to-one queries."""
    sd = dict(sd)
    queries = sd.pop("query_embed.weight", None)
    out = dd.rename(sd, config)
    if queries is not None:
        n = config.num_queries
        target = "transformer.tgt_embed.weight" if config.query_init == "mixed" \
            else "query_embed.weight"
        out.put("query_embed.weight", target, queries[:n])
        if queries.shape[0] > n:
            out.dropped.append((f"query_embed.weight[{n}:{queries.shape[0]}]",
                                "one-to-many queries (training only)"))
    return out


FORMAT = CheckpointFormat(
    name="h_deformable_detr",
    description="official H-Deformable-DETR (HDETR/H-Deformable-DETR): ResNet or Swin, "
                "mixed query selection, one-to-one queries",
    signature=dd.SIGNATURE,
    derive_config=derive_config,
    rename=rename,
    refine_match=lambda sd: dd.matches_official_layout(sd) and dd.is_h_deformable_detr(sd),
)
