"""Media test helpers: images, broken files, a video, and local HTTP servers on 127.0.0.1 (all offline)."""

from __future__ import annotations

import io
import socket
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "myntra-100" / "images"


def photo(size: tuple[int, int] = (600, 800)) -> Image.Image:
    """A real product photo from ../shared/data when present (resized to ``size``), else a generated one."""
    files = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if files:
        with Image.open(files[0]) as im:
            return im.convert("RGB").resize(size)
    w, h = size
    im = Image.linear_gradient("L").resize(size).convert("RGB")
    im.paste((200, 30, 30), (w // 4, h // 4, w // 2, h // 2))  # something asymmetric, so rotations show
    return im


def jpeg_bytes(im: Image.Image, quality: int = 90, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, **save_kwargs)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def exif_rotated_jpeg(size: tuple[int, int] = (400, 300), orientation: int = 6) -> bytes:
    """A JPEG stored ``size`` (w, h) with EXIF Orientation ``orientation`` (6: display rotated 90° clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(photo(size), exif=exif.tobytes())


def corrupt_jpeg(data: bytes) -> bytes:
    """``data`` with 64 bytes in the middle of the entropy-coded scan bit-flipped.

    Not every corruption is detectable: Pillow drops libjpeg's warnings, so some random garbage in the scan
    decodes to a damaged picture without error. A flipped run breaks the Huffman stream, which libjpeg rejects.
    """
    mid = len(data) // 2
    return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 64]) + data[mid + 64 :]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def png_header_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A ~60-byte PNG that declares ``width`` x ``height`` pixels (8-bit grey): a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + (_png_chunk(b"IEND", b""))
    )


def write_video(
    path: Path, seconds: float = 2.0, fps: int = 10, size: tuple[int, int] = (320, 240), gop: int | None = None
) -> str:
    """An MP4 made from real photos (shifted a little every frame); returns the codec name readers see."""
    import av

    base = photo((size[0] * 2, size[1] * 2))
    with av.open(str(path), mode="w") as container:
        for codec in ("libx264", "h264", "mpeg4"):
            try:
                stream = container.add_stream(codec, rate=fps, options={"g": str(gop)} if gop else {})
                break
            except Exception:  # codec not in this FFmpeg build
                continue
        else:
            raise RuntimeError("PyAV here encodes neither h264 nor mpeg4")
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(int(seconds * fps)):
            x = 8 * i
            frame_img = base.crop((x, x // 2, x + size[0], x // 2 + size[1]))
            for packet in stream.encode(av.VideoFrame.from_image(frame_img)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(str(path)) as written:  # the name a reader sees (h264), not the encoder's (libx264)
        return written.streams.video[0].codec_context.name


class _Handler(BaseHTTPRequestHandler):
    routes: dict[str, Callable[[], tuple[int, bytes]]] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 (http.server's naming)
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        status, body = self.routes.get(self.path, lambda: (404, b"not found"))()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # quiet
        pass


@contextmanager
def http_server(routes: dict[str, Callable[[], tuple[int, bytes]]]) -> Iterator[tuple[str, dict[str, int]]]:
    """Serve ``routes`` (path -> () -> (status, body)) on 127.0.0.1; yields (base URL, hit counts per path)."""
    handler = type("Handler", (_Handler,), {"routes": routes, "hits": {}})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.hits
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def hanging_server() -> Iterator[str]:
    """A socket on 127.0.0.1 that completes TCP handshakes (kernel backlog) but never reads nor answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port() -> int:
    """A loopback port nothing listens on (connection refused)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port
