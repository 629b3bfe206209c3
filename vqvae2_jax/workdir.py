"""The one owner of a run's on-disk layout.

A workdir holds one experiment, one folder per stage:

  <workdir>/vqvae/          config.json (resolved config; its model fields are the record),
                            config.txt, metrics.jsonl, checkpoints/<step>/, pictures
  <workdir>/extract/        manifest.json, <split>/shard_*.npy, config.json
  <workdir>/prior_<level>/  config.json, metrics.jsonl, checkpoints/
  <workdir>/classifier/     config.json, metrics.jsonl, checkpoints/
  <workdir>/sample/         samples.png, samples.npz, images/, rejection.*
  <workdir>/evaluate/       report.json, report.md, tradeoff.png, caches

The `config.json` a training stage writes is the source of truth for the models it
trained: later stages, the Python API and the notebook rebuild every model from the
model fields recorded there (`MODEL_FIELDS`), never from their own command line. An
explicit override that contradicts a recorded model field fails at start
(`resolve_recorded`), naming the field and both values.
"""
from __future__ import annotations

import json
from typing import Any, Iterable

import jax
import ml_collections
import orbax.checkpoint as ocp

from vqvae2_jax import config_lib
from vqvae2_jax import storage
from vqvae2_jax.data.codes import MANIFEST
# Stage names are the registry's; imported here too for the modules that read them
# beside a Workdir.
from vqvae2_jax.registry import (  # pylint: disable=unused-import
    CLASSIFIER, EVALUATE, EXTRACT, SAMPLE, VQVAE, prior_level, prior_stage)

CONFIG_JSON, CONFIG_TXT, CHECKPOINTS = "config.json", "config.txt", "checkpoints"
CLASSES_JSON = "classes.json"


class ConfigConflictError(ValueError):
  """An explicit override contradicts a model field the workdir recorded."""


class StageMissingError(FileNotFoundError):
  """A stage this use needs has not been run (or trained) in this workdir."""


def model_fields(stage: str) -> tuple[str, ...]:
  """Dotted config sections / keys that define the model a training stage trains.

  Training-only sub-sections (`train`) are not part of the record's identity: batch sizes,
  steps and learning rates may differ freely between runs on one workdir.
  """
  if stage == VQVAE:
    return ("vqvae", "data.image_size")
  if stage == CLASSIFIER:
    return ("classifier",)
  if prior_level(stage) is not None:
    return (f"priors.{prior_level(stage)}",)
  return ()


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
  """{'a.b': 1, ...} of a nested dict (tuples and lists compared as lists)."""
  if isinstance(value, dict):
    out = {}
    for k, v in value.items():
      out.update(_flatten(v, f"{prefix}.{k}"))
    return out
  if isinstance(value, tuple):
    value = list(value)
  return {prefix: value}


def _is_training_key(key: str) -> bool:
  return ".train." in key + "."


class Workdir:
  """Paths, records and checkpoints of one experiment directory.

  Nothing else in the package joins path strings for stage folders, checkpoint folders,
  manifests or recorded configs. `path` may be a local folder or a bucket URL
  (`gs://bucket/run`): every file goes through `vqvae2_jax.storage`.
  """

  def __init__(self, path: str):
    self.path = str(path)

  def __repr__(self) -> str:
    return f"Workdir({self.path!r})"

  # ---------------------------------------------------------------- layout
  def stage_dir(self, stage: str) -> str:
    """<workdir>/<stage>: everything a stage writes."""
    return storage.join(self.path, stage)

  def checkpoint_dir(self, stage: str) -> str:
    """<workdir>/<stage>/checkpoints: the orbax steps of a training stage."""
    return storage.join(self.stage_dir(stage), CHECKPOINTS)

  def path_in(self, stage: str, *names: str) -> str:
    """A file or folder inside a stage's folder."""
    return storage.join(self.stage_dir(stage), *names)

  @property
  def extract_dir(self) -> str:
    return self.stage_dir(EXTRACT)

  def checkpoint_steps(self, stage: str) -> list[int]:
    """Saved steps of a training stage, ascending (empty when none)."""
    d = self.checkpoint_dir(stage)
    steps = sorted(int(s) for s in storage.listdir(d) if s.isdigit())
    if storage.is_remote(d):
      # A bucket has no rename: orbax writes a step under its final name and marks it
      # finished last (commit_success.txt); a step without the mark was interrupted.
      steps = [s for s in steps if ocp.path.step.is_path_finalized(storage.join(d, str(s)))]
    return steps

  def has_checkpoint(self, stage: str) -> bool:
    """Whether the stage has saved at least one step."""
    return bool(self.checkpoint_steps(stage))

  def latest_step(self, stage: str) -> int:
    """The newest saved step; StageMissingError naming the stage to run otherwise."""
    steps = self.checkpoint_steps(stage)
    if not steps:
      raise StageMissingError(
          f"no {stage} checkpoint in {self.checkpoint_dir(stage)}: run the {stage} stage "
          f"with --workdir={self.path} first")
    return steps[-1]

  def has_manifest(self) -> bool:
    return storage.exists(storage.join(self.extract_dir, MANIFEST))

  def manifest(self) -> dict:
    """The extraction manifest (levels, shapes, num_codes, classes, stage-1 step)."""
    path = storage.join(self.extract_dir, MANIFEST)
    if not storage.exists(path):
      raise StageMissingError(
          f"no extracted codes in {self.extract_dir} (missing {MANIFEST}): run the extract "
          f"stage with --workdir={self.path} first")
    return json.loads(storage.read_text(path))

  # ---------------------------------------------------------------- records
  def write_config(self, stage: str, config: ml_collections.ConfigDict) -> None:
    """Records the resolved config of a stage (JSON, the record, and readable text)."""
    if jax.process_index() != 0:
      return
    d = self.stage_dir(stage)
    storage.makedirs(d)
    storage.write_text(storage.join(d, CONFIG_JSON), config.to_json_best_effort(indent=2))
    storage.write_text(storage.join(d, CONFIG_TXT), str(config))

  def recorded_config(self, stage: str) -> dict | None:
    """The config a stage recorded (plain dict), or None when it has not run."""
    path = storage.join(self.stage_dir(stage), CONFIG_JSON)
    if not storage.exists(path):
      return None
    try:
      return json.loads(storage.read_text(path))
    except (OSError, json.JSONDecodeError) as e:
      raise ConfigConflictError(
          f"{path} is unreadable ({e}); it records the model of the {stage} stage. Restore "
          "it, or train that stage again in a new --workdir") from e

  def recorded_section(self, stage: str, dotted: str) -> Any:
    """A recorded config value (`dotted` like 'priors.top'), or None when absent."""
    value = self.recorded_config(stage)
    for key in dotted.split("."):
      if not isinstance(value, dict) or key not in value:
        return None
      value = value[key]
    return value

  def write_classes(self, stage: str, class_names: list[str]) -> None:
    """Records the classes a classifier stage was trained on (classes.json)."""
    if jax.process_index() != 0:
      return
    storage.makedirs(self.stage_dir(stage))
    storage.write_text(self.path_in(stage, CLASSES_JSON), json.dumps(
        {"num_classes": len(class_names), "class_names": list(class_names)}))

  def recorded_classes(self, stage: str) -> dict:
    """{'num_classes', 'class_names'} recorded by a classifier stage."""
    path = self.path_in(stage, CLASSES_JSON)
    if not storage.exists(path):
      raise StageMissingError(f"no trained {stage} in {self.stage_dir(stage)} (missing "
                              f"{CLASSES_JSON}): run the {stage} stage first")
    return json.loads(storage.read_text(path))

  def inference_params_key(self, stage: str) -> str:
    """'ema_params' when the stage kept a parameter EMA (what inference uses), else
    'params'. Decided from the recorded training config."""
    decay = None
    if stage == VQVAE:
      decay = self.recorded_section(stage, "vqvae_train.param_ema_decay")
    elif stage == CLASSIFIER:
      decay = self.recorded_section(stage, "classifier.train.param_ema_decay")
    elif prior_level(stage) is not None:
      decay = self.recorded_section(stage, f"priors.{prior_level(stage)}.train.param_ema_decay")
    return "ema_params" if decay and decay > 0 else "params"

  def resolve_recorded(self, config: ml_collections.ConfigDict,
                       explicit: Iterable[str] = (),
                       stages: Iterable[str] | None = None) -> ml_collections.ConfigDict:
    """`config` with every recorded model field of the workdir's trained stages.

    Args:
      config: the stage's config (from its own command line).
      explicit: dotted keys the user set explicitly (`--config.a.b=...`); such a key that
        contradicts a recorded model field raises ConfigConflictError naming the field and
        both values. Other differences (defaults, presets) quietly take the record.
      stages: stages whose records apply (default: every training stage with a record).

    Returns:
      A new, locked config; training sub-sections keep the command line's values.
    """
    explicit = set(explicit)
    stages = list(stages) if stages is not None else (
        [VQVAE, CLASSIFIER] + [prior_stage(l) for l in config_lib.prior_levels(config)])
    resolved = config.copy_and_resolve_references()
    for stage in stages:
      # Only a trained model binds: a record without a checkpoint is a run that never
      # saved, and may be restarted with other shapes.
      if not self.has_checkpoint(stage) or self.recorded_config(stage) is None:
        continue
      for section in model_fields(stage):
        recorded = self.recorded_section(stage, section)
        if recorded is None:
          continue
        current = config_lib.get_field(config, section)
        current = current.to_dict() if hasattr(current, "to_dict") else current
        flat_rec, flat_cur = _flatten(recorded, section), _flatten(current, section)
        for key in flat_cur.keys() - flat_rec.keys():
          legacy = key.rsplit(".", 1)[-1]
          if legacy in config_lib.LEGACY_RECORD_VALUES:
            flat_rec[key] = config_lib.LEGACY_RECORD_VALUES[legacy]
        for key, rec_value in flat_rec.items():
          if _is_training_key(key) or key not in flat_cur:
            continue
          if flat_cur[key] != rec_value:
            if key in explicit:
              raise ConfigConflictError(
                  f"--config.{key}={flat_cur[key]!r} contradicts the {stage} model recorded "
                  f"in {self.stage_dir(stage)}/{CONFIG_JSON} ({key}={rec_value!r}). Drop "
                  "the override (later stages read the recorded model), or train into a "
                  "new --workdir")
            _set_field(resolved, key, rec_value)
    resolved.lock()
    return resolved


def _set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """config.a.b = value for dotted 'a.b' (tuples restored from JSON lists)."""
  *parents, last = dotted.split(".")
  node = config
  for key in parents:
    node = node[key]
  if isinstance(node[last], tuple) and isinstance(value, list):
    value = tuple(value)
  node[last] = value  # an existing key: allowed on a locked ConfigDict
