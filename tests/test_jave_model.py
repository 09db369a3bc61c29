"""JAVE model and losses (Zhu et al., EMNLP 2020) on the tiny preset: shapes, masking, ablation switches, KL, and one
synthetic end-to-end training. CPU, offline, seconds."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from features.batch import FIELD_SPECIAL, FIELD_TITLE, IGNORE_INDEX, ProductBatch
from jave import JaveConfig, JaveModel, JaveOutput, jave_loss
from jave.losses import bernoulli_kl, tagger_attribute_probs

A, IMPLICIT = 2, (3,)
COLOURS = ["red", "blue", "green", "black"]  # attribute 0: value written in the text
MATERIALS = ["cotton", "wool", "silk", "leather"]  # attribute 1
FILLERS = ["shirt", "dress", "jacket", "bag", "hat", "nice", "new", "classic", "soft", "great", "summer"]
RGB = [(1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0)]  # implicit value = the image's dominant colour


def build(seed: int = 0, **overrides) -> JaveModel:
    torch.manual_seed(seed)
    return JaveModel(JaveConfig.tiny(num_attributes=A, implicit_value_sizes=IMPLICIT, **overrides))


@pytest.fixture(scope="module")
def model() -> JaveModel:
    return build().eval()


def toy_products(n: int, seed: int, media: list[int] | None = None) -> list[dict]:
    """Products whose attribute values are words in the text and whose implicit value is the image colour."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(FILLERS, rng.randint(3, 5))
        tags = [0] * len(words)
        present = [0.0] * A
        for a, values in enumerate((COLOURS, MATERIALS)):
            if rng.random() < 0.6:
                pos = rng.randint(0, len(words))
                words.insert(pos, rng.choice(values))
                tags.insert(pos, 1 + 2 * a)  # B-a (every value is one wordpiece)
                present[a] = 1.0
        n_media = media[i] if media is not None else rng.choice([0, 1, 1, 2])
        colour = rng.randrange(len(RGB))
        out.append({"words": words, "tags": tags, "attrs": present, "n_media": n_media, "colour": colour})
    return out


def collate(products: list[dict], tokenizer, max_media: int = 3, size: int = 32) -> ProductBatch:
    b = len(products)
    t = 2 + max(len(p["words"]) for p in products)
    ids = torch.full((b, t), tokenizer.pad_token_id)
    mask = torch.zeros(b, t, dtype=torch.long)
    field = torch.full((b, t), FIELD_SPECIAL)
    tags = torch.full((b, t), IGNORE_INDEX)
    pixels = torch.zeros(b, max_media, 3, size, size)
    media = torch.zeros(b, max_media, dtype=torch.bool)
    implicit = torch.full((b, 1), IGNORE_INDEX)
    gen = torch.Generator().manual_seed(b)
    for i, p in enumerate(products):
        word_ids = tokenizer.convert_tokens_to_ids(p["words"])
        assert tokenizer.unk_token_id not in word_ids, p["words"]
        n = len(word_ids)
        ids[i, : n + 2] = torch.tensor([tokenizer.cls_token_id, *word_ids, tokenizer.sep_token_id])
        mask[i, : n + 2] = 1
        field[i, 1 : n + 1] = FIELD_TITLE
        tags[i, 1 : n + 1] = torch.tensor(p["tags"])
        for m in range(p["n_media"]):
            colour = torch.tensor(RGB[p["colour"]])[:, None, None]
            pixels[i, m] = 0.8 * colour + 0.2 * torch.randn(3, size, size, generator=gen)
            media[i, m] = True
        if p["n_media"]:
            implicit[i, 0] = p["colour"]
    return ProductBatch(
        input_ids=ids,
        attention_mask=mask,
        token_field=field,
        media_mask=media,
        pixel_values=pixels,
        attr_labels=torch.tensor([p["attrs"] for p in products]),
        tag_labels=tags,
        implicit_labels=implicit,
    )


def mixed_batch(model: JaveModel) -> ProductBatch:
    """Product 0 has no media, product 1 three images, product 2 one."""
    return collate(toy_products(3, seed=1, media=[0, 3, 1]), model.text_tower.tokenizer)


def assert_finite(out: JaveOutput) -> None:
    for name, value in [
        ("attr", out.attr_logits),
        ("tag", out.tag_logits),
        *[("impl", x) for x in out.implicit_logits],
    ]:
        assert torch.isfinite(value).all(), name


# ------------------------------------------------------------------------------------------------ shapes, masks


def test_shapes_and_no_nans_with_zero_one_and_three_images(model):
    batch = mixed_batch(model)
    with torch.no_grad():
        out = model(batch)
    b, t = batch.input_ids.shape
    r = 3 * 16  # M media x a 4x4 grid each
    assert out.attr_logits.shape == (b, A)
    assert out.tag_logits.shape == (b, t, 1 + 2 * A)
    assert [x.shape for x in out.implicit_logits] == [(b, 3)]
    assert out.global_gate.shape == (b, t, 32) and out.regional_gate.shape == (b, r, 32)
    assert out.region_attention.shape == (b, t, r)
    assert_finite(out)
    att = out.region_attention
    assert torch.all(att[0] == 0), "a product without media attends to nothing"
    torch.testing.assert_close(att[1].sum(-1), torch.ones(t))
    torch.testing.assert_close(att[2, :, :16].sum(-1), torch.ones(t))
    assert torch.all(att[2, :, 16:] == 0), "masked media slots get no attention"


def test_product_without_media_is_not_faked(model):
    """A product without images gives the same outputs alone (image path skipped) as beside products with images."""
    batch = mixed_batch(model)
    alone = ProductBatch(
        input_ids=batch.input_ids[:1],
        attention_mask=batch.attention_mask[:1],
        token_field=batch.token_field[:1],
        media_mask=batch.media_mask[:1],
        pixel_values=batch.pixel_values[:1],
    )
    with torch.no_grad():
        mixed, single = model(batch), model(alone)
    assert single.global_gate is None and single.region_attention is None
    assert_finite(single)
    torch.testing.assert_close(single.attr_logits, mixed.attr_logits[:1])
    torch.testing.assert_close(single.tag_logits, mixed.tag_logits[:1])
    torch.testing.assert_close(single.implicit_logits[0], mixed.implicit_logits[0][:1])


def test_precomputed_visual_features_match_pixels(model):
    batch = mixed_batch(model)
    with torch.no_grad():
        glob, regions = model.image_tower(batch.pixel_values.flatten(0, 1))  # (B*M, Dv), (B*M, 16, Dv)
        b, m = batch.media_mask.shape
        cached = dataclasses.replace(
            batch,
            pixel_values=None,
            visual_global=glob.view(b, m, -1),
            visual_regions=regions.view(b, m, *regions.shape[1:]),
        )
        torch.testing.assert_close(model(cached).tag_logits, model(batch).tag_logits)
        empty = ~batch.media_mask
        garbage = dataclasses.replace(
            cached,
            visual_global=cached.visual_global.masked_fill(empty[:, :, None], float("nan")),
            visual_regions=cached.visual_regions.masked_fill(empty[:, :, None, None], float("nan")),
        )
        torch.testing.assert_close(model(garbage).tag_logits, model(batch).tag_logits)  # empty slots never read


def test_dropout_runs_in_training_only():
    model = build(dropout=0.3)
    batch = mixed_batch(model)
    model.train()
    assert not torch.allclose(model(batch).tag_logits, model(batch).tag_logits)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(batch).tag_logits, model(batch).tag_logits)


def test_bad_inputs_name_the_fix(model):
    batch = mixed_batch(model)
    with pytest.raises(ValueError, match="pixel_values nor precomputed"):
        model(dataclasses.replace(batch, pixel_values=None))
    with pytest.raises(ValueError, match="token_field"):
        dataclasses.replace(batch, token_field=batch.token_field[:, :-1])
    with pytest.raises(ValueError, match="bool"):
        dataclasses.replace(batch, media_mask=batch.media_mask.long())
    with pytest.raises(ValueError, match="implicit_value_sizes"):
        JaveConfig.tiny(implicit_value_sizes=(1,))


def test_default_preset_runs_on_pretrained_towers():
    """all-MiniLM-L6-v2 + ImageNet tf_efficientnet_lite0 (PyPI packages): a product with 2 images, one without."""
    torch.manual_seed(0)
    model = JaveModel(JaveConfig.default(num_attributes=A, implicit_value_sizes=IMPLICIT)).eval()
    assert not any(p.requires_grad for p in model.image_tower.parameters())  # frozen: features are cacheable
    products = toy_products(2, seed=3, media=[2, 0])
    batch = collate(products, model.text_tower.tokenizer, max_media=2, size=224)
    with torch.no_grad():
        out = model(batch)
    assert out.tag_logits.shape == (2, batch.input_ids.shape[1], 1 + 2 * A)
    assert out.region_attention.shape[-1] == 2 * 49
    assert_finite(out)
    bad = dataclasses.replace(
        batch, pixel_values=None, visual_global=torch.zeros(2, 2, 7), visual_regions=torch.zeros(2, 2, 4, 7)
    )
    with pytest.raises(ValueError, match="width 7 but the image tower gives 1280"):
        model(bad)


def test_config_presets_are_loggable():
    params = dataclasses.asdict(JaveConfig.tiny())
    assert params["text"]["tiny"] and params["image"]["tiny"] and params["kl_weight"] == 0.5
    default = JaveConfig.default(num_attributes=5)
    assert default.num_tags == 11 and default.image.name == "tf_efficientnet_lite0" and not default.text.tiny
    assert len(dataclasses.fields(JaveConfig)) <= 20


# ----------------------------------------------------------------------------------------------------- ablations


def test_use_image_false_ignores_pixels():
    model = build(use_image=False).eval()
    assert model.image_tower is None
    batch = mixed_batch(model)
    noisy = dataclasses.replace(batch, pixel_values=torch.randn_like(batch.pixel_values))
    with torch.no_grad():
        a, b = model(batch), model(noisy)
    assert a.global_gate is None and a.regional_gate is None
    torch.testing.assert_close(a.tag_logits, b.tag_logits)
    torch.testing.assert_close(a.implicit_logits[0], b.implicit_logits[0])


def test_image_changes_outputs_when_used(model):
    batch = mixed_batch(model)
    noisy = dataclasses.replace(batch, pixel_values=torch.randn_like(batch.pixel_values))
    with torch.no_grad():
        a, b = model(batch), model(noisy)
    assert not torch.allclose(a.tag_logits[1], b.tag_logits[1])
    torch.testing.assert_close(a.tag_logits[0], b.tag_logits[0])  # no media: pixels in its slots are never read


def _same_weights(cfg_override: dict) -> tuple[JaveModel, JaveModel]:
    full = build().eval()
    ablated = build(**cfg_override).eval()
    missing, unexpected = ablated.load_state_dict(full.state_dict(), strict=False)
    assert not missing, missing
    return full, ablated


def test_global_gate_switch():
    full, ablated = _same_weights({"use_global_gate": False})
    assert ablated.global_gate is None
    batch = mixed_batch(full)
    with torch.no_grad():
        a, b = full(batch), ablated(batch)
    assert b.global_gate is None and a.global_gate is not None
    assert not torch.allclose(a.attr_logits[1:], b.attr_logits[1:])
    torch.testing.assert_close(a.attr_logits[0], b.attr_logits[0])  # no media: nothing to gate


def test_regional_gate_switch_only_touches_the_tagger():
    full, ablated = _same_weights({"use_regional_gate": False})
    batch = mixed_batch(full)
    with torch.no_grad():
        a, b = full(batch), ablated(batch)
    assert b.regional_gate is None and a.regional_gate is not None
    torch.testing.assert_close(a.attr_logits, b.attr_logits)
    assert not torch.allclose(a.tag_logits[1:], b.tag_logits[1:])


def test_use_kl_false_zeroes_the_kl_term():
    model = build(use_kl=False).eval()
    batch = mixed_batch(model)
    with torch.no_grad():
        losses = jave_loss(model(batch), batch, model.cfg)
    assert set(losses) == {"attr_bce", "value_ce", "kl", "implicit_ce", "total"}
    assert losses["kl"].item() == 0.0
    expected = losses["value_ce"] + losses["attr_bce"] + losses["implicit_ce"]
    torch.testing.assert_close(losses["total"], expected)


def test_loss_terms_without_labels_are_zero(model):
    batch = dataclasses.replace(mixed_batch(model), attr_labels=None, tag_labels=None, implicit_labels=None)
    with torch.no_grad():
        losses = jave_loss(model(batch), batch, model.cfg)
    assert losses["attr_bce"] == 0 and losses["value_ce"] == 0 and losses["implicit_ce"] == 0
    assert torch.isfinite(losses["kl"]) and losses["kl"] > 0


# ------------------------------------------------------------------------------------------------------------ KL


def _agreeing_output(p_attr: torch.Tensor, t: int = 6) -> tuple[JaveOutput, torch.Tensor]:
    """Tag logits whose max-over-tokens P(B-a)+P(I-a) is exactly p_attr[a]: token a puts p_a on B-a, rest on O."""
    b, a = p_attr.shape
    probs = torch.full((b, t, 1 + 2 * a), 1e-12)
    probs[..., 0] = 1.0
    for j in range(a):
        probs[:, j, 1 + 2 * j] = 0.5 * p_attr[:, j]
        probs[:, j, 2 + 2 * j] = 0.5 * p_attr[:, j]
        probs[:, j, 0] = 1.0 - p_attr[:, j]
    probs = probs / probs.sum(-1, keepdim=True)
    out = JaveOutput(attr_logits=torch.logit(p_attr), tag_logits=probs.log(), implicit_logits=())
    return out, torch.ones(b, t, dtype=torch.bool)


def _batch_for(out: JaveOutput, mask: torch.Tensor) -> ProductBatch:
    b, t = mask.shape
    return ProductBatch(
        input_ids=torch.zeros(b, t, dtype=torch.long),
        attention_mask=mask.long(),
        token_field=torch.zeros(b, t, dtype=torch.long),
        media_mask=torch.zeros(b, 1, dtype=torch.bool),
    )


def test_kl_is_zero_when_heads_agree_and_positive_when_not():
    cfg = JaveConfig.tiny(num_attributes=3)
    p_attr = torch.tensor([[0.9, 0.2, 0.6], [0.05, 0.5, 0.99]])
    out, mask = _agreeing_output(p_attr)
    torch.testing.assert_close(tagger_attribute_probs(out.tag_logits, mask), p_attr)
    agree = jave_loss(out, _batch_for(out, mask), cfg)["kl"]
    assert abs(agree.item()) < 1e-5
    flipped = dataclasses.replace(out, attr_logits=-out.attr_logits)
    assert jave_loss(flipped, _batch_for(out, mask), cfg)["kl"].item() > 0.3


def test_kl_finite_at_extremes():
    p = torch.tensor([0.0, 1.0, 0.0, 1.0])
    q = torch.tensor([1.0, 0.0, 0.0, 1.0])
    kl = bernoulli_kl(p, q)
    assert torch.isfinite(kl).all() and kl[2:].abs().max() < 1e-4
    cfg = JaveConfig.tiny(num_attributes=2)
    out = JaveOutput(attr_logits=torch.full((2, 2), 1e4), tag_logits=torch.full((2, 4, 5), -1e4), implicit_logits=())
    mask = torch.zeros(2, 4, dtype=torch.bool)  # no real tokens at all
    assert torch.isfinite(jave_loss(out, _batch_for(out, mask), cfg)["kl"])


# --------------------------------------------------------------------------------------------- gradients, training


def test_gradients_reach_the_gates_and_towers():
    model = build().train()
    batch = mixed_batch(model)
    jave_loss(model(batch), batch, model.cfg)["total"].backward()
    for name in ("global_gate.text.weight", "global_gate.image.weight", "regional_gate.attributes.weight",
                 "regional_gate.region.weight", "attention.key.weight", "field_embed.weight"):  # fmt: skip
        grad = model.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_tower.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_tower.parameters())


@torch.no_grad()
def evaluate(model: JaveModel, batch: ProductBatch) -> dict[str, float]:
    model.eval()
    out = model(batch)
    pred = (out.attr_logits > 0).float()
    gold = batch.attr_labels
    tp = (pred * gold).sum()
    f1 = (2 * tp / (pred.sum() + gold.sum()).clamp_min(1)).item()
    value_tokens = batch.tag_labels > 0
    tag_acc = (out.tag_logits.argmax(-1)[value_tokens] == batch.tag_labels[value_tokens]).float().mean().item()
    known = batch.implicit_labels[:, 0] != IGNORE_INDEX
    impl_acc = (out.implicit_logits[0].argmax(-1)[known] == batch.implicit_labels[known, 0]).float().mean().item()
    return {"attr_f1": f1, "tag_acc": tag_acc, "implicit_acc": impl_acc}


def train(model: JaveModel, steps: int = 100) -> list[dict[str, float]]:
    tok = model.text_tower.tokenizer
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        batch = collate(toy_products(32, seed=step), tok)
        model.train()
        terms = jave_loss(model(batch), batch, model.cfg)
        opt.zero_grad()
        terms["total"].backward()
        opt.step()
        losses.append({k: v.item() for k, v in terms.items()})
    return losses


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def test_synthetic_training_end_to_end():
    """~100 steps on a toy task: values are words in the text, the implicit value is the image's colour."""
    model = build(seed=1)
    test = collate(toy_products(96, seed=999), model.text_tower.tokenizer)
    before = evaluate(model, test)
    losses = train(model)
    after = evaluate(model, test)
    first, last = losses[:5], losses[-5:]
    print("before", before, "after", after, "loss", _mean(first, "total"), "->", _mean(last, "total"))
    assert _mean(last, "total") < 0.3 * _mean(first, "total")
    for key in ("value_ce", "attr_bce", "implicit_ce"):
        assert _mean(last, key) < _mean(first, key), key
    assert after["attr_f1"] > max(0.9, before["attr_f1"])
    assert after["tag_acc"] > max(0.9, before["tag_acc"])
    assert after["implicit_acc"] > max(0.9, before["implicit_acc"])


def test_text_only_ablation_cannot_learn_the_image_colour():
    """The implicit value lives only in the pixels: without the image path it stays near chance, text still learns."""
    model = build(seed=1, use_image=False)
    train(model)
    after = evaluate(model, collate(toy_products(96, seed=999), model.text_tower.tokenizer))
    print("text-only", after)
    assert after["implicit_acc"] < 0.7
    assert after["tag_acc"] > 0.9
