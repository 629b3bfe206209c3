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

T = TypeVar("T")

ON_BAD_IMAGE_CHOICES = ("error", "skip")


class DataError(ValueError):
  """A problem with the input data; the message says what to fix."""


class BadImagePolicy:
  """Applies `on_bad_image` when an item cannot be decoded.

  With 'error' the first unreadable item raises a `DataError` naming it. With
  'skip' a warning is logged once per bad item, the item is counted in
  `num_skipped` (unique items) and the next item (index + 1, wrapping) is tried
  instead, so every call still returns a good image. Thread-safe: sources are
  read from a thread pool.
  """

  def __init__(self, on_bad_image: str, num_items: int):
    """Creates the policy.

    Args:
      on_bad_image: 'error' or 'skip'.
      num_items: the number of items of the source (for wrapping around).
    """
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
      raise ValueError(
          f"on_bad_image={on_bad_image!r} is not one of {ON_BAD_IMAGE_CHOICES}; "
          "set --config.data.on_bad_image=error or --config.data.on_bad_image=skip.")
    self.on_bad_image = on_bad_image
    self.num_items = num_items
    self._bad: set[int] = set()
    self._lock = threading.Lock()

  @property
  def num_skipped(self) -> int:
    """How many distinct unreadable items have been met (and skipped) so far."""
    with self._lock:
      return len(self._bad)

  def read(self, index: int, decode: Callable[[int], T],
           describe: Callable[[int], str]) -> T:
    """Returns `decode(index)`, or applies the policy when it fails.

    Args:
      index: the item to read.
      decode: reads item `i`; raises any exception when the item is bad.
      describe: a human-readable name of item `i` (a file path, a record id).

    Returns:
      The decoded item `index`, or (skip mode) the next readable item.

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
        return decode(i)
      except DataError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError..
        # for damaged files; whatever the cause the item cannot be used.
        if self.on_bad_image == "error":
          raise DataError(
              f"Cannot read image {describe(i)}: {type(e).__name__}: {e}. "
              "Fix or delete the file, or pass --config.data.on_bad_image=skip "
              "to skip unreadable images.") from e
        with self._lock:
          first_time = i not in self._bad
          self._bad.add(i)
        if first_time:
          logging.warning("Skipping unreadable image %s (%s: %s).", describe(i),
                          type(e).__name__, e)
    raise DataError(
        f"None of the {self.num_items} images could be read (the first one was "
        f"{describe(0)}); check the data location and file formats.")
