"""What Grounding DINO adds to DINO: a text backbone, image-text fusion in the encoder, text
cross-attention in the decoder, and class logits that are dot products with the text.

The prompt is one string of phrases separated by " . " ("cat . dog ."). It is tokenized
once (:class:`Prompt`), BERT reads it with attention kept inside each phrase and position
ids restarting at each phrase (Grounding DINO's "sub-sentence" masking), and a linear layer
projects it to the detector's width. Each encoder layer then runs, in order, a bidirectional
image-text cross-attention (:class:`FusionLayer`), a text self-attention layer (the
sine position of each token in its phrase on queries and keys, attention kept inside
phrases) and the usual deformable self-attention layer; each decoder
layer attends to the text between its self-attention and its deformable cross-attention.
Class logits are ``queries @ text.T`` over the tokens (``-inf`` outside the text, padded to
``max_text_len``); :meth:`Prompt.phrase_logits` turns them into one class per phrase.

BERT itself is transformers' ``BertModel`` (an optional dependency: ``pip install
frozenseg[grounding]``), the well-kept implementation; its tokenizer files travel in the
converted detector folder (``tokenizer/``).

Shapes: B batch, S image positions, T text tokens, Q queries, C width.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from frozenseg.detector.hybrid import AttentionEncoderLayer
from frozenseg.detector.position import box_position_embedding
from frozenseg.detector.transformer import DecoderLayer, Encoder, EncoderLayer, run_layer

# Token ids that end a phrase in BERT's uncased vocabulary, as Grounding DINO fixes them:
# [CLS], [SEP], "." and "?".
PHRASE_ENDS = (101, 102, 1012, 1029)
TOKENIZER_FOLDER = "tokenizer"


@dataclass
class Text:
    """The prompt as the transformer sees it: features (B, T, C); mask (B, T), True on
    real tokens."""

    features: torch.Tensor
    mask: torch.Tensor


@dataclass
class Prompt:
    """A tokenized prompt, one for every image of a batch.

    input_ids, position_ids (T,) long; attention (T, T) bool, True where token i may see
    token j (itself, and the tokens of its own phrase); phrases: the prompt's phrases and,
    for each, the token positions it covers (separators and [CLS]/[SEP] belong to none).
    """

    text: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention: torch.Tensor
    phrases: list[tuple[str, list[int]]]

    @classmethod
    def from_ids(cls, text: str, ids: list[int], tokens: list[str] | None = None) -> Prompt:
        """Phrase blocks from the separator ids: a block runs up to and including the next
        separator; a block ending at the first or last token (the [CLS] alone, or a last
        phrase with no "." before [SEP]) keeps only itself, at position 0."""
        n = len(ids)
        ends = [i for i, t in enumerate(ids) if t in PHRASE_ENDS]
        closing = torch.tensor([next((e for e in ends if e >= i), n) for i in range(n)])
        opening = torch.tensor([max((e for e in ends if e < i), default=-1) for i in range(n)])
        inside = (closing != 0) & (closing != n - 1) & (closing != n)
        same_block = (closing[:, None] == closing[None]) & inside[:, None]
        attention = torch.eye(n, dtype=torch.bool) | same_block
        position = torch.where(inside, torch.arange(n) - opening - 1, 0)
        words = tokens or [str(t) for t in ids]
        starts = [i for i, t in enumerate(ids)
                  if t not in PHRASE_ENDS and (i == 0 or ids[i - 1] in PHRASE_ENDS)]
        spans = [list(range(i, int(closing[i]))) for i in starts]
        phrases = [(_join_wordpieces([words[j] for j in span]), span) for span in spans]
        return cls(text, torch.tensor(ids), position, attention, phrases)

    @classmethod
    def probe(cls) -> Prompt:
        """[CLS] one token [SEP], in any BERT vocabulary: to run a detector without its
        tokenizer (the converter's check that the weights give finite outputs)."""
        return cls.from_ids("probe", [101, 104, 102])

    @property
    def phrase_names(self) -> list[str]:
        return [name for name, _ in self.phrases]

    def phrase_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., max_text_len) token logits -> (..., P): each phrase's best token."""
        return torch.stack([logits[..., span].amax(-1) for _, span in self.phrases], -1)


def _join_wordpieces(pieces: list[str]) -> str:
    return " ".join(pieces).replace(" ##", "")


def load_tokenizer(folder: str | Path):
    """The prompt tokenizer saved with a converted Grounding DINO (its ``tokenizer/``)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("Grounding DINO needs transformers: pip install "
                          "frozenseg[grounding]") from None
    return AutoTokenizer.from_pretrained(str(folder))


def tokenize(tokenizer, text: str) -> Prompt:
    """``text`` -> a Prompt. As Grounding DINO's own demo does, the text is lowercased and
    stripped, and a final " ." is added if the text does not end with one."""
    text = text.strip().lower()
    if not text:
        raise ValueError("the prompt is empty: name the things to find, e.g. 'cat . dog .'")
    if not text.endswith("."):
        text += " ."
    ids = tokenizer(text)["input_ids"]
    prompt = Prompt.from_ids(text, ids, tokenizer.convert_ids_to_tokens(ids))
    if not prompt.phrases:
        raise ValueError(f"the prompt {text!r} has no phrase between its separators")
    # Phrases are named by the text between separators ("c_shape", not the wordpieces'
    # "c _ shape"), so that a dataset's category names match them.
    names = [part.strip() for part in re.split(r"[.?]", text) if part.strip()]
    if len(names) == len(prompt.phrases):
        prompt.phrases = [(name, span) for name, (_, span) in
                          zip(names, prompt.phrases, strict=True)]
    return prompt


class TextBackbone(nn.Module):
    """BERT (transformers' BertModel, without pooler) and the projection to the detector's
    width: a Prompt -> Text for a batch of ``batch`` images."""

    def __init__(self, *, bert: dict, dim: int) -> None:
        super().__init__()
        try:
            from transformers import BertConfig, BertModel
        except ImportError:
            raise ImportError("Grounding DINO needs transformers for its BERT text "
                              "encoder: pip install frozenseg[grounding]") from None
        self.bert = BertModel(BertConfig(**bert), add_pooling_layer=False)
        self.projection = nn.Linear(bert["hidden_size"], dim)

    def forward(self, prompt: Prompt, batch: int) -> Text:
        device = self.projection.weight.device
        ids = prompt.input_ids.to(device)[None].expand(batch, -1)
        attention = prompt.attention.to(device)[None, None].expand(batch, -1, -1, -1)
        out = self.bert(ids, attention, torch.zeros_like(ids),
                        prompt.position_ids.to(device)[None].expand(batch, -1))
        features = self.projection(out.last_hidden_state)
        return Text(features, torch.ones(ids.shape, dtype=torch.bool, device=device))


class BiAttention(nn.Module):
    """Image-to-text and text-to-image attention from one set of dot products: each image
    position attends to the text (softmax over tokens, padding masked), each token to the
    image (softmax over positions, padding masked). ``dim`` wide inside, ``heads`` heads."""

    def __init__(self, *, width: int, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.vision_proj = nn.Linear(width, dim)
        self.text_proj = nn.Linear(width, dim)
        self.values_vision_proj = nn.Linear(width, dim)
        self.values_text_proj = nn.Linear(width, dim)
        self.out_vision_proj = nn.Linear(dim, width)
        self.out_text_proj = nn.Linear(dim, width)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, -1).transpose(1, 2)

    def forward(self, vision, text, vision_padding, text_padding):
        """vision (B, S, C), text (B, T, C); paddings (B, S), (B, T) True at padding."""
        q = self._split(self.vision_proj(vision))
        scores = q @ self._split(self.text_proj(text)).transpose(-1, -2) * q.shape[-1] ** -0.5
        to_text = scores.masked_fill(text_padding[:, None, None], float("-inf")).softmax(-1)
        to_vision = scores.transpose(-1, -2).masked_fill(vision_padding[:, None, None],
                                                         float("-inf")).softmax(-1)
        vision_out = to_text @ self._split(self.values_text_proj(text))
        text_out = to_vision @ self._split(self.values_vision_proj(vision))
        return (self.out_vision_proj(vision_out.transpose(1, 2).flatten(2)),
                self.out_text_proj(text_out.transpose(1, 2).flatten(2)))


class FusionLayer(nn.Module):
    """Pre-norm BiAttention, each side added back with a learned per-channel scale."""

    def __init__(self, *, width: int, dim: int, heads: int) -> None:
        super().__init__()
        self.layer_norm_vision = nn.LayerNorm(width)
        self.layer_norm_text = nn.LayerNorm(width)
        self.attn = BiAttention(width=width, dim=dim, heads=heads)
        self.vision_param = nn.Parameter(torch.full((width,), 1e-4))
        self.text_param = nn.Parameter(torch.full((width,), 1e-4))

    def forward(self, vision, text, vision_padding, text_padding):
        vision, text = self.layer_norm_vision(vision), self.layer_norm_text(text)
        dv, dt = self.attn(vision, text, vision_padding, text_padding)
        return vision + self.vision_param * dv, text + self.text_param * dt


class FusionEncoderLayer(nn.Module):
    """Fusion, then the text enhancer on the fused text, then the deformable layer on the
    fused image."""

    def __init__(self, *, dim: int, ffn_dim: int, levels: int, heads: int, points: int) -> None:
        super().__init__()
        self.fusion_layer = FusionLayer(width=dim, dim=ffn_dim // 2, heads=heads // 2)
        # text self-attention, attention kept inside each phrase, relu FFN
        self.text_enhancer_layer = AttentionEncoderLayer(dim=dim, ffn_dim=ffn_dim // 2,
                                                         heads=heads // 2, activation="relu")
        self.deformable_layer = EncoderLayer(dim=dim, ffn_dim=ffn_dim, levels=levels,
                                             heads=heads, points=points)

    def forward(self, src, pos, reference_points, shapes, padding_mask, text, text_pos,
                blocked, text_padding):
        src, text = self.fusion_layer(src, text, padding_mask, text_padding)
        text = self.text_enhancer_layer(text, text_pos, blocked)
        return self.deformable_layer(src, pos, reference_points, shapes, padding_mask), text


class FusionEncoder(nn.Module):
    """Grounding DINO's feature enhancer: FusionEncoderLayers over the image and the text."""

    def __init__(self, *, layers: list[FusionEncoderLayer], dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.dim = dim

    def forward(self, src, pos, shapes, valid_ratios, padding_mask, text: Text,
                prompt: Prompt) -> tuple[list[torch.Tensor], Text]:
        """As :class:`Encoder`, plus the text: every layer's image output and the final
        text (the decoder's and the class heads' keys)."""
        reference_points = Encoder.reference_points(shapes, valid_ratios)
        text_pos = box_position_embedding(prompt.position_ids.to(src.device)[:, None].float(),
                                          num_feats=self.dim).to(src.dtype)[None]
        blocked = ~prompt.attention.to(src.device)
        features, outputs = text.features, []
        for layer in self.layers:
            src, features = run_layer(self, layer, src, pos, reference_points, shapes,
                                      padding_mask, features, text_pos, blocked, ~text.mask)
            outputs.append(src)
        return outputs, Text(features, text.mask)


class TextDecoderLayer(DecoderLayer):
    """DINO's decoder layer with text cross-attention between its self-attention and its
    deformable cross-attention (queries + query_pos attend to the text, add & norm)."""

    def __init__(self, *, dim: int, ffn_dim: int, levels: int, heads: int, points: int,
                 cross_heads: int | None = None) -> None:
        super().__init__(dim=dim, ffn_dim=ffn_dim, levels=levels, heads=heads, points=points,
                         cross_heads=cross_heads)
        self.text_cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_text = nn.LayerNorm(dim)

    def forward(self, tgt, query_pos, reference_points, memory, shapes, memory_mask,
                self_attn_mask=None, text: Text | None = None):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.self_attn(q, k, tgt, attn_mask=self_attn_mask,
                                              need_weights=False)[0])
        attended = self.text_cross_attn(tgt + query_pos, text.features, text.features,
                                        key_padding_mask=~text.mask, need_weights=False)[0]
        tgt = self.norm_text(tgt + attended)
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, shapes, None,
                                   memory_mask)
        tgt = self.norm1(tgt + attended)
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class ContrastiveHead(nn.Module):
    """Class logits of queries against the text: (B, Q, C) x Text -> (B, Q, max_text_len),
    the dot product with each token, -inf at padding and past the text."""

    def __init__(self, *, max_text_len: int) -> None:
        super().__init__()
        self.max_text_len = max_text_len

    def forward(self, queries: torch.Tensor, text: Text) -> torch.Tensor:
        logits = (queries @ text.features.transpose(-1, -2)).masked_fill(
            ~text.mask[:, None], float("-inf"))
        return F.pad(logits, (0, self.max_text_len - logits.shape[-1]), value=float("-inf"))
