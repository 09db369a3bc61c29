"""Pair matchers (features/matcher.py): code tokens, summaries, pair features, hybrid trees, cross-encoder."""

from __future__ import annotations

import numpy as np
import pytest

from features.matcher import (
    FEATURES,
    HybridConfig,
    HybridMatcher,
    MatcherConfig,
    PairFeatures,
    PairMatcher,
    Summarizer,
    TreeEnsemble,
    code_tokens,
    serialize,
)
from features.towers import TextTowerConfig


def row(title: str, description: str | None = None, price: str | None = None) -> dict:
    specs = [{"key": "price", "value": price}] if price else []
    return {"title": title, "description": description, "specs": specs}


def test_code_tokens_normalise_separators_and_skip_plain_words():
    assert code_tokens("Sony Bravia KDL-40V4100 40' LCD") == {"kdl40v4100"}
    assert code_tokens("XTA-3510-73-GB-10K") == code_tokens("xta 3510-73gb-10k".replace(" ", "-"))
    assert code_tokens("part 388504-B21, 64GB kit, 2 pcs, year 2019") == {"388504b21", "64gb"}
    assert code_tokens("black leather shoes") == set()


def test_summarizer_drops_repeats_and_keeps_codes_in_order():
    texts = [serialize(row(f"common words here item{i}")) for i in range(20)]
    s = Summarizer(max_words=4).fit(texts)
    text = serialize(row("lg dishwasher lds4821ww", "lg dishwasher lds4821ww common words here white quiet tub"))
    out = s(text)
    assert out.split().count("dishwasher") == 1  # repeated title dropped from the description
    assert "lds4821ww" in out and out.index("lg") < out.index("lds4821ww")  # codes kept, order kept
    content = [w for w in out.split() if w not in ("COL", "VAL", "title", "description")]
    assert len(content) == 4
    assert "common" not in out  # the most frequent words go first
    assert s(serialize(row("short"))) == serialize(row("short"))


def test_pair_features_see_shared_model_numbers_and_price():
    a = row("Sony Bravia 40 inch LCD TV KDL-40V4100", price="1200")
    b = row("Sony KDL40V4100 Bravia television", price="1000")
    c = row("Sony Bravia 40 inch LCD TV KDL-46V4100", price="1500")
    feats = PairFeatures().fit([a, b, c])
    x = feats([(a, b), (a, c)])
    col = {n: i for i, n in enumerate(FEATURES)}
    assert x.shape == (2, len(FEATURES))
    assert x[0, col["code_shared"]] == 1 and x[1, col["code_shared"]] == 0
    assert x[0, col["code_contained"]] == 1.0 and x[1, col["code_contained"]] == 0.0
    assert x[0, col["price_ratio"]] == pytest.approx(1000 / 1200)
    assert x[1, col["jaccard"]] > x[0, col["jaccard"]]  # words alone favour the wrong pair; codes do not
    assert np.isnan(x[:, col["cosine"]]).all()  # no tower given
    assert x[0, col["code_similarity"]] == 1.0 and 0.8 < x[1, col["code_similarity"]] < 1.0  # a variant, not equal
    assert x[0, col["title_codes_found_max"]] == 1.0 and x[1, col["title_codes_found_max"]] == 0.0


def toy_pairs(n: int, seed: int) -> list[tuple[dict, dict, int]]:
    """Same product = same model number, written with a separator on the right (``AB-1234X``); the wording of the
    right record is random, so only the normalised code decides."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = ["kettle", "toaster", "blender"][i % 3]
        code = f"ab{rng.integers(1000, 9999)}x"
        label = int(rng.random() < 0.5)
        other = f"AB-{code[2:].upper()}" if label else f"AB-{rng.integers(1000, 9999)}X"
        wording = [f"acme {kind} {other}", f"{other} acme appliance steel"][int(rng.integers(2))]
        out.append((row(f"acme {kind} {code}"), row(wording), label))
    return out


def test_hybrid_learns_a_separable_toy_set_and_blends_a_cross_score():
    train, valid, test = toy_pairs(120, 0), toy_pairs(60, 1), toy_pairs(60, 2)
    feats = PairFeatures().fit(r for a, b, _ in (*train, *valid, *test) for r in (a, b))  # records, no labels
    m = HybridMatcher(HybridConfig(max_iter=50), features=feats).fit(train, valid)
    pred = m.predict([(a, b) for a, b, _ in test])
    assert m.valid_f1 == 1.0
    assert (pred == np.array([y for *_, y in test], bool)).all()
    # word overlap alone points the wrong way (non-matches share the wording); the code features fix it
    plain = ("jaccard", "title_jaccard", "length_ratio")
    codes = (*plain, "code_jaccard", "code_shared", "code_contained")
    assert HybridMatcher(HybridConfig(max_iter=50, features=plain), features=feats).fit(train, valid).valid_f1 < 0.9
    assert HybridMatcher(HybridConfig(max_iter=50, features=codes), features=feats).fit(train, valid).valid_f1 == 1
    # a perfect cross-encoder score on valid is taken (weight 1); then predict needs it
    yv = np.array([y for *_, y in valid], np.float32)
    blended = HybridMatcher(HybridConfig(max_iter=50, features=plain), features=feats)
    blended.fit(train, valid, cross_valid=yv)
    assert blended.weight > 0 and blended.valid_f1 == 1.0
    with pytest.raises(ValueError, match="cross="):
        blended.predict_proba([(a, b) for a, b, _ in test])


def test_tree_ensemble_predicts_exactly_as_sklearn_with_missing_values():
    from sklearn.ensemble import HistGradientBoostingClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 5))
    x[rng.random(x.shape) < 0.15] = np.nan  # the pair features have NaNs (no codes, no price)
    y = (np.nan_to_num(x[:, 0]) + np.nan_to_num(x[:, 1], nan=1.0) > 0.3).astype(int)
    model = HistGradientBoostingClassifier(max_iter=40, max_leaf_nodes=15, random_state=0).fit(x, y)
    trees = TreeEnsemble.from_sklearn(model)
    xt = rng.normal(size=(300, 5))
    xt[rng.random(xt.shape) < 0.2] = np.nan
    np.testing.assert_allclose(trees.predict_proba(xt), model.predict_proba(xt), rtol=0, atol=1e-12)
    assert len(trees.arrays["roots"]) == 40
    three = HistGradientBoostingClassifier(max_iter=5).fit(x[:, :2], np.arange(600) % 3)
    with pytest.raises(ValueError, match="binary"):
        TreeEnsemble.from_sklearn(three)


def test_hybrid_matcher_saves_without_pickle_and_loads_to_the_same_scores(tmp_path):
    train, valid, test = toy_pairs(120, 0), toy_pairs(60, 1), toy_pairs(60, 2)
    feats = PairFeatures().fit(r for a, b, _ in (*train, *valid) for r in (a, b))
    m = HybridMatcher(HybridConfig(max_iter=50, features=FEATURES[2:]), features=feats).fit(train, valid)
    folder = m.save(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["matcher.json", "matcher.safetensors"]
    back = HybridMatcher.load(folder)
    pairs = [(a, b) for a, b, _ in test]
    np.testing.assert_allclose(back.predict_proba(pairs), m.predict_proba(pairs), atol=1e-6)
    assert back.threshold == m.threshold and back.columns == m.columns and back.valid_f1 == m.valid_f1
    assert back.features.tower is None and (back.predict(pairs) == m.predict(pairs)).all()
    # test records were not in the TF-IDF fit: the loaded vocabulary is the saved one, not refit
    assert back.features.char_tfidf.vocabulary_ == feats.char_tfidf.vocabulary_
    blended = HybridMatcher(HybridConfig(max_iter=20, features=("jaccard", "length_ratio")), features=feats)
    blended.fit(train, valid, cross_valid=np.array([y for *_, y in valid], np.float32))
    assert blended.weight > 0
    with pytest.raises(ValueError, match="cross-encoder"):
        blended.save(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="matcher.json"):
        HybridMatcher.load(tmp_path)


def test_tiny_cross_encoder_fits_with_summaries_and_length_batches():
    cfg = MatcherConfig(text=TextTowerConfig(tiny=True), max_length=32, summarize=6, epochs=1, batch_size=8, lr=1e-3)
    m = PairMatcher(cfg)
    train, valid = toy_pairs(24, 0), toy_pairs(12, 1)
    m.fit(train, valid, log=None)
    assert m.summarizer is not None and len(m.history) == 1
    pairs = [(a, b) for a, b, _ in valid]
    p = m.predict_proba(pairs)
    assert p.shape == (12,) and np.isfinite(p).all()
    # length-sorted batching must return scores in the input order
    assert np.allclose(m.predict_proba(pairs[::-1]), p[::-1], atol=1e-6)
    batches = m._batches(np.array([5, 1, 9, 3, 7]), 2, None)
    assert [b.tolist() for b in batches] == [[1, 3], [0, 4], [2]]


def test_hybrid_matcher_with_a_supcon_tower_saves_it_and_loads_the_same_scores(tmp_path):
    from features.supcon import SupConConfig, SupConTuner

    train, valid, test = toy_pairs(60, 0), toy_pairs(30, 1), toy_pairs(20, 2)
    tuner = SupConTuner(SupConConfig(text=TextTowerConfig(tiny=True, max_length=32), max_length=32, epochs=1))
    feats = PairFeatures(supcon=tuner.eval().embed).fit(r for a, b, _ in (*train, *valid) for r in (a, b))
    m = HybridMatcher(HybridConfig(max_iter=20), features=feats).fit(train, valid)
    assert FEATURES.index("supcon_cosine") in m.columns
    back = HybridMatcher.load(m.save(tmp_path / "m"))
    pairs = [(a, b) for a, b, _ in test]
    np.testing.assert_allclose(back.predict_proba(pairs), m.predict_proba(pairs), atol=1e-6)
    m.features.supcon = lambda texts: np.ones((len(texts), 4), np.float32)  # not a tuner: nothing to save
    with pytest.raises(ValueError, match="SupConTuner"):
        m.save(tmp_path / "f")
