"""Enrichment fast path (tiny model): the visual feature cache, bf16 autocast and length bucketing change speed, not
answers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

ATTRS = ("color", "material", "size")


def _checkpoint(path, seed: int = 0):
    """A tiny JAVE checkpoint folder as `jave.trainer` writes one (random weights)."""
    from jave.codec import AttributeVocab
    from jave.data import TaskSpec
    from jave.model import jave_tiny
    from jave.trainer import save_weights

    torch.manual_seed(seed)
    model = jave_tiny(num_attributes=len(ATTRS), implicit_value_sizes=(3,)).eval()
    spec = TaskSpec(AttributeVocab(ATTRS), {"sleeve": ("long", "short", "none")}, max_length=64)
    path.mkdir(parents=True, exist_ok=True)
    (path / "spec.json").write_text(json.dumps(spec.to_json()))
    (path / "config.json").write_text(json.dumps({"model": asdict(model.cfg)}, default=str))
    save_weights(model, path / "best.safetensors")
    return path


def _images(folder, n: int) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(p, "JPEG")
        out.append(str(p))
    return out


def _rows(images: list[str], n: int = 7, with_media: bool = True) -> list[dict]:
    """Products of very different text lengths; every other one shares an image, one has none."""
    rows = []
    for i in range(n):
        uri = images[i % len(images)]
        media = [{"uri": uri, "sha256": hashlib.sha256(Path(uri).read_bytes()).hexdigest(), "blob_uri": uri}]
        rows.append(
            {
                "product_id": f"p{i}",
                "title": f"Cotton shirt {i} " + "blue " * (1 + 5 * (i % 3)),
                "description": "soft linen " * (i * 2),
                "specs": [{"key": "Material", "value": "cotton"}],
                "images": [] if i == 3 else [uri],
                "image_media": media if with_media and i != 3 else None,
                "labels": [],
            }
        )
    return rows


@pytest.fixture
def enricher(tmp_path):
    from flows.jave_pyfunc import JaveEnricher

    return JaveEnricher(_checkpoint(tmp_path / "ckpt"))


def _count_tower_calls(enricher) -> list[int]:
    """Forward passes of the image tower, whichever backend runs it (PyTorch hook + the ONNX session's calls)."""
    calls = [0]
    enricher.model.image_tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    encoder = enricher.image_encoder
    if encoder._onnx is not None:
        session = encoder._onnx.session

        class Counting:
            def run(self, *a, **kw):
                calls[0] += 1
                return session.run(*a, **kw)

        encoder._onnx.session = Counting()
    return calls


def _scores(preds: list[dict]) -> list[tuple]:
    return [(p["product_id"], p["attribute"], p["kind"], p["value"], p["begin"]) for p in preds]


def test_cache_hit_does_not_call_the_backbone(tmp_path, enricher):
    from flows.jave_pyfunc import JaveEnricher
    from warehouse.visual_features import VisualFeatureStore

    rows = _rows(_images(tmp_path / "img", 3))
    store = VisualFeatureStore(tmp_path / "wh", enricher.backbone_id)
    enricher.configure(device="cpu", precision="fp32", visual_store=store)
    calls = _count_tower_calls(enricher)
    cold = enricher.predict_rows(rows)
    assert calls[0] >= 1 and store.writes == 3 and store.misses == 3

    # a new process (new enricher, new store object) over the same warehouse: every image is a hit
    again = JaveEnricher(enricher.checkpoint_dir)
    store2 = VisualFeatureStore(tmp_path / "wh", again.backbone_id)
    again.configure(device="cpu", precision="fp32", visual_store=store2)
    calls2 = _count_tower_calls(again)
    warm = again.predict_rows(rows)
    assert calls2[0] == 0 and store2.hits == 3 and store2.writes == 0
    assert _scores(warm) == _scores(cold)
    np.testing.assert_allclose([p["score"] for p in warm], [p["score"] for p in cold], rtol=1e-5, atol=1e-6)


def test_backbone_id_changes_with_weights_and_preprocessing(tmp_path, enricher):
    from flows.jave_pyfunc import JaveEnricher

    other = JaveEnricher(_checkpoint(tmp_path / "other", seed=1))
    assert other.backbone_id != enricher.backbone_id  # other image-tower weights: other features
    before = enricher.backbone_id
    enricher.configure(device="cpu", precision="fp32", decode_max_side=512)
    assert enricher.backbone_id != before  # other decode size: other pixels


def test_cached_features_match_the_uncached_model_path(tmp_path, enricher):
    """Features from the store give the model's own image path outputs (fp16 storage: close, not equal)."""
    from flows.jave_pyfunc import load_image
    from jave.data import build_examples
    from jave.predict import infer
    from warehouse.visual_features import VisualFeatureStore

    rows = _rows(_images(tmp_path / "img", 3))
    store = VisualFeatureStore(tmp_path / "wh", enricher.backbone_id)
    enricher.configure(device="cpu", precision="fp32", visual_store=store)
    enricher.visual_features(rows)  # fills the store
    feats = enricher.visual_features(rows)  # read back from it
    assert store.hits == 3
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    model = enricher.model
    cached = infer(model, examples, enricher.spec, 4, visual_cache=feats)
    direct = infer(model, examples, enricher.spec, 4, image_loader=load_image, preprocess=model.image_tower.preprocess)
    for a, b in zip(cached, direct, strict=True):
        np.testing.assert_allclose(a.attr_probs, b.attr_probs, atol=2e-3)
        np.testing.assert_allclose(a.tag_probs, b.tag_probs, atol=2e-3)


def test_rows_without_media_entries_are_keyed_by_their_bytes(tmp_path, enricher):
    from warehouse.visual_features import VisualFeatureStore

    images = _images(tmp_path / "img", 3)
    store = VisualFeatureStore(tmp_path / "wh", enricher.backbone_id)
    enricher.configure(device="cpu", precision="fp32", visual_store=store)
    with_media = enricher.predict_rows(_rows(images))
    without = enricher.predict_rows(_rows(images, with_media=False))  # fetched + hashed: the same keys
    assert store.writes == 3 and store.hits == 3
    assert _scores(without) == _scores(with_media)


def test_bf16_autocast_stays_close_to_fp32(tmp_path, enricher):
    from jave.data import build_examples
    from jave.predict import infer

    rows = _rows(_images(tmp_path / "img", 3))
    enricher.configure(device="cpu", precision="fp32")
    feats = enricher.visual_features(rows)
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    fp32 = infer(enricher.model, examples, enricher.spec, 4, visual_cache=feats)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what precision="bf16" wraps the forward in
        bf16 = infer(enricher.model, examples, enricher.spec, 4, visual_cache=feats)
    for a, b in zip(fp32, bf16, strict=True):
        np.testing.assert_allclose(a.attr_probs, b.attr_probs, atol=0.03)
        np.testing.assert_allclose(a.tag_probs, b.tag_probs, atol=0.03)
        assert (a.tag_probs.argmax(-1) == b.tag_probs.argmax(-1)).mean() > 0.9


def test_bf16_inference_copy_matches_autocast_and_runs_in_the_enrichers_place(tmp_path, enricher, monkeypatch):
    """The bf16 copy of the text tower: Linear weights stored in bf16 (autocast's per-call casts, saved), attention
    in fp32 on CPU; the tower itself untouched; the enricher runs the copy under precision bf16."""
    import features.runtime as runtime
    from features.runtime import FP32_ATTENTION, autocast_inference_copy

    tower = enricher.model.text_tower
    cpu = torch.device("cpu")
    copy = autocast_inference_copy(tower, torch.bfloat16, cpu)
    linear = [m for m in copy.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.dtype == torch.bfloat16 and m.bias.dtype == torch.bfloat16 for m in linear)
    assert all(m.weight.dtype == torch.float32 for m in tower.modules() if isinstance(m, torch.nn.Linear))
    emb = copy.model.embeddings.word_embeddings.weight
    assert emb is tower.model.embeddings.word_embeddings.weight  # shared, not copied
    assert copy.model.config._attn_implementation == FP32_ATTENTION
    assert tower.model.config._attn_implementation == "sdpa"
    enc = tower.tokenizer(["red cotton shirt, long sleeves", "mug"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    keep = mask.bool()
    with torch.no_grad():
        ref = tower(ids, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto, fast = tower(ids, mask).float(), copy(ids, mask).float()
            short = copy(ids[1:, : int(mask[1].sum())], mask[1:, : int(mask[1].sum())]).float()
    err_auto, err_fast = (auto - ref)[keep].abs().max(), (fast - ref)[keep].abs().max()
    assert err_fast <= 1.5 * err_auto + 1e-3, (err_fast, err_auto)  # as close to fp32 as plain autocast
    torch.testing.assert_close(short[0], fast[1, : short.shape[1]])  # padding does not leak into the states
    # without the fp32 attention (another implementation), the copy gives autocast's very bits
    tower.model.set_attn_implementation("eager")
    try:
        plain = autocast_inference_copy(tower, torch.bfloat16, cpu)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(plain(ids, mask), tower(ids, mask))
    finally:
        tower.model.set_attn_implementation("sdpa")

    monkeypatch.setattr(runtime, "resolve_precision", lambda precision, device: torch.bfloat16)
    rows = _rows(_images(tmp_path / "img", 3))
    enricher.configure(device="cpu", precision="bf16")
    assert enricher.precision == "bf16" and enricher.text_runtime is not None
    calls = []
    hook = enricher.text_runtime.register_forward_hook(lambda *_: calls.append(1))
    try:
        assert len(enricher.predict_rows(rows)) > 0 and calls
    finally:
        hook.remove()
    assert enricher.model.text_tower is tower  # swapped back


def test_bucketing_returns_predictions_in_input_order(tmp_path, enricher):
    from jave.data import build_examples
    from jave.predict import infer

    rows = _rows(_images(tmp_path / "img", 3), n=9)
    enricher.configure(device="cpu", precision="fp32")
    feats = enricher.visual_features(rows)
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    lengths = [e.length for e in examples]
    assert lengths != sorted(lengths)  # bucketing reorders these
    batched = infer(enricher.model, examples, enricher.spec, 4, visual_cache=feats)
    alone = [infer(enricher.model, [e], enricher.spec, 1, visual_cache=feats)[0] for e in examples]
    for e, a, b in zip(examples, batched, alone, strict=True):
        assert a.tag_probs.shape[0] == e.length
        np.testing.assert_allclose(a.attr_probs, b.attr_probs, atol=1e-5)
        np.testing.assert_allclose(a.tag_probs, b.tag_probs, atol=1e-5)
    preds = enricher.predict_rows(rows, batch_size=4)
    order = list(dict.fromkeys(p["product_id"] for p in preds))
    assert order == [r["product_id"] for r in rows]


def test_store_round_trip_on_s3(moto_s3):
    from warehouse.visual_features import VisualFeatureStore

    client, endpoint = moto_s3
    client.create_bucket(Bucket="enrich-wh")
    opts = {"AWS_ENDPOINT_URL": endpoint, "AWS_ALLOW_HTTP": "true", "AWS_REGION": "us-east-1"}
    store = VisualFeatureStore("s3://enrich-wh/warehouse", "tiny-abc", opts)
    g, r = np.arange(4, dtype=np.float32), np.ones((2, 4), np.float32) / 3
    store.put_many({"ab" * 32: (g, r)})
    store.put_many({"ab" * 32: (g, r)})  # already there: not rewritten
    got = VisualFeatureStore("s3://enrich-wh/warehouse", "tiny-abc", opts).get_many(["ab" * 32, "cd" * 32])
    assert store.writes == 1 and list(got) == ["ab" * 32]
    np.testing.assert_array_equal(got["ab" * 32][0], g.astype(np.float16))
    np.testing.assert_allclose(got["ab" * 32][1], r, atol=1e-3)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="enrich-wh")["Contents"]]
    assert keys == [f"warehouse/visual_features/tiny-abc/ab/{'ab' * 32}.safetensors"]


def test_device_and_precision_are_validated(enricher):
    with pytest.raises(ValueError, match="device"):
        enricher.configure(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA"):
            enricher.configure(device="cuda")
    assert enricher.configure(device="auto", precision="fp32").device.type in ("cpu", "cuda")


def test_onnx_image_backend_gives_the_torch_features_and_answers(tmp_path, enricher):
    rows = _rows(_images(tmp_path / "img", 3))
    torch_feats = enricher.configure(device="cpu", precision="fp32", backend="torch").visual_features(rows)
    torch_preds = enricher.predict_rows(rows)
    assert enricher.image_encoder._onnx is None
    onnx_feats = enricher.configure(device="cpu", precision="fp32", backend="onnx").visual_features(rows)
    assert enricher.image_encoder._onnx is not None and enricher.image_encoder.calls == 1
    assert set(onnx_feats) == set(torch_feats)
    for uri, (g, r) in torch_feats.items():  # both rounded to fp16 (the store's format)
        np.testing.assert_allclose(onnx_feats[uri][0], g, atol=2e-3)
        np.testing.assert_allclose(onnx_feats[uri][1], r, atol=2e-3)
    onnx_preds = enricher.predict_rows(rows)
    assert _scores(onnx_preds) == _scores(torch_preds)
    np.testing.assert_allclose([p["score"] for p in onnx_preds], [p["score"] for p in torch_preds], atol=1e-3)


def test_int8_text_tower_stays_close_to_fp32(tmp_path, enricher):
    from jave.data import build_examples
    from jave.predict import infer

    rows = _rows(_images(tmp_path / "img", 3))
    enricher.configure(device="cpu", precision="fp32", backend="torch")
    assert enricher.text_runtime is None
    feats = enricher.visual_features(rows)
    examples = build_examples(rows, enricher.spec, enricher.tokenizer)
    fp32 = infer(enricher.model, examples, enricher.spec, 4, visual_cache=feats)
    enricher.configure(device="cpu", precision="int8")
    assert enricher.precision == "int8" and enricher.backend == "onnx"
    from features.onnx_backend import swapped

    with swapped(enricher.model, "text_tower", enricher.text_runtime):  # what predict_rows runs under int8
        int8 = infer(enricher.model, examples, enricher.spec, 4, visual_cache=feats)
    assert enricher.model.text_tower is not enricher.text_runtime  # the torch tower is back afterwards
    for a, b in zip(fp32, int8, strict=True):
        np.testing.assert_allclose(a.attr_probs, b.attr_probs, atol=0.05)
        assert (a.tag_probs.argmax(-1) == b.tag_probs.argmax(-1)).mean() > 0.9
    assert not np.allclose(fp32[0].tag_probs, int8[0].tag_probs, atol=1e-7)  # the int8 graph really ran
    assert len(enricher.predict_rows(rows)) > 0


def test_fp32_text_tower_under_onnx_runtime_gives_the_torch_predictions(tmp_path, enricher):
    """fp32 on CPU with backend onnx/auto runs the text tower under ONNX Runtime: same predictions as eager PyTorch
    (to float tolerance), and the torch tower is really bypassed while it predicts."""
    rows = _rows(_images(tmp_path / "img", 3))
    torch_preds = enricher.configure(device="cpu", precision="fp32", backend="torch").predict_rows(rows)
    assert enricher.text_runtime is None
    calls = []
    hook = enricher.model.text_tower.register_forward_hook(lambda *_: calls.append(1))
    try:
        enricher.predict_rows(rows)
        assert calls, "the torch text tower ran under backend torch"
        calls.clear()
        enricher.configure(device="cpu", precision="fp32", backend="auto")
        assert enricher.backend == "onnx" and enricher.text_runtime is not None
        onnx_preds = enricher.predict_rows(rows)
        assert not calls, "the torch text tower ran although ONNX Runtime was configured"
    finally:
        hook.remove()
    assert enricher.model.text_tower is not enricher.text_runtime  # swapped back after predicting
    assert _scores(onnx_preds) == _scores(torch_preds)
    np.testing.assert_allclose([p["score"] for p in onnx_preds], [p["score"] for p in torch_preds], atol=1e-4)


def test_backend_and_int8_are_validated(enricher):
    with pytest.raises(ValueError, match="backend 'gpu' is not one of"):
        enricher.configure(device="cpu", backend="gpu")
    with pytest.raises(ValueError, match="int8.*ONNX Runtime"):
        enricher.configure(device="cpu", precision="int8", backend="torch")
    from features.runtime import resolve_precision

    with pytest.raises(ValueError, match="int8.*CPU only"):
        resolve_precision("int8", torch.device("cuda"))


def test_exported_graph_is_cached_by_weights(tmp_path):
    from features.onnx_backend import onnx_text_tower
    from features.towers import TextTower

    torch.manual_seed(0)
    tower = TextTower(tiny=True).eval()
    first = onnx_text_tower(tower, int8=False, root=tmp_path)
    stamp = first.path.stat().st_mtime_ns
    again = onnx_text_tower(tower, int8=False, root=tmp_path)
    assert again.path == first.path and again.path.stat().st_mtime_ns == stamp  # reused, not re-exported
    ids, mask = torch.randint(5, 90, (2, 9)), torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        np.testing.assert_allclose(again(ids, mask), tower(ids, mask), atol=1e-5)
        next(tower.parameters()).add_(0.5)
    assert onnx_text_tower(tower, int8=False, root=tmp_path).path != first.path  # new weights: a new graph


def test_weights_fingerprint_covers_buffers_and_weights():
    from torch import nn

    from features.runtime import weights_fingerprint

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # 0-dim num_batches_tracked buffer included
    before = weights_fingerprint(net, "decode=1024")
    assert before == weights_fingerprint(net, "decode=1024")
    assert before != weights_fingerprint(net, "decode=512")
    with torch.no_grad():
        net[1].running_mean += 1
    assert weights_fingerprint(net, "decode=1024") != before


def test_flow_rows_carry_media_keys_and_hit_the_warehouse_cache(tmp_path, prefect_harness, enricher):
    """products_to_predict attaches each image's sha256 + blob; the store under the warehouse root is reused."""
    from flows.enrich import ModelRef, prepare_enricher, products_to_predict
    from flows.ingest import ingest
    from warehouse.sample_catalog import FIELD_MAP, MIN_PRODUCTS, generate
    from warehouse.tables import Warehouse

    cat = generate(tmp_path / "cat", n_products=MIN_PRODUCTS, seed=3, n_videos=0)
    root = str(tmp_path / "wh")
    ingest(str(cat.catalog_path), mapping=dict(FIELD_MAP), warehouse_root=root, media=True)
    wh = Warehouse(root)
    rows = products_to_predict(wh, "1", None, only_changed=False).to_pylist()
    media = wh.sql("SELECT product_id, uri, sha256, blob_uri FROM media WHERE kind = 'image' AND status = 'ok'")
    assert sum(len(r["image_media"] or ()) for r in rows) == media.num_rows > 0
    for r in rows:
        for m in r["image_media"] or ():
            assert m["uri"] in r["images"] and len(m["sha256"]) == 64 and m["blob_uri"].endswith(".jpg")

    ref = ModelRef("jave", "1", "run", "", device="cpu", precision="fp32", visual_cache_root=root)
    prepare_enricher(enricher, ref)
    for r in rows:
        r["labels"] = []
    first = enricher.predict_rows(rows)
    shas = {m["sha256"] for r in rows for m in (r["image_media"] or ()) if m["uri"] in r["images"][:4]}
    assert enricher.visual_store.writes == len(shas)
    calls = _count_tower_calls(enricher)
    again = enricher.predict_rows(rows)
    assert calls[0] == 0 and enricher.visual_store.hits == len(shas)
    assert _scores(again) == _scores(first)


def test_unwritable_onnx_cache_falls_back_to_a_temp_copy(tmp_path, monkeypatch):
    from features.onnx_backend import onnx_image_tower
    from features.towers import ImageTower

    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ENRICH_ONNX_CACHE", str(blocker / "onnx"))
    torch.manual_seed(3)
    tower = ImageTower(tiny=True).eval()
    onnx = onnx_image_tower(tower)
    assert not str(onnx.path).startswith(str(blocker)) and onnx.path.exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(onnx(x)[0], tower(x)[0], atol=1e-5)
