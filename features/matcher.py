"""Pair matchers for product dedupe, after Ditto (Li et al., VLDB 2021, "Deep Entity Matching with Pre-Trained
Language Models").

- ``PairMatcher``: the cross-encoder over the serialized pair ``COL title VAL ... [SEP] COL title VAL ...``,
  fine-tuned from the text tower. Two of Ditto's optimisations are here in CPU-cheap form: summarisation
  (``Summarizer``: repeated words dropped, then only the highest-IDF words kept, words with digits — model numbers,
  part numbers, sizes — always, in their original order; Ditto keeps the top TF-IDF tokens the same way) and batches
  of similar length (dynamic padding wastes little). MixDA augmentation is left out.
- ``HybridMatcher``: gradient-boosted trees on cheap pair features (``PairFeatures``: frozen-tower cosine of the
  records and of the titles, TF-IDF word and character n-gram cosines, token Jaccard, overlap and containment of
  "code" tokens, price ratio; optionally the cosine of a SupCon-fine-tuned tower, features/supcon.py), optionally
  blended with a cross-encoder's score (blend weight and threshold chosen on validation pairs). Product matching
  hinges on model numbers, which the features compare exactly.
- ``cosine_scores``: the bi-encoder baseline, cosine of the tower's mean-pooled embeddings of each record.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from features.similarity import threshold_for_f1
from features.towers import TextTower, TextTowerConfig, mean_pool

Pair = tuple[Mapping, Mapping]
Triple = tuple[Mapping, Mapping, int]

_WORD = re.compile(r"[a-z0-9]+(?:[-./][a-z0-9]+)*")
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_MARKERS = frozenset({"COL", "VAL"})


def serialize(row: Mapping) -> str:
    """A canonical row as Ditto writes a record: ``COL title VAL ... COL description VAL ... COL <key> VAL <value>``."""
    parts = [f"COL title VAL {row.get('title') or ''}"]
    if row.get("description"):
        parts.append(f"COL description VAL {row['description']}")
    parts += [f"COL {s['key']} VAL {s['value']}" for s in row.get("specs") or ()]
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------------ text helpers


def words(text: str) -> list[str]:
    """Lower-cased word tokens; ``-``, ``.`` and ``/`` stay inside a token (``kdl-40v4100``, ``2.5``, ``dvd/cd``)."""
    return _WORD.findall(text.lower())


def code_tokens(text: str) -> set[str]:
    """Model-number-like tokens, normalised (lower case, ``-./`` removed): letters mixed with digits and at least 4
    characters (``kdl40v4100``, ``388504b21``, ``64gb``), or 5+ digits (part numbers). Vendors write the same code
    with and without separators (``XTA-3510-73-GB`` vs ``XTA-3510-73GB``); normalised, they compare equal."""
    out = set()
    for w in words(text):
        code = _NOT_ALNUM.sub("", w)
        has_digit = any(c.isdigit() for c in code)
        if has_digit and (len(code) >= 5 if code.isdigit() else len(code) >= 4):
            out.add(code)
    return out


def _price(row: Mapping) -> float | None:
    for s in row.get("specs") or ():
        if str(s.get("key", "")).lower() == "price":
            try:
                value = float(str(s.get("value", "")).replace(",", "").replace("$", "").strip())
            except ValueError:
                return None
            return value if value > 0 else None
    return None


class Summarizer:
    """Ditto's summarisation, CPU-cheap: drop repeated words, then keep the ``max_words`` highest-IDF ones.

    ``COL``/``VAL`` markers and attribute names are always kept, so are words holding a digit (model numbers,
    sizes, capacities: what matching turns on); the kept words stay in their original order. IDF comes from the
    records passed to ``fit`` (training records: no label is read); unseen words count as rarest.
    """

    def __init__(self, max_words: int = 48) -> None:
        self.max_words = max_words
        self.idf: dict[str, float] = {}
        self.default_idf = 0.0

    def fit(self, texts: Iterable[str]) -> Summarizer:
        df: Counter[str] = Counter()
        n = 0
        for text in texts:
            df.update({w.lower() for w in text.split()})
            n += 1
        self.idf = {w: math.log((1 + n) / (1 + c)) + 1 for w, c in df.items()}
        self.default_idf = math.log(1 + n) + 1
        return self

    def __call__(self, text: str) -> str:
        tokens = text.split()
        keep, seen, after_col = [], set(), False
        for t in tokens:  # drop repeats (Abt repeats the title inside the description)
            marker = t in _MARKERS or after_col
            after_col = t == "COL"
            if marker or t.lower() not in seen:
                keep.append((t, marker))
                seen.add(t.lower())
        content = [i for i, (_, marker) in enumerate(keep) if not marker]
        if len(content) <= self.max_words:
            return " ".join(t for t, _ in keep)

        def priority(i: int) -> tuple[bool, float]:
            word = keep[i][0]
            return any(c.isdigit() for c in word), self.idf.get(word.lower(), self.default_idf)

        chosen = set(sorted(content, key=priority, reverse=True)[: self.max_words])
        return " ".join(t for i, (t, marker) in enumerate(keep) if marker or i in chosen)


@torch.no_grad()
def cosine_scores(tower: TextTower, pairs: Sequence[Pair], batch_size: int = 64) -> np.ndarray:
    """Baseline pair scores (P,): cosine of the tower's normalised embeddings of the two serialized records."""
    tower.eval()
    out = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        left = tower.embed([serialize(a) for a, _ in chunk])
        right = tower.embed([serialize(b) for _, b in chunk])
        out.append((left * right).sum(-1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


# --------------------------------------------------------------------------------------------------- cross-encoder


@dataclass(frozen=True)
class MatcherConfig:
    """Cross-encoder size and training schedule.

    Attributes:
        text: the tower to fine-tune (all-MiniLM-L6-v2 by default).
        max_length: tokens of the serialized pair (both records, truncated longest first).
        summarize: words kept per record by ``Summarizer`` (fit on the training records); 0 serializes in full.
        epochs, batch_size, lr, weight_decay, warmup: AdamW with linear warmup then linear decay.
        seed: initialisation and shuffling.
    """

    text: TextTowerConfig = field(default_factory=lambda: TextTowerConfig(max_length=128))
    max_length: int = 128
    summarize: int = 0
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup: float = 0.1
    seed: int = 0


class PairMatcher(nn.Module):
    """Cross-encoder: the text tower reads both records in one sequence; a linear head on the mean-pooled states."""

    def __init__(self, cfg: MatcherConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MatcherConfig()
        torch.manual_seed(self.cfg.seed)
        self.tower = TextTower(self.cfg.text)
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(self.tower.hidden_size, 1))
        self.threshold = 0.5
        self.summarizer: Summarizer | None = None
        self.history: list[dict[str, float]] = []

    def text(self, row: Mapping) -> str:
        """The record as the cross-encoder reads it: serialized, summarised when the matcher was fit with it."""
        text = serialize(row)
        return self.summarizer(text) if self.summarizer is not None else text

    def encode(self, pairs: Sequence[Pair]) -> dict[str, Tensor]:
        return self.tower.tokenizer(
            [self.text(a) for a, _ in pairs],
            [self.text(b) for _, b in pairs],
            padding=True,
            truncation="longest_first",
            max_length=self.cfg.max_length,
            return_tensors="pt",
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Match logits (B,)."""
        states = self.tower(input_ids, attention_mask)  # (B, T, D)
        return self.head(mean_pool(states, attention_mask)).squeeze(-1)

    def _lengths(self, pairs: Sequence[Pair]) -> np.ndarray:
        enc = self.tower.tokenizer(
            [self.text(a) for a, _ in pairs],
            [self.text(b) for _, b in pairs],
            truncation="longest_first",
            max_length=self.cfg.max_length,
        )
        return np.array([len(x) for x in enc["input_ids"]])

    def _batches(self, lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
        """Index batches of similar length (little padding): shuffled pools of 50 batches sorted by length; the
        batch order is shuffled again so lengths do not drift through an epoch. No rng: one sorted pass."""
        if rng is None:
            order = np.argsort(lengths, kind="stable")
            return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        order, pool = rng.permutation(len(lengths)), 50 * batch_size
        batches = []
        for i in range(0, len(order), pool):
            chunk = order[i : i + pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            batches += [chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    @torch.no_grad()
    def predict_proba(self, pairs: Sequence[Pair], batch_size: int = 64) -> np.ndarray:
        """Match probabilities (P,) float32."""
        was_training = self.training
        self.eval()
        out = np.zeros(len(pairs), dtype=np.float32)
        for idx in self._batches(self._lengths(pairs), batch_size, None) if len(pairs) else []:
            enc = self.encode([pairs[j] for j in idx])
            out[idx] = torch.sigmoid(self(enc["input_ids"], enc["attention_mask"])).numpy()
        self.train(was_training)
        return out

    def predict(self, pairs: Sequence[Pair]) -> np.ndarray:
        """Match decisions (P,) bool at the threshold chosen on validation."""
        return self.predict_proba(pairs) >= self.threshold

    def fit(
        self,
        pairs_train: Sequence[Triple],
        pairs_valid: Sequence[Triple],
        *,
        log: Callable[[str], None] | None = print,
    ) -> PairMatcher:
        """Fine-tune on (left, right, label) triples; keep the epoch with the best valid F1 and its threshold."""
        if not pairs_train or not pairs_valid:
            raise ValueError(f"fit needs training and validation pairs; got {len(pairs_train)} and {len(pairs_valid)}")
        cfg = self.cfg
        if cfg.summarize:
            records = {serialize(r) for a, b, _ in pairs_train for r in (a, b)}
            self.summarizer = Summarizer(cfg.summarize).fit(sorted(records))
        rng = np.random.default_rng(cfg.seed)
        labels = torch.tensor([int(y) for *_, y in pairs_train], dtype=torch.float32)
        train_pairs = [(a, b) for a, b, _ in pairs_train]
        lengths = self._lengths(train_pairs)
        valid_pairs = [(a, b) for a, b, _ in pairs_valid]
        valid_labels = np.array([int(y) for *_, y in pairs_valid])
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        steps = cfg.epochs * -(-len(pairs_train) // cfg.batch_size)
        warm = max(1, int(cfg.warmup * steps))
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
        )
        # positives are rare (≈10% in Abt-Buy): weight them so the loss does not settle on "no match"
        pos_weight = ((1 - labels.mean()) / labels.mean().clamp_min(1e-6)).clamp(1, 10)
        best, best_state = -1.0, None
        for epoch in range(cfg.epochs):
            self.train()
            start, total = time.perf_counter(), 0.0
            for idx in self._batches(lengths, cfg.batch_size, rng):
                enc = self.encode([train_pairs[j] for j in idx])
                logits = self(enc["input_ids"], enc["attention_mask"])
                loss = F.binary_cross_entropy_with_logits(logits, labels[idx], pos_weight=pos_weight)
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
            threshold, f1 = threshold_for_f1(self.predict_proba(valid_pairs), valid_labels)
            row = {"epoch": epoch, "loss": total / len(train_pairs), "valid_f1": f1, "threshold": threshold}
            row["seconds"] = time.perf_counter() - start
            self.history.append(row)
            if log:
                log(
                    f"epoch {epoch}: loss {row['loss']:.4f} valid F1 {f1:.4f} @ {threshold:.3f} ({row['seconds']:.0f}s)"
                )
            if f1 > best:
                best, self.threshold = f1, threshold
                best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if best_state is not None:
            self.load_state_dict(best_state)
        self.eval()
        return self


# -------------------------------------------------------------------------------------------- features and hybrid


FEATURES: tuple[str, ...] = (
    "cosine",  # frozen tower, whole serialized records
    "title_cosine",  # frozen tower, titles only
    "tfidf_word",  # TF-IDF cosine over words
    "tfidf_char",  # TF-IDF cosine over character 3-5-grams (typos, glued codes)
    "jaccard",  # word sets of the records
    "title_jaccard",
    "code_jaccard",  # code tokens (model / part numbers, sizes) of the two records
    "code_shared",  # how many codes the two records share
    "code_contained",  # share of the codes of the record with fewer codes found inside the other's text
    "codes_min",  # codes of the record with fewer codes
    "codes_max",
    "code_similarity",  # best character similarity of a code of one record to a code of the other (variants)
    "title_code_jaccard",  # codes of the titles, where the model number usually sits
    "title_codes_found_min",  # share of a title's codes found inside the other record's text, the lower side
    "title_codes_found_max",  # the higher side (a short listing's title codes inside a long description)
    "price_ratio",  # min / max price, NaN when a price is missing
    "length_ratio",  # shorter / longer record, in words
    "supcon_cosine",  # cosine of a SupCon-fine-tuned tower (features/supcon.py); NaN (dropped) without one
)


class PairFeatures:
    """Cheap pair features (``FEATURES``) for labelled or candidate pairs of canonical rows.

    ``fit`` learns the TF-IDF vocabularies and IDF from records (text only, no labels): fit it on every record that
    will be matched, or the model numbers of unseen records fall out of the vocabulary. Embeddings of each distinct
    record text are cached, so a record in many pairs is embedded once. Without a tower the two cosine features are
    NaN (the trees route them as missing); so is ``supcon_cosine`` without ``supcon``, a function from serialized
    records to normalised vectors (N, D) such as ``SupConTuner.embed``. A tower fine-tuned on the training pairs
    scores those pairs better than unseen ones: compare with and without the feature on validation pairs.
    """

    def __init__(
        self,
        tower: TextTower | None = None,
        batch_size: int = 64,
        supcon: Callable[[Sequence[str]], np.ndarray] | None = None,
    ) -> None:
        self.tower = tower
        self.batch_size = batch_size
        self.supcon = supcon
        self._cache: dict[str, np.ndarray] = {}
        self._supcon_cache: dict[str, np.ndarray] = {}
        self._states: nn.Module | bool | None = None  # the tower's ONNX Runtime export (False: not installed)
        self.word_tfidf = self.char_tfidf = None

    def fit(self, rows: Iterable[Mapping]) -> PairFeatures:
        texts = sorted({serialize(r) for r in rows})
        self.word_tfidf, self.char_tfidf = _tfidf("word").fit(texts), _tfidf("char").fit(texts)
        return self

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        """What ``PairFeatures.from_state`` needs, as JSON (tower config, vocabularies) and arrays (IDF weights)."""
        if self.word_tfidf is None:
            raise RuntimeError("PairFeatures is not fit; call .fit(rows) with the records first")
        tower = None if self.tower is None else dataclasses.asdict(self.tower.cfg)
        meta = {"tower": tower, "batch_size": self.batch_size, "vocabulary": {}}
        arrays = {}
        for kind, vec in (("word", self.word_tfidf), ("char", self.char_tfidf)):
            meta["vocabulary"][kind] = {term: int(i) for term, i in vec.vocabulary_.items()}
            arrays[f"idf.{kind}"] = np.asarray(vec.idf_, np.float64)
        return meta, arrays

    @classmethod
    def from_state(cls, meta: Mapping, arrays: Mapping[str, np.ndarray]) -> PairFeatures:
        """The features ``state`` described; the tower (if any) is built again from its config (frozen)."""
        tower = None
        if meta.get("tower") is not None:
            tower = TextTower(TextTowerConfig(**(dict(meta["tower"]) | {"trainable": False}))).eval()
        out = cls(tower, batch_size=int(meta.get("batch_size", 64)))
        for kind in ("word", "char"):
            vec = _tfidf(kind, vocabulary=meta["vocabulary"][kind])
            vec.idf_ = np.asarray(arrays[f"idf.{kind}"], np.float64)
            setattr(out, f"{kind}_tfidf", vec)
        return out

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) frozen-tower embeddings, cached per text; batched by token length, the tower under ONNX Runtime
        (fp32) when it is installed (`features.onnx_backend`: ~2x eager PyTorch on CPU, the same vectors to ~1e-6)."""
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            if self._states is None and next(self.tower.parameters()).device.type == "cpu":
                from features.onnx_backend import onnx_available, onnx_text_tower

                self._states = onnx_text_tower(self.tower, int8=False) if onnx_available() else False
            with torch.no_grad():
                vectors = self.tower.embed_many(missing, self.batch_size, states=self._states or None)
            self._cache.update(zip(missing, vectors, strict=True))
        return np.stack([self._cache[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)

    def embed_supcon(self, texts: Sequence[str]) -> np.ndarray:
        """(N, D) vectors of the ``supcon`` function, cached per text."""
        missing = sorted({t for t in texts if t not in self._supcon_cache})
        if missing:
            self._supcon_cache.update(zip(missing, self.supcon(missing), strict=True))
        return np.stack([self._supcon_cache[t] for t in texts]) if texts else np.zeros((0, 1), np.float32)

    def __call__(self, pairs: Sequence[Pair], supcon: bool = True) -> np.ndarray:
        """Features (P, len(FEATURES)) float32; ``supcon=False`` leaves ``supcon_cosine`` NaN without embedding."""
        if self.word_tfidf is None:
            raise RuntimeError("PairFeatures is not fit; call .fit(rows) with the records first")
        n = len(pairs)
        left = [serialize(a) for a, _ in pairs]
        right = [serialize(b) for _, b in pairs]
        out = np.full((n, len(FEATURES)), np.nan, dtype=np.float32)
        col = {name: i for i, name in enumerate(FEATURES)}
        if n == 0:
            return out
        if self.tower is not None:
            out[:, col["cosine"]] = (self.embed(left) * self.embed(right)).sum(1)
            lt = [str(a.get("title") or "") for a, _ in pairs]
            rt = [str(b.get("title") or "") for _, b in pairs]
            out[:, col["title_cosine"]] = (self.embed(lt) * self.embed(rt)).sum(1)
        if self.supcon is not None and supcon:
            out[:, col["supcon_cosine"]] = (self.embed_supcon(left) * self.embed_supcon(right)).sum(1)
        for name, vec in (("tfidf_word", self.word_tfidf), ("tfidf_char", self.char_tfidf)):
            a, b = vec.transform(left), vec.transform(right)  # rows L2-normalised
            out[:, col[name]] = np.asarray(a.multiply(b).sum(1)).ravel()
        for i, (ra, rb) in enumerate(pairs):
            wa, wb = set(words(left[i])), set(words(right[i]))
            ta, tb = set(words(str(ra.get("title") or ""))), set(words(str(rb.get("title") or "")))
            ca, cb = code_tokens(left[i]), code_tokens(right[i])
            out[i, col["jaccard"]] = _jaccard(wa, wb)
            out[i, col["title_jaccard"]] = _jaccard(ta, tb)
            out[i, col["code_jaccard"]] = _jaccard(ca, cb)
            out[i, col["code_shared"]] = len(ca & cb)
            small, big_text = (ca, _NOT_ALNUM.sub("", right[i].lower())) if len(ca) <= len(cb) else (
                cb, _NOT_ALNUM.sub("", left[i].lower()))  # fmt: skip
            out[i, col["code_contained"]] = sum(c in big_text for c in small) / len(small) if small else np.nan
            out[i, col["codes_min"]], out[i, col["codes_max"]] = sorted((len(ca), len(cb)))
            if ca and cb:
                out[i, col["code_similarity"]] = max(SequenceMatcher(None, x, y).ratio() for x in ca for y in cb)
            tca, tcb = code_tokens(str(ra.get("title") or "")), code_tokens(str(rb.get("title") or ""))
            out[i, col["title_code_jaccard"]] = _jaccard(tca, tcb)
            found = [sum(c in _NOT_ALNUM.sub("", other.lower()) for c in codes) / len(codes)
                     for codes, other in ((tca, right[i]), (tcb, left[i])) if codes]  # fmt: skip
            if found:
                out[i, col["title_codes_found_min"]], out[i, col["title_codes_found_max"]] = min(found), max(found)
            pa, pb = _price(ra), _price(rb)
            if pa and pb:
                out[i, col["price_ratio"]] = min(pa, pb) / max(pa, pb)
            la, lb = len(wa), len(wb)
            out[i, col["length_ratio"]] = min(la, lb) / max(la, lb, 1)
        return out


def _tfidf(kind: str, vocabulary: Mapping[str, int] | None = None):
    """The TF-IDF vectorizer of one text feature: ``word`` (``words`` tokens) or ``char`` (3-5-grams)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if kind == "word":
        return TfidfVectorizer(token_pattern=_WORD.pattern, sublinear_tf=True, vocabulary=vocabulary)
    return TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 5), sublinear_tf=True, vocabulary=vocabulary)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a or b else float("nan")


@dataclass(frozen=True)
class HybridConfig:
    """Gradient-boosted trees (sklearn ``HistGradientBoostingClassifier``) on ``PairFeatures``.

    Attributes:
        max_iter, learning_rate, max_leaf_nodes, l2_regularization, min_samples_leaf: the trees.
        features: the feature names used (a subset of ``FEATURES``; ablations drop some).
        blend_grid: weights tried for the cross-encoder's probability when one is given (chosen on valid).
        seed: the trees' seed.
    """

    max_iter: int = 300
    learning_rate: float = 0.05
    max_leaf_nodes: int = 15
    l2_regularization: float = 1.0
    min_samples_leaf: int = 10
    features: tuple[str, ...] = FEATURES
    blend_grid: tuple[float, ...] = tuple(i / 10 for i in range(11))
    seed: int = 0


class HybridMatcher:
    """Trees on cheap pair features, optionally blended with a cross-encoder: ``p = (1-w)·p_trees + w·p_cross``.

    ``fit`` trains the trees on the training pairs, then picks ``w`` (when cross-encoder scores for the validation
    pairs are given) and the threshold on the validation pairs. The cross-encoder was trained on the training pairs,
    so its scores there are overfit; it is therefore blended, not fed to the trees as a feature.
    """

    def __init__(self, cfg: HybridConfig | None = None, *, features: PairFeatures | None = None) -> None:
        self.cfg = cfg or HybridConfig()
        self.features = features or PairFeatures()
        unknown = set(self.cfg.features) - set(FEATURES)
        if unknown:
            raise ValueError(f"HybridConfig.features has unknown names {sorted(unknown)}; pick from {FEATURES}")
        self.columns = [FEATURES.index(f) for f in self.cfg.features]
        self.model = None
        self.threshold = 0.5
        self.weight = 0.0
        self.valid_f1 = float("nan")

    def _x(self, pairs: Sequence[Pair]) -> np.ndarray:
        # the SupCon tower may ride along for blocking only: embed with it only when the trees read its cosine
        return self.features(pairs, supcon=FEATURES.index("supcon_cosine") in self.columns)[:, self.columns]

    def _trees(self, pairs: Sequence[Pair]) -> np.ndarray:
        return self.model.predict_proba(self._x(pairs))[:, 1].astype(np.float32)

    def fit(self, pairs_train: Sequence[Triple], pairs_valid: Sequence[Triple], cross_valid: np.ndarray | None = None):
        """Train the trees; choose the blend weight (if ``cross_valid``) and the threshold on the valid pairs."""
        from sklearn.ensemble import HistGradientBoostingClassifier

        if not pairs_train or not pairs_valid:
            raise ValueError(f"fit needs training and validation pairs; got {len(pairs_train)} and {len(pairs_valid)}")
        if self.features.word_tfidf is None:  # better: fit them on every record to be matched (no labels needed)
            self.features.fit(r for a, b, _ in (*pairs_train, *pairs_valid) for r in (a, b))
        cfg = self.cfg
        self.model = HistGradientBoostingClassifier(
            max_iter=cfg.max_iter,
            learning_rate=cfg.learning_rate,
            max_leaf_nodes=cfg.max_leaf_nodes,
            l2_regularization=cfg.l2_regularization,
            min_samples_leaf=cfg.min_samples_leaf,
            early_stopping=False,
            random_state=cfg.seed,
        )
        self.columns = [FEATURES.index(f) for f in cfg.features]
        x = self._x([(a, b) for a, b, _ in pairs_train])
        # a feature missing on every training pair (no tower, no prices) carries nothing: drop it
        self.columns = [c for c, present in zip(self.columns, ~np.isnan(x).all(0), strict=True) if present]
        x = x[:, ~np.isnan(x).all(0)]
        self.model.fit(x, np.array([int(y) for *_, y in pairs_train]))
        trees = self._trees([(a, b) for a, b, _ in pairs_valid])
        y = np.array([int(y) for *_, y in pairs_valid])
        grid = cfg.blend_grid if cross_valid is not None else (0.0,)
        best = (-1.0, 0.0, 0.5)
        for w in grid:
            score = trees if cross_valid is None else (1 - w) * trees + w * np.asarray(cross_valid, np.float32)
            thr, f1 = threshold_for_f1(score, y)
            if f1 > best[0] + 1e-9:
                best = (f1, w, thr)
        self.valid_f1, self.weight, self.threshold = best
        return self

    def predict_proba(self, pairs: Sequence[Pair], cross: np.ndarray | None = None) -> np.ndarray:
        """Match scores (P,) float32; ``cross`` (the cross-encoder's probabilities) is needed when fit with one."""
        if self.model is None:
            raise RuntimeError("HybridMatcher is not fit; call .fit(train, valid) first")
        trees = self._trees(pairs)
        if self.weight == 0.0:
            return trees
        if cross is None:
            raise ValueError(f"this matcher blends a cross-encoder (weight {self.weight}); pass its scores as cross=")
        return ((1 - self.weight) * trees + self.weight * np.asarray(cross, np.float32)).astype(np.float32)

    def predict(self, pairs: Sequence[Pair], cross: np.ndarray | None = None) -> np.ndarray:
        """Match decisions (P,) bool at the threshold chosen on validation."""
        return self.predict_proba(pairs, cross) >= self.threshold

    def save(self, folder: str | Path) -> Path:
        """Write the fitted matcher to ``folder``: ``matcher.json`` (config, features kept, threshold, TF-IDF
        vocabularies, the towers' configs) and ``matcher.safetensors`` (the trees as arrays, IDF weights, the
        SupCon tower's weights when there is one, and the frozen tower's weights only when it is the random ``tiny``
        one: a pretrained tower is referenced by name). Nothing
        is pickled; ``HybridMatcher.load`` reads it back. A matcher blended with a cross-encoder cannot be saved
        alone (its scores need the cross-encoder's)."""
        from safetensors.numpy import save_file

        if self.model is None:
            raise RuntimeError("HybridMatcher is not fit; call .fit(train, valid) first")
        if self.weight != 0.0:
            raise ValueError(f"this matcher blends a cross-encoder (weight {self.weight}); save one fit without it")
        from features.supcon import SupConTuner

        trees = self.model if isinstance(self.model, TreeEnsemble) else TreeEnsemble.from_sklearn(self.model)
        meta, arrays = self.features.state()
        arrays |= {f"trees.{k}": v for k, v in trees.arrays.items()}
        meta["supcon"] = None
        if self.features.supcon is not None:  # the fine-tuned tower behind ``supcon_cosine``: its config and weights
            tuner = getattr(self.features.supcon, "__self__", None)
            if not isinstance(tuner, SupConTuner):
                raise ValueError("supcon_cosine comes from a function, not a SupConTuner's .embed: it cannot be saved")
            meta["supcon"] = dataclasses.asdict(tuner.cfg)
            arrays |= {f"supcon.{k}": v.detach().cpu().numpy() for k, v in tuner.state_dict().items()}
        if self.features.tower is not None and self.features.tower.cfg.tiny:
            arrays |= {f"tower.{k}": v.detach().cpu().numpy() for k, v in self.features.tower.state_dict().items()}
        meta |= {
            "format": 1, "config": dataclasses.asdict(self.cfg), "columns": [FEATURES[c] for c in self.columns],
            "threshold": float(self.threshold), "valid_f1": float(self.valid_f1), "baseline": trees.baseline,
        }  # fmt: skip
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "matcher.json").write_text(json.dumps(meta))
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(folder / "matcher.safetensors"))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HybridMatcher:
        """A matcher ``save`` wrote; it scores pairs exactly as the saved one did (same features, trees, cut)."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        if not (folder / "matcher.json").exists():
            raise FileNotFoundError(f"{folder} holds no matcher.json; point at a folder HybridMatcher.save wrote")
        meta = json.loads((folder / "matcher.json").read_text())
        if meta.get("format") != 1:
            raise ValueError(f"{folder}: unknown matcher format {meta.get('format')!r}; this code reads format 1")
        arrays = load_file(str(folder / "matcher.safetensors"))
        features = PairFeatures.from_state(meta, arrays)

        def part(prefix: str) -> dict[str, np.ndarray]:
            return {k.removeprefix(prefix): v for k, v in arrays.items() if k.startswith(prefix)}

        tower_state = {k: torch.from_numpy(v) for k, v in part("tower.").items()}
        if tower_state:
            features.tower.load_state_dict(tower_state)
        if meta.get("supcon") is not None:
            from features.supcon import SupConConfig, SupConTuner

            sc = dict(meta["supcon"])
            tuner = SupConTuner(SupConConfig(**(sc | {"text": TextTowerConfig(**sc["text"])})))
            tuner.load_state_dict({k: torch.from_numpy(v) for k, v in part("supcon.").items()})
            features.supcon = tuner.eval().embed
        cfg = dict(meta["config"])
        cfg |= {"features": tuple(cfg["features"]), "blend_grid": tuple(cfg["blend_grid"])}
        out = cls(HybridConfig(**cfg), features=features)
        out.columns = [FEATURES.index(f) for f in meta["columns"]]
        out.model = TreeEnsemble(part("trees."), meta["baseline"])
        out.threshold, out.valid_f1 = float(meta["threshold"]), float(meta["valid_f1"])
        return out


class TreeEnsemble:
    """A fitted binary ``HistGradientBoostingClassifier`` on numerical features as plain arrays: the same
    probabilities, without sklearn's pickled estimator, so a saved matcher loads from safetensors.

    Every tree's nodes are concatenated (child indices made global); a row starts at each tree's root and moves
    left when its feature is ``<=`` the node's threshold, or is missing and the node sends missing values left, as
    sklearn's predictor does. The raw score is the baseline plus each tree's leaf value; the probability its
    sigmoid.
    """

    FIELDS = ("feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf", "value")

    def __init__(self, arrays: Mapping[str, np.ndarray], baseline: float) -> None:
        missing = {*self.FIELDS, "roots"} - set(arrays)
        if missing:
            raise ValueError(f"tree arrays are missing {sorted(missing)}")
        self.arrays = {k: np.asarray(arrays[k]) for k in (*self.FIELDS, "roots")}
        self.baseline = float(baseline)

    @classmethod
    def from_sklearn(cls, model) -> TreeEnsemble:
        trees = [p[0] for p in model._predictors]  # binary: one tree per boosting iteration
        if not trees or len(model.classes_) != 2 or any(t.nodes["is_categorical"].any() for t in trees):
            raise ValueError("TreeEnsemble takes binary classifiers on numerical features only")
        sizes = np.array([len(t.nodes) for t in trees], np.int64)
        roots = np.r_[0, np.cumsum(sizes)[:-1]].astype(np.int64)
        nodes = np.concatenate([t.nodes for t in trees])
        shift = np.repeat(roots, sizes)
        arrays = {
            "feature_idx": nodes["feature_idx"].astype(np.int64), "num_threshold": nodes["num_threshold"],
            "missing_go_to_left": nodes["missing_go_to_left"].astype(np.uint8),
            "left": nodes["left"].astype(np.int64) + shift, "right": nodes["right"].astype(np.int64) + shift,
            "is_leaf": nodes["is_leaf"].astype(np.uint8), "value": nodes["value"], "roots": roots,
        }  # fmt: skip
        return cls(arrays, float(np.ravel(model._baseline_prediction)[0]))

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (N,) float64 for features (N, F)."""
        a = self.arrays
        x = np.asarray(x, np.float64)
        node = np.broadcast_to(a["roots"], (len(x), len(a["roots"]))).copy()  # (N, trees)
        rows = np.arange(len(x))[:, None]
        live = ~a["is_leaf"][node].astype(bool)
        while live.any():
            at = node[live]
            value = x[np.broadcast_to(rows, node.shape)[live], a["feature_idx"][at]]
            left = np.where(np.isnan(value), a["missing_go_to_left"][at].astype(bool), value <= a["num_threshold"][at])
            node[live] = np.where(left, a["left"][at], a["right"][at])
            live = ~a["is_leaf"][node].astype(bool)
        return self.baseline + a["value"][node].sum(1)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """(N, 2) class probabilities, as sklearn's ``predict_proba``."""
        p = 1.0 / (1.0 + np.exp(-self.decision_function(x)))
        return np.stack([1.0 - p, p], 1)
