"""Corpora as TFDS builders (array_record files), served without TensorFlow and read with grain.

One builder per kind of data; each takes a config whose name fingerprints its parameters, so a
changed setting builds a new cache and an unchanged one is reused (``prepare`` is cheap when built):

* ``source_code``  files of a source tree (default: the Python standard library) — ``SourceCode``
* ``git_commits``  commits of a local git repository as request/diff pairs — ``GitCommits``
* ``jsonl``        conversations / trajectories, one JSON object per line — ``JsonlConversations``
* ``procedural``   generated tasks from ``kat_jax.data.procedural`` — ``ProceduralTasks``

``prepare(builder_cls, config, data_dir)`` builds if needed and returns the builder;
``builder.as_data_source(split)`` gives random access; ``common.builder_stats(builder)`` gives the
kept/skipped counts and problem reports.
"""
from __future__ import annotations

import contextlib
import os
import sys

import tensorflow_datasets as tfds

from kat_jax.data.corpora import common

DEFAULT_DATA_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kat_jax", "tfds")


def resolve_data_dir(data_dir: str = "") -> str:
  """``data_dir``, else ``$KAT_JAX_DATA_DIR``, else ``~/.cache/kat_jax/tfds``."""
  return data_dir or os.environ.get("KAT_JAX_DATA_DIR", "") or DEFAULT_DATA_DIR


def prepare(builder_cls, config: tfds.core.BuilderConfig, data_dir: str = ""
            ) -> tfds.core.DatasetBuilder:
  """Builds (once; cached under ``data_dir``) and returns the builder of ``config``."""
  tfds.display_progress_bar(False)
  builder = builder_cls(config=config, data_dir=resolve_data_dir(data_dir),
                        file_format="array_record")
  # TFDS prints its progress lines to stdout; keep stdout for the caller (benchmarks print JSON).
  with contextlib.redirect_stdout(sys.stderr):
    builder.download_and_prepare()
  return builder
