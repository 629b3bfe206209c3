r"""The codec's byte stream: header, range-coded payload, checksum.

One stream holds one image. Layout (little-endian), format version 1:

  offset  size  field
  0       4     magic b"VQ2C"
  4       1     format version (1)
  5       1     flags (bit 0: a class label follows)
  6       2     image size S (square S x S x 3 images)
  8       2     codebook size K
  10      2     batch size the stream was coded in \  the batch layout: decoding runs the
  12      2     row of the image in that batch     /  same compiled loop, same row
  14      8     model fingerprint (`fingerprint`)
  22      4     CRC-32 of the codes (int32, every level, top first)
  26      2     class label (0 without one)
  28      1     number of levels L
  29      4L    level shapes (height, width; uint16 each), top first
  29+4L   4     payload length in 32-bit words
  33+4L   4n    payload: constriction range-coder words, levels top first, raster order
  end-4   4     CRC-32 of every byte before it

So the header costs 37 + 4L bytes (45 for two levels). The trailing CRC refuses
truncated and corrupted streams before any decoding; the fingerprint refuses streams of
other models before any decoding; the codes' CRC catches the one failure left, a
decoder whose probabilities differ from the encoder's (another platform's floating point).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import zlib
from typing import Any, Iterable, Sequence

import jax
import numpy as np

MAGIC = b"VQ2C"
VERSION = 1
_FIXED = struct.Struct("<4sBBHHHH8sIHB")  # up to and including the number of levels
_LEVEL = struct.Struct("<HH")
_WORDS = struct.Struct("<I")
_CRC = struct.Struct("<I")
FINGERPRINT_BYTES = 8


class StreamError(ValueError):
  """A stream that cannot be decoded: not a codec stream, truncated, corrupted."""


class ModelMismatchError(StreamError):
  """A stream coded with other models (or for another image size) than the decoder's."""


@dataclasses.dataclass(frozen=True)
class Header:
  """Everything a stream says about itself besides its payload.

  Attributes:
    image_size: S of the S x S x 3 image.
    num_codes: K, the codebook size of every level.
    batch_size, row: the batch layout the image was coded in.
    fingerprint: 8 bytes identifying the models (`fingerprint`).
    codes_crc: CRC-32 of the image's codes, every level, top first.
    label: the class label, or None.
    shapes: (height, width) per level, top first.
  """
  image_size: int
  num_codes: int
  batch_size: int
  row: int
  fingerprint: bytes
  codes_crc: int
  label: int | None
  shapes: tuple[tuple[int, int], ...]

  @property
  def size_bytes(self) -> int:
    """Bytes of the header and the trailing checksum (everything but the payload)."""
    return _FIXED.size + _LEVEL.size * len(self.shapes) + _WORDS.size + _CRC.size


def pack(header: Header, payload: np.ndarray) -> bytes:
  """Header + payload (uint32 words [n]) + CRC -> the stream's bytes."""
  payload = np.asarray(payload, "<u4")
  flags = 1 if header.label is not None else 0
  parts = [_FIXED.pack(MAGIC, VERSION, flags, header.image_size, header.num_codes,
                       header.batch_size, header.row, header.fingerprint, header.codes_crc,
                       header.label or 0, len(header.shapes))]
  parts += [_LEVEL.pack(h, w) for h, w in header.shapes]
  parts += [_WORDS.pack(payload.size), payload.tobytes()]
  body = b"".join(parts)
  return body + _CRC.pack(zlib.crc32(body))


def unpack(data: bytes, name: str = "stream") -> tuple[Header, np.ndarray]:
  """The stream's bytes -> (Header, payload uint32 [n]); StreamError naming `name` and the
  problem for anything that is not an intact version-1 stream."""
  data = bytes(data)
  if len(data) < 5 or data[:4] != MAGIC:
    raise StreamError(f"{name} is not a vqvae2_jax codec stream (no {MAGIC!r} magic): pass "
                      "a file written by `python -m vqvae2_jax.codec compress`")
  if data[4] != VERSION:
    raise StreamError(f"{name} has stream format version {data[4]}; this decoder reads "
                      f"version {VERSION}")
  if len(data) < _FIXED.size:
    raise StreamError(f"{name} is truncated: {len(data)} bytes, shorter than a header")
  (_, _, flags, size, num_codes, batch_size, row, fp, codes_crc, label,
   num_levels) = _FIXED.unpack_from(data)
  offset = _FIXED.size
  need = offset + _LEVEL.size * num_levels + _WORDS.size
  if len(data) < need:
    raise StreamError(f"{name} is truncated: {len(data)} bytes, its header needs {need}")
  shapes = tuple(_LEVEL.unpack_from(data, offset + _LEVEL.size * l)
                 for l in range(num_levels))
  offset += _LEVEL.size * num_levels
  (words,) = _WORDS.unpack_from(data, offset)
  offset += _WORDS.size
  expected = offset + 4 * words + _CRC.size
  if len(data) != expected:
    raise StreamError(f"{name} is truncated or damaged: its header announces {expected} "
                      f"bytes, the stream has {len(data)}")
  (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
  if zlib.crc32(data[:-_CRC.size]) != crc:
    raise StreamError(f"{name} is corrupted: its checksum does not match its bytes "
                      "(re-copy the file, or compress the image again)")
  payload = np.frombuffer(data, "<u4", count=words, offset=offset).astype(np.uint32)
  header = Header(image_size=size, num_codes=num_codes, batch_size=batch_size, row=row,
                  fingerprint=fp, codes_crc=codes_crc, label=label if flags & 1 else None,
                  shapes=tuple((int(h), int(w)) for h, w in shapes))
  return header, payload


def codes_crc(codes: Sequence[np.ndarray]) -> int:
  """CRC-32 of one image's codes: int32 [H_l, W_l] per level, top first."""
  crc = 0
  for c in codes:
    crc = zlib.crc32(np.ascontiguousarray(c, "<i4").tobytes(), crc)
  return crc


def fingerprint(model_record: dict, trees: Iterable[Any]) -> bytes:
  """8 bytes of SHA-256 over the recorded model config and every parameter.

  Args:
    model_record: JSON-serialisable description of the models (recorded config fields,
      levels, shapes, K); hashed as canonical JSON.
    trees: parameter / variable pytrees; each leaf's path, dtype, shape and bytes are
      hashed in tree order (leaves are gathered to the host).
  """
  h = hashlib.sha256(json.dumps(model_record, sort_keys=True, default=str).encode())
  for tree in trees:
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      arr = np.asarray(jax.device_get(leaf))
      h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}".encode())
      h.update(np.ascontiguousarray(arr).tobytes())
  return h.digest()[:FINGERPRINT_BYTES]


def check_models(header: Header, name: str, *, fingerprint_: bytes, image_size: int,
                 num_codes: int, shapes: Sequence[tuple[int, int]]) -> None:
  """ModelMismatchError unless the stream was coded by exactly these models."""
  if header.fingerprint != fingerprint_:
    raise ModelMismatchError(
        f"{name} was compressed with other models (fingerprint {header.fingerprint.hex()}, "
        f"these are {fingerprint_.hex()}): decompress it with the workdir that compressed "
        "it")
  mine = (image_size, num_codes, tuple(map(tuple, shapes)))
  theirs = (header.image_size, header.num_codes, header.shapes)
  if mine != theirs:  # same fingerprint, other shapes: a damaged or forged header
    raise ModelMismatchError(f"{name} describes (size, K, level shapes) {theirs}, these "
                             f"models have {mine}")
