"""FrozenDetector: a converted detector, frozen, returning DetectorOutput.

Input images are float RGB in [0, 1], (3, H, W) each, already resized (see
:func:`detector_input_size` for the originals' 800/1333 rule); the detector
normalises them with its source's mean and std and pads a batch to a common size.

An open-vocabulary detector (Grounding DINO) finds what its prompt names:
``detector.set_prompt("cat . dog .")`` before encoding; each phrase is then a class (labels
are phrase indices, ``classes`` names them).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from frozenseg.boxes import to_normalized
from frozenseg.detector import folder, grounding
from frozenseg.detector.classes import class_map
from frozenseg.detector.config import DetectorConfig, normalize
from frozenseg.detector.model import DeformableDETR, Encoded, RawDetection, build_detector
from frozenseg.detector.output import DetectorOutput
from frozenseg.ops.levels import shapes_tensor, start_index

DEFAULT_TOP_K = 100  # detections per image: COCO evaluation's maxDets


def _no_grad_while_frozen(method):
    """No autograd graph while the detector is frozen (the usual case); with finetune()
    the method records one, for fine-tuning."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Encoding:
    """A batch through the backbone and encoder, with each image's (H, W)."""

    encoded: Encoded
    sizes: torch.Tensor


class FrozenDetector(nn.Module):
    def __init__(self, model: DeformableDETR, *, top_k: int = DEFAULT_TOP_K,
                 memory_layer: int | None = None, classes: dict | None = None,
                 tokenizer=None) -> None:
        """memory_layer: which encoder layer's output (1-based) becomes DetectorOutput.memory;
        default layer 4 (the paper's choice for a 6-layer encoder), or the last if fewer.
        classes: {"names", "category_ids"} per classifier index (see detector.classes).
        tokenizer: an open-vocabulary detector's prompt tokenizer (load_detector's)."""
        super().__init__()
        layers = model.encoder_layers
        memory_layer = memory_layer or min(4, layers)
        if not 1 <= memory_layer <= layers:
            raise ValueError(f"memory_layer {memory_layer} is not in 1..{layers}: this "
                             f"detector's encoder gives {layers} state(s) (null takes the "
                             "4th or the last)")
        self.model = model.eval().requires_grad_(False)
        self.config: DetectorConfig = model.config
        self.top_k, self.memory_layer = top_k, memory_layer
        self.classes = classes or class_map(self.config.num_classes)
        self.tokenizer, self.prompt = tokenizer, None
        mean, std = torch.tensor(self.config.image_mean), torch.tensor(self.config.image_std)
        self.register_buffer("mean", mean.view(3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(3, 1, 1), persistent=False)

    def set_prompt(self, text: str) -> None:
        """Open vocabulary: what to find, as phrases separated by " . " ("cat . dog ."; a
        final " ." is added if missing). Each phrase becomes a class: labels are phrase
        indices, its score the best of its tokens' (``Prompt.phrase_logits``), and
        ``classes`` names the phrases. Encodings made before the call are stale."""
        if not self.config.open_vocabulary:
            raise ValueError(f"this {self.config.variant} detector has a fixed set of "
                             "classes: it takes no prompt")
        if self.tokenizer is None:
            raise ValueError("this detector has no tokenizer: load it with load_detector "
                             "from the folder frozenseg convert wrote")
        prompt = grounding.tokenize(self.tokenizer, text)
        if len(prompt.input_ids) > self.config.max_text_len:
            raise ValueError(f"the prompt is {len(prompt.input_ids)} tokens long; this "
                             f"detector reads at most {self.config.max_text_len}")
        self.prompt = prompt
        self.classes = class_map(len(prompt.phrases), prompt.phrase_names)

    def _prompt(self) -> dict:
        """The encoder's prompt argument: none for a closed-set detector."""
        if not self.config.open_vocabulary:
            return {}
        if self.prompt is None:
            raise ValueError("Grounding DINO finds what a prompt names: call "
                             "detector.set_prompt('cat . dog .') first (--prompt)")
        return {"prompt": self.prompt}

    def _class_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) classifier logits -> (..., classes): the phrases' for a prompt."""
        return logits if self.prompt is None else self.prompt.phrase_logits(logits)

    def train(self, mode: bool = True) -> FrozenDetector:
        """The detector stays in eval mode (frozen batch norm, no dropout) whatever the caller."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def head_dims(self) -> dict[str, int | float]:
        """What a mask head on this detector is sized by (``build_mask_head``'s keywords):
        the transformer's width, its feature levels, the channels of C1 and the stride of
        the memory's first level (8 for most; 32 for the plain DETRs' one level; the
        backbone's own where its levels are the memory, as LW-DETR's projector's)."""
        strides = getattr(self.model.backbone, "strides", None)
        return {"hidden_dim": self.config.hidden_dim,
                "num_levels": self.config.num_feature_levels,
                "c1_channels": self.model.backbone.channels[0],
                "memory_stride": strides[0] if strides else
                4 * 2 ** self.config.backbone_levels[0]}

    def finetune(self, part: str) -> list[nn.Parameter]:
        """Fine-tuning (paper Table 16): "partial" trains the transformer (encoder and
        decoder), "full" the whole detector; returns the parameters that now train. The
        forward methods then keep their graph; batch norm stays frozen (eval mode)."""
        modules = {"partial": [self.model.transformer], "full": [self.model]}
        if part not in modules:
            raise ValueError(f"fine-tuned part is {part!r}; one of partial, full")
        params = [p for m in modules[part] for p in m.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.model.parameters())

    @_no_grad_while_frozen
    def forward(self, images: list[torch.Tensor] | torch.Tensor) -> DetectorOutput:
        """Top-K predictions over queries x classes, as the original post-processors rank them."""
        return self.detect(self.encode(images))

    @_no_grad_while_frozen
    def encode(self, images: list[torch.Tensor] | torch.Tensor) -> Encoding:
        """The backbone and encoder on a batch, once: ``detect`` and ``embed`` then run
        the decoder on it as often as needed (a Predictor's many box sets per image)."""
        batch, padding, sizes = self.preprocess(images)
        return Encoding(self.model.encode(batch, padding, **self._prompt()), sizes)

    @_no_grad_while_frozen
    def detect(self, encoding: Encoding) -> DetectorOutput:
        """``self(images)`` from their encoding."""
        return self._detect(encoding.encoded, encoding.sizes)

    @_no_grad_while_frozen
    def embed(self, encoding: Encoding, boxes: list[torch.Tensor],
              labels: list[torch.Tensor] | None = None) -> DetectorOutput:
        """``self.embed_boxes(images, boxes, labels)`` from their encoding."""
        return self._embed(encoding.encoded, encoding.sizes, boxes, labels)

    @_no_grad_while_frozen
    def detect_and_embed(self, images, boxes: list[torch.Tensor],
                         labels: list[torch.Tensor] | None = None
                         ) -> tuple[DetectorOutput, DetectorOutput]:
        """``(self(images), self.embed_boxes(images, boxes, labels))`` from one encoder run:
        the detections and the queries of given (e.g. ground-truth) boxes, sharing memory."""
        encoding = self.encode(images)
        return self.detect(encoding), self.embed(encoding, boxes, labels)

    def _detect(self, encoded: Encoded, sizes: torch.Tensor) -> DetectorOutput:
        memory = encoded.encoder_states[-1]
        raw = self.model.decode(
            self.model.initial_queries(memory, encoded.mask, encoded.shapes, text=encoded.text),
            encoded)
        probs = self._probabilities(self._class_logits(raw.logits[-1]))
        b, q, k = probs.shape
        if self.config.no_object_class:  # DETR: each query's best class, queries ranked
            best, labels = probs.max(-1)
            scores, query = best.topk(min(self.top_k, q), dim=1)
            return self._output(raw, sizes, query, scores, labels.gather(1, query),
                                torch.ones_like(scores, dtype=torch.bool))
        scores, index = probs.flatten(1).topk(min(self.top_k, q * k), dim=1)
        query = torch.div(index, k, rounding_mode="floor")
        return self._output(raw, sizes, query, scores, index % k,
                            torch.ones_like(scores, dtype=torch.bool))

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., K) class probabilities: a sigmoid per class, or (DETR) a softmax whose last
        "no object" class is left out."""
        if self.config.no_object_class:
            return logits.softmax(-1)[..., :-1]
        return logits.sigmoid()

    @_no_grad_while_frozen
    def stage1(self, images: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """The backbone's stride-4 map alone, (B, C1, H/4, W/4): DetectorOutput.c1 for
        outputs read from the feature cache (the cheap part of the backbone, recomputed)."""
        batch, _, _ = self.preprocess(images)
        return self.model.backbone(batch, stages=1)[0]

    @_no_grad_while_frozen
    def embed_boxes(self, images, boxes: list[torch.Tensor],
                    labels: list[torch.Tensor] | None = None) -> DetectorOutput:
        """Queries for given boxes: the decoder runs with them as its reference boxes.

        boxes: per image (N_i, 4) absolute (x0, y0, x1, y1) pixels of that image; labels:
        per image (N_i,) class indices, used as content queries where the detector has a
        label embedding (DINO builds its denoising queries this way); otherwise the mean
        learned content query (Grounding DINO: it has no label embedding; its boxes are
        scored against the prompt's phrases); the plain DETRs take boxes as
        ``PlainDETR.decode_boxes`` says (DAB-DETR: as anchors; DETR, Conditional DETR: the
        best-overlapping query). Output K = max N_i, in the given order; query_mask marks
        the real ones; boxes are the given ones (normalised), scores and labels predicted
        (labels: the given ones when passed).
        """
        return self.embed(self.encode(images), boxes, labels)

    def _embed(self, encoded: Encoded, sizes: torch.Tensor, boxes: list[torch.Tensor],
               labels: list[torch.Tensor] | None) -> DetectorOutput:
        memory = encoded.encoder_states[-1]
        width = max((len(b) for b in boxes), default=0)
        states = memory.new_zeros(len(boxes), width, self.config.hidden_dim)
        out_boxes = memory.new_zeros(len(boxes), width, 4)
        scores = memory.new_zeros(len(boxes), width)
        out_labels = torch.zeros(len(boxes), width, dtype=torch.long, device=memory.device)
        for i, image_boxes in enumerate(boxes):
            n = len(image_boxes)
            if n == 0:
                continue
            normalised = to_normalized(image_boxes.to(memory), sizes[i], clip=True)
            given = labels[i].to(memory.device) if labels is not None else None
            anchors = normalised * self._canvas_scale(sizes)[i].to(normalised)
            raw = self.model.decode_boxes(anchors, given, _select(encoded, i))
            probs = self._probabilities(self._class_logits(raw.logits[-1][0]))
            states[i, :n], out_boxes[i, :n] = raw.decoder_states[-1][0], normalised
            scores[i, :n], predicted = probs.max(-1)
            out_labels[i, :n] = given if given is not None else predicted
        mask = torch.arange(width, device=memory.device)[None] < torch.tensor(
            [len(b) for b in boxes], device=memory.device)[:, None]
        return self._assemble(encoded, sizes, states, out_boxes, scores, out_labels, mask)

    def preprocess(self, images):
        """Normalise and pad: (B, 3, H, W) batch, (B, H, W) padding mask, (B, 2) sizes."""
        if isinstance(images, torch.Tensor):
            images = list(images) if images.dim() == 4 else [images]
        device = self.device
        sizes = torch.tensor([img.shape[-2:] for img in images], device=device)
        h, w = (max(img.shape[d] for img in images) for d in (-2, -1)) if images else (0, 0)
        batch = torch.zeros(len(images), 3, h, w, device=device)
        padding = torch.ones(len(images), h, w, dtype=torch.bool, device=device)
        for i, img in enumerate(images):
            if img.dim() != 3 or img.shape[0] != 3:
                raise ValueError(f"image {i} has shape {tuple(img.shape)}, expected (3, H, W)")
            ih, iw = img.shape[-2:]
            batch[i, :, :ih, :iw] = img.to(device).float()
            padding[i, :ih, :iw] = False
        return normalize(batch, padding, self.mean, self.std), padding, sizes

    def _output(self, raw: RawDetection, sizes, query, scores, labels, mask) -> DetectorOutput:
        gather = query[..., None]
        states = raw.decoder_states[-1].gather(1, gather.expand(-1, -1, self.config.hidden_dim))
        boxes = raw.boxes[-1].gather(1, gather.expand(-1, -1, 4))
        boxes = boxes / self._canvas_scale(sizes)[:, None].to(boxes)
        return self._assemble(raw.encoded, sizes, states, boxes, scores, labels, mask)

    def _canvas_scale(self, sizes: torch.Tensor) -> torch.Tensor:
        """(B, 4): each image's box frame in the model's, (cx, cy, w, h) factors. A model
        that masks padding predicts in each image's own frame (ones); one that does not
        (RT-DETR) in the padded batch's, whose size is the largest image's."""
        if self.config.mask_padding:
            return torch.ones(len(sizes), 4, device=sizes.device)
        fraction = (sizes / sizes.amax(0)).flip(-1).float()  # (w, h) of the canvas
        return torch.cat([fraction, fraction], -1)

    def _assemble(self, encoded: Encoded, sizes, states, boxes, scores, labels, mask):
        spatial_shapes = shapes_tensor(encoded.shapes, device=sizes.device)
        return DetectorOutput(
            queries=states, boxes=boxes, scores=scores, labels=labels, query_mask=mask,
            memory=encoded.encoder_states[self.memory_layer - 1], memory_mask=encoded.mask,
            spatial_shapes=spatial_shapes, level_start_index=start_index(spatial_shapes),
            valid_ratios=encoded.valid_ratios, c1=encoded.features[0], image_sizes=sizes,
            level_shapes=encoded.shapes,
        )


def _select(encoded: Encoded, i: int) -> Encoded:
    """Image i of a batch, as a batch of one."""
    return Encoded(
        features=[f[i : i + 1] for f in encoded.features],
        encoder_states=[s[i : i + 1] for s in encoded.encoder_states],
        mask=encoded.mask[i : i + 1], shapes=encoded.shapes,
        valid_ratios=encoded.valid_ratios[i : i + 1],
        text=None if encoded.text is None else grounding.Text(
            encoded.text.features[i : i + 1], encoded.text.mask[i : i + 1]),
    )


def detector_input_size(height: int, width: int, *, short: int = 800,
                        max_size: int = 1333) -> tuple[int, int]:
    """(H, W) the originals resize an image to: shorter side ``short``, longer <= max_size."""
    small, large = min(height, width), max(height, width)
    if large / small * short > max_size:
        short = int(round(max_size * small / large))
    if small == short:
        return height, width
    if width < height:
        return int(short * height / width), short
    return short, int(short * width / height)


def load_detector(
    path: str | Path, *, top_k: int = DEFAULT_TOP_K, memory_layer: int | None = None
) -> FrozenDetector:
    """A detector folder (:mod:`frozenseg.detector.folder`: ``frozenseg convert`` writes
    them), frozen. Raises DetectorFolderError (a ValueError) naming a missing or bad file."""
    meta = folder.read_meta(path)
    model = build_detector(folder.read_config(path))
    model.load_state_dict(folder.read_weights(path), strict=True)
    return FrozenDetector(model, top_k=top_k, memory_layer=memory_layer,
                          classes=meta.get("classes"), tokenizer=folder.read_tokenizer(path))
