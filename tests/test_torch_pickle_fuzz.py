"""Fuzz test of the torch.save reader: thousands of crafted and mutated files are each
loaded exactly as torch loads them or refused with a one-line TorchFileError; none
crashes, hangs, or returns bytes from outside its buffer (tests/torch_file_fuzz.py)."""
from __future__ import annotations

import collections
import time

import pytest

import torch_file_fuzz as fuzz
from vqvae2_jax.eval import torch_pickle


def test_mutated_and_crafted_files_load_like_torch_or_are_refused():
  torch = pytest.importorskip("torch")
  bases = fuzz.base_files(torch)
  outcomes = collections.Counter()
  slowest, start = 0.0, time.perf_counter()
  for name, data, must_refuse, base in fuzz.cases(torch, seed=0, scale=2):
    t0 = time.perf_counter()
    outcome = fuzz.check(torch_pickle.loads, torch_pickle.TorchFileError, torch, name, data,
                         must_refuse, bases.get(base))
    slowest = max(slowest, time.perf_counter() - t0)
    outcomes[outcome] += 1
  total = sum(outcomes.values())
  print(f"{total} cases in {time.perf_counter() - start:.1f} s: {dict(outcomes)}, "
        f"slowest {slowest * 1e3:.0f} ms")
  assert total >= 3000 and outcomes["loaded"] >= 300 and outcomes["refused"] >= 1000
  assert slowest < 2.0  # no case hangs
  # No load left state behind: the real files still load exactly as torch loads them.
  for name, data in bases.items():
    assert fuzz.same(torch_pickle.loads(data), fuzz.torch_load(torch, data), torch), name
