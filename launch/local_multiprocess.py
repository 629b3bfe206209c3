r"""Runs one command as N cooperating JAX processes on this machine (CPU, fake devices).

A rehearsal of a multi-host run without a cluster: every process gets
`--xla_force_host_platform_device_count=K` CPU devices and JAX_PLATFORMS=cpu, and the
distributed flags that `jax.distributed.initialize` needs (coordinator 127.0.0.1 on a
free port, num_processes, process_id) are appended to the command:

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=2 -- \
      python -m vqvae2_jax.main --config=configs/demo.py:vqvae,tiny --workdir=/tmp/mp

Each process's output is streamed with a `[pI]` prefix. A process that fails (or runs
past --timeout) makes the launcher stop all the others at once: its peers would
otherwise wait for it until JAX's initialisation or heartbeat timeout (minutes). The exit
status is 0 when every process succeeded, else the first failing process's status
(124 for a timeout).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Sequence

TIMEOUT_STATUS = 124  # what coreutils `timeout` returns, so scripts can tell it apart
_DEVICE_FLAG = "--xla_force_host_platform_device_count"


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port that was free on `host` a moment ago (the coordinator binds it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


def process_env(devices_per_process: int, base: dict[str, str] | None = None
                ) -> dict[str, str]:
  """`base` (default os.environ) with JAX on CPU and `devices_per_process` fake devices.

  Other XLA_FLAGS (e.g. --xla_backend_optimization_level=0) are kept; an existing device
  count flag is replaced.
  """
  env = dict(os.environ if base is None else base)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_FLAG)]
  env["XLA_FLAGS"] = " ".join(flags + [f"{_DEVICE_FLAG}={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def distributed_flags(coordinator: str, num_processes: int, process_id: int) -> list[str]:
  """The vqvae2_jax.main flags that make process `process_id` join the job."""
  return ["--config.distributed.initialize=True",
          f"--config.distributed.coordinator_address={coordinator}",
          f"--config.distributed.num_processes={num_processes}",
          f"--config.distributed.process_id={process_id}"]


class _Printer:
  """Copies a child's output line by line to our stdout with a prefix (one lock)."""

  _lock = threading.Lock()

  def __init__(self, stream, prefix: str):
    self.thread = threading.Thread(target=self._pump, args=(stream, prefix), daemon=True)
    self.thread.start()

  def _pump(self, stream, prefix: str) -> None:
    for raw in iter(stream.readline, b""):
      line = raw.decode("utf-8", errors="replace").rstrip("\n")
      with self._lock:
        sys.stdout.write(f"{prefix}{line}\n")
        sys.stdout.flush()
    stream.close()


def _stop(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
  """SIGTERM to every still-running child's process group, SIGKILL after `grace` s."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGTERM)
      except ProcessLookupError:
        pass
  deadline = time.monotonic() + grace
  for p in procs:
    try:
      p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      p.wait()


def launch(command: Sequence[str], num_processes: int = 2, devices_per_process: int = 2,
           timeout: float = 600.0, port: int = 0, cwd: str | None = None,
           env: dict[str, str] | None = None) -> int:
  """Runs `command` + distributed flags as `num_processes` local processes.

  Args:
    command: argv of one process, e.g. ['python', '-m', 'vqvae2_jax.main', ...].
    num_processes: processes to start (process ids 0 .. num_processes - 1).
    devices_per_process: fake CPU devices each process sees.
    timeout: seconds after which all processes still running are stopped (status 124).
    port: coordinator port on 127.0.0.1; 0 picks a free one.
    cwd: working directory of the processes (default: the current one).
    env: base environment (default os.environ).

  Returns:
    0 if every process exited with 0; otherwise the status of the first one that failed.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes={num_processes} and devices_per_process="
                     f"{devices_per_process} must both be >= 1")
  if not command:
    raise ValueError("no command given; put it after `--`")
  coordinator = f"127.0.0.1:{port or free_port()}"
  child_env = process_env(devices_per_process, env)
  print(f"[launcher] {num_processes} processes x {devices_per_process} CPU devices, "
        f"coordinator {coordinator}, timeout {timeout:.0f}s", flush=True)
  procs, printers = [], []
  for i in range(num_processes):
    argv = list(command) + distributed_flags(coordinator, num_processes, i)
    # Own process group per child, so stopping it also stops anything it started.
    p = subprocess.Popen(argv, cwd=cwd, env=child_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(p)
    printers.append(_Printer(p.stdout, f"[p{i}] "))

  status, deadline = 0, time.monotonic() + timeout
  try:
    # Poll every child each round (a short-circuiting any() would miss a failure).
    while None in [p.poll() for p in procs]:
      failed = [(i, p.returncode) for i, p in enumerate(procs)
                if p.returncode not in (None, 0)]
      if failed:
        i, status = failed[0]
        print(f"[launcher] process {i} exited with status {status}; stopping the others",
              flush=True)
        break
      if time.monotonic() > deadline:
        status = TIMEOUT_STATUS
        print(f"[launcher] timeout after {timeout:.0f}s; stopping all processes", flush=True)
        break
      time.sleep(0.2)
  except KeyboardInterrupt:
    status = 130
    print("[launcher] interrupted; stopping all processes", flush=True)
  finally:
    _stop(procs)
    for printer in printers:
      printer.thread.join(timeout=5.0)
  if status == 0:
    status = next((p.returncode for p in procs if p.returncode != 0), 0)
  print(f"[launcher] exit statuses {[p.returncode for p in procs]}", flush=True)
  return status


def _interrupt(signum, frame) -> None:
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      usage="%(prog)s [--num_processes N] [--devices_per_process K] [--timeout S] "
            "[--port P] -- COMMAND ...")
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--timeout", type=float, default=600.0,
                      help="seconds before every process still running is stopped")
  parser.add_argument("--port", type=int, default=0, help="coordinator port; 0 = free port")
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args(argv)
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command after `--`, e.g. -- python -m vqvae2_jax.main ...")
  # SIGTERM to the launcher (e.g. from a scheduler) stops the children too.
  signal.signal(signal.SIGTERM, _interrupt)
  return launch(command, args.num_processes, args.devices_per_process, args.timeout,
                args.port)


if __name__ == "__main__":
  sys.exit(main())
