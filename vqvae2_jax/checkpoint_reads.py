"""Failed checkpoint reads: corruption told from failure, transient failures retried.

Only evidence about the bytes makes a step corrupt, because a corrupt step is moved aside
and training resumes from an older one (`Checkpointer.restore_newest_valid`); a flaky read
taken for corruption would silently roll a long run back. A failed read is one of:

  corrupt    the files are not what a finished save wrote: a file missing
             (FileNotFoundError; tensorstore NOT_FOUND), metadata that does not parse
             (JSON / Unicode decode errors; tensorstore INVALID_ARGUMENT, which it raises
             as a ValueError without the code), array bytes that
             do not decode or whose size contradicts the index (DATA_LOSS, OUT_OF_RANGE,
             FAILED_PRECONDITION: e.g. "Truncated Zstd-compressed stream"), an item the
             step does not hold, a step without its commit marker. (A checksum mismatch of
             arrays that did decode is found after the read: `Checkpointer._verify`.)
  transient  the storage did not answer: any other OSError (EIO, a permission or
             connection error, TimeoutError, ConnectionError), tensorstore UNAVAILABLE,
             DEADLINE_EXCEEDED, ABORTED (its message for a bucket it cannot reach: "All N
             retry attempts failed: CURL error ..."), UNKNOWN, INTERNAL, PERMISSION_DENIED,
             UNAUTHENTICATED, CANCELLED; a bucket's HTTP 401, 403, 408, 429 or 5xx (gcsfs,
             google-api-core; its 404 is a missing file). Retried with exponential
             backoff (`RetryPolicy`).
  memory     MemoryError, or RESOURCE_EXHAUSTED naming memory (the allocator of the host or
             device): not retried, not corruption.
  unknown    anything else: not retried, not corruption.

Orbax wraps the errors of the array reads (`Exception("Encountered error while reading
array index ...") from <tensorstore's ValueError>`), and tensorstore reports a status as
`ValueError("<CODE>: <message>")`; the chain of causes is walked to the first link that
says what happened.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import re
import sys
import time
from typing import Any, Callable, Iterator
import warnings

CORRUPT, TRANSIENT, MEMORY, UNKNOWN = "corrupt", "transient", "memory", "unknown"

_CORRUPT_CODES = {"NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                  "INVALID_ARGUMENT"}
_TRANSIENT_CODES = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "UNKNOWN", "INTERNAL",
                    "PERMISSION_DENIED", "UNAUTHENTICATED", "CANCELLED",
                    "RESOURCE_EXHAUSTED"}
# HTTP statuses of a bucket's answer that a later try may not get: timeout, throttled,
# credentials (expired tokens are refreshed), server errors.
_TRANSIENT_HTTP = {401, 403, 408, 429, 500, 502, 503, 504}
_STATUS = re.compile(r"^([A-Z_]+): ")
# Tensorstore raises INVALID_ARGUMENT as a ValueError without the code (e.g. 'Error opening
# "zarr" driver: ... Error decoding b-tree node: ZSTD_decompressStream() failed: Data
# corruption detected [tensorstore_spec=...]'): known by its spec suffix or opening words.
_INVALID_ARGUMENT = re.compile(r"\[tensorstore_spec|^Error (opening|reading|parsing|decoding) ")
# Tensorstore appends the whole spec of the array (kilobytes of JSON) to its messages.
_SPEC_SUFFIX = re.compile(r"\s*\[tensorstore_spec(\[\d+\])?=.*$", re.DOTALL)
# After a failed read: how long the reads orbax abandoned get to finish (local reads take
# milliseconds) while their noise is dropped (`_abandoned_reads_quiet`).
_SETTLE_S = 0.2
# Orbax's own messages for a step or an item that is not on disk.
_MISSING = ("was not found in the checkpoint", "Found incomplete checkpoint")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
  """`tries` attempts in all; the wait before retry k (k = 1, 2, ...) is
  first_delay_s * 2**(k - 1), at most max_delay_s."""
  tries: int = 4
  first_delay_s: float = 1.0
  max_delay_s: float = 30.0

  def __post_init__(self):
    if self.tries < 1 or self.first_delay_s < 0 or self.max_delay_s < 0:
      raise ValueError(f"{self} needs tries >= 1 and delays >= 0")

  def delay(self, retry: int) -> float:
    return min(self.max_delay_s, self.first_delay_s * 2 ** (retry - 1))


# What every Checkpointer uses unless given another (1 + 2 + 4 s of waiting in all).
DEFAULT_RETRY = RetryPolicy()


def causes(error: BaseException) -> Iterator[BaseException]:
  """`error`, then what it was raised from (or during), as Python's traceback shows it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)


def _kind_of(error: BaseException) -> str | None:
  """The kind one exception shows by itself, or None when it says nothing (a wrapper)."""
  if isinstance(error, MemoryError):
    return MEMORY
  if isinstance(error, FileNotFoundError):
    return CORRUPT  # a finished step's file is gone
  if isinstance(error, (json.JSONDecodeError, UnicodeDecodeError)):
    return CORRUPT  # metadata that does not parse
  if isinstance(error, OSError):  # TimeoutError and ConnectionError included
    return TRANSIENT
  message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  if any(m in message for m in _MISSING):
    return CORRUPT
  http = getattr(error, "code", None) or getattr(error, "status", None)
  if isinstance(http, int) and 400 <= http < 600:  # gcsfs, google-api-core, aiohttp
    return CORRUPT if http == 404 else TRANSIENT if http in _TRANSIENT_HTTP else None
  status = _STATUS.match(message)
  if status:
    code = status.group(1)
    if code == "RESOURCE_EXHAUSTED" and "memory" in message.lower():
      return MEMORY
    if code in _CORRUPT_CODES:
      return CORRUPT
    if code in _TRANSIENT_CODES:
      return TRANSIENT
  if isinstance(error, ValueError) and _INVALID_ARGUMENT.search(message):
    return CORRUPT
  return None


def classify(error: BaseException) -> tuple[str, BaseException]:
  """(kind, the link of `error`'s chain that decided it; `error` itself when unknown)."""
  for link in causes(error):
    kind = _kind_of(link)
    if kind is not None:
      return kind, link
  return UNKNOWN, error


def describe(error: BaseException, limit: int = 300) -> str:
  """'OSError: [Errno 5] Input/output error': one line, without tensorstore's spec."""
  text = " ".join(_SPEC_SUFFIX.sub("", str(error)).split())
  return f"{type(error).__name__}: {text}"[:limit]


class ReadFailed(Exception):
  """A read that failed for good: kind (see the module doc), cause (the deciding link of
  the last error's chain), tries (attempts made), waited_s (seconds spent waiting)."""

  def __init__(self, kind: str, cause: BaseException, tries: int, waited_s: float):
    super().__init__(f"{kind} after {tries} tries: {describe(cause)}")
    self.kind, self.cause, self.tries, self.waited_s = kind, cause, tries, waited_s


class _DropAbandonedTasks(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "exception was never retrieved" not in record.getMessage()


def _loop_closed(error: BaseException | None) -> bool:
  return isinstance(error, RuntimeError) and "Event loop is closed" in str(error)


def _is_abandoned_read(unraisable) -> bool:
  return (asyncio.iscoroutine(unraisable.object)
          or isinstance(unraisable.object, asyncio.Future)
          or _loop_closed(unraisable.exc_value))


@contextlib.contextmanager
def _abandoned_reads_quiet() -> Iterator[None]:
  """Drops the stderr noise of the reads orbax abandons when one of a step's reads fails.

  Orbax reads a step's arrays concurrently and stops waiting at the first failure: the
  other reads' coroutines and tasks are dropped, and tensorstore's callbacks into the
  closed event loop fail (tensorstore prints those through sys.excepthook, from its
  threads, as the abandoned reads finish). Python reports each ('Task exception was never
  retrieved', 'coroutine ... was never awaited', 'Event loop is closed') with its
  traceback: hundreds of lines that would bury the one-line error and say nothing it
  does not. They are dropped while the reads and retries run; after a read that finally
  fails, for the rest of the process (the caller stops with that error, and on a loaded
  machine abandoned reads may report long after any fixed grace period).
  """
  asyncio_logger, drop = logging.getLogger("asyncio"), _DropAbandonedTasks()
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    if not _is_abandoned_read(unraisable):
      previous_unraisable(unraisable)

  def except_hook(kind, value, traceback):
    if not _loop_closed(value):
      previous_except(kind, value, traceback)
  asyncio_logger.addFilter(drop)
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  never_awaited = dict(message="coroutine .* was never awaited", category=RuntimeWarning)
  try:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", **never_awaited)
      yield
  except BaseException:
    warnings.filterwarnings("ignore", **never_awaited)  # process-wide from here: see above
    time.sleep(_SETTLE_S)  # abandoned local reads finish within milliseconds
    gc.collect()  # the abandoned tasks report now, while their reports are dropped
    raise  # the hooks and the asyncio filter stay installed
  sys.unraisablehook, sys.excepthook = previous_unraisable, previous_except
  asyncio_logger.removeFilter(drop)


def read_with_retries(read: Callable[[], Any], policy: RetryPolicy, what: str) -> Any:
  """read(), retried while it fails transiently; raises ReadFailed (from the last error)
  when it fails otherwise or `policy.tries` attempts all failed. Each retry prints one
  line on stdout naming `what` and the error (stderr stays for the final error)."""
  with _abandoned_reads_quiet():
    return _retry(read, policy, what)


def _retry(read: Callable[[], Any], policy: RetryPolicy, what: str) -> Any:
  waited = 0.0
  for attempt in range(1, policy.tries + 1):
    try:
      return read()
    except Exception as e:  # pylint: disable=broad-exception-caught
      kind, cause = classify(e)
      if kind != TRANSIENT or attempt == policy.tries:
        raise ReadFailed(kind, cause, attempt, waited) from e
      delay = policy.delay(attempt)
      print(f"reading {what} failed ({describe(cause, 160)}); retry {attempt} of "
            f"{policy.tries - 1} in {delay:g}s", flush=True)
      time.sleep(delay)
      waited += delay
  raise AssertionError("unreachable")
