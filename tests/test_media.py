"""Media layer: fetching (path, file://, http, s3), decoding, quarantine reasons, video frames, blob store."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow as pa
import pytest
from media_fixtures import (
    closed_port,
    corrupt_jpeg,
    exif_rotated_jpeg,
    hanging_server,
    http_server,
    jpeg_bytes,
    photo,
    png_bytes,
    png_header_bomb,
    write_video,
)
from PIL import Image

from warehouse.media import (
    BlobStore,
    MediaConfig,
    MediaError,
    decode_image,
    fetch_bytes,
    process_product_media,
    resolve_uri,
    sample_video_frames,
)
from warehouse.quarantine import Reason
from warehouse.schema import MEDIA, QUARANTINE

FAST = MediaConfig(timeout_s=2, retries=1, backoff_s=0.05)


@pytest.fixture
def good_jpg(tmp_path: Path) -> Path:
    path = tmp_path / "good.jpg"
    path.write_bytes(jpeg_bytes(photo((600, 800))))
    return path


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(str(tmp_path / "store"))


def run(product_images, product_videos=(), *, store, cfg=FAST, **kwargs):
    media, quarantined = process_product_media(
        "p1",
        list(product_images),
        list(product_videos),
        cfg=cfg,
        store=store,
        run_id="run-1",
        source="cat.jsonl",
        **kwargs,
    )
    # Rows always fit the warehouse schemas.
    pa.Table.from_pylist(media, schema=MEDIA)
    pa.Table.from_pylist(quarantined, schema=QUARANTINE)
    return media, quarantined


def by_uri(rows):
    return {r["uri"]: r for r in rows}


def assert_bad_beside_good(media, quarantined, bad_uri: str, good_uri: str, reason: Reason) -> None:
    """The bad item is quarantined with ``reason`` and an error row; the good image beside it is stored."""
    assert [q["reason"] for q in quarantined] == [reason.value], quarantined
    q = quarantined[0]
    assert q["position"] == f"media:{bad_uri}" and q["payload"] == bad_uri and q["product_id"] == "p1"
    assert q["source"] == "cat.jsonl" and q["run_id"] == "run-1"
    assert bad_uri in q["message"]
    rows = by_uri(media)
    assert rows[bad_uri]["status"] == "error" and rows[bad_uri]["sha256"] is None and rows[bad_uri]["blob_uri"] is None
    good = rows[good_uri]
    assert good["status"] == "ok" and good["kind"] == "image" and Path(good["blob_uri"]).is_file()


# ---------------------------------------------------------------------------------------------------------------
# Images: the good path
# ---------------------------------------------------------------------------------------------------------------


def test_good_image_row(good_jpg: Path, store: BlobStore) -> None:
    media, quarantined = run([str(good_jpg)], store=store)
    assert quarantined == []
    (row,) = media
    assert row["sha256"] == hashlib.sha256(good_jpg.read_bytes()).hexdigest()
    assert (row["width"], row["height"], row["format"], row["frame_ts"]) == (600, 800, "JPEG", None)
    assert row["blob_uri"] == store.uri(row["sha256"])
    assert row["blob_uri"].endswith(f"/blobs/{row['sha256'][:2]}/{row['sha256']}.jpg")
    with Image.open(row["blob_uri"]) as blob:
        assert blob.mode == "RGB" and blob.size == (600, 800)


def test_large_jpeg_downscaled_but_reports_original_size(tmp_path: Path, store: BlobStore) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(photo((2400, 1800))))
    media, _ = run([f"file://{path}"], store=store)
    assert (media[0]["width"], media[0]["height"]) == (2400, 1800)
    with Image.open(media[0]["blob_uri"]) as blob:
        assert blob.size == (1024, 768)
    image, info = decode_image(path.read_bytes(), MediaConfig(), max_side=300)
    assert image.size == (300, 225) and (info["width"], info["height"]) == (2400, 1800)


def test_exif_orientation_6_is_rotated(tmp_path: Path, store: BlobStore) -> None:
    data = exif_rotated_jpeg((400, 300), orientation=6)
    image, info = decode_image(data, MediaConfig())
    assert image.size == (300, 400) and (info["width"], info["height"]) == (300, 400)
    # The same with downscaling (draft + resize after the transpose) and through the whole pipeline.
    big = tmp_path / "rot.jpg"
    big.write_bytes(exif_rotated_jpeg((2000, 1000), orientation=6))
    media, _ = run([str(big)], store=store)
    assert (media[0]["width"], media[0]["height"]) == (1000, 2000)
    with Image.open(media[0]["blob_uri"]) as blob:
        assert blob.size == (512, 1024)


def test_transparent_png_becomes_rgb_on_white() -> None:
    im = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    im.paste((255, 0, 0, 255), (0, 0, 10, 10))
    out, info = decode_image(png_bytes(im), MediaConfig())
    assert out.mode == "RGB" and info["format"] == "PNG"
    assert out.getpixel((20, 20)) == (255, 255, 255) and out.getpixel((5, 5)) == (255, 0, 0)


def test_relative_paths_resolve_against_base_dir(good_jpg: Path, store: BlobStore) -> None:
    media, quarantined = run(["good.jpg"], store=store, base_dir=str(good_jpg.parent))
    assert quarantined == [] and media[0]["uri"] == "good.jpg" and media[0]["status"] == "ok"
    assert resolve_uri("img/a.jpg", "s3://bucket/catalog/") == "s3://bucket/catalog/img/a.jpg"
    assert resolve_uri("https://x/a.jpg", "/data") == "https://x/a.jpg"


def test_duplicate_uris_processed_once(good_jpg: Path, store: BlobStore) -> None:
    media, _ = run([str(good_jpg), str(good_jpg)], store=store)
    assert len(media) == 1


# ---------------------------------------------------------------------------------------------------------------
# Images: every failure is a reason, and never stops the good image beside it
# ---------------------------------------------------------------------------------------------------------------


def _bad_local(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("corrupt", Reason.MEDIA_CORRUPT),
        ("truncated", Reason.MEDIA_CORRUPT),
        ("header_bomb", Reason.MEDIA_BOMB),
        ("solid_bomb", Reason.MEDIA_BOMB),
        ("text_as_jpg", Reason.MEDIA_NOT_IMAGE),
        ("missing", Reason.MEDIA_UNREACHABLE),
        ("bad_scheme", Reason.MEDIA_BAD_URI),
        ("too_large", Reason.MEDIA_TOO_LARGE),
    ],
)
def test_bad_image_quarantined_good_kept(case: str, reason: Reason, tmp_path: Path, good_jpg: Path, store) -> None:
    good = good_jpg.read_bytes()
    cfg = FAST
    if case == "corrupt":
        bad = _bad_local(tmp_path, "corrupt.jpg", corrupt_jpeg(good))
    elif case == "truncated":
        bad = _bad_local(tmp_path, "trunc.jpg", good[: len(good) * 6 // 10])
    elif case == "header_bomb":  # 60 bytes on disk, 10^10 pixels declared: PIL's own guard, at our limit
        bad = _bad_local(tmp_path, "bomb.png", png_header_bomb(100_000, 100_000))
    elif case == "solid_bomb":  # a real, fully decodable 1.2 Mpx image, tiny on disk, with the limit lowered
        bad = _bad_local(tmp_path, "solid.png", png_bytes(Image.new("RGB", (1200, 1000), (10, 20, 30))))
        cfg = MediaConfig(max_pixels=1_000_000, timeout_s=2, retries=1)
    elif case == "text_as_jpg":
        bad = _bad_local(tmp_path, "notes.jpg", b"this is a text file, not a JPEG\n" * 10)
    elif case == "missing":
        bad = str(tmp_path / "nowhere.jpg")
    elif case == "bad_scheme":
        bad = "ftp://example.com/a.jpg"
    elif case == "too_large":
        bad = _bad_local(tmp_path, "huge.jpg", good + b"\0" * 200_000)
        cfg = MediaConfig(max_bytes=len(good) + 1000)
    media, quarantined = run([bad, str(good_jpg)], store=store, cfg=cfg)
    assert_bad_beside_good(media, quarantined, bad, str(good_jpg), reason)


def test_bomb_guard_is_per_call_and_restored() -> None:
    saved = Image.MAX_IMAGE_PIXELS
    data = png_bytes(Image.new("RGB", (1200, 1000)))
    with pytest.raises(MediaError) as e:
        decode_image(data, MediaConfig(max_pixels=1_000_000))
    assert e.value.reason == Reason.MEDIA_BOMB and "MediaConfig.max_pixels" in e.value.message
    assert saved == Image.MAX_IMAGE_PIXELS
    assert decode_image(data, MediaConfig(max_pixels=2_000_000))[1]["width"] == 1200


def test_messages_name_the_uri_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MediaError) as e:
        fetch_bytes(str(tmp_path / "gone.jpg"), FAST, what="image")
    assert e.value.message.startswith(f"image {tmp_path / 'gone.jpg'}: file not found") and "check the path" in str(
        e.value
    )
    with pytest.raises(MediaError) as e:
        fetch_bytes("gs://bucket/a.jpg", FAST, what="image")
    assert e.value.reason == Reason.MEDIA_BAD_URI and "unsupported scheme 'gs'" in e.value.message


# ---------------------------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------------------------


def test_http_ok_404_and_retried_503(good_jpg: Path, store: BlobStore) -> None:
    body = good_jpg.read_bytes()
    flaky_calls = []

    def flaky():
        flaky_calls.append(1)
        return (503, b"busy") if len(flaky_calls) == 1 else (200, body)

    routes = {"/ok.jpg": lambda: (200, body), "/gone.jpg": lambda: (404, b"nope"), "/flaky.jpg": flaky}
    with http_server(routes) as (base, hits):
        media, quarantined = run([f"{base}/gone.jpg", f"{base}/ok.jpg", f"{base}/flaky.jpg"], store=store)
        assert_bad_beside_good(media, quarantined, f"{base}/gone.jpg", f"{base}/ok.jpg", Reason.MEDIA_UNREACHABLE)
        assert "HTTP 404" in quarantined[0]["message"]
        assert hits == {"/gone.jpg": 1, "/ok.jpg": 1, "/flaky.jpg": 2}  # 4xx never retried; 5xx retried
        assert by_uri(media)[f"{base}/flaky.jpg"]["status"] == "ok"
        assert by_uri(media)[f"{base}/ok.jpg"]["sha256"] == hashlib.sha256(body).hexdigest()


def test_http_5xx_gives_up_after_retries() -> None:
    with http_server({"/down.jpg": lambda: (500, b"boom")}) as (base, hits), pytest.raises(MediaError) as e:
        fetch_bytes(f"{base}/down.jpg", MediaConfig(retries=2, backoff_s=0.01))
    assert hits == {"/down.jpg": 3} and e.value.reason == Reason.MEDIA_UNREACHABLE
    assert "HTTP 500" in e.value.message and "3 attempts" in e.value.message


def test_http_content_length_over_cap(good_jpg: Path) -> None:
    body = good_jpg.read_bytes()
    with http_server({"/a.jpg": lambda: (200, body)}) as (base, _), pytest.raises(MediaError) as e:
        fetch_bytes(f"{base}/a.jpg", MediaConfig(max_bytes=len(body) // 2))
    assert e.value.reason == Reason.MEDIA_TOO_LARGE and "MediaConfig.max_bytes" in e.value.message


@pytest.mark.timeout(30)
def test_http_hanging_server_times_out_bounded(good_jpg: Path, store: BlobStore) -> None:
    cfg = MediaConfig(timeout_s=1, retries=1, backoff_s=0.05)
    with hanging_server() as base:
        bad = f"{base}/slow.jpg"
        t0 = time.monotonic()
        media, quarantined = run([bad, str(good_jpg)], store=store, cfg=cfg)
        elapsed = time.monotonic() - t0
    assert_bad_beside_good(media, quarantined, bad, str(good_jpg), Reason.MEDIA_UNREACHABLE)
    msg = quarantined[0]["message"]
    assert "HTTP timeout after 1s (2 attempts)" in msg and "MediaConfig.timeout_s" in msg
    assert 1.9 < elapsed < 10


def test_http_connection_refused(good_jpg: Path, store: BlobStore) -> None:
    bad = f"http://127.0.0.1:{closed_port()}/a.jpg"
    media, quarantined = run([bad, str(good_jpg)], store=store)
    assert_bad_beside_good(media, quarantined, bad, str(good_jpg), Reason.MEDIA_UNREACHABLE)
    assert "connection failed (2 attempts)" in quarantined[0]["message"]


# ---------------------------------------------------------------------------------------------------------------
# Video
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    codec = write_video(path, seconds=2.0, fps=10)
    return path, codec


def test_sample_video_frames_uniform(video) -> None:
    path, _ = video
    frames = sample_video_frames(path.read_bytes(), 4)
    times = [ts for ts, _ in frames]
    assert len(frames) == 4 and times == sorted(times) and len(set(times)) == 4
    assert 0 <= times[0] < 0.5 and 1.5 <= times[-1] < 2.0
    assert all(im.mode == "RGB" and im.size == (320, 240) for _, im in frames)
    # More frames asked than the clip has: distinct frames only, still increasing.
    many = [ts for ts, _ in sample_video_frames(path.read_bytes(), 50)]
    assert len(many) == 20 and many == sorted(set(many))


def test_seeking_across_keyframes_picks_the_right_frames(tmp_path: Path) -> None:
    import av
    import numpy as np

    path = tmp_path / "gop5.mp4"
    write_video(path, seconds=4.0, fps=10, gop=5)  # a keyframe every 0.5 s: targets are reached by seeking
    with av.open(str(path)) as c:
        every = {round(f.time, 3): np.asarray(f.to_image(), dtype=np.int16) for f in c.decode(video=0)}
    frames = sample_video_frames(path.read_bytes(), 4)
    assert [round(ts, 3) for ts, _ in frames] == [0.5, 1.5, 2.5, 3.5]
    for ts, im in frames:  # the very frame a straight decode gives at that time
        assert np.abs(np.asarray(im, dtype=np.int16) - every[round(ts, 3)]).max() == 0


def test_video_frames_rows_and_blobs(video, good_jpg: Path, store: BlobStore) -> None:
    path, codec = video
    media, quarantined = run([str(good_jpg)], [str(path)], store=store)
    assert quarantined == []
    frames = [r for r in media if r["kind"] == "video_frame"]
    assert len(frames) == 4 and all(r["status"] == "ok" and r["uri"] == str(path) for r in frames)
    assert [r["frame_ts"] for r in frames] == sorted({r["frame_ts"] for r in frames})
    for r in frames:
        blob = Path(r["blob_uri"]).read_bytes()
        assert hashlib.sha256(blob).hexdigest() == r["sha256"] and r["blob_uri"] == store.uri(r["sha256"])
        assert (r["width"], r["height"], r["format"]) == (320, 240, codec)
    assert len({r["sha256"] for r in frames}) == 4


def test_video_without_duration_is_sampled_by_index(video, tmp_path: Path) -> None:
    import av

    path, codec = video
    if codec not in ("h264", "libx264"):
        pytest.skip("raw elementary stream written only for h264")
    raw = tmp_path / "clip.h264"
    with av.open(str(path)) as src, av.open(str(raw), "w", format="h264") as dst:
        out = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = out
                dst.mux(packet)
    frames = sample_video_frames(raw.read_bytes(), 4)
    times = [ts for ts, _ in frames]
    assert len(frames) == 4 and times == sorted(set(times))


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("notes.mp4", b"definitely not a video\n" * 20, Reason.MEDIA_NOT_VIDEO),
        ("still.mp4", None, Reason.MEDIA_NOT_VIDEO),  # a JPEG named .mp4: FFmpeg opens it, but it is no video
        ("trunc.mp4", "truncated", Reason.MEDIA_CORRUPT),
    ],
)
def test_bad_video_quarantined_good_kept(name, data, reason, video, tmp_path: Path, good_jpg: Path, store) -> None:
    if data is None:
        data = good_jpg.read_bytes()
    elif data == "truncated":
        full = video[0].read_bytes()
        data = full[: len(full) // 2]
    bad = _bad_local(tmp_path, name, data)
    media, quarantined = run([str(good_jpg)], [bad], store=store)
    assert_bad_beside_good(media, quarantined, bad, str(good_jpg), reason)
    assert by_uri(media)[bad]["kind"] == "video_frame"


# ---------------------------------------------------------------------------------------------------------------
# Blob store
# ---------------------------------------------------------------------------------------------------------------


def test_blob_store_idempotent(video, good_jpg: Path, store: BlobStore) -> None:
    first, _ = run([str(good_jpg)], [str(video[0])], store=store)
    written = store.writes
    files = sorted(p for p in Path(store.root).rglob("*") if p.is_file())
    assert written == 5 and len(files) == 5
    second, _ = run([str(good_jpg)], [str(video[0])], store=store)
    assert store.writes == written and sorted(p for p in Path(store.root).rglob("*") if p.is_file()) == files
    assert first == second
    # A fresh store over the same root (another run) writes nothing either.
    again = BlobStore(store.root)
    run([str(good_jpg)], [str(video[0])], store=again)
    assert again.writes == 0


# ---------------------------------------------------------------------------------------------------------------
# S3 through a local moto server
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def s3(moto_s3):
    client, endpoint = moto_s3
    client.create_bucket(Bucket="media")
    return client, {"client_kwargs": {"endpoint_url": endpoint}}


@pytest.mark.timeout(60)
def test_s3_fetch_and_store(s3, good_jpg: Path, video) -> None:
    client, options = s3
    client.put_object(Bucket="media", Key="catalog/img/good.jpg", Body=good_jpg.read_bytes())
    client.put_object(Bucket="media", Key="catalog/clip.mp4", Body=video[0].read_bytes())
    store = BlobStore("s3://media/warehouse", storage_options=options)
    media, quarantined = run(
        ["img/good.jpg", "s3://media/catalog/img/missing.jpg"],
        ["clip.mp4"],
        store=store,
        storage_options=options,
        base_dir="s3://media/catalog",
    )
    assert [q["reason"] for q in quarantined] == [Reason.MEDIA_UNREACHABLE.value]
    ok = [r for r in media if r["status"] == "ok"]
    assert len(ok) == 5 and store.writes == 5
    image = by_uri(media)["img/good.jpg"]
    assert image["sha256"] == hashlib.sha256(good_jpg.read_bytes()).hexdigest()
    assert image["blob_uri"] == f"s3://media/warehouse/blobs/{image['sha256'][:2]}/{image['sha256']}.jpg"
    key = image["blob_uri"].removeprefix("s3://media/")
    assert client.get_object(Bucket="media", Key=key)["Body"].read()[:3] == b"\xff\xd8\xff"
    run(["img/good.jpg"], ["clip.mp4"], store=store, storage_options=options, base_dir="s3://media/catalog")
    assert store.writes == 5  # idempotent on S3 too


def test_non_string_and_empty_uris_are_bad_uris(good_jpg: Path, store: BlobStore) -> None:
    media, quarantined = run([None, "", str(good_jpg)], store=store)
    assert [q["reason"] for q in quarantined] == [Reason.MEDIA_BAD_URI.value] * 2
    assert [r["status"] for r in media] == ["error", "error", "ok"] and media[0]["uri"] == "None"


class _FakeFrame:
    def __init__(self, rotation: int) -> None:
        self.rotation = rotation

    def to_image(self) -> Image.Image:
        return Image.new("RGB", (40, 30))


@pytest.mark.parametrize(("rotation", "size"), [(0, (40, 30)), (-90, (30, 40)), (90, (30, 40)), (-180, (40, 30))])
def test_video_display_rotation_applied(rotation: int, size: tuple[int, int]) -> None:
    from warehouse.media import _frame_image

    assert _frame_image(_FakeFrame(rotation)).size == size
