"""Data errors and the shared policy for unreadable images.

`DataError` is what every image source raises for a problem with the data on
disk (a missing folder, an unprepared dataset, a corrupt file); its message
names the path and says what to do. `BadImagePolicy` implements the
`on_bad_image` setting ('error' or 'skip') once for all file-backed sources.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

from absl import logging
import numpy as np

from vqvae2_jax.registry import BAD_IMAGE_ERROR, BAD_IMAGE_SKIP, ON_BAD_IMAGE

T = TypeVar("T")


class DataError(ValueError):
  """A problem with the input data; the message says what to fix."""


class BadImagePolicy:
  """Applies `on_bad_image` when an item cannot be decoded.

  With 'error' the first unreadable item raises a `DataError` naming it. With
  'skip' a warning is logged once per bad item, the item is counted in
  `num_skipped` (unique items) and the next item (index + 1, wrapping) is tried
  instead, so every call still returns a good image. Thread-safe (grain reads
  items from threads) and picklable (grain's decode workers get a copy; each
  worker then counts what it met, and `read_counted` reports the skipped items
  with every item so the loader in the main process can count them all).
  """

  def __init__(self, on_bad_image: str, num_items: int):
    """Creates the policy.

    Args:
      on_bad_image: 'error' or 'skip'.
      num_items: the number of items of the source (for wrapping around).
    """
    if on_bad_image not in ON_BAD_IMAGE:
      raise ValueError(
          f"on_bad_image={on_bad_image!r} is not one of {ON_BAD_IMAGE}; set "
          f"--config.data.on_bad_image={BAD_IMAGE_ERROR} or "
          f"--config.data.on_bad_image={BAD_IMAGE_SKIP}.")
    self.on_bad_image = on_bad_image
    self.num_items = num_items
    self._bad: set[int] = set()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_lock"]  # locks do not pickle; each copy gets its own
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  @property
  def num_skipped(self) -> int:
    """How many distinct unreadable items have been met (and skipped) so far."""
    with self._lock:
      return len(self._bad)

  def read(self, index: int, decode: Callable[[int], T],
           describe: Callable[[int], str]) -> T:
    """`read_counted` without the skip record."""
    return self.read_counted(index, decode, describe)[0]

  def read_counted(self, index: int, decode: Callable[[int], T],
                   describe: Callable[[int], str]) -> tuple[T, np.ndarray]:
    """Returns `decode(index)`, or applies the policy when it fails.

    Args:
      index: the item to read.
      decode: reads item `i`; raises any exception when the item is bad.
      describe: a human-readable name of item `i` (a file path, a record id).

    Returns:
      (item, skipped): the decoded item `index`, or (skip mode) the next
      readable item; skipped = int64 [3] (first, count, num_items): the
      unreadable items passed over are (first + j) % num_items, j < count
      (count 0: none).

    Raises:
      DataError: in 'error' mode for a bad item, and in 'skip' mode when no
        item at all can be read.
    """
    for offset in range(self.num_items):
      i = (index + offset) % self.num_items
      with self._lock:
        known_bad = i in self._bad
      if known_bad:
        continue
      try:
        item = decode(i)
      except DataError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError..
        # for damaged files; whatever the cause the item cannot be used.
        if self.on_bad_image == BAD_IMAGE_ERROR:
          raise DataError(
              f"Cannot read image {describe(i)}: {type(e).__name__}: {e}. "
              f"Fix or delete the file, or pass --config.data.on_bad_image={BAD_IMAGE_SKIP} "
              "to skip unreadable images.") from e
        with self._lock:
          first_time = i not in self._bad
          self._bad.add(i)
        if first_time:
          logging.warning("Skipping unreadable image %s (%s: %s).", describe(i),
                          type(e).__name__, e)
        continue
      return item, np.asarray([index, offset, self.num_items], np.int64)
    raise DataError(
        f"None of the {self.num_items} images could be read (the first one was "
        f"{describe(0)}); check the data location and file formats.")


def no_skips() -> np.ndarray:
  """The skip record of an item read without skipping: int64 [3], count 0."""
  return np.zeros(3, np.int64)


def skipped_items(records: np.ndarray) -> set[tuple[int, int]]:
  """(num_items, item) of every unreadable item named by skip records [..., 3]."""
  out = set()
  for first, count, num_items in np.asarray(records, np.int64).reshape(-1, 3):
    out.update((int(num_items), int((first + j) % num_items)) for j in range(count))
  return out
