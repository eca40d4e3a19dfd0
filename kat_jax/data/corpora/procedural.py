"""Procedural function-writing tasks (``kat_jax.data.procedural``) as a TFDS corpus.

The tasks are generated deterministically from ``seed``; each example stores the task's JSON
(``Task.to_json``: spec, reference solution, tests) and its id, template, family and level, so the
pipeline renders them (``procedural.generate.task_to_conversation``) and the RL / eval code can
rebuild the ``Task``. Our ``train`` split holds the generator's ``train`` tasks and ``eval`` its
``heldout`` tasks, which share no (template, params) pair with training tasks::

  builder = corpora.prepare(ProceduralTasks, procedural_config(num_train=2000), data_dir)
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from kat_jax.data.corpora import common

# Our split name -> the generator's split name.
GENERATOR_SPLITS = {"train": "train", "eval": "heldout"}


@dataclasses.dataclass
class ProceduralConfig(common.KatBuilderConfig):
  families: tuple = ()          # empty = all families
  levels: tuple = (0,)
  num_train: int = 20_000
  num_eval: int = 500
  seed: int = 0
  heldout_fraction: float = 0.1


def procedural_config(*, families: Sequence[str] = (), levels: Sequence[int] = (0,),
                      num_train: int = 20_000, num_eval: int = 500, seed: int = 0,
                      heldout_fraction: float = 0.1) -> ProceduralConfig:
  fields = dict(families=tuple(sorted(families)), levels=tuple(sorted(int(v) for v in levels)),
                num_train=int(num_train), num_eval=int(num_eval), seed=int(seed),
                heldout_fraction=float(heldout_fraction))
  return ProceduralConfig(name=f"procedural_{common.config_fingerprint(fields)}", **fields)


class ProceduralTasks(tfds.core.GeneratorBasedBuilder):
  """Generated tasks; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Procedural function-writing tasks with reference solutions and unit tests.",
        features=tfds.features.FeaturesDict({
            "task": tfds.features.Text(), "task_id": tfds.features.Text(),
            "template": tfds.features.Text(), "family": tfds.features.Text(), "level": np.int32,
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    from kat_jax.data.procedural import generate  # pylint: disable=g-import-not-at-top
    config = self.builder_config
    report = common.BuildReport()
    tasks = {}
    for split, count in (("train", config.num_train), ("eval", config.num_eval)):
      if count <= 0:
        tasks[split] = []
        continue
      tasks[split] = generate.generate_tasks(
          config.seed, count, split=GENERATOR_SPLITS[split], levels=config.levels,
          families=list(config.families) or None, heldout_fraction=config.heldout_fraction)
      for _ in tasks[split]:
        report.keep(split)
    report.write_to(self.info.metadata)
    return common.nonempty_splits(
        {split: ((t.task_id, {"task": t.to_json(), "task_id": t.task_id, "template": t.template,
                              "family": t.family, "level": t.level}) for t in rows)
         for split, rows in tasks.items()},
        report, f"procedural tasks (families {list(config.families) or 'all'})")

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
