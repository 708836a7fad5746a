"""A folder of broken and unusual image files, as real data folders hold them.

`write_odd_files(folder)` writes them and returns `{file name: expected status}`;
OS junk, which must not be considered at all, maps to `None`.
"""

import io
import os

import numpy as np
from PIL import Image


def _image(mode, size=40, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size, size, 3), "uint8")
    image = Image.fromarray(pixels)
    if mode == "P":
        return image.convert("P", palette=Image.Palette.ADAPTIVE)
    return image.convert(mode)


def _sixteen_bit_png(seed):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 65535, (40, 40, 3)).astype("uint16")
    return tf.io.encode_png(pixels).numpy()


def _encode(image, image_format, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, image_format, **kwargs)
    return buffer.getvalue()


def write_odd_files(folder: str, seed: int = 0) -> dict:
    os.makedirs(folder, exist_ok=True)
    jpeg = _encode(_image("RGB", seed=seed), "JPEG")
    png = _encode(_image("RGB", seed=seed + 1), "PNG")
    frames = [_image("P", seed=seed + i) for i in range(3)]
    animated = io.BytesIO()
    frames[0].save(animated, "GIF", save_all=True, append_images=frames[1:])
    files = {
        # Valid but unusual: used.
        "grayscale.jpg": (_encode(_image("L", seed=seed + 2), "JPEG"), "used"),
        "rgba.png": (_encode(_image("RGBA", seed=seed + 3), "PNG"), "used"),
        "cmyk.jpg": (_encode(_image("CMYK", seed=seed + 4), "JPEG"), "used"),
        "sixteen_bit.png": (_sixteen_bit_png(seed + 5), "used"),
        "palette.png": (_encode(_image("P", seed=seed + 6), "PNG"), "used"),
        "animated.gif": (animated.getvalue(), "used"),
        "bitmap.bmp": (_encode(_image("RGB", seed=seed + 7), "BMP"), "used"),
        "lossy.webp": (_encode(_image("RGB", seed=seed + 8), "WEBP"), "used"),
        "jpeg_named.png": (jpeg, "used"),
        "png_named.jpg": (png, "used"),
        "UPPER CASE.JPEG": (_encode(_image("RGB", seed=seed + 9), "JPEG"), "used"),
        "ñandú 蜂 photo.jpg": (_encode(_image("RGB", seed=seed + 10), "JPEG"), "used"),
        # Unreadable: skipped with a reason.
        "empty.jpg": (b"", "skipped"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "skipped"),
        "notes.png": (b"shopping list: milk, eggs", "skipped"),
        "scan.tiff": (_encode(_image("RGB"), "TIFF"), "skipped"),
        "document.jpg": (b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n", "skipped"),
        "phone.heic": (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 40, "skipped"),
        "icon.ico": (_encode(_image("RGB", size=32), "ICO"), "skipped"),
        "bomb.png": (_encode(Image.new("L", (9500, 9500)), "PNG"), "skipped"),
        "corrupt_body.png": (png[:40] + b"\x00" * (len(png) - 40), "skipped"),
        # OS junk: ignored, not even reported.
        ".DS_Store": (b"\x00\x00\x00\x01Bud1", None),
        "Thumbs.db": (b"\xd0\xcf\x11\xe0", None),
        "._grayscale.jpg": (b"\x00\x05\x16\x07", None),
    }
    expected = {}
    for name, (contents, status) in files.items():
        with open(os.path.join(folder, name), "wb") as handle:
            handle.write(contents)
        expected[name] = status
    os.symlink(os.path.join(folder, "gone.jpg"), os.path.join(folder, "link.jpg"))
    expected["link.jpg"] = "skipped"
    junk = os.path.join(folder, "__MACOSX")
    os.makedirs(junk)
    with open(os.path.join(junk, "photo.jpg"), "wb") as handle:
        handle.write(jpeg)
    expected["__MACOSX/photo.jpg"] = None
    return expected
