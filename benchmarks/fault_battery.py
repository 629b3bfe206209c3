"""Fault battery: inject faults into tiny training runs, rerun until done, compare.

  python benchmarks/fault_battery.py [--tries 12] [--seed 0] [--stage vqvae]

Each try runs `<stage>,tiny` (4 steps, a checkpoint every step) with one fault from
tests/fault_injection.py (SIGTERM at each of the safe points CI tests,
`fault_injection.SIGTERM_POINTS`, and at step 3; SIGKILL inside a save's write or
commit) or an external SIGTERM / SIGKILL at a random moment, then reruns the same command
without faults until it exits 0 (at most 3 reruns). A try survives when every SIGTERM run
exited 0 with "preempted: saved step N" (or, before training started, "preempted outside
training"; or finished: `fault_injection.preempted_cleanly`), and the final checkpoint's
array checksums equal an uninterrupted run's (bit-exact state). Prints the figures and
the load average.
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRIVER = os.path.join(ROOT, "tests", "fault_injection.py")
sys.path.insert(0, os.path.dirname(DRIVER))
from fault_injection import SIGTERM_POINTS, final_checksums, preempted_cleanly  # noqa: E402

FAULTS = [*SIGTERM_POINTS.values(), "sigterm_step:3", "sigkill_save:2", "sigkill_save:4",
          "sigkill_write:3", "random_sigterm", "random_sigkill"]
FINAL_STEP = 4


def run(stage, workdir, fault=None, kill_after=None, sig=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("FAULT", None)
  if fault:
    env["FAULT"] = fault
  # Injected faults need the driver; everything else runs the real command line.
  entry = [DRIVER] if fault else ["-m", "vqvae2_jax.main"]
  cmd = [sys.executable, *entry, f"--config=configs/demo.py:{stage},tiny",
         f"--workdir={workdir}", f"--config.{stage}_train.checkpoint_every=1"]
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  if kill_after is not None:
    try:
      proc.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      proc.send_signal(sig)
  out, err = proc.communicate(timeout=600)
  return proc.returncode, out, err


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tries", type=int, default=len(FAULTS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stage", default="vqvae")
  parser.add_argument("--random-only", action="store_true",
                      help="only external SIGTERM/SIGKILL at random moments")
  parser.add_argument("--max-delay", type=float, default=15.0,
                      help="latest random kill, seconds after start")
  args = parser.parse_args()
  rng = random.Random(args.seed)
  root = tempfile.mkdtemp(prefix="fault_battery_")
  start = time.time()
  rc, _, err = run(args.stage, os.path.join(root, "reference"))
  assert rc == 0, err[-2000:]
  reference = final_checksums(os.path.join(root, "reference"), args.stage, FINAL_STEP)
  faults = survived = 0
  for t in range(args.tries):
    fault = (rng.choice(["random_sigterm", "random_sigkill"]) if args.random_only
             else FAULTS[t % len(FAULTS)])
    workdir = os.path.join(root, f"try{t}")
    if fault.startswith("random"):
      sig = signal.SIGTERM if fault == "random_sigterm" else signal.SIGKILL
      delay = rng.uniform(1.5, args.max_delay)
      rc, out, err = run(args.stage, workdir, kill_after=delay, sig=sig)
      label = f"{fault}@{delay:.1f}s"
    else:
      rc, out, err = run(args.stage, workdir, fault=fault)
      sig = signal.SIGKILL if fault.startswith("sigkill") else signal.SIGTERM
      label = fault
    faults += 1
    first_rc = rc
    # SIGTERM: a clean exit 0 (preempted, or finished before the signal landed);
    # SIGKILL: killed, or finished before it landed.
    ok = rc == 0 or (sig == signal.SIGKILL and rc == -signal.SIGKILL)
    if sig == signal.SIGTERM:
      ok = preempted_cleanly(rc, out, args.stage)
    reruns = 0
    while ok and (rc != 0 or "done" not in out):
      if reruns == 3:
        ok = False
        break
      rc, out, err = run(args.stage, workdir)
      reruns += 1
    same = ok and final_checksums(workdir, args.stage, FINAL_STEP) == reference
    survived += same
    print(f"try {t}: {label:<22} first rc={first_rc} reruns={reruns} "
          f"{'survived' if same else 'FAILED: ' + err.strip()[-300:]}", flush=True)
  print(f"{args.stage}: {args.tries} tries, {faults} faults injected, {survived} survived "
        f"(bit-exact final state); {time.time() - start:.0f}s; load {os.getloadavg()}")


if __name__ == "__main__":
  main()
