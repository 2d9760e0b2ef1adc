"""Lossless codecs as a measure of image complexity: the bits/dim PNG or WebP lossless needs
for an image (payload only, container framing excluded), and a line describing the codec."""

from __future__ import annotations

import io

import numpy as np
import torch

from glowflow.errors import GlowflowError
from glowflow.pixels import quantize

CODECS = ("png", "webp")


def check_codec(codec: str) -> None:
    """Raise :class:`GlowflowError` unless ``codec`` is one of :data:`CODECS`."""
    if codec not in CODECS:
        raise GlowflowError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def _png_payload_bytes(data: bytes) -> int:
    """Bytes of the IDAT chunks' data (the zlib stream) in a PNG file."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise GlowflowError("not a PNG file")
    pos, total = 8, 0
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        if data[pos + 4 : pos + 8] == b"IDAT":
            total += length
        pos += 12 + length
    return total


def _webp_payload_bytes(data: bytes) -> int:
    """Bytes of the VP8L chunk's data (the lossless bitstream) in a WebP file."""
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise GlowflowError("not a WebP file")
    pos, total = 12, 0
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if data[pos : pos + 4] == b"VP8L":
            total += size
        pos += 8 + size + (size & 1)
    if total == 0:
        raise GlowflowError("WebP file has no lossless (VP8L) bitstream")
    return total


def codec_description(codec: str) -> str:
    """One line naming the codec, its library and settings, and what is counted."""
    import PIL

    check_codec(codec)
    if codec == "png":
        return (
            f"PNG (Pillow {PIL.__version__}, zlib; optimize=True, compress_level=9; "
            f"bits of the IDAT payload, container framing excluded)"
        )
    return (
        f"WebP lossless (Pillow {PIL.__version__}, libwebp; lossless=True, quality=100, method=6; "
        f"bits of the VP8L payload, RIFF framing excluded)"
    )


def _to_pil(pixels: np.ndarray):
    """uint8 (C, H, W) -> a PIL image: 'L' for C = 1, 'RGB' for C = 3, otherwise the channels
    stacked vertically as one (C*H, W) 'L' image."""
    from PIL import Image

    c = pixels.shape[0]
    if c == 1:
        return Image.fromarray(np.ascontiguousarray(pixels[0]))
    if c == 3:
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    return Image.fromarray(np.ascontiguousarray(pixels.reshape(-1, pixels.shape[2])))


def codec_bits_per_dim(images01: torch.Tensor, n_bits: int = 8, codec: str = "png") -> np.ndarray:
    """Bits per dimension a real lossless codec needs for each image, shape (N,).

    ``images01``: (N, C, H, W) in [0, 1] on the 8-bit grid. Each image is first put on the grid
    the model sees (:func:`glowflow.pixels.quantize`: 8-bit pixels ``p``, and with ``n_bits`` < 8
    the integers ``floor(p / 2**(8 - n_bits))``, stored as 8-bit samples). It is then encoded
    with Pillow:

    * ``"png"``: ``Image.save(format="PNG", optimize=True, compress_level=9)``; counted are the
      bytes of the IDAT chunks (the zlib-compressed, filtered scanlines), not the 8-byte signature
      or chunk framing (57 bytes for one image data chunk), which are the same for every image
      of a size and would otherwise add ``456 / D`` bits/dim.
    * ``"webp"``: ``Image.save(format="WEBP", lossless=True, quality=100, method=6)``; counted is
      the VP8L bitstream, not the RIFF framing.

    Grey images (C = 1) are encoded as 8-bit grey, C = 3 as RGB, other C as the channels stacked
    vertically into one grey image. Result: ``8 * bytes / (C * H * W)``.
    """
    check_codec(codec)
    levels = quantize(images01.detach().to("cpu", torch.float64), n_bits).clamp(0, 2**n_bits - 1)
    pixels = levels.to(torch.uint8).numpy()
    dims = int(np.prod(pixels.shape[1:]))
    return np.array([8.0 * _payload_bytes(_to_pil(img), codec) / dims for img in pixels], dtype=np.float64)


def _payload_bytes(pil, codec: str) -> int:
    """Bytes of ``pil``'s compressed payload under ``codec`` (settings in :func:`codec_bits_per_dim`)."""
    buffer = io.BytesIO()
    if codec == "png":
        pil.save(buffer, format="PNG", optimize=True, compress_level=9)
        return _png_payload_bytes(buffer.getvalue())
    pil.save(buffer, format="WEBP", lossless=True, quality=100, method=6)
    return _webp_payload_bytes(buffer.getvalue())
