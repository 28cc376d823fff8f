"""Safe decoding of one encoded image to uint8 RGB, in TensorFlow ops only.

Used by `preprocessing.process` and so by both `prepare` (training pixels) and
the exported SavedModel (served pixels): one implementation, no Python at
serving time. Every check that can be made from the bytes is made *before*
anything is decoded, and a failed check is an error string, not an exception,
so one bad image never fails a batch:

  empty bytes, unknown or unsupported format (TIFF / WebP: the Python callers
  transcode those to PNG first, see `preprocessing.graph_bytes`), a JPEG whose
  marker structure is broken (truncated, or garbage in the scan data: an
  invalid marker), a PNG without IEND, more than MAX_MEGAPIXELS from the
  header, or more than MAX_DECODED_BYTES once decoded (a 16-bit RGBA PNG takes
  8 bytes per pixel).

Conversions, recorded by name in `conversions` (";"-joined): EXIF orientation
applied (JPEG APP1), 16-bit -> 8-bit (round(v / 257)), alpha composited on
black (colour * alpha / 255, rounded), grayscale -> RGB, palette -> RGB,
CMYK -> RGB. Large JPEGs are decoded at 1/2, 1/4 or 1/8 scale by libjpeg
(DCT scaling) when the final size allows it.
"""

import math

import tensorflow as tf

MAX_MEGAPIXELS = 60.0
# 8-bit RGB at MAX_MEGAPIXELS: a 16-bit or alpha image is refused at fewer pixels,
# which bounds the memory of one decode (a 59 MP 16-bit RGBA PNG would take 474 MB
# raw and several GB through the conversions).
MAX_DECODED_BYTES = int(MAX_MEGAPIXELS * 1e6 * 3)
FORMATS = ("unknown", "JPEG", "PNG", "GIF", "BMP", "TIFF", "WebP")
_UNKNOWN, _JPEG, _PNG, _GIF, _BMP, _TIFF, _WEBP = range(len(FORMATS))
_HEAD = 64  # bytes read for magic numbers and PNG / GIF / BMP headers
_MAX_SEGMENTS = 4096  # JPEG marker-walk bound (real files have < 100)
# JPEG markers that carry a length field and may appear outside entropy-coded data.
_SEGMENT_MARKERS = sorted({*range(0xC0, 0xD0), 0xDB, 0xDC, 0xDD, 0xDE, 0xDF,
                           *range(0xE0, 0xF0), 0xFE} - {0xC8})
_SOF_MARKERS = sorted(set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC})
_EXIF_ENTRIES = 64  # IFD0 entries searched for the orientation tag


def _as_bytes(data: tf.Tensor) -> tf.Tensor:
    """tf.string [] -> uint8 [N + 16]: the bytes, then 16 zeros (reads past the end are 0)."""
    return tf.pad(tf.io.decode_raw(data, tf.uint8), [[0, 16]])


def _at(b: tf.Tensor, i) -> tf.Tensor:
    """int32 b[i] for int32 i of any shape; 0 outside [0, len(b))."""
    i = tf.convert_to_tensor(i, tf.int32)
    inside = (i >= 0) & (i < tf.shape(b)[0])
    value = tf.cast(tf.gather(b, tf.clip_by_value(i, 0, tf.shape(b)[0] - 1)), tf.int32)
    return tf.where(inside, value, 0)


def _be16(b, i):
    return _at(b, i) * 256 + _at(b, i + 1)


def _uint(b, i, n: int, little) -> tf.Tensor:
    """n-byte unsigned integer at i (int64), little- or big-endian (bool tensor)."""
    parts = [tf.cast(_at(b, i + k), tf.int64) for k in range(n)]
    le = sum(p * (256 ** k) for k, p in enumerate(parts))
    be = sum(p * (256 ** (n - 1 - k)) for k, p in enumerate(parts))
    return tf.where(little, le, be)


def _contains(b: tf.Tensor, pattern: bytes) -> tf.Tensor:
    """Whether uint8 bytes b contain `pattern` (bool [])."""
    k, n = len(pattern), tf.shape(b)[0]
    hit = tf.ones([tf.maximum(n - k + 1, 0)], tf.bool)
    for i, v in enumerate(pattern):
        hit &= b[i:n - k + 1 + i] == v
    return tf.reduce_any(hit)


# (format, byte offset, magic): the one table of file signatures, used in the graph
# (`image_format`) and on the host (`format_of`); the first match wins.
MAGIC = ((_JPEG, 0, b"\xff\xd8\xff"), (_PNG, 0, b"\x89PNG\r\n\x1a\n"), (_GIF, 0, b"GIF8"),
         (_BMP, 0, b"BM"), (_TIFF, 0, b"II*\x00"), (_TIFF, 0, b"MM\x00*"), (_WEBP, 8, b"WEBP"))
GRAPH_FORMATS = ("JPEG", "PNG", "GIF", "BMP")  # what `decode` reads


def format_of(data: bytes) -> str:
    """FORMATS name of encoded bytes, from MAGIC (host side, no TF op)."""
    return next((FORMATS[code] for code, at, magic in MAGIC
                 if data[at:at + len(magic)] == magic), "unknown")


def image_format(head: tf.Tensor) -> tf.Tensor:
    """int32 index into FORMATS from the first bytes (uint8 [>= 16]), from MAGIC."""
    fmt = tf.constant(_UNKNOWN)
    for code, at, magic in reversed(MAGIC):
        hit = tf.reduce_all(tf.stack([head[at + i] == v for i, v in enumerate(magic)]))
        fmt = tf.where(hit, code, fmt)
    return fmt


# --------------------------------------------------------------------------- JPEG structure


def _exif_orientation(b: tf.Tensor, p: tf.Tensor) -> tf.Tensor:
    """EXIF orientation (int32 1..8, 1 when absent or invalid) of an APP1 segment at p."""
    is_exif = tf.reduce_all(tf.stack([_at(b, p + 4 + i) == v for i, v in enumerate(b"Exif")]))
    t = p + 10  # TIFF header: byte order, 42, offset of IFD0
    little = _at(b, t) == 0x49
    ifd = t + tf.cast(_uint(b, t + 4, 4, little), tf.int32)
    count = tf.cast(_uint(b, ifd, 2, little), tf.int32)
    entries = ifd + 2 + 12 * tf.range(_EXIF_ENTRIES)
    tags = _uint(b, entries, 2, little)
    values = tf.cast(_uint(b, entries + 8, 2, little), tf.int32)  # SHORT: first 2 bytes
    hit = (tags == 0x0112) & (tf.range(_EXIF_ENTRIES) < count)
    value = tf.reduce_max(tf.where(hit, values, 0))
    return tf.where(is_exif & (value >= 1) & (value <= 8), value, 1)


def jpeg_structure(b: tf.Tensor) -> dict:
    """Walks the JPEG markers of bytes b (uint8, from `_as_bytes`) without decoding.

    Outside entropy-coded data every byte belongs to a segment; inside it, 0xFF
    is followed only by 0x00 (stuffing), 0xFF (fill) or, with a restart interval,
    a restart marker. Random bytes written over scan data break this almost
    surely (libjpeg only warns "Corrupt JPEG data" and returns garbage pixels).
    Not caught: corruption that keeps this structure (e.g. a few flipped bits).

    Returns:
        {"status": int32 0 ok / 1 truncated (no end-of-image marker) / 2 corrupt,
         "height", "width", "components" (int32, from the first SOF),
         "orientation" (int32 1..8, from the first APP1 Exif segment)}.
    """
    n = tf.shape(b)[0] - 16
    # Markers: 0xFF not followed by 0x00 or 0xFF (few positions: gather their next byte).
    ff = tf.cast(tf.where(b[:n] == 0xFF)[:, 0], tf.int32)
    nxt = _at(b, ff + 1)
    candidate = (nxt != 0) & (nxt != 0xFF)
    restart = (nxt >= 0xD0) & (nxt <= 0xD7)
    stops_all = tf.concat([tf.boolean_mask(ff, candidate), [-1]], 0)
    stops_no_rst = tf.concat([tf.boolean_mask(ff, candidate & ~restart), [-1]], 0)
    allowed = tf.scatter_nd([[m] for m in _SEGMENT_MARKERS], tf.ones([len(_SEGMENT_MARKERS)],
                                                                     tf.bool), [256])
    is_sof = tf.scatter_nd([[m] for m in _SOF_MARKERS], tf.ones([len(_SOF_MARKERS)], tf.bool),
                           [256])

    def next_stop(stops, start):  # first marker position >= start, or -1
        return tf.gather(stops, tf.searchsorted(stops[:-1], start[None])[0])

    def body(step, pos, status, sof, app1, dri, scans):
        head = _at(b, pos + tf.range(4))
        fill = (head[0] == 0xFF) & (head[1] == 0xFF)
        marker = head[1]
        seg_end = pos + 2 + head[2] * 256 + head[3]
        sof = tf.where(tf.gather(is_sof, marker) & (sof < 0), pos, sof)
        app1 = tf.where((marker == 0xE1) & (app1 < 0), pos, app1)
        dri = dri | (marker == 0xDD)
        is_sos, is_eoi = marker == 0xDA, marker == 0xD9
        after_scan = next_stop(tf.cond(dri, lambda: stops_no_rst, lambda: stops_all), seg_end)
        valid = (head[0] == 0xFF) & (tf.gather(allowed, marker) | is_sos | is_eoi)
        broken = (pos + 1 >= n) | ~valid | (~is_eoi & (seg_end < pos + 4)) | (seg_end > n) | (
            is_sos & (after_scan < 0))
        new_status = tf.where(fill, 0, tf.where(broken, 2, tf.where(is_eoi, 3, 0)))
        new_pos = tf.where(fill, pos + 1, tf.where(is_sos, after_scan, seg_end))
        return (step + 1, new_pos, new_status, sof, app1, dri,
                scans + tf.cast(is_sos & ~fill, tf.int32))

    zero, none = tf.constant(0), tf.constant(-1)
    _, _, status, sof, app1, _, scans = tf.while_loop(
        lambda step, pos, status, *_: (status == 0) & (step < _MAX_SEGMENTS), body,
        (zero, tf.constant(2), zero, none, none, tf.constant(False), zero))
    # Sound: reached EOI after at least one scan. Otherwise truncated when no EOI
    # marker ends the file (FFD9 cannot occur in entropy-coded data; some writers
    # pad after EOI, hence a window), else corrupt.
    ends = _contains(b[tf.maximum(n - 4096, 0):n], b"\xff\xd9")
    status = tf.where((status == 3) & (scans > 0), 0, tf.where(ends, 2, 1))
    orientation = tf.cond(app1 >= 0, lambda: _exif_orientation(b, app1), lambda: 1)
    return {"status": status, "height": tf.where(sof >= 0, _be16(b, sof + 5), 0),
            "width": tf.where(sof >= 0, _be16(b, sof + 7), 0),
            "components": tf.where(sof >= 0, _at(b, sof + 9), 0), "orientation": orientation}


# --------------------------------------------------------------------------- headers


def _header(data: tf.Tensor, b: tf.Tensor, fmt: tf.Tensor) -> dict:
    """Size and layout from the header: height, width, channels (decoded, before
    conversion), bytes per channel, orientation, and the structure status."""
    def jpeg():
        s = jpeg_structure(b)
        return (s["height"], s["width"], tf.maximum(s["components"], 1), 1,
                s["orientation"], s["status"])

    def png():
        depth, ctype = _at(b, 24), _at(b, 25)
        channels = tf.gather([1, 1, 3, 4, 2, 1, 4], tf.clip_by_value(ctype, 0, 6))
        tail = _as_bytes(tf.strings.substr(data, tf.maximum(tf.strings.length(data) - 64, 0), 64))
        status = tf.where(_contains(tail, b"IEND"), 0, 1)
        return (tf.cast(_uint(b, 20, 4, False), tf.int32),
                tf.cast(_uint(b, 16, 4, False), tf.int32), channels,
                tf.where(depth == 16, 2, 1), 1, status)

    def gif():
        return (tf.cast(_uint(b, 8, 2, True), tf.int32), tf.cast(_uint(b, 6, 2, True), tf.int32),
                3, 1, 1, 0)

    def bmp():
        height = tf.cast(_uint(b, 22, 4, True), tf.int64)
        height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # top-down: negative
        return (tf.cast(height, tf.int32), tf.cast(_uint(b, 18, 4, True), tf.int32), 4, 1, 1, 0)

    def other():
        return 0, 0, 0, 1, 1, 0

    branches = [other, jpeg, png, gif, bmp, other, other]
    values = tf.switch_case(fmt, [lambda f=f: tuple(tf.constant(v) if isinstance(v, int)
                                                    else v for v in f()) for f in branches])
    keys = ("height", "width", "channels", "bytes_per_channel", "orientation", "status")
    return dict(zip(keys, values, strict=True))


def reduced_scale(height: tf.Tensor, width: tf.Tensor, target_size: int | None) -> tf.Tensor:
    """Largest JPEG DCT scale in {1, 2, 4, 8} keeping the shorter side >= target_size."""
    if not target_size:
        return tf.constant(1)
    short = tf.cast(tf.minimum(height, width), tf.float32)
    scale = tf.constant(1)
    for s in (2, 4, 8):
        scale = tf.where(tf.math.ceil(short / s) >= target_size, s, scale)
    return scale


def _check(data: tf.Tensor, head: dict, fmt: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
    """"" when the image may be decoded, else the reason (tf.string [])."""
    h, w = tf.cast(head["height"], tf.int64), tf.cast(head["width"], tf.int64)
    down = tf.cast(scale, tf.int64)
    decoded = ((h + down - 1) // down) * ((w + down - 1) // down) * tf.cast(
        tf.maximum(head["channels"], 3) * head["bytes_per_channel"], tf.int64)
    name = tf.gather(FORMATS, fmt)
    too_big = tf.strings.format("decoded image too large to decode safely ({} MB > {} MB)",
                                [decoded // 1_000_000, MAX_DECODED_BYTES // 1_000_000])
    reasons = [
        (tf.strings.length(data) == 0, "empty image data (0 bytes)"),
        (fmt == _UNKNOWN, "not an image (unrecognised format)"),
        ((fmt == _TIFF) | (fmt == _WEBP), tf.strings.join(
            ["unsupported format in the graph: ", name, " (transcode to PNG first)"])),
        ((fmt == _JPEG) & (head["status"] == 1), "truncated JPEG (no end-of-image marker)"),
        ((fmt == _JPEG) & (head["status"] == 2),
         "corrupt JPEG data (broken marker structure or garbage in the scan data)"),
        ((fmt == _PNG) & (head["status"] == 1), "truncated PNG (no IEND chunk)"),
        ((h < 1) | (w < 1), tf.strings.join([name, " header without a valid size"])),
        (h * w > int(MAX_MEGAPIXELS * 1e6),
         f"image too large to decode safely (> {MAX_MEGAPIXELS:g} MP)"),
        (decoded > MAX_DECODED_BYTES, too_big),
    ]
    reason = tf.constant("")
    for hit, text in reversed(reasons):
        reason = tf.where(hit, text, reason)
    return reason


# --------------------------------------------------------------------------- decoding


def _16_to_8(x: tf.Tensor) -> tf.Tensor:
    """uint16 -> uint8, round(v * 255 / 65535) = (v + 128) // 257."""
    return tf.cast((tf.cast(x, tf.int32) + 128) // 257, tf.uint8)


def _to_rgb(x: tf.Tensor) -> tf.Tensor:
    """uint8 [H, W, C], C in {1 gray, 2 gray+alpha, 3 RGB, 4 RGBA} -> uint8 RGB [H, W, 3],
    alpha composited on black (colour * alpha / 255, rounded)."""
    c = tf.shape(x)[2]
    has_alpha = (c == 2) | (c == 4)
    colours = c - tf.cast(has_alpha, tf.int32)
    colour = tf.cast(x[..., :colours], tf.int32)
    alpha = tf.cast(x[..., c - 1:c], tf.int32)
    colour = tf.where(has_alpha, (colour * alpha + 127) // 255, colour)
    rgb = tf.tile(colour, [1, 1, 3 // colours])
    return tf.ensure_shape(tf.cast(rgb, tf.uint8), [None, None, 3])


def _orient(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Applies EXIF orientation 1..8 (what PIL.ImageOps.exif_transpose does)."""
    def transpose(x):
        return tf.transpose(x, [1, 0, 2])
    branches = [
        lambda: image,
        lambda: image[:, ::-1],                      # 2 mirror
        lambda: image[::-1, ::-1],                   # 3 rotate 180
        lambda: image[::-1],                         # 4 flip vertically
        lambda: transpose(image),                    # 5 transpose
        lambda: tf.image.rot90(image, 3),            # 6 rotate 90 clockwise
        lambda: transpose(image)[::-1, ::-1],        # 7 transverse
        lambda: tf.image.rot90(image, 1),            # 8 rotate 90 counter-clockwise
    ]
    return tf.ensure_shape(tf.switch_case(orientation - 1, branches), [None, None, 3])


def _decode_pixels(data: tf.Tensor, fmt: tf.Tensor, head: dict,
                   scale: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(uint8 RGB [H', W', 3], int32 channels as stored) of bytes that passed `_check`."""
    def jpeg():
        # Accurate integer IDCT: TF's default INTEGER_FAST is up to ~10 levels off.
        branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r,
                                                  dct_method="INTEGER_ACCURATE")
                    for r in (1, 2, 4, 8)]
        index = tf.cast(tf.round(tf.math.log(tf.cast(scale, tf.float32)) / math.log(2.0)),
                        tf.int32)
        return (_orient(tf.switch_case(index, branches), head["orientation"]),
                head["channels"])

    def png():
        raw = tf.cond(head["bytes_per_channel"] == 2,
                      lambda: _16_to_8(tf.io.decode_png(data, channels=0, dtype=tf.uint16)),
                      lambda: tf.io.decode_png(data, channels=0))
        return _to_rgb(raw), tf.shape(raw)[2]

    def other():  # GIF (first frame), BMP
        raw = tf.io.decode_image(data, channels=0, expand_animations=False)
        return _to_rgb(raw), tf.shape(raw)[2]

    return tf.switch_case(tf.where(fmt == _JPEG, 0, tf.where(fmt == _PNG, 1, 2)),
                          [jpeg, png, other])


def _conversions(fmt: tf.Tensor, head: dict, channels: tf.Tensor) -> tf.Tensor:
    """";"-joined names of the conversions decoding applied (tf.string []).

    channels: as stored (JPEG components; PNG / BMP / GIF decoded channels).
    """
    palette = head["palette"]
    names = tf.constant(["exif_orientation", "16bit->8bit", "alpha->black", "gray->rgb",
                         "palette->rgb", "cmyk->rgb"])
    jpeg = fmt == _JPEG
    flags = tf.stack([head["orientation"] != 1, head["bytes_per_channel"] == 2,
                      ~jpeg & ((channels == 2) | (channels == 4)),
                      ~palette & ((channels == 1) | (channels == 2)), palette,
                      jpeg & (channels == 4)])
    return tf.strings.reduce_join(tf.boolean_mask(names, flags), separator=";")


def decode(data: tf.Tensor, target_size: int | None = None) -> dict:
    """Checks and decodes one encoded image; never raises for bad bytes it can see.

    Args:
        data: tf.string [] (JPEG, PNG, GIF first frame, BMP).
        target_size: final square side; JPEGs are then decoded at the largest
            DCT scale 1/2, 1/4 or 1/8 whose shorter side stays >= target_size.
    Returns:
        {"image": uint8 RGB [H', W', 3] ([1, 1, 3] zeros when not ok),
         "ok": bool, "error": tf.string ("" when ok), "format": tf.string,
         "original_size": int32 [2] (H, W of the full-resolution image after
         EXIF orientation), "decode_scale": int32 (H' ~= H / scale),
         "conversions": tf.string}.
    """
    b_head = _as_bytes(tf.strings.substr(data, 0, _HEAD))
    fmt = image_format(b_head)
    # Only JPEGs need the whole file (marker walk, EXIF).
    b = tf.cond(fmt == _JPEG, lambda: _as_bytes(data), lambda: b_head)
    head = _header(data, b, fmt)
    head["palette"] = (fmt == _PNG) & (_at(b_head, 25) == 3)
    scale = tf.where(fmt == _JPEG, reduced_scale(head["height"], head["width"], target_size), 1)
    error = _check(data, head, fmt, scale)
    ok = tf.equal(error, "")
    image, channels = tf.cond(ok, lambda: _decode_pixels(data, fmt, head, scale),
                              lambda: (tf.zeros([1, 1, 3], tf.uint8), tf.constant(3)))
    swapped = head["orientation"] >= 5
    size = tf.where(swapped, tf.stack([head["width"], head["height"]]),
                    tf.stack([head["height"], head["width"]]))
    return {"image": image, "ok": ok, "error": error, "format": tf.gather(FORMATS, fmt),
            "original_size": size, "decode_scale": scale,
            "conversions": tf.where(ok, _conversions(fmt, head, channels), "")}
