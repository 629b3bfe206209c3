"""A GCS API server on 127.0.0.1 (`gcp-storage-emulator`, in memory) for bucket tests.

  with bucket_server.serve("vqbucket") as env:   # env: the variables that point clients at it
    subprocess.run([...], env=dict(os.environ, **env))

`use_in_process(env)` points this process's clients at it too: gcsfs (through etils.epath)
and tensorstore (orbax's arrays) read their endpoints from the environment, and gcsfs's
anonymous token is set in fsspec's config (fsspec reads its environment once, at import).

Run as a script, this file is the server: the emulator with one fix. Its media downloads
lack the `x-goog-generation` header that GCS sends; tensorstore reads an object's
generation from it, and orbax's OCDBT manifest is updated by a write conditional on the
generation it read (without the header: "Malformed StorageGeneration").
"""
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

BUCKET = "vqbucket"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def client_env(url: str) -> dict[str, str]:
  """Variables that send every storage client of a run to the server at `url`."""
  return {
      "STORAGE_EMULATOR_HOST": url,  # gcsfs, Google's client libraries
      "FSSPEC_GCS_TOKEN": "anon",  # gcsfs: no credential lookup (no metadata server)
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's array store
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",  # tensorstore: no credential lookup
  }


@contextlib.contextmanager
def serve(bucket: str = BUCKET, timeout_s: float = 30.0):
  """Starts the server with `bucket` created; yields client_env(its URL); stops it."""
  port = _free_port()
  log = tempfile.NamedTemporaryFile(prefix="gcs_server_", suffix=".log", delete=False)
  proc = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={bucket}", "--quiet"],
      stdout=log, stderr=subprocess.STDOUT)
  deadline = time.monotonic() + timeout_s
  try:
    while True:
      try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        break
      except OSError:
        if proc.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"the GCS server did not start (see {log.name})") from None
        time.sleep(0.1)
    yield client_env(f"http://127.0.0.1:{port}")
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
    log.close()


def use_in_process(env: dict[str, str]) -> None:
  """Points this process's gcsfs and tensorstore at the server of `env`."""
  import fsspec  # pylint: disable=g-import-not-at-top
  os.environ.update(env)
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  fsspec.config.conf["gcs"]["use_listings_cache"] = False


def _serve_with_generation_headers() -> None:
  """The emulator's command line, its media downloads sending GCS's generation headers."""
  from gcp_storage_emulator import __main__ as emulator  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    download(request, response, storage, *args, **kwargs)
    try:
      obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # pylint: disable=broad-except
      return  # not found: download already answered 404
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj["metageneration"])

  objects.download = download_with_generation  # before the server builds its routes
  sys.exit(emulator.main(sys.argv[1:]))


if __name__ == "__main__":
  _serve_with_generation_headers()
