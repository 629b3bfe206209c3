"""Files of a run on local disk or in a bucket: one path layer for every reader and writer.

Every path the package writes or reads (workdir, data roots, codec streams) may be a local
path or a URL such as `gs://bucket/run`. Paths stay plain strings; this module answers
for both kinds through `etils.epath` (the path library orbax itself uses; `gs://` goes
through fsspec's `gcsfs`, installed by the `gcs` extra; where TensorFlow is installed,
etils picks `tf.io.gfile` instead). Local paths take the same code paths as plain `open` /
`os` calls, so local runs are unchanged.

What a bucket lacks, and what is done instead:
  - rename: `move_tree` copies every object, checks each copy's checksum against the
    original, and only then deletes the original;
  - append: `append_text` rewrites the object (its old text plus the new lines);
  - memory maps: `load_npy` reads the whole array into memory;
  - readers of local files only (array_record): `local_copy` copies a folder once.
An object appears whole when its upload finishes, so a write interrupted by a kill leaves
the previous object (or none), never a truncated one: no temp-name dance is needed there.

Emulated buckets (tests, the README's local run): `STORAGE_EMULATOR_HOST` points gcsfs
at a GCS API server; `TENSORSTORE_GCS_HTTP_URL` does the same for orbax's arrays.
"""
from __future__ import annotations

import hashlib
import io
import os
import posixpath
import shutil
from typing import IO, Any, Iterator

from etils import epath
import numpy as np

_CHUNK = 1 << 22  # bytes per read when hashing a file


def is_remote(path: str) -> bool:
  """True for a URL (`gs://bucket/...`), False for a local path."""
  return "://" in str(path)


def _configure_gcs() -> None:
  """gcsfs defaults for a workdir shared by several writers.

  Listings are not cached: orbax writes array data through tensorstore (another client),
  and a cached listing would hide the steps it saved. The experimental zonal-bucket probe
  of recent gcsfs versions (a gRPC call per bucket) is off unless asked for: it waits a
  minute on any endpoint that is not Google's, e.g. an emulator.
  """
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gcs", {}).setdefault("use_listings_cache", False)
  os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


_configure_gcs()


def path(p: str) -> epath.Path:
  """The epath.Path of a local path or URL."""
  return epath.Path(p)


def join(base: str, *names: str) -> str:
  """base/name/...: `os.path.join` for local paths, '/'-joined for URLs."""
  base = str(base)
  return posixpath.join(base, *names) if is_remote(base) else os.path.join(base, *names)


def dirname(p: str) -> str:
  return posixpath.dirname(p) if is_remote(p) else os.path.dirname(p)


def basename(p: str) -> str:
  return posixpath.basename(str(p).rstrip("/")) if is_remote(p) else os.path.basename(p)


def absolute(p: str) -> str:
  """An absolute local path (`os.path.abspath`), or the URL unchanged."""
  return str(p).rstrip("/") if is_remote(p) else os.path.abspath(p)


def exists(p: str) -> bool:
  return os.path.exists(p) if not is_remote(p) else path(p).exists()


def isfile(p: str) -> bool:
  return os.path.isfile(p) if not is_remote(p) else path(p).is_file()


def isdir(p: str) -> bool:
  """A folder; on a bucket, a prefix that holds at least one object."""
  return os.path.isdir(p) if not is_remote(p) else path(p).is_dir()


def listdir(p: str) -> list[str]:
  """Names of the entries of a folder, sorted ([] when it does not exist)."""
  if not is_remote(p):
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  try:
    return sorted(child.name for child in path(p).iterdir())
  except FileNotFoundError:
    return []


def walk_files(top: str) -> Iterator[str]:
  """Paths relative to `top` of every file below it (symlinked folders followed locally),
  in no particular order; none when `top` does not exist."""
  if not is_remote(top):
    for dirpath, _, filenames in os.walk(top, followlinks=True):
      for name in filenames:
        yield os.path.relpath(os.path.join(dirpath, name), top)
    return
  for child in (path(top).iterdir() if isdir(top) else ()):
    if child.is_dir():
      yield from (posixpath.join(child.name, name) for name in walk_files(str(child)))
    else:
      yield child.name


def makedirs(p: str) -> None:
  """Creates a folder and its parents (a bucket has no folders: nothing to do there)."""
  if not is_remote(p):
    os.makedirs(p, exist_ok=True)


def open(p: str, mode: str = "r") -> IO[Any]:  # pylint: disable=redefined-builtin
  """Opens a file for reading or writing ('r', 'rb', 'w', 'wb', 'a')."""
  if not is_remote(p):
    return io.open(p, mode)
  if "a" in mode:
    raise ValueError(f"{p}: a bucket object cannot be appended to; use append_text")
  return path(p).open(mode)


def save_figure(fig: Any, p: str, **savefig_kwargs) -> str:
  """`fig.savefig` (matplotlib) to a path or URL, creating local folders; returns `p`."""
  if not is_remote(p):
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    fig.savefig(p, **savefig_kwargs)
    return p
  with open(p, "wb") as f:
    fig.savefig(f, format=posixpath.splitext(p)[1].lstrip(".") or "png", **savefig_kwargs)
  return p


def save_picture(image: Any, p: str) -> str:
  """`image.save` (PIL) to a path or URL (format from the extension), creating local
  folders; returns `p`."""
  if not is_remote(p):
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    image.save(p)
    return p
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(p, "wb") as f:
    image.save(f, format=Image.registered_extensions()[posixpath.splitext(p)[1].lower()])
  return p


def read_text(p: str) -> str:
  with open(p) as f:
    return f.read()


def write_text(p: str, text: str) -> None:
  with open(p, "w") as f:
    f.write(text)


def write_bytes(p: str, data: bytes) -> None:
  with open(p, "wb") as f:
    f.write(data)


def append_text(p: str, text: str) -> None:
  """Appends to a text file; on a bucket the object is rewritten with the text added."""
  if not is_remote(p):
    with io.open(p, "a") as f:
      f.write(text)
    return
  old = read_text(p) if exists(p) else ""
  write_text(p, old + text)


def remove(p: str) -> None:
  """Deletes a file (nothing when absent)."""
  if not is_remote(p):
    if os.path.exists(p):
      os.remove(p)
  else:
    path(p).unlink(missing_ok=True)


def rmtree(p: str) -> None:
  """Deletes a folder and everything below it (nothing when absent)."""
  if not is_remote(p):
    shutil.rmtree(p, ignore_errors=True)
  elif path(p).exists():
    path(p).rmtree()


def glob(pattern: str) -> list[str]:
  """Paths matching a pattern whose wildcards are in the last component, sorted."""
  if not is_remote(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(pattern))
  parent, name = posixpath.split(pattern)
  try:
    return sorted(str(q) for q in path(parent).glob(name))
  except FileNotFoundError:
    return []


def save_npy(p: str, array: np.ndarray) -> None:
  """Writes one .npy whole: locally via a temp name and a rename (a kill never leaves a
  truncated file under the final name); on a bucket as one upload (the same guarantee)."""
  if not is_remote(p):
    tmp = p[:-len(".npy")] + ".tmp.npy" if p.endswith(".npy") else p + ".tmp"
    np.save(tmp, array)
    os.replace(tmp, p)
    return
  buffer = io.BytesIO()
  np.save(buffer, array)
  with open(p, "wb") as f:
    f.write(buffer.getvalue())


def load_npy(p: str, mmap: bool = True) -> np.ndarray:
  """Reads a .npy: memory-mapped read-only locally (when `mmap`), whole from a bucket."""
  if not is_remote(p):
    return np.load(p, mmap_mode="r" if mmap else None)
  with open(p, "rb") as f:
    return np.load(io.BytesIO(f.read()))


def digest(p: str) -> str:
  """SHA-256 of a file's bytes (read in chunks)."""
  h = hashlib.sha256()
  with open(p, "rb") as f:
    while block := f.read(_CHUNK):
      h.update(block)
  return h.hexdigest()


def local_copy(url: str) -> str:
  """A local copy of the bucket folder `url`, for readers of local files only.

  array_record (tfds's storage format) reads local files only. The copy is made once
  under ~/.cache/vqvae2_jax/buckets/<bucket>/<path> (each file via a temp name, so an
  interrupted copy is resumed); files already there with the bucket's size are kept.
  Returns the local folder; a local `url` is returned as it is.
  """
  if not is_remote(url):
    return url
  local = os.path.join(os.path.expanduser("~/.cache/vqvae2_jax/buckets"),
                       url.split("://", 1)[1].strip("/"))
  for name in walk_files(url):
    src, dst = join(url, name), os.path.join(local, *name.split("/"))
    size = path(src).stat().length
    if os.path.isfile(dst) and os.path.getsize(dst) == size:
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with open(src, "rb") as f_in, io.open(dst + ".tmp", "wb") as f_out:
      shutil.copyfileobj(f_in, f_out, _CHUNK)
    os.replace(dst + ".tmp", dst)
  return local


class MoveError(OSError):
  """A copy made for a move differs from its original; the original was kept."""


def move_tree(src: str, dst: str) -> None:
  """Moves the folder `src` to `dst` (replacing `dst`).

  Locally one rename. On a bucket, which has no rename: every object is copied, each
  copy's SHA-256 is checked against its original's, and only when all match is `src`
  deleted; a mismatch raises MoveError with `src` untouched.
  """
  if not is_remote(src) and not is_remote(dst):
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.makedirs(os.path.dirname(dst) or ".", exist_ok=True)
    os.replace(src, dst)
    return
  rmtree(dst)
  names = sorted(walk_files(src))
  for name in names:
    path(join(src, name)).copy(path(join(dst, name)))
  for name in names:
    a, b = join(src, name), join(dst, name)
    if digest(a) != digest(b):
      raise MoveError(f"the copy {b} of {a} differs from it; {src} was kept")
  rmtree(src)
