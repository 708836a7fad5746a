"""Pixel counts read from image headers, before any pixel is decoded.

A PNG of a few kilobytes can declare 30000x30000 pixels; the decoders
allocate what the header declares, so one such request can take gigabytes from
a server. `declared_pixels` reads the count from the header with TensorFlow
ops alone, so the exported SavedModel refuses such an image before decoding it
and still serves without tftransfer (TensorFlow Serving included). The folder
scan uses the same function, so training and serving agree on what an image
declares.
"""

from __future__ import annotations

import tensorflow as tf

_PADDING = 32  # Zero bytes after the contents, so fixed offsets stay in range.
_FORMATS = ("jpeg", "png", "gif", "bmp", "webp")


def declared_pixels(contents: tf.Tensor) -> tf.Tensor:
    """The number of pixels an encoded image's header declares.

    Reads JPEG (its frame header, through `tf.image.extract_jpeg_shape`), PNG,
    GIF, BMP and WebP headers, without decoding. For a GIF the count is the
    largest of the canvas and the sum of its frames' areas, since the decoder
    holds every frame. Anything else declares 0 pixels: the decoder then
    refuses it as an unknown format.

    Args:
        contents: A scalar string tensor holding the encoded file's bytes.

    Returns:
        A scalar int64 tensor.

    Raises:
        tf.errors.InvalidArgumentError: a JPEG whose header cannot be read.

    Example:

    >>> png = tf.io.encode_png(tf.zeros([30, 40, 3], tf.uint8))
    >>> int(declared_pixels(png))
    1200
    >>> int(declared_pixels(tf.constant(b"not an image")))
    0
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    data = tf.concat([tf.io.decode_raw(contents, tf.uint8),
                      tf.zeros([_PADDING], tf.uint8)], 0)
    data = tf.cast(data, tf.int64)
    branches = [
        lambda: _jpeg(contents),
        lambda: _unsigned(data, 16, 4, "big") * _unsigned(data, 20, 4, "big"),
        lambda: _gif(data),
        lambda: tf.abs(_signed32(data, 18)) * tf.abs(_signed32(data, 22)),
        lambda: _webp(data),
        lambda: tf.constant(0, tf.int64),
    ]
    return tf.switch_case(_format_index(contents), branches)


def check_declared_pixels(contents: tf.Tensor, max_pixels: int) -> tf.Tensor:
    """An op that fails with `InvalidArgumentError` when `contents` declares
    more than `max_pixels` pixels; run the decoder under it
    (`tf.control_dependencies`)."""
    return tf.debugging.assert_less_equal(
        declared_pixels(contents), tf.constant(max_pixels, tf.int64),
        message=(f"The image declares more than {max_pixels} pixels, the limit "
                 "this model was exported with (serving_max_pixels in its metrics.json); "
                 "send a smaller image or export with a higher limit"))


def _format_index(contents: tf.Tensor) -> tf.Tensor:
    """Index into `_FORMATS` of the contents' format, `len(_FORMATS)` if none."""
    head = tf.strings.substr(tf.strings.join([contents, b"\0" * 12]), 0, 12)
    starts = lambda magic: tf.equal(tf.strings.substr(head, 0, len(magic)), magic)  # noqa: E731
    tests = [
        starts(b"\xff\xd8\xff"),
        starts(b"\x89PNG\r\n\x1a\n"),
        tf.logical_or(starts(b"GIF87a"), starts(b"GIF89a")),
        starts(b"BM"),
        tf.logical_and(starts(b"RIFF"),
                       tf.equal(tf.strings.substr(head, 8, 4, unit="BYTE"), b"WEBP")),
    ]
    index = tf.constant(len(_FORMATS), tf.int32)
    for i in reversed(range(len(tests))):
        index = tf.where(tests[i], tf.constant(i, tf.int32), index)
    return index


def _unsigned(data: tf.Tensor, start, count: int, order: str = "little") -> tf.Tensor:
    """The unsigned integer in `count` bytes of `data` from `start`."""
    # One slice and one dot product, not an op per byte: the ops are traced
    # into every graph that checks a header (the folder scan's included).
    weights = [256 ** i for i in range(count)]
    if order == "big":
        weights.reverse()
    # ensure_shape: a short slice would broadcast into a wrong value.
    window = tf.ensure_shape(data[start:start + count], [count])
    return tf.reduce_sum(window * tf.constant(weights, tf.int64))


def _signed32(data: tf.Tensor, start: int) -> tf.Tensor:
    value = _unsigned(data, start, 4)
    return tf.where(value >= 2**31, value - 2**32, value)


def _jpeg(contents: tf.Tensor) -> tf.Tensor:
    shape = tf.image.extract_jpeg_shape(contents, output_type=tf.int64)
    return shape[0] * shape[1]


def _webp(data: tf.Tensor) -> tf.Tensor:
    # The first chunk after "RIFF....WEBP" at byte 12: lossy ("VP8 "), lossless
    # ("VP8L") or extended ("VP8X", which declares the canvas).
    chunk = _unsigned(data, 12, 4, "big")
    lossy = (_unsigned(data, 26, 2) % 16384) * (_unsigned(data, 28, 2) % 16384)
    bits = _unsigned(data, 21, 4)
    lossless = (bits % 16384 + 1) * ((bits // 16384) % 16384 + 1)
    extended = (_unsigned(data, 24, 3) + 1) * (_unsigned(data, 27, 3) + 1)
    return tf.where(tf.equal(chunk, 0x56503820), lossy,
                    tf.where(tf.equal(chunk, 0x5650384C), lossless,
                             tf.where(tf.equal(chunk, 0x56503858), extended,
                                      tf.constant(0, tf.int64))))


def _gif(data: tf.Tensor) -> tf.Tensor:
    """The larger of the canvas (the logical screen, grown to hold every
    frame) and the sum of the frames' areas, walking the GIF's blocks."""
    size = tf.shape(data, out_type=tf.int64)[0] - _PADDING
    packed = data[10]
    # A global colour table of 3 * 2^(n + 1) bytes follows the 13-byte header.
    start = 13 + tf.where(packed >= 128, 3 * tf.bitwise.left_shift(
        tf.constant(2, tf.int64), packed % 8), tf.constant(0, tf.int64))
    zero = tf.constant(0, tf.int64)

    def step(position, in_blocks, width, height, total):
        byte = data[tf.minimum(position, size)]

        def sub_block():  # A data sub-block: its size, then its bytes; 0 ends them.
            return (position + 1 + byte, tf.not_equal(byte, 0), width, height, total)

        def block():
            def image():
                left, top = _unsigned(data, position + 1, 2), _unsigned(data, position + 3, 2)
                w, h = _unsigned(data, position + 5, 2), _unsigned(data, position + 7, 2)
                flags = data[position + 9]
                table = tf.where(flags >= 128, 3 * tf.bitwise.left_shift(
                    tf.constant(2, tf.int64), flags % 8), zero)
                # Descriptor (10 bytes), local colour table, LZW code size.
                return (position + 11 + table, tf.constant(True), tf.maximum(width, left + w),
                        tf.maximum(height, top + h), total + w * h)

            def extension():  # Introducer and label, then sub-blocks.
                return position + 2, tf.constant(True), width, height, total

            def end():  # The trailer, or bytes that are no block: stop.
                return size, tf.constant(False), width, height, total

            return tf.case([(tf.equal(byte, 0x2C), image),
                            (tf.equal(byte, 0x21), extension)], default=end)

        return tf.cond(in_blocks, sub_block, block)

    _, _, width, height, total = tf.while_loop(
        lambda position, *_: position < size, step,
        (start, tf.constant(False), _unsigned(data, 6, 2), _unsigned(data, 8, 2), zero))
    return tf.maximum(width * height, total)
