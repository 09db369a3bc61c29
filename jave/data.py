"""Training data for JAVE (Zhu et al., EMNLP 2020): canonical catalog rows -> tokenized examples -> `ProductBatch`es.

A `TaskSpec` fixes what a model extracts (the attribute vocabulary, the implicit attributes and their closed value
sets, the token budget); it is saved beside the weights as JSON. `build_examples` tokenizes rows once (one fast
tokenizer call); `batches` pads them, and adds images (loaded and preprocessed, or precomputed features from a
cache) when asked. A product whose image is missing gets ``media_mask`` False, never a fake image.

Label conventions of the canonical row: a label with a span (``field``/``begin``/``end``) is an extracted value; a
label with value ``"n/a"`` says the attribute applies but the product has no value for it (ExtractGPT, WDC-PAVE);
a label without a span and another value is implicit (not written in the text, e.g. ImplicitAVE).
"""

from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from features.batch import IGNORE_INDEX, ProductBatch
from jave.codec import AttributeVocab, Encoded, FieldOffsets, build_text, collate, encode_batch, label_spans, separator

NA_VALUE = "n/a"  # the attribute applies but has no value (ExtractGPT / WDC-PAVE convention)

ImageLoader = Callable[[str], Any]  # uri -> PIL image (None or an exception: missing)
Preprocess = Callable[[Sequence[Any]], torch.Tensor]  # PIL images -> (N, 3, H, W), e.g. ImageTower.preprocess
VisualCache = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # uri or sha256 -> (global (Dv,), regions (R, Dv))


# ------------------------------------------------------------------------------------------------------ task spec


@dataclass(frozen=True)
class TaskSpec:
    """What one JAVE model predicts; saved as ``spec.json`` beside its weights.

    Attributes:
        vocab: the attributes the tagger extracts and the attribute head predicts (A).
        implicit: implicit attribute -> its closed value set, in head order (one implicit head each).
        max_length: tokens per product, special tokens included.
    """

    vocab: AttributeVocab
    implicit: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_length: int = 128

    def __post_init__(self) -> None:
        object.__setattr__(self, "implicit", {a: tuple(v) for a, v in self.implicit.items()})
        small = {a: v for a, v in self.implicit.items() if len(v) < 2}
        if small:
            raise ValueError(f"Implicit attributes {sorted(small)} have fewer than 2 values; a closed set needs >= 2")
        if self.max_length < 8:
            raise ValueError(f"max_length ({self.max_length}) is too small for any product text; use >= 8")

    @property
    def implicit_attributes(self) -> tuple[str, ...]:
        return tuple(self.implicit)

    @property
    def implicit_value_sizes(self) -> tuple[int, ...]:
        """What ``JaveConfig.implicit_value_sizes`` must be for this task."""
        return tuple(len(v) for v in self.implicit.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": list(self.vocab.attributes),
            "implicit": {a: list(v) for a, v in self.implicit.items()},
            "max_length": self.max_length,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | str) -> TaskSpec:
        """From ``to_json``'s dict (or its JSON string)."""
        if isinstance(obj, str):
            obj = json.loads(obj)
        return cls(
            vocab=AttributeVocab(tuple(obj["attributes"])),
            implicit={a: tuple(v) for a, v in obj.get("implicit", {}).items()},
            max_length=int(obj["max_length"]),
        )

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[Mapping[str, Any]],
        max_length: int = 128,
        implicit_options: Mapping[str, Sequence[str]] | None = None,
        min_count: int = 1,
        implicit_share: float = 0.5,
    ) -> TaskSpec:
        """The task the labels of ``rows`` (usually the training split) define.

        Extracted attributes: those with at least ``min_count`` span or "n/a" labels, sorted. Implicit attributes:
        the keys of ``implicit_options`` (attribute -> closed value set) when given; otherwise every attribute whose
        valued labels are mostly (``>= implicit_share``) without a span, with the distinct values seen at least
        ``min_count`` times as its closed set (sorted). A few unaligned values of an otherwise extracted attribute
        do not make it implicit. An attribute may be both: tagged where its value is written, classified always.
        """
        spans: Counter[str] = Counter()
        na: Counter[str] = Counter()
        unaligned: Counter[str] = Counter()
        values: dict[str, Counter[str]] = defaultdict(Counter)
        for row in rows:
            for lb in row.get("labels") or ():
                a, value = lb["attribute"], lb["value"]
                if value == NA_VALUE:
                    na[a] += 1
                    continue
                values[a][value] += 1
                if lb.get("field") is not None and lb.get("begin") is not None:
                    spans[a] += 1
                else:
                    unaligned[a] += 1
        extracted = sorted(a for a in set(spans) | set(na) if spans[a] + na[a] >= min_count)
        if implicit_options is not None:
            implicit = {a: tuple(v) for a, v in implicit_options.items()}
        else:
            implicit = {}
            for a in sorted(unaligned):
                if unaligned[a] >= min_count and unaligned[a] >= implicit_share * (unaligned[a] + spans[a]):
                    kept = tuple(sorted(v for v, n in values[a].items() if n >= min_count))
                    if len(kept) >= 2:
                        implicit[a] = kept
        if not extracted:
            raise ValueError(
                "No attribute has a span or 'n/a' label in these rows, so there is nothing to tag; JAVE needs at "
                "least one extracted attribute (check that the rows carry labels with field/begin/end)."
            )
        return cls(AttributeVocab(tuple(extracted)), implicit, max_length)


# ------------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One product, tokenized once, with its training targets and the gold labels kept for evaluation.

    Attributes:
        product_id: the row's id.
        text: the model text (``build_text``).
        fields: where each field sits in ``text``.
        encoded: tokens, offsets, fields and BIO tag targets (unpadded).
        attr_target: (A,) 1.0 where the attribute has a value written in the text (a span label), else 0.
        implicit_target: (A_impl,) value index per implicit attribute, -100 where unknown.
        images: the product's image URIs (or blob paths), in order.
        gold: the row's labels, unchanged.
        category: the row's category (ExtractGPT scores per category).
        pad_id: the tokenizer's padding id.
    """

    product_id: str
    text: str
    fields: FieldOffsets
    encoded: Encoded
    attr_target: np.ndarray
    implicit_target: np.ndarray
    images: tuple[str, ...] = ()
    gold: tuple[dict[str, Any], ...] = ()
    category: str | None = None
    pad_id: int = 0

    @property
    def length(self) -> int:
        return len(self.encoded.input_ids)

    @property
    def gold_values(self) -> dict[str, set[str]]:
        """Attribute -> its gold values ({"n/a"} when known to have none), for every labelled attribute."""
        out: dict[str, set[str]] = defaultdict(set)
        for lb in self.gold:
            out[lb["attribute"]].add(lb["value"])
        return dict(out)


def build_examples(rows: Iterable[Mapping[str, Any]], spec: TaskSpec, tokenizer: Any) -> list[Example]:
    """Tokenize ``rows`` into examples with one batched (Rust) tokenizer call.

    Labels of attributes outside ``spec`` are kept in ``Example.gold`` (they count as misses in ExtractGPT
    scoring) but give no training target.
    """
    rows = list(rows)
    sep = separator(tokenizer)
    texts, offsets, spans = [], [], []
    for row in rows:
        text, fo = build_text(row.get("title"), row.get("description"), row.get("specs"), sep=sep)
        labels = [lb for lb in row.get("labels") or () if lb["attribute"] in spec.vocab and lb["value"] != NA_VALUE]
        texts.append(text)
        offsets.append(fo)
        spans.append(label_spans(labels, fo))
    encoded = encode_batch(texts, spans, tokenizer, spec.vocab, spec.max_length, offsets) if rows else []
    implicit_index = {a: {v: i for i, v in enumerate(vals)} for a, vals in spec.implicit.items()}
    pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    out = []
    for row, text, fo, span_list, enc in zip(rows, texts, offsets, spans, encoded, strict=True):
        attr = np.zeros(len(spec.vocab), dtype=np.float32)
        for a, _, _ in span_list:
            attr[spec.vocab.id(a)] = 1.0
        implicit = np.full(len(spec.implicit), IGNORE_INDEX, dtype=np.int64)
        for lb in row.get("labels") or ():
            index = implicit_index.get(lb["attribute"])
            if index is not None and lb["value"] in index:
                implicit[list(spec.implicit).index(lb["attribute"])] = index[lb["value"]]
        out.append(
            Example(
                product_id=str(row.get("product_id")),
                text=text,
                fields=fo,
                encoded=enc,
                attr_target=attr,
                implicit_target=implicit,
                images=tuple(row.get("images") or ()),
                gold=tuple(dict(lb) for lb in row.get("labels") or ()),
                category=row.get("category"),
                pad_id=pad_id,
            )
        )
    return out


# -------------------------------------------------------------------------------------------------------- batches


def batch_order(
    examples: Sequence[Example], batch_size: int, *, shuffle: bool, seed: int = 0, bucket_by_length: bool = True
) -> list[list[int]]:
    """Example indices per batch. The order depends only on ``seed`` (not on global RNG state), so a resumed run
    sees the batches an uninterrupted one would.

    With ``bucket_by_length``, examples of similar length share a batch (less padding): shuffled, cut into pools
    of 50 batches, sorted by length inside each pool; batch order is then shuffled. Without ``shuffle`` the
    batches come sorted by length (bucketing) or in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size ({batch_size}) must be >= 1")
    rng = random.Random(seed)
    index = list(range(len(examples)))
    if shuffle:
        rng.shuffle(index)
    if bucket_by_length:
        pool = batch_size * 50 if shuffle else max(len(index), 1)
        index = [
            i
            for start in range(0, len(index), pool)
            for i in sorted(index[start : start + pool], key=lambda i: examples[i].length)
        ]
    out = [index[i : i + batch_size] for i in range(0, len(index), batch_size)]
    if shuffle and bucket_by_length:
        rng.shuffle(out)
    return out


def make_batch(
    examples: Sequence[Example],
    *,
    image_loader: ImageLoader | None = None,
    preprocess: Preprocess | None = None,
    visual_cache: VisualCache | None = None,
    max_images: int = 4,
    with_labels: bool = True,
) -> ProductBatch:
    """One padded `ProductBatch` of ``examples`` (see `batches`)."""
    padded = collate([e.encoded for e in examples], pad_id=examples[0].pad_id)
    b = len(examples)
    media_mask = torch.zeros(b, 0, dtype=torch.bool)
    visual: dict[str, torch.Tensor] = {}
    if visual_cache is not None:
        media_mask, visual = _cached_visuals(examples, visual_cache, max_images)
    elif image_loader is not None:
        if preprocess is None:
            raise ValueError("batches(image_loader=...) also needs preprocess=, e.g. the image tower's .preprocess")
        media_mask, pixels = _load_pixels(examples, image_loader, preprocess, max_images)
        if pixels is not None:
            visual = {"pixel_values": pixels}
    labels: dict[str, torch.Tensor] = {}
    if with_labels:
        labels["attr_labels"] = torch.from_numpy(np.stack([e.attr_target for e in examples]))
        labels["tag_labels"] = padded["tags"]
        if examples[0].implicit_target.size:
            labels["implicit_labels"] = torch.from_numpy(np.stack([e.implicit_target for e in examples]))
    return ProductBatch(
        input_ids=padded["input_ids"],
        attention_mask=padded["attention_mask"],
        token_field=padded["token_field"],
        media_mask=media_mask,
        **visual,
        **labels,
    )


def _load_pixels(
    examples: Sequence[Example], loader: ImageLoader, preprocess: Preprocess, max_images: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    m = min(max_images, max((len(e.images) for e in examples), default=0))
    mask = torch.zeros(len(examples), m, dtype=torch.bool)
    images, slots = [], []
    for i, e in enumerate(examples):
        for j, uri in enumerate(e.images[:m]):
            try:
                image = loader(uri)
            except Exception:  # noqa: BLE001  any loader error (e.g. warehouse MediaError) = missing: slot stays masked
                image = None
            if image is not None:
                images.append(image)
                slots.append((i, j))
    if not images:
        return mask, None
    pixels = preprocess(images)  # (N, 3, H, W)
    out = pixels.new_zeros(len(examples), m, *pixels.shape[1:])  # (B, M, 3, H, W)
    for (i, j), px in zip(slots, pixels, strict=True):
        out[i, j] = px
        mask[i, j] = True
    return mask, out


def _cached_visuals(
    examples: Sequence[Example], cache: VisualCache, max_images: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    m = min(max_images, max((len(e.images) for e in examples), default=0))
    mask = torch.zeros(len(examples), m, dtype=torch.bool)
    hits = {}
    for i, e in enumerate(examples):
        for j, key in enumerate(e.images[:m]):
            feats = cache.get(key)
            if feats is not None:
                hits[i, j] = feats
                mask[i, j] = True
    if not hits:
        return mask, {}
    # assembled in numpy: a pure memory copy, where torch's intra-op threads only add barrier overhead (measured
    # 60x slower with 2 threads than 1 on a busy 2-core box)
    # float16 features, as the visual store keeps them, are copied as float16 and cast once per batch by one torch
    # op (a single vectorised kernel, not the many small ops that comment is about)
    glob0, reg0 = (np.asarray(x) for x in next(iter(hits.values())))
    dtype = np.result_type(glob0.dtype, reg0.dtype, *(np.asarray(x).dtype for gr in hits.values() for x in gr))
    glob = np.zeros((len(examples), m, *glob0.shape), dtype)  # (B, M, Dv)
    regions = np.zeros((len(examples), m, *reg0.shape), dtype)  # (B, M, R, Dv)
    for (i, j), (g, r) in hits.items():
        glob[i, j], regions[i, j] = np.asarray(g), np.asarray(r)
    return mask, {"visual_global": torch.from_numpy(glob).float(), "visual_regions": torch.from_numpy(regions).float()}


def batches(
    examples: Sequence[Example],
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    image_loader: ImageLoader | None = None,
    preprocess: Preprocess | None = None,
    visual_cache: VisualCache | None = None,
    max_images: int = 4,
    bucket_by_length: bool = True,
    with_labels: bool = True,
) -> Iterator[ProductBatch]:
    """Padded `ProductBatch`es of ``examples``, in ``batch_order``.

    Args:
        examples: from ``build_examples``.
        batch_size: products per batch (the last one may be smaller).
        shuffle, seed: shuffle with ``random.Random(seed)``; pass ``seed + epoch`` for a new order each epoch.
        image_loader: uri -> PIL image (None or OSError/ValueError when missing); loads up to ``max_images`` per
            product into ``pixel_values`` through ``preprocess`` (the image tower's ``preprocess``).
        visual_cache: uri -> precomputed (global (Dv,), regions (R, Dv)) features; used instead of the loader
            when given (a cache miss leaves the slot masked).
        bucket_by_length: batch examples of similar length together.
        with_labels: attach attribute, tag and implicit targets.
    """
    for index in batch_order(examples, batch_size, shuffle=shuffle, seed=seed, bucket_by_length=bucket_by_length):
        yield make_batch(
            [examples[i] for i in index],
            image_loader=image_loader,
            preprocess=preprocess,
            visual_cache=visual_cache,
            max_images=max_images,
            with_labels=with_labels,
        )
