"""JAVE training core (Zhu et al., EMNLP 2020): task spec, examples and batches, metrics on hand-computed cases
(ExtractGPT counting, seqeval strict), a synthetic end-to-end training that learns, kill-and-resume equivalence,
thresholds and prediction. Tiny preset, CPU, offline."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from features.text import load_tokenizer
from jave.codec import AttributeVocab
from jave.config import JaveConfig
from jave.data import TaskSpec, batch_order, batches, build_examples
from jave.metrics import (
    attribute_confusion,
    attribute_f1,
    extractgpt_f1,
    implicit_accuracy,
    outcome,
    per_attribute_table,
    value_f1_seqeval,
    wdc_pave_f1,
)
from jave.model import JaveModel
from jave.predict import predict
from jave.trainer import THRESHOLD_GRID, TrainConfig, choose_thresholds, evaluate, load_trained, train

COLOURS = ["red", "blue", "green", "black"]
MATERIALS = ["cotton", "wool", "silk", "leather"]
STYLES = {"office": "formal", "gym": "sport", "beach": "casual"}  # implicit: the word implies the value
FILLERS = ["shirt", "dress", "jacket", "bag", "hat", "nice", "new", "classic", "soft", "great"]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def label(attribute, value, field=None, begin=None, end=None):
    return {"attribute": attribute, "value": value, "field": field, "begin": begin, "end": end}


def synthetic_rows(n: int, seed: int) -> list[dict]:
    """Canonical rows: colour/material written in the title (or "n/a"), style implied by a cue word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(FILLERS, 3)
        cue = rng.choice(sorted(STYLES))
        words.insert(rng.randint(0, len(words)), cue)
        values = {}
        for attribute, options in (("Color", COLOURS), ("Material", MATERIALS)):
            if rng.random() < 0.6:
                value = rng.choice(options)
                words.insert(rng.randint(0, len(words)), value)
                values[attribute] = value
        title = " ".join(words)
        labels = []
        for attribute in ("Color", "Material"):
            if attribute in values:
                begin = f" {title} ".index(f" {values[attribute]} ")
                labels.append(label(attribute, values[attribute], "title", begin, begin + len(values[attribute])))
            else:
                labels.append(label(attribute, "n/a"))
        labels.append(label("Style", STYLES[cue]))
        rows.append(
            {"product_id": f"p{seed}-{i}", "title": title, "description": None, "specs": [], "labels": labels,
             "category": "Clothing", "images": []}
        )  # fmt: skip
    return rows


@pytest.fixture(scope="module")
def data(tok):
    train_rows, val_rows = synthetic_rows(160, seed=1), synthetic_rows(48, seed=2)
    spec = TaskSpec.from_rows(train_rows, max_length=32)
    return spec, build_examples(train_rows, spec, tok), build_examples(val_rows, spec, tok), val_rows


def tiny_model(spec: TaskSpec, seed: int = 0) -> JaveModel:
    torch.manual_seed(seed)
    return JaveModel(JaveConfig.tiny(len(spec.vocab), spec.implicit_value_sizes, use_image=False, dropout=0.1))


FAST = TrainConfig(epochs=4, batch_size=16, lr=5e-3, tower_lr=5e-3, warmup_ratio=0.1, patience=10, seed=3)


# ------------------------------------------------------------------------------------------------ spec and data


def test_task_spec_from_rows_and_json(data):
    spec, train_ex, _, _ = data
    assert spec.vocab.attributes == ("Color", "Material")
    assert spec.implicit == {"Style": ("casual", "formal", "sport")}
    assert spec.implicit_value_sizes == (3,)
    assert TaskSpec.from_json(spec.to_json()) == spec
    # A stray unaligned value does not turn an extracted attribute into an implicit one.
    rows = [{"labels": [label("Color", "red", "title", 0, 3)]}] * 3 + [{"labels": [label("Color", "teal")]}]
    assert TaskSpec.from_rows(rows).implicit == {}
    given = TaskSpec.from_rows(rows, implicit_options={"Fit": ["slim", "loose"]})
    assert given.implicit == {"Fit": ("slim", "loose")}
    with pytest.raises(ValueError, match="nothing to tag"):
        TaskSpec.from_rows([{"labels": [label("Style", "x")]}])


def test_examples_targets(data):
    spec, train_ex, _, _ = data
    for e in train_ex[:20]:
        gold = e.gold_values
        for a in spec.vocab.attributes:
            assert e.attr_target[spec.vocab.id(a)] == (gold[a] != {"n/a"})
        style = spec.implicit["Style"][e.implicit_target[0]]
        assert gold["Style"] == {style}
        tagged = {spec.vocab.attributes[(t - 1) // 2] for t in e.encoded.tags if t > 0 and t % 2 == 1}
        assert tagged == {a for a in spec.vocab.attributes if gold[a] != {"n/a"}}


def test_batches_cover_every_example_once_and_depend_only_on_seed(data):
    spec, train_ex, _, _ = data
    order = batch_order(train_ex, 16, shuffle=True, seed=7)
    assert sorted(i for b in order for i in b) == list(range(len(train_ex)))
    assert order == batch_order(train_ex, 16, shuffle=True, seed=7)
    assert order != batch_order(train_ex, 16, shuffle=True, seed=8)
    batch = next(batches(train_ex, 16, shuffle=False))
    assert batch.attr_labels.shape == (16, 2) and batch.implicit_labels.shape == (16, 1)
    assert batch.media_mask.shape == (16, 0) and batch.pixel_values is None


def test_batches_images_missing_are_masked_and_cache_is_used(data):
    spec, train_ex, _, _ = data

    ex = [replace(train_ex[0], images=("a.jpg", "gone.jpg")), replace(train_ex[1], images=()), train_ex[2]]
    ex[2] = replace(ex[2], images=("b.jpg",))

    def loader(uri):
        if uri == "gone.jpg":
            raise FileNotFoundError(uri)
        return Image.new("RGB", (8, 8), "red")

    def preprocess(images):
        return torch.ones(len(images), 3, 4, 4)

    batch = next(batches(ex, 3, shuffle=False, bucket_by_length=False, image_loader=loader, preprocess=preprocess))
    assert batch.media_mask.tolist() == [[True, False], [False, False], [True, False]]
    assert batch.pixel_values.shape == (3, 2, 3, 4, 4)
    assert batch.pixel_values[1].abs().sum() == 0  # no fake pixels where there is no image
    cache = {"b.jpg": (torch.ones(5), torch.ones(4, 5))}
    batch = next(batches(ex, 3, shuffle=False, bucket_by_length=False, visual_cache=cache))
    assert batch.media_mask.tolist() == [[False, False], [False, False], [True, False]]
    assert batch.visual_global.shape == (3, 2, 5) and batch.visual_regions.shape == (3, 2, 4, 5)


# ------------------------------------------------------------------------------------------------------ metrics


def test_extractgpt_counting_hand_computed():
    gold = [
        {"a": {"x"}, "b": {"n/a"}, "c": {"n/a"}, "d": {"y"}, "e": {"z", "z2"}},
        {"a": {"x"}, "e": {"z", "z2"}},
        {"b": {"n/a"}},
    ]
    pred = [
        {"a": "x", "b": None, "c": "q", "d": "n/a", "e": "w"},  # VC, NN, NV, VN, VW
        {"a": "x", "e": "z2"},  # VC, VC (any gold value matches)
        {"b": "v"},  # NV
    ]
    assert [outcome(gold[0][k], pred[0][k]) for k in "abcde"] == ["VC", "NN", "NV", "VN", "VW"]
    m = extractgpt_f1(gold, pred)
    assert (m["extractgpt_VC"], m["extractgpt_NN"], m["extractgpt_NV"], m["extractgpt_VN"], m["extractgpt_VW"]) == (
        3, 1, 2, 1, 1,
    )  # fmt: skip
    assert m["extractgpt_precision"] == pytest.approx(3 / (2 + 3 + 1))  # VC / (NV + VC + VW)
    assert m["extractgpt_recall"] == pytest.approx(3 / (1 + 3 + 1))  # VC / (VN + VC + VW)
    p, r = 3 / 6, 3 / 5
    assert m["extractgpt_f1"] == pytest.approx(2 * p * r / (p + r))
    assert wdc_pave_f1(gold, pred)["wdc_pave_f1"] == m["extractgpt_f1"]
    # An attribute the prediction leaves out is "n/a"; exact match after stripping gold whitespace.
    assert extractgpt_f1([{"a": {" x "}}], [{}])["extractgpt_VN"] == 1
    assert extractgpt_f1([{"a": {" x "}}], [{"a": "x"}])["extractgpt_f1"] == 1.0
    assert extractgpt_f1([{"a": {"X"}}], [{"a": "x"}])["extractgpt_VW"] == 1
    # Macro over (attribute, category): a (2 VC) -> 1, b (1 NV) -> 0, c (NV) -> 0, d (VN) -> 0, e (VW, VC) -> .5
    macro = extractgpt_f1(gold, pred, categories=["k", "k", "k"])["extractgpt_macro_f1"]
    assert macro == pytest.approx((1 + 0 + 0 + 0 + 0.5) / 5)
    table = {row["attribute"]: row for row in per_attribute_table(gold, pred)}
    assert table["a"]["f1"] == 1.0 and table["a"]["support"] == 2
    assert table["e"]["precision"] == 0.5 and table["e"]["recall"] == 0.5
    assert table["b"]["support"] == 0 and table["b"]["NV"] == 1 and table["b"]["NN"] == 1


def test_seqeval_strict_known_case():
    names = ("O", "B-a", "I-a", "B-b", "I-b")
    gold = [[1, 2, 0, 3], [0, 3, 4]]
    pred = [[1, 2, 0, 4], [0, 3, 0]]  # an I-b without B-b is no span in strict IOB2; b cut short is wrong
    m = value_f1_seqeval(gold, pred, names)
    # gold spans: a, b, b (3); predicted spans: a, b[1:2] (2); correct: a only
    assert m["value_precision"] == pytest.approx(1 / 2)
    assert m["value_recall"] == pytest.approx(1 / 3)
    assert m["value_f1_strict"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert value_f1_seqeval([[0, 0]], [[0, 0]], names)["value_f1_strict"] == 0.0


def test_attribute_f1_implicit_accuracy_confusion_hand_computed():
    gold = [[1, 0], [1, 1], [0, 0]]
    prob = [[0.9, 0.6], [0.2, 0.7], [0.1, 0.4]]
    m = attribute_f1(gold, prob)
    # a0: tp 1, fn 1 -> f1 2/3; a1: tp 1, fp 1 -> f1 2/3; micro tp 2, fp 1, fn 1 -> 2/3
    assert m == pytest.approx({"attr_micro_f1": 2 / 3, "attr_macro_f1": 2 / 3})
    assert attribute_f1(gold, prob, threshold=[0.1, 0.65])["attr_micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 1))
    acc = implicit_accuracy([{"s": "x"}, {"s": "y", "t": "z"}], [{"s": "x"}, {"s": "x", "t": "z"}])
    assert acc["implicit_accuracy"] == pytest.approx(2 / 3)
    assert acc["implicit_macro_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    labels, matrix = attribute_confusion(
        [[("a", 0, 3), ("b", 5, 8)], [("a", 0, 2)]], [[("b", 1, 3), ("b", 5, 8)], [("a", 4, 6)]], ["a", "b"]
    )
    assert labels == ["a", "b", "O"]
    # gold a -> predicted b; gold b -> b; gold a unmatched -> O; predicted a over nothing -> O row
    assert matrix.tolist() == [[0, 1, 1], [0, 1, 0], [1, 0, 0]]


# ----------------------------------------------------------------------------------------------------- training


def test_training_learns_and_predicts_exact_substrings(data, tmp_path):
    spec, train_ex, val_ex, val_rows = data
    model = tiny_model(spec)
    before = evaluate(model, val_ex, spec)
    history = []
    cfg = TrainConfig(epochs=8, batch_size=16, lr=5e-3, tower_lr=5e-3, patience=8, checkpoint_dir=str(tmp_path))
    result = train(model, train_ex, val_ex, spec, cfg, on_epoch=lambda e, m: history.append(m))
    assert result.select_metric == "extractgpt_f1" and len(history) == 8
    assert {"train/attr_bce", "train/value_ce", "train/kl", "train/implicit_ce", "train/total"} <= set(history[0])
    assert history[-1]["train/total"] < 0.5 * history[0]["train/total"]
    after = evaluate(model, val_ex, spec)
    assert after["extractgpt_f1"] == pytest.approx(result.best_metric)
    assert after["extractgpt_f1"] > before["extractgpt_f1"] + 0.4 and after["extractgpt_f1"] > 0.7
    assert after["value_f1_strict"] > 0.6 and after["implicit_accuracy"] > 0.6
    assert {p.name for p in tmp_path.iterdir()} >= {"last.pt", "best.safetensors", "spec.json", "config.json"}

    thresholds = choose_thresholds(model, val_ex, spec)
    assert set(thresholds) == set(spec.vocab.attributes)
    assert all(t in THRESHOLD_GRID for t in thresholds.values())
    assert set(choose_thresholds(model, val_ex, spec, objective="attribute").values()) <= set(THRESHOLD_GRID)

    preds = predict(model, val_ex, spec, thresholds=thresholds)
    assert [p.product_id for p in preds] == [e.product_id for e in val_ex]
    assert any(p.extractions for p in preds)
    for p, row in zip(preds, val_rows, strict=True):
        assert set(p.attributes) == set(spec.vocab.attributes) and set(p.implicit) == {"Style"}
        for x in p.extractions:
            assert row[x.field][x.begin : x.end] == x.value
            assert 0.0 <= x.score <= p.attributes[x.attribute] + 1e-9
    assert predict(model, val_ex, spec) == predict(model, val_ex, spec)  # deterministic

    loaded, loaded_spec = load_trained(tmp_path)
    assert loaded_spec == spec
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)


def test_kill_and_resume_matches_uninterrupted_run(data, tmp_path):
    spec, train_ex, val_ex, _ = data
    train_ex, val_ex = train_ex[:64], val_ex[:16]

    straight = tiny_model(spec)
    train(straight, train_ex, val_ex, spec, replace(FAST, checkpoint_dir=str(tmp_path / "a")))

    class Killed(Exception):
        pass

    def kill_after_2(epoch, metrics):
        if epoch == 2:
            raise Killed

    cfg = replace(FAST, checkpoint_dir=str(tmp_path / "b"))
    with pytest.raises(Killed):
        train(tiny_model(spec), train_ex, val_ex, spec, cfg, on_epoch=kill_after_2)
    resumed = tiny_model(spec, seed=123)  # a fresh process builds a differently initialised model
    seen = []
    result = train(resumed, train_ex, val_ex, spec, cfg, on_epoch=lambda e, m: seen.append(e))
    assert seen == [3, 4] and result.epochs_run == 4 and len(result.history) == 4

    last_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    last_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    for k, v in last_a["model"].items():
        torch.testing.assert_close(last_b["model"][k], v, rtol=0, atol=1e-6)
    for k, v in straight.state_dict().items():  # the best weights, restored at the end
        torch.testing.assert_close(resumed.state_dict()[k], v, rtol=0, atol=1e-6)
    assert last_a["history"] == last_b["history"]

    again = []  # a finished run resumes to nothing
    train(tiny_model(spec), train_ex, val_ex, spec, cfg, on_epoch=lambda e, m: again.append(e))
    assert again == []


def test_max_steps_and_early_stopping(data):
    spec, train_ex, val_ex, _ = data
    train_ex, val_ex = train_ex[:32], val_ex[:8]
    res = train(tiny_model(spec), train_ex, val_ex, spec, TrainConfig(epochs=5, batch_size=8, max_steps=6))
    assert res.steps == 6 and res.epochs_run == 2 and res.stopped_early

    calls = iter([0.5, 0.4, 0.3, 0.2, 0.1])
    res = train(
        tiny_model(spec), train_ex, val_ex, spec, TrainConfig(epochs=5, batch_size=16, patience=2),
        evaluate_fn=lambda m, ex: {"extractgpt_f1": next(calls)},
    )  # fmt: skip
    assert res.best_epoch == 1 and res.epochs_run == 3 and res.stopped_early and res.best_metric == 0.5


def test_model_and_spec_mismatch_is_a_clear_error(data):
    spec, train_ex, val_ex, _ = data
    other = TaskSpec(AttributeVocab(("Color",)), {"Style": ("a", "b", "c")}, 32)
    with pytest.raises(ValueError, match="spec has 1"):
        train(tiny_model(spec), train_ex[:8], [], other, TrainConfig(epochs=1))
    assert np.isfinite(evaluate(tiny_model(spec), val_ex[:8], spec)["attr_micro_f1"])


def test_frozen_image_tower_features_are_computed_once_and_match_the_per_batch_path(data, tmp_path, monkeypatch):
    """Training with a frozen image tower reads features computed once (flows.train_jave._image_kwargs) instead of
    decoding every image per batch; the model sees the same thing either way (to float16 rounding)."""
    import flows.train_jave as tj
    from jave.data import make_batch

    spec, train_ex, val_ex, _ = data
    paths = []
    for i, colour in enumerate(("red", "blue", "green")):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.new("RGB", (40, 30), colour).save(paths[-1])
    gone = str(tmp_path / "gone.png")
    ex = {"train": [replace(train_ex[0], images=(paths[0], gone)), replace(train_ex[1], images=(paths[1],)),
                    replace(train_ex[2], images=())],
          "validation": [replace(val_ex[0], images=(paths[2], paths[0]))]}  # fmt: skip
    torch.manual_seed(0)
    model = JaveModel(JaveConfig.tiny(len(spec.vocab), spec.implicit_value_sizes, use_image=True)).eval()

    assert set(tj._image_kwargs(model, True, ex, 4)) == {"image_loader", "preprocess"}  # trainable: per batch
    assert tj._image_kwargs(model, False, ex, 4) == {}
    model.image_tower.requires_grad_(False)
    cached = tj._image_kwargs(model, True, ex, 4)["visual_cache"]
    assert set(cached) == set(paths)  # every readable image once; the missing one is left out (a masked slot)
    assert all(g.dtype == np.float16 and r.dtype == np.float16 for g, r in cached.values())
    assert set(tj._image_kwargs(model, True, ex, 1)["visual_cache"]) == {paths[0], paths[1], paths[2]}

    from flows.jave_pyfunc import load_image

    examples = ex["train"] + ex["validation"]
    with torch.no_grad():
        a = model(make_batch(examples, image_loader=load_image, preprocess=model.image_tower.preprocess))
        b = model(make_batch(examples, visual_cache=cached))
    assert torch.allclose(a.attr_logits, b.attr_logits, atol=1e-2)
    assert torch.allclose(a.tag_logits, b.tag_logits, atol=1e-2)
    assert not torch.equal(model(make_batch(examples, visual_cache={})).attr_logits, b.attr_logits)

    monkeypatch.setattr(tj, "VISUAL_PRECOMPUTE_MAX_BYTES", 10)  # too big to keep: back to decoding per batch
    assert set(tj._image_kwargs(model, True, ex, 4)) == {"image_loader", "preprocess"}
