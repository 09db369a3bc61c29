"""BIO codec for JAVE's value tagger (Zhu et al., EMNLP 2020): character spans <-> attribute-specific token tags.

The model reads ``title [SEP] description [SEP] linearized specs`` (``build_text``), tokenized by a Hugging Face
fast tokenizer whose character offsets tie every token to the text. With A attributes there are K = 1 + 2A tags:
0 is "O", ``1 + 2a`` is B-attribute_a and ``2 + 2a`` is I-attribute_a.

Encoding rules (``encode``):
  * a token belongs to a span when their character ranges overlap; the first such token gets B, the rest I.
    Spans that start or end inside a token therefore expand to token boundaries ("3.5g" inside "3.5g," is exact:
    WordPiece splits punctuation, so it covers "3", ".", "5", "##g"; "Letter" inside "Letters" widens to
    "Letters"), and leading or trailing whitespace in a span, which no token covers, drops out on decoding.
  * overlapping spans: the longer span wins (ties: the earlier one, then the attribute that sorts first); a span
    sharing any token with a span already placed is dropped whole and counted in ``SpanStats.conflicts``. The
    same attribute over the same tokens twice is one span (``duplicates``).
  * spans past the truncation point are counted in ``truncated``: a cut span keeps its visible tokens, a span
    entirely past it is lost. Spans with no token at all (empty, whitespace) are counted in ``empty``.
  * tokens outside every field ([CLS], the [SEP]s between fields, padding) get the ignore index -100.

Decoding rules (``decode``), lenient like seqeval's default (conlleval) mode:
  * B-a starts a span; I-a continues the open span when it is of attribute a, in the same field and on the
    previous token, and otherwise starts a new span (an I without a B is not thrown away); O, ignored tokens and
    field boundaries close the open span.
  * the value is the exact text from the first character of the first token to the last character of the last
    token, reported with offsets relative to its field; with tag probabilities the score is the mean probability
    of the span's tags.

So ``decode(encode(spans)) == spans`` exactly for spans on token boundaries with no conflicts and no truncation;
other spans come back widened to the tokens they touch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from features.text import linearize_specs

IGNORE_INDEX = -100  # torch.nn.CrossEntropyLoss's default ignore_index
FIELDS: tuple[str, ...] = ("title", "description", "specs")  # token_field ids are positions here; -1 is none
DEFAULT_SEP = " [SEP] "  # BERT's separator; pass ``separator(tokenizer)`` for other tokenizers

Span = tuple[str, int, int]  # (attribute, begin, end): character offsets into the model text, end exclusive


# --------------------------------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class AttributeVocab:
    """Ordered attribute names <-> ids, and the K = 1 + 2A BIO tag names built on them."""

    attributes: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        attributes = tuple(self.attributes)
        object.__setattr__(self, "attributes", attributes)
        index = {a: i for i, a in enumerate(attributes)}
        if len(index) != len(attributes):
            dupes = sorted({a for a in attributes if attributes.count(a) > 1})
            raise ValueError(f"Duplicate attribute names {dupes} in the vocabulary; each attribute must appear once")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_labels(cls, labels: Iterable[str | Mapping[str, Any]]) -> AttributeVocab:
        """The sorted distinct attributes of ``labels`` (label dicts or attribute names): same set, same vocab."""
        return cls(tuple(sorted({lb if isinstance(lb, str) else lb["attribute"] for lb in labels})))

    def __len__(self) -> int:
        return len(self.attributes)

    def __contains__(self, attribute: object) -> bool:
        return attribute in self._index

    def id(self, attribute: str) -> int:
        try:
            return self._index[attribute]
        except KeyError:
            raise KeyError(
                f"Unknown attribute {attribute!r}; the vocabulary has {len(self)} attributes "
                f"(build it with AttributeVocab.from_labels over the training labels)"
            ) from None

    @property
    def num_tags(self) -> int:
        return 1 + 2 * len(self.attributes)

    @property
    def tag_names(self) -> tuple[str, ...]:
        return ("O",) + tuple(f"{p}-{a}" for a in self.attributes for p in ("B", "I"))

    def begin_tag(self, attribute: str) -> int:
        return 1 + 2 * self.id(attribute)

    def inside_tag(self, attribute: str) -> int:
        return 2 + 2 * self.id(attribute)

    def to_json(self) -> dict[str, Any]:
        return {"attributes": list(self.attributes)}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> AttributeVocab:
        """From ``to_json``'s dict (or its JSON string)."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        return cls(tuple(obj["attributes"]))


# --------------------------------------------------------------------------------------------------- model text


class FieldOffsets(Mapping[str, int]):
    """Where each present field starts in the model text (a read-only ``{field: begin}`` mapping), and ends."""

    def __init__(self, ranges: Mapping[str, tuple[int, int]]) -> None:
        self.ranges: dict[str, tuple[int, int]] = dict(ranges)

    def __getitem__(self, name: str) -> int:
        return self.ranges[name][0]

    def __iter__(self):
        return iter(self.ranges)

    def __len__(self) -> int:
        return len(self.ranges)

    def __repr__(self) -> str:
        return f"FieldOffsets({self.ranges!r})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, FieldOffsets):
            return self.ranges == other.ranges
        return super().__eq__(other)

    def end(self, name: str) -> int:
        return self.ranges[name][1]

    def to_json(self) -> dict[str, list[int]]:
        return {n: [b, e] for n, (b, e) in self.ranges.items()}

    @classmethod
    def from_json(cls, obj: Mapping[str, Sequence[int]]) -> FieldOffsets:
        """From ``to_json``'s ``{field: [begin, end]}``."""
        return cls({n: (int(b), int(e)) for n, (b, e) in obj.items()})

    def to_text(self, name: str, begin: int, end: int) -> tuple[int, int]:
        """A field-relative span -> offsets into the model text."""
        b, e = self.ranges[name]
        if not 0 <= begin <= end <= e - b:
            raise ValueError(f"Span ({begin}, {end}) lies outside field {name!r} of length {e - b}")
        return b + begin, b + end


def separator(tokenizer: Any) -> str:
    """The field separator for ``tokenizer``: its sep token with a space on each side, e.g. ``" [SEP] "``."""
    return f" {tokenizer.sep_token} "


def build_text(
    title: str | None,
    description: str | None = None,
    specs: Sequence[Mapping[str, str]] | str | None = None,
    sep: str = DEFAULT_SEP,
) -> tuple[str, FieldOffsets]:
    """JAVE's model text ``title [SEP] description [SEP] specs`` and where each field sits in it.

    Empty fields are left out with their separator (a title-only product's text is its title), so the returned
    ``FieldOffsets`` names only the fields present. ``offsets[field] + label_begin`` is a label's text offset.

    Args:
        title, description: the product's text fields.
        specs: the spec table (list of ``{key, value}``) or its ``linearize_specs`` string.
        sep: the separator between fields; ``separator(tokenizer)`` for a non-BERT tokenizer.
    """
    spec_text = specs if isinstance(specs, str) else linearize_specs(specs)
    parts: list[str] = []
    ranges: dict[str, tuple[int, int]] = {}
    pos = 0
    for name, value in zip(FIELDS, (title, description, spec_text), strict=True):
        if not value:
            continue
        if parts:
            parts.append(sep)
            pos += len(sep)
        parts.append(value)
        ranges[name] = (pos, pos + len(value))
        pos += len(value)
    return "".join(parts), FieldOffsets(ranges)


def label_spans(labels: Iterable[Mapping[str, Any]], field_offsets: FieldOffsets) -> list[Span]:
    """Canonical labels -> text spans; labels without a span (implicit, "n/a") or of an absent field are skipped."""
    spans = []
    for lb in labels:
        name = lb.get("field")
        if name is None or lb.get("begin") is None or name not in field_offsets:
            continue
        spans.append((lb["attribute"], *field_offsets.to_text(name, lb["begin"], lb["end"])))
    return spans


# --------------------------------------------------------------------------------------------------- encoding


@dataclass
class SpanStats:
    """What happened to the spans given to ``encode`` (add them up over a dataset with ``+``)."""

    spans: int = 0  # given
    placed: int = 0  # tagged (including cut ones)
    conflicts: int = 0  # dropped: shared a token with a longer (or earlier) span of another attribute
    duplicates: int = 0  # same attribute on the same tokens as a placed span: one span
    truncated: int = 0  # reached past the truncation point (cut, or lost when wholly past it)
    empty: int = 0  # covered no token (empty or whitespace-only)

    def __add__(self, other: SpanStats) -> SpanStats:
        return SpanStats(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class Encoded:
    """One example: tokens, their character offsets and field, and the target tags (all unpadded, length T)."""

    input_ids: np.ndarray  # (T,) int64
    attention_mask: np.ndarray  # (T,) int64
    offsets: np.ndarray  # (T, 2) int64, character offsets into the text; (0, 0) for special tokens
    token_field: np.ndarray  # (T,) int64, index into FIELDS, -1 outside every field
    tags: np.ndarray  # (T,) int64, BIO tag ids, IGNORE_INDEX outside every field
    stats: SpanStats


def _token_fields(offsets: np.ndarray, field_offsets: FieldOffsets | None, text_len: int) -> np.ndarray:
    token_field = np.full(len(offsets), -1, dtype=np.int64)
    real = offsets[:, 1] > offsets[:, 0]
    for name, b, e in _field_ranges(field_offsets, text_len):
        token_field[real & (offsets[:, 0] >= b) & (offsets[:, 1] <= e)] = FIELDS.index(name)
    return token_field


def _field_ranges(field_offsets: FieldOffsets | None, text_len: int) -> list[tuple[str, int, int]]:
    """(field, begin, end) of each field in the text."""
    if field_offsets is None:
        return [("title", 0, text_len)]
    if not isinstance(field_offsets, FieldOffsets):
        if any(isinstance(v, int) for v in field_offsets.values()):
            raise TypeError(
                f"field_offsets {dict(field_offsets)!r} gives where fields begin but not where they end, so the "
                "separators between them cannot be told apart; pass build_text's FieldOffsets (or "
                "FieldOffsets.from_json of its to_json())"
            )
        field_offsets = FieldOffsets.from_json(field_offsets)
    return [(n, b, e) for n, (b, e) in field_offsets.ranges.items()]


def _assign_tags(
    text: str, offsets: np.ndarray, token_field: np.ndarray, spans: Sequence[Span], vocab: AttributeVocab, visible: int
) -> tuple[np.ndarray, SpanStats]:
    """BIO tags for ``spans``; ``visible`` is where truncation cut the text (its length when it did not)."""
    tags = np.where(token_field >= 0, 0, IGNORE_INDEX).astype(np.int64)
    stats = SpanStats(spans=len(spans))
    content = np.flatnonzero(token_field >= 0)  # token ids of field tokens, in text order
    starts, ends = offsets[content, 0], offsets[content, 1]
    placed: set[tuple[int, int, int]] = set()
    # Longest first, then earliest, then attribute id: the order in which conflicts are resolved.
    order = sorted(spans, key=lambda s: (-(s[2] - s[1]), s[1], vocab.id(s[0])))
    for attribute, begin, end in order:
        if not 0 <= begin <= end <= len(text):
            raise ValueError(f"Span {(attribute, begin, end)} is outside the text of length {len(text)}")
        a = vocab.id(attribute)
        lo = int(np.searchsorted(ends, begin, side="right"))  # first token ending after begin
        hi = int(np.searchsorted(starts, end, side="left"))  # first token starting at or after end
        cut = end > visible and bool(text[visible:end].strip())
        if cut:
            stats.truncated += 1
        if lo >= hi or begin == end:
            stats.empty += not cut
            continue
        if (a, lo, hi) in placed:
            stats.duplicates += 1
            continue
        idx = content[lo:hi]
        if tags[idx].any():
            stats.conflicts += 1
            continue
        tags[idx] = 2 + 2 * a
        tags[idx[0]] = 1 + 2 * a
        placed.add((a, lo, hi))
        stats.placed += 1
    return tags, stats


def encode_batch(
    texts: Sequence[str],
    spans: Sequence[Sequence[Span]],
    tokenizer: Any,
    vocab: AttributeVocab,
    max_length: int,
    field_offsets: Sequence[FieldOffsets | None] | None = None,
) -> list[Encoded]:
    """``encode`` for many texts with one (Rust, parallel) tokenizer call."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer, so it cannot return character offsets; "
            "load one with features.text.load_tokenizer or AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    if len(spans) != len(texts):
        raise ValueError(f"Got {len(texts)} texts but {len(spans)} span lists; pass one span list per text")
    if field_offsets is None:
        field_offsets = [None] * len(texts)
    batch = tokenizer(
        list(texts), truncation=True, max_length=max_length, return_offsets_mapping=True, return_attention_mask=True
    )
    out = []
    for i, text in enumerate(texts):
        ids = np.asarray(batch["input_ids"][i], dtype=np.int64)
        offsets = np.asarray(batch["offset_mapping"][i], dtype=np.int64).reshape(-1, 2)
        token_field = _token_fields(offsets, field_offsets[i], len(text))
        visible = len(text) if len(ids) < max_length else int(offsets[:, 1].max(initial=0))
        tags, stats = _assign_tags(text, offsets, token_field, spans[i], vocab, visible)
        mask = np.asarray(batch["attention_mask"][i], dtype=np.int64)
        out.append(Encoded(ids, mask, offsets, token_field, tags, stats))
    return out


def encode(
    text: str,
    spans: Sequence[Span],
    tokenizer: Any,
    vocab: AttributeVocab,
    max_length: int,
    field_offsets: FieldOffsets | None = None,
) -> Encoded:
    """Tokenize ``text`` and tag its tokens with the BIO tags of ``spans`` (rules in the module docstring).

    Args:
        text: the model text, usually from ``build_text``.
        spans: (attribute, begin, end) character offsets into ``text``.
        tokenizer: a Hugging Face fast tokenizer.
        vocab: the attributes; an attribute outside it is a KeyError.
        max_length: tokens kept, special tokens included.
        field_offsets: ``build_text``'s offsets; None treats the whole text as the title.
    """
    return encode_batch([text], [spans], tokenizer, vocab, max_length, [field_offsets])[0]


def collate(encoded: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest example: ids with ``pad_id``, tags with -100, fields with -1, offsets with 0."""
    t = max(len(e.input_ids) for e in encoded)
    b = len(encoded)
    out = {
        "input_ids": torch.full((b, t), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((b, t), dtype=torch.long),
        "offsets": torch.zeros((b, t, 2), dtype=torch.long),
        "token_field": torch.full((b, t), -1, dtype=torch.long),
        "tags": torch.full((b, t), IGNORE_INDEX, dtype=torch.long),
    }
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        for key in out:
            out[key][i, :n] = torch.from_numpy(getattr(e, key))
    return out


# --------------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Extraction:
    """One extracted value: ``value == field_text[begin:end]``; score is None when decoded from hard tags."""

    attribute: str
    value: str
    field: str
    begin: int
    end: int
    score: float | None = None


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def decode(
    text: str,
    offsets: Any,
    tags: Any,
    vocab: AttributeVocab,
    field_offsets: FieldOffsets | None = None,
) -> list[Extraction]:
    """Token tags (or tag probabilities) -> extracted values with field-relative spans (rules in the module doc).

    Args:
        text: the model text the offsets index.
        offsets: (T, 2) character offsets of the tokens (padding and special tokens have end <= begin).
        tags: (T,) tag ids, or (T, K) tag probabilities (the argmax is decoded, its probability scores the span).
        vocab: the attributes the tags were built on.
        field_offsets: ``build_text``'s offsets; None treats the whole text as the title.
    """
    offsets = _numpy(offsets).astype(np.int64).reshape(-1, 2)
    tags = _numpy(tags)
    probs = None
    if tags.ndim == 2:
        if tags.shape[1] != vocab.num_tags:
            raise ValueError(f"Tag probabilities have {tags.shape[1]} columns; the vocabulary has {vocab.num_tags} (K)")
        probs = tags.astype(np.float64)
        tags = probs.argmax(axis=1)
        tag_prob = probs[np.arange(len(tags)), tags]
    tags = tags.astype(np.int64)
    if len(tags) != len(offsets):
        raise ValueError(f"Got {len(tags)} tags for {len(offsets)} tokens; pass one tag per token")
    token_field = _token_fields(offsets, field_offsets, len(text))
    ranges = {n: b for n, b, _ in _field_ranges(field_offsets, len(text))}
    # O and tokens outside every field close spans; tag ids beyond the vocabulary are treated as O.
    active = (token_field >= 0) & (tags > 0) & (tags < vocab.num_tags)

    out: list[Extraction] = []
    start = -1  # first token of the open span, -1 when none
    # plain Python lists and a running sum: this loop runs per token of every product at inference, where numpy
    # scalar indexing and a .mean() per span cost more than the model's heads (bench/enrich.py, warm)
    tag_l, field_l, off_l = tags.tolist(), token_field.tolist(), offsets.tolist()
    csum = np.concatenate(([0.0], np.cumsum(tag_prob))).tolist() if probs is not None else None

    def close(last: int) -> None:
        name = FIELDS[field_l[start]]
        b, e = off_l[start][0], off_l[last][1]
        score = (csum[last + 1] - csum[start]) / (last + 1 - start) if csum is not None else None
        attribute = vocab.attributes[(tag_l[start] - 1) // 2]
        out.append(Extraction(attribute, text[b:e], name, b - ranges[name], e - ranges[name], score))

    for i, is_active in enumerate(active.tolist()):
        if not is_active:
            if start >= 0:
                close(i - 1)
                start = -1
            continue
        tag = tag_l[i]
        continues = (
            start >= 0
            and tag % 2 == 0  # an I tag ...
            and (tag - 1) // 2 == (tag_l[start] - 1) // 2  # ... of the open span's attribute ...
            and field_l[i] == field_l[start]  # ... in its field
        )
        if not continues:
            if start >= 0:
                close(i - 1)
            start = i
    if start >= 0:
        close(len(tags) - 1)
    return out
