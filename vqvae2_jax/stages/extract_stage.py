"""Stage 2a: encode the data set to discrete codes (paper Algorithm 2, lines 1-7).

Reads the stage-1 checkpoint in the same workdir, encodes the configured splits batch by
batch (batch sharded over the mesh, every process decoding its own slice of each batch in
data.num_threads threads and data.worker_count grain worker processes, and encoding it on
its own devices), and writes code shards (see `vqvae2_jax.data.codes`; process 0 writes
the gathered codes). Shards already on disk are skipped, so an interrupted extraction
resumes where it stopped. The manifest is written last.
"""
from __future__ import annotations

import functools
import itertools
import json
import time

import jax
import numpy as np

from vqvae2_jax import api
from vqvae2_jax import builders
from vqvae2_jax import checkpoint as ckpt_lib
from vqvae2_jax import images as image_lib
from vqvae2_jax import parallel
from vqvae2_jax import storage
from vqvae2_jax.data import codes as codes_lib
from vqvae2_jax.data.loader import iterate_once
from vqvae2_jax.data.sources import Subset, make_source
from vqvae2_jax.registry import EXTRACT, level_names

NAME = EXTRACT
IMAGES_PER_SHARD_BATCHES = 16  # global batches per shard file


def make_encode_fn(model):
  """Jitted (variables, uint8 images [B, S, S, 3]) -> int32 codes per level."""
  @functools.partial(jax.jit, out_shardings=parallel.batch_sharding())
  def encode(variables, images):
    return model.apply(variables, image_lib.to_model(images), method=model.encode)
  return encode


def run(config, workdir: str) -> None:
  """Encodes config.extract.splits into code shards under <workdir>/extract."""
  batch_size = config.extract.batch_size
  parallel.check_batch_size(batch_size, "extract.batch_size")
  run = api.load(workdir, config=config)
  (model, variables), vqvae_step = run.vqvae, run.vqvae_step
  encode = make_encode_fn(model)
  names = level_names(config.vqvae.num_levels)
  size = config.data.image_size
  shapes = {n: list(hw) for n, hw in builders.code_shapes(config).items()}
  dtype = codes_lib.code_dtype(config.vqvae.num_codes)
  w = run.workdir
  out_dir = w.extract_dir
  manifest_path = storage.join(out_dir, codes_lib.MANIFEST)
  if w.has_manifest():
    previous = w.manifest()
    if previous.get("vqvae_step") != vqvae_step:
      raise ckpt_lib.CheckpointError(
          f"{out_dir} holds codes of stage-1 step {previous.get('vqvae_step')}, but the "
          f"checkpoint is at step {vqvae_step}: delete {out_dir} to extract again")
  w.write_config(NAME, config)
  splits, num_classes, class_names = {}, 0, []
  shard_size = batch_size * IMAGES_PER_SHARD_BATCHES
  for split in config.extract.splits:
    source = make_source(config.data, split)
    num_classes, class_names = source.num_classes, list(source.class_names)
    num_shards = -(-len(source) // shard_size)
    keys = names + ("label", "index")
    # Process 0 decides what is missing: every process must encode the same shards.
    todo = parallel.main_process_value(np.asarray(
        [not codes_lib.shard_complete(out_dir, split, shard, keys)
         for shard in range(num_shards)]))
    todo = [int(shard) for shard in np.nonzero(todo)[0]]
    bounds = {s: (s * shard_size, min(len(source), (s + 1) * shard_size)) for s in todo}
    start_time, done = time.time(), 0
    # One pass over the missing shards' images: every shard but the split's last is
    # whole global batches, so batches never straddle two shards.
    rows = np.concatenate([np.arange(*bounds[s]) for s in todo] or [np.zeros(0, np.int64)])
    batches = (iterate_once(Subset(source, rows), batch_size,
                            num_threads=config.data.num_threads,
                            worker_count=config.data.worker_count)
               if len(rows) else iter(()))
    for shard in todo:
      lo, hi = bounds[shard]
      arrays = {k: [] for k in keys}
      for batch in itertools.islice(batches, -(-(hi - lo) // batch_size)):
        global_batch = parallel.host_to_global(
            {"image": batch["image"], "label": batch["label"], "valid": batch["valid"]})
        level_codes = encode(variables, global_batch["image"])
        valid = parallel.global_to_host(global_batch["valid"])
        for name, c in zip(names, level_codes):
          arrays[name].append(parallel.global_to_host(c)[valid].astype(dtype))
        arrays["label"].append(parallel.global_to_host(global_batch["label"])[valid])
      arrays["index"] = [np.arange(lo, hi, dtype=np.int64)]
      if jax.process_index() == 0:
        codes_lib.write_shard(out_dir, split, shard,
                              {k: np.concatenate(v) for k, v in arrays.items()})
      done += hi - lo
      rate = done / max(time.time() - start_time, 1e-9)
      parallel.print0(f"[{NAME}] {split}: shard {shard + 1}/{num_shards} "
                      f"({hi}/{len(source)} images, {rate:.1f} img/s)")
    if hasattr(batches, "close"):
      batches.close()  # stops grain's threads and workers
    splits[split] = {"num_images": len(source), "num_shards": num_shards}
  manifest = dict(vqvae_step=vqvae_step, levels=list(names), shapes=shapes,
                  num_codes=config.vqvae.num_codes, dtype=dtype.name, splits=splits,
                  num_classes=num_classes, class_names=class_names,
                  image_size=size)
  if jax.process_index() == 0:
    storage.write_text(manifest_path, json.dumps(manifest, indent=2))
  parallel.sync_processes(f"{NAME}: manifest written")  # later stages read it at once
  parallel.print0(f"[{NAME}] wrote {manifest_path}")
