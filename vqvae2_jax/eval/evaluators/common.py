"""What every evaluator shares: the per-run log, the pictures it hands back, its shape.

An evaluator is built from its own keys of config.evaluate (`from_config(settings,
inputs)`) and the run's shared `inputs.EvalInputs`; `run()` yields what it measured as
(report key, value) pairs, and `Figure`s for the caller to write (process 0 only).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Protocol, Union

from vqvae2_jax import parallel


class EvalLog:
  """Progress lines and report notes of one evaluation run (one object per run).

  Calling it prints a progress line (process 0) with the seconds since the run began;
  `note` adds lines for the report's notes (skipped sections, caveats), in the order the
  evaluators meet them.
  """

  def __init__(self, prefix: str):
    self.prefix, self.start = prefix, time.time()
    self.notes: list[str] = []

  def __call__(self, message: str) -> None:
    parallel.print0(f"[{self.prefix}] {message} | {time.time() - self.start:.0f}s elapsed")

  def note(self, *messages: str) -> None:
    """Adds `messages` to the report's notes."""
    self.notes.extend(messages)


class Figure(NamedTuple):
  """A picture an evaluator made: `save(path)` draws it to `path`; the caller puts it in
  the stage's folder as `filename`."""
  filename: str
  save: Callable[[str], Any]


Result = Union[tuple[str, Any], Figure]


class Evaluator(Protocol):
  """One metric family."""

  @classmethod
  def from_config(cls, settings: Mapping[str, Any], inputs) -> "Evaluator":
    """The evaluator for config.evaluate `settings` (its own keys) over `inputs`."""

  def run(self) -> Iterator[Result]:
    """(report key, value) pairs and Figures."""
