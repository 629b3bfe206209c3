"""Range coding of code maps under the priors, inside the incremental sampling loop.

Compression and decompression run the *same* compiled program: the sampler's generic
loop (`sampling.incremental.run_incremental`) over the prior's own decoding step
(`PixelSNAILPrior.decode_step`, the step sampling uses) with one per-position choice,
`HOST_CHOICE`, that hands the float32 logits [B, K] of raster position p to the host
through an ordered `io_callback` and feeds back the code the host returns. On the host, whichever session is active
answers:

* compressing: quantize the logits (`frequencies.quantize`), range-encode the known code
  of every image, return the known codes (so the loop conditions on the true codes);
* decompressing: quantize the logits, range-decode each image's code, return it.

Because both sides get their logits from one executable, with the same batch size and
each image in the same row of the batch (the stream records both), the logits and hence
the integer frequencies agree bit for bit, and decoding returns the encoder's codes.
Rows of a batch are independent, so padding rows and neighbouring images do not matter.

Range coding (constriction's `queue.RangeEncoder/RangeDecoder`) rather than ANS: the
decoder must consume symbols in raster order, position by position as the prior
produces them, and a range coder is a queue (first in, first out), so the encoder can
code each position the moment its logits exist, in the same order, in the same loop.
ANS is a stack: the encoder would have to hold every position's frequencies (N x K per
image) and code them in reverse after the loop. Both cost the same bits up to a word.

All coding runs on one device: ordered host callbacks need a single-device program.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Callable, Mapping, Sequence

import constriction
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from vqvae2_jax import parallel
from vqvae2_jax.codec import frequencies
from vqvae2_jax.codec import stream as stream_lib
from vqvae2_jax.sampling import incremental, reference

_FAMILY = constriction.stream.model.Categorical(perfect=False)


@dataclasses.dataclass(frozen=True)
class HostChoice:
  """The per-position choice of the coding loop (static and hashable; all equal).

  choose(p int32 [], logits float32 [B, K]) -> int32 [B], answered on the host by the
  active session (`_active`).
  """

  def __call__(self, p: jax.Array, logits: jax.Array) -> jax.Array:
    return io_callback(_host_step, jax.ShapeDtypeStruct(logits.shape[:1], jnp.int32),
                       p, logits, ordered=True)


HOST_CHOICE = HostChoice()
_LOCK = threading.Lock()
_ACTIVE: list[Any] = []


def _host_step(p, logits) -> np.ndarray:
  return _ACTIVE[-1].step(int(p), np.asarray(logits, np.float32))


@contextlib.contextmanager
def _active(session):
  """Makes `session` answer HOST_CHOICE; one coding loop at a time per process."""
  with _LOCK:
    _ACTIVE.append(session)
    try:
      yield session
    finally:
      _ACTIVE.pop()


class _Session:
  """Host side of one level of one batch. rows: batch rows holding images."""

  def __init__(self, batch: int, rows: Sequence[int]):
    self.batch, self.rows, self.error = batch, list(rows), None
    self.bits = np.zeros(batch, np.float64)  # ideal code length under the frequencies

  def step(self, p: int, logits: np.ndarray) -> np.ndarray:
    codes = np.zeros(self.batch, np.int32)
    if self.error is not None or not self.rows:
      return codes
    try:
      freqs = frequencies.quantize(logits[self.rows])
      codes[self.rows] = self._code(p, freqs, frequencies.coder_weights(freqs))
      self.bits[self.rows] += frequencies.code_length_bits(freqs, codes[self.rows])
    except Exception as e:  # pylint: disable=broad-except
      # Raised after the loop: an exception inside a host callback only reaches the
      # caller as an opaque runtime error.
      self.error = e
    return codes


class _EncodeSession(_Session):
  def __init__(self, codes: np.ndarray, rows, encoders):
    super().__init__(codes.shape[0], rows)
    self.codes, self.encoders = codes, encoders

  def _code(self, p, freqs, weights):
    known = self.codes[self.rows, p]
    for k, r in enumerate(self.rows):
      self.encoders[r].encode(known[k:k + 1], _FAMILY, weights[k:k + 1])
    return known


class _DecodeSession(_Session):
  def __init__(self, batch: int, rows, decoders):
    super().__init__(batch, rows)
    self.decoders = decoders

  def _code(self, p, freqs, weights):
    out = np.empty(len(self.rows), np.int32)
    for k, r in enumerate(self.rows):
      out[k] = self.decoders[r].decode(_FAMILY, weights[k:k + 1])[0]
    return out


@dataclasses.dataclass
class CodecModels:
  """What coding needs: every level's prior, the code shapes, the model fingerprint.

  Attributes:
    priors: level -> (PixelSNAILPrior, params), top first.
    shapes: level -> (H_l, W_l).
    image_size: S of the S x S images the codes come from.
    num_codes: K.
    fingerprint: `stream.fingerprint` of the models (8 bytes).
    batch_size: images per device call (a stream records the batch size it used).
    loop: `run_incremental`-compatible loop; None = `run_incremental` for priors with
      the decoding interface, else the reference loop (one full pass per position).
  """
  priors: Mapping[str, tuple[Any, Any]]
  shapes: Mapping[str, tuple[int, int]]
  image_size: int
  num_codes: int
  fingerprint: bytes
  batch_size: int = 8
  loop: Callable | None = None

  def __post_init__(self):
    device = jax.local_devices()[0]
    # One device for the coding loop (ordered host callbacks), params copied there once.
    self.priors = {l: (p, jax.device_put(jax.device_get(params), device))
                   for l, (p, params) in self.priors.items()}
    self.shapes = {l: tuple(int(s) for s in self.shapes[l]) for l in self.priors}
    self.device = device

  @property
  def levels(self) -> tuple[str, ...]:
    return tuple(self.priors)

  @property
  def conditional(self) -> bool:
    """Whether any prior needs a class label."""
    return any(p.num_classes > 0 for p, _ in self.priors.values())

  @property
  def num_classes(self) -> int:
    return max(p.num_classes for p, _ in self.priors.values())

  def _run_level(self, level: str, batch: int, upper: list[np.ndarray],
                 labels: np.ndarray | None, session: _Session) -> np.ndarray:
    """One level of one batch through the loop; int32 [batch, H, W] codes it returns."""
    prior, params = self.priors[level]
    loop = self.loop or (incremental.run_incremental
                         if incremental.has_decoding_interface(prior)
                         else reference.run_reference)
    put = lambda x: jax.device_put(jnp.asarray(x), self.device)
    with _active(session), parallel.on_one_device(self.device):
      out = np.asarray(loop(
          prior, params, shape=(batch,) + self.shapes[level],
          cond_codes=tuple(put(u) for u in upper),
          labels=put(labels) if prior.num_classes else None, choose=HOST_CHOICE))
    if session.error is not None:
      raise session.error
    return out

  def check_labels(self, labels, n: int) -> np.ndarray | None:
    """int32 [n] labels for class-conditional priors (None for unconditional ones)."""
    if not self.conditional:
      return None
    if labels is None:
      raise ValueError("these priors are class-conditional: pass labels int [n] (or let "
                       "the Run choose the cheapest class)")
    labels = np.broadcast_to(np.asarray(labels, np.int32), (n,))
    bad = labels[(labels < 0) | (labels >= self.num_classes)]
    if bad.size:
      raise ValueError(f"labels {sorted(set(bad.tolist()))} are not classes of these priors "
                       f"(0..{self.num_classes - 1})")
    return labels


def compress_codes(models: CodecModels, codes: Sequence[np.ndarray],
                   labels: np.ndarray | None = None, *, batch_size: int | None = None
                   ) -> tuple[list[bytes], dict[str, np.ndarray]]:
  """Range-codes code maps under the priors, one stream per image.

  Args:
    models: the priors and their fingerprint.
    codes: int [n, H_l, W_l] per level, top first.
    labels: int [n] class labels (class-conditional priors), else None.
    batch_size: images per device call (default models.batch_size; fewer when n is
      smaller). Decoding reuses the batch size a stream records.

  Returns:
    (n streams of bytes, level -> float64 [n] ideal code length in bits of the codes
    under the quantized frequencies the coder used).
  """
  codes = [np.asarray(c, np.int32) for c in codes]
  levels = models.levels
  if len(codes) != len(levels):
    raise ValueError(f"expected codes for the {len(levels)} levels {levels}, got "
                     f"{len(codes)}")
  n = len(codes[0])
  for level, c in zip(levels, codes):
    if c.shape != (n,) + models.shapes[level]:
      raise ValueError(f"{level} codes must be [{n}, {models.shapes[level]}], got "
                       f"{c.shape}")
    if c.size and (c.min() < 0 or c.max() >= models.num_codes):
      raise ValueError(f"{level} codes must lie in [0, {models.num_codes})")
  labels = models.check_labels(labels, n)
  batch = max(1, min(n, batch_size or models.batch_size))
  streams: list[bytes] = []
  bits = {l: np.zeros(n, np.float64) for l in levels}
  for lo in range(0, n, batch):
    hi = min(lo + batch, n)
    rows = list(range(hi - lo))
    chunk = [_pad(c[lo:hi], batch) for c in codes]
    lab = None if labels is None else _pad(labels[lo:hi], batch)
    encoders = [constriction.stream.queue.RangeEncoder() for _ in rows]
    for l, level in enumerate(levels):
      flat = chunk[l].reshape(batch, -1)
      session = _EncodeSession(flat, rows, encoders)
      out = models._run_level(level, batch, chunk[:l], lab, session)  # pylint: disable=protected-access
      if not np.array_equal(out[rows], chunk[l][rows]):
        raise RuntimeError(f"the coding loop did not feed back the {level} codes it was "
                           "given: the loop's `choose` contract is broken")
      bits[level][lo:hi] = session.bits[rows]
    for r in rows:
      header = stream_lib.Header(
          image_size=models.image_size, num_codes=models.num_codes, batch_size=batch,
          row=r, fingerprint=models.fingerprint,
          codes_crc=stream_lib.codes_crc([c[r] for c in chunk]),
          label=None if lab is None else int(lab[r]),
          shapes=tuple(models.shapes[l] for l in levels))
      streams.append(stream_lib.pack(header, encoders[r].get_compressed()))
  return streams, bits


def parse_streams(models: CodecModels, streams: Sequence[bytes],
                  names: Sequence[str] | None = None) -> list[tuple[Any, np.ndarray]]:
  """(Header, payload) of every stream, each checked against `models` (StreamError /
  ModelMismatchError naming the stream). Nothing runs on a device."""
  names = list(names) if names is not None else [f"stream {i}" for i in range(len(streams))]
  parsed = []
  for data, name in zip(streams, names):
    header, payload = stream_lib.unpack(data, name)
    stream_lib.check_models(header, name, fingerprint_=models.fingerprint,
                            image_size=models.image_size, num_codes=models.num_codes,
                            shapes=[models.shapes[l] for l in models.levels])
    if header.row >= header.batch_size:
      raise stream_lib.StreamError(f"{name}: row {header.row} outside its batch of "
                                   f"{header.batch_size}")
    if (header.label is None) == models.conditional:
      raise stream_lib.ModelMismatchError(
          f"{name} {'lacks' if models.conditional else 'carries'} a class label, but these "
          f"priors are {'' if models.conditional else 'un'}conditional")
    parsed.append((header, payload))
  return parsed


def plan_batches(headers: Sequence[Any]) -> list[tuple[int, dict[int, int]]]:
  """Groups streams into device batches that reproduce their batch layout.

  Returns [(batch_size, {row: stream index})]: each stream sits in the row it was coded
  in, in a batch of the size it was coded in; streams of one compress call share one.
  """
  batches: list[tuple[int, dict[int, int]]] = []
  for i, h in enumerate(headers):
    for size, slots in batches:
      if size == h.batch_size and h.row not in slots:
        slots[h.row] = i
        break
    else:
      batches.append((h.batch_size, {h.row: i}))
  return batches


def decompress_codes(models: CodecModels, streams: Sequence[bytes],
                     names: Sequence[str] | None = None,
                     progress: Callable[[int], None] | None = None
                     ) -> tuple[tuple[np.ndarray, ...], np.ndarray | None]:
  """Streams -> (codes int32 [n, H_l, W_l] per level top first, labels int32 [n] or None).

  Every stream is checked first (format, checksum, models); then each batch is decoded
  level by level in the loop that coded it. `progress(done)` is called after each batch.
  Raises StreamError when decoded codes fail the stream's codes checksum.
  """
  names = list(names) if names is not None else [f"stream {i}" for i in range(len(streams))]
  parsed = parse_streams(models, streams, names)
  levels, n = models.levels, len(parsed)
  out = [np.zeros((n,) + models.shapes[l], np.int32) for l in levels]
  labels = np.zeros(n, np.int32) if models.conditional else None
  done = 0
  for batch, slots in plan_batches([h for h, _ in parsed]):
    rows = sorted(slots)
    decoders = {r: constriction.stream.queue.RangeDecoder(parsed[slots[r]][1]) for r in rows}
    lab = None
    if labels is not None:
      lab = np.zeros(batch, np.int32)
      for r in rows:
        lab[r] = parsed[slots[r]][0].label
    decoded: list[np.ndarray] = []
    for level in levels:
      session = _DecodeSession(batch, rows, decoders)
      decoded.append(models._run_level(level, batch, decoded, lab, session))  # pylint: disable=protected-access
    for r in rows:
      i = slots[r]
      header = parsed[i][0]
      if stream_lib.codes_crc([d[r] for d in decoded]) != header.codes_crc:
        raise stream_lib.StreamError(
            f"{names[i]}: the decoded codes fail the stream's checksum, so this machine "
            "computes other probabilities than the one that compressed it (another "
            "platform or library version); decompress it where it was compressed")
      for l in range(len(levels)):
        out[l][i] = decoded[l][r]
      if labels is not None:
        labels[i] = header.label
    done += len(rows)
    if progress is not None:
      progress(done)
  return tuple(out), labels


def _pad(x: np.ndarray, batch: int) -> np.ndarray:
  """x [m, ...] zero-padded to [batch, ...]."""
  return np.concatenate([x, np.zeros((batch - len(x),) + x.shape[1:], x.dtype)])
