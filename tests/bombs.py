"""Decompression bombs: small files whose headers declare huge images.

Each function returns the bytes of a file that declares `side` x `side`
pixels (20000: 400 million). The PNG and the GIF are complete (TensorFlow
2.21 decodes each to 1.2 GB of pixels, its process peaking near 2 GB); the
JPEG is a small one with a patched header, which libjpeg decodes all the same
(gray past the data); the BMP and WebP are headers.
"""

import io
import struct
import zlib

from PIL import Image


def png_bomb(side: int = 20000) -> bytes:
    """A complete, valid 1-bit PNG: every row is there, zlib-compressed."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # Filter byte, then the row's bits.
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def jpeg_bomb(side: int = 20000) -> bytes:
    """A small JPEG whose frame header (SOF0) is patched to `side` x `side`."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 128).save(buffer, "JPEG")
    contents = bytearray(buffer.getvalue())
    start = contents.index(b"\xff\xc0")  # Length (2), precision (1), height, width.
    contents[start + 5:start + 9] = struct.pack(">HH", side, side)
    return bytes(contents)


def gif_bomb(side: int = 20000, screen: int = None) -> bytes:
    """A valid GIF: one `side` x `side` frame of zeros on a `screen` x
    `screen` canvas (default: the frame's size), about 270 KB at 20000."""
    screen = side if screen is None else screen
    return (b"GIF89a" + struct.pack("<HHBBB", screen, screen, 0x80, 0, 0)
            + b"\x00\x00\x00\xff\xff\xff"  # A two-colour global table.
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, side, side, 0)
            + b"\x02" + _lzw_zeros(side * side) + b"\x3b")


def _lzw_zeros(count: int) -> bytes:
    """GIF LZW data (code size 2) for `count` zero pixels, in sub-blocks.

    With one colour the encoder's strings are runs of zeros one longer each
    time (codes 0, 6, 7, ...), until the table is full at 4096 and a clear
    code starts it again.
    """
    out, bits, filled = bytearray(), 0, 0

    def write(code, width):
        nonlocal bits, filled
        bits |= code << filled
        filled += width
        while filled >= 8:
            out.append(bits & 255)
            bits >>= 8
            filled -= 8

    while count:
        width, next_code, length = 3, 6, 1
        write(4, width)  # Clear.
        while count and next_code < 4096:
            run = min(length, count)
            write(0 if run == 1 else run + 4, width)
            count -= run
            next_code += 1
            if next_code == (1 << width) + 1 and width < 12:
                width += 1
            length += 1
    write(5, width)  # End of information.
    if filled:
        out.append(bits & 255)
    blocks = b"".join(bytes([len(out[i:i + 255])]) + out[i:i + 255]
                      for i in range(0, len(out), 255))
    return blocks + b"\x00"


def bmp_bomb(side: int = 20000) -> bytes:
    """A 24-bit BMP header declaring `side` x `side`, with a few pixels."""
    pixels = b"\x00" * 64
    return (b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, side, side, 1, 24, 0, len(pixels),
                          2835, 2835, 0, 0)
            + pixels)


def webp_bomb() -> bytes:
    """An extended WebP (VP8X) header declaring a 16384 x 16384 canvas."""
    body = b"WEBP" + b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    body += (16383).to_bytes(3, "little") + (16383).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body)) + body
