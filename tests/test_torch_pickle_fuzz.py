"""Fuzz test of the torch.save reader: thousands of crafted and mutated files are each
loaded exactly as torch loads them or refused with a one-line TorchFileError; none
crashes, hangs, or returns bytes from outside its buffer (tests/torch_file_fuzz.py)."""
from __future__ import annotations

import collections
import time

import pytest

import torch_file_fuzz as fuzz
from vqvae2_jax.eval import torch_pickle
from vqvae2_jax.eval import torch_pickle_machine


class WorkMeter:
  """The work of one load, in units that bound its time whatever the machine's speed:
  pickle opcodes run, the pickle bytes they were given, tensor bytes copied out (granted
  by the expansion budget)."""

  def __init__(self, monkeypatch):
    self.reset()
    counted = {code: self._counting(handler)
               for code, handler in torch_pickle_machine._DISPATCH.items()}
    monkeypatch.setattr(torch_pickle_machine, "_DISPATCH", counted)
    make_machine, take = torch_pickle_machine._Machine.__init__, torch_pickle._Budget.take

    def counting_init(machine, data, pos, *args, **kwargs):
      self.pickle_bytes += len(data) - pos
      make_machine(machine, data, pos, *args, **kwargs)

    def counting_take(budget, nbytes, source):
      take(budget, nbytes, source)  # raises when refused: only granted bytes count
      self.tensor_bytes += nbytes
    monkeypatch.setattr(torch_pickle_machine._Machine, "__init__", counting_init)
    monkeypatch.setattr(torch_pickle._Budget, "take", counting_take)

  def reset(self):
    self.opcodes = self.pickle_bytes = self.tensor_bytes = 0

  def _counting(self, handler):
    def counted(machine):
      self.opcodes += 1
      return handler(machine)
    return counted


def test_mutated_and_crafted_files_load_like_torch_or_are_refused(monkeypatch):
  torch = pytest.importorskip("torch")
  bases = fuzz.base_files(torch)
  meter = WorkMeter(monkeypatch)
  outcomes = collections.Counter()
  start = time.perf_counter()
  for name, data, must_refuse, base in fuzz.cases(torch, seed=0, scale=2):
    meter.reset()
    outcome = fuzz.check(torch_pickle.loads, torch_pickle.TorchFileError, torch, name, data,
                         must_refuse, bases.get(base))
    outcomes[outcome] += 1
    # No case hangs: every opcode consumes at least one byte of its pickle, so the loop
    # runs at most that many times, and the copied tensors stay within the budget of
    # MAX_EXPANSION x the file's bytes (+ 1 MiB) however the views are strided (the check
    # loads each case once with our reader).
    assert meter.opcodes <= meter.pickle_bytes, (name, meter.opcodes, meter.pickle_bytes)
    assert meter.tensor_bytes <= torch_pickle.MAX_EXPANSION * len(data) + (1 << 20), name
  total = sum(outcomes.values())
  print(f"{total} cases in {time.perf_counter() - start:.1f} s: {dict(outcomes)}")
  assert total >= 3000 and outcomes["loaded"] >= 300 and outcomes["refused"] >= 1000
  # No load left state behind: the real files still load exactly as torch loads them
  # (and the meter sees their opcodes and tensors).
  for name, data in bases.items():
    meter.reset()
    assert fuzz.same(torch_pickle.loads(data), fuzz.torch_load(torch, data), torch), name
    assert 0 < meter.opcodes <= meter.pickle_bytes and meter.tensor_bytes > 0, name
