"""A source-code tree as a TFDS corpus (array_record), default: the installed Python standard library.

Each example is one file: ``{"path": relative path, "language": name, "content": file text,
"sha256": content hash}``. Files are read as UTF-8; undecodable files, files over ``max_file_bytes``
and exact duplicates (same content hash; the lexicographically first path is kept) are skipped and
counted (``common.builder_stats``). The ``eval`` split holds the files whose path hashes below
``eval_fraction``. Readers put the path/language header in front of the content with
``document_text``, so that FIM and other transforms can treat header and body separately::

  builder = SourceCode(config=source_code_config(root), data_dir=tmp)
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")      # random access, no TensorFlow needed
"""
from __future__ import annotations

import dataclasses
import os
import sysconfig
from typing import Optional, Sequence

import tensorflow_datasets as tfds

from kat_jax.data.corpora import common

# File extension -> (language name, line-comment prefix for the header).
LANGUAGES = {
    ".py": ("python", "#"), ".pyi": ("python", "#"), ".sh": ("shell", "#"), ".bash": ("shell", "#"),
    ".rb": ("ruby", "#"), ".pl": ("perl", "#"), ".r": ("r", "#"), ".yaml": ("yaml", "#"),
    ".yml": ("yaml", "#"), ".toml": ("toml", "#"), ".cfg": ("ini", "#"), ".mk": ("makefile", "#"),
    ".c": ("c", "//"), ".h": ("c", "//"), ".cc": ("cpp", "//"), ".cpp": ("cpp", "//"),
    ".hpp": ("cpp", "//"), ".cu": ("cuda", "//"), ".java": ("java", "//"), ".js": ("javascript", "//"),
    ".ts": ("typescript", "//"), ".tsx": ("typescript", "//"), ".go": ("go", "//"),
    ".rs": ("rust", "//"), ".kt": ("kotlin", "//"), ".swift": ("swift", "//"), ".scala": ("scala", "//"),
    ".cs": ("csharp", "//"), ".php": ("php", "//"), ".sql": ("sql", "--"), ".lua": ("lua", "--"),
    ".hs": ("haskell", "--"),
}
DEFAULT_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__", ".git", "test", "tests",
                        "idle_test")


def stdlib_root() -> str:
  """Directory of the running interpreter's standard library sources."""
  return sysconfig.get_paths()["stdlib"]


def language_of(path: str) -> Optional[str]:
  entry = LANGUAGES.get(os.path.splitext(path)[1].lower())
  return entry[0] if entry else None


def header_text(path: str, language: str) -> str:
  """``"# path: asyncio/tasks.py\\n# language: python\\n"`` (comment syntax of the language)."""
  prefix = "#"
  for language_name, comment in LANGUAGES.values():
    if language_name == language:
      prefix = comment
      break
  return f"{prefix} path: {path}\n{prefix} language: {language}\n"


def document_text(path: str, language: str, content: str) -> str:
  """The training text of one file: path/language header, then the file."""
  return header_text(path, language) + content


@dataclasses.dataclass
class SourceCodeConfig(common.KatBuilderConfig):
  root: str = ""
  extensions: tuple = (".py",)
  exclude_dirs: tuple = DEFAULT_EXCLUDE_DIRS
  max_file_bytes: int = 1_000_000


def source_code_config(root: str = "", *, extensions: Sequence[str] = (".py",),
                       exclude_dirs: Sequence[str] = DEFAULT_EXCLUDE_DIRS,
                       max_file_bytes: int = 1_000_000, eval_fraction: float = 0.05
                       ) -> SourceCodeConfig:
  """A config named by a fingerprint of its parameters (each setting gets its own cache)."""
  root = os.path.abspath(root or stdlib_root())
  if not os.path.isdir(root):
    raise ValueError(f"source-code corpus root {root!r} is not a directory; set data.code.root to a "
                     "checkout (empty means the Python standard library).")
  extensions = tuple(sorted(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions))
  unknown = [e for e in extensions if e not in LANGUAGES]
  if unknown:
    raise ValueError(f"unknown source extensions {unknown}; known: {sorted(LANGUAGES)}")
  fields = dict(root=root, extensions=extensions, exclude_dirs=tuple(sorted(exclude_dirs)),
                max_file_bytes=int(max_file_bytes), eval_fraction=float(eval_fraction))
  name = f"{os.path.basename(root.rstrip(os.sep)) or 'root'}_{common.config_fingerprint(fields)}"
  name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
  return SourceCodeConfig(name=name, **fields)


def list_source_files(root: str, extensions: Sequence[str], exclude_dirs: Sequence[str]) -> list[str]:
  """Relative paths (``/``-separated, sorted) of files under ``root`` with one of ``extensions``."""
  excluded = set(exclude_dirs)
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in excluded)
    for filename in files:
      if os.path.splitext(filename)[1].lower() in extensions:
        rel = os.path.relpath(os.path.join(directory, filename), root)
        found.append(rel.replace(os.sep, "/"))
  return sorted(found)


class SourceCode(tfds.core.GeneratorBasedBuilder):
  """Files of a source tree; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Source files of a local tree with path/language metadata, exact-deduplicated.",
        features=tfds.features.FeaturesDict({
            "path": tfds.features.Text(), "language": tfds.features.Text(),
            "content": tfds.features.Text(), "sha256": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    report = common.BuildReport()
    examples = {split: [] for split in common.SPLITS}
    seen_hashes = {}
    for rel in list_source_files(config.root, config.extensions, config.exclude_dirs):
      full = os.path.join(config.root, rel)
      try:
        size = os.path.getsize(full)
        if size > config.max_file_bytes:
          report.skip("oversized", full, f"{size} bytes > max_file_bytes={config.max_file_bytes}")
          continue
        with open(full, "rb") as f:
          data = f.read()
      except OSError as e:
        report.skip("unreadable", full, str(e))
        continue
      try:
        content = data.decode("utf-8")
      except UnicodeDecodeError as e:
        report.skip("undecodable", full, str(e))
        continue
      digest = common.content_hash(data)
      if digest in seen_hashes:
        report.skip("duplicate", full, f"same content as {seen_hashes[digest]}", warn=False)
        continue
      seen_hashes[digest] = rel
      split = common.split_of(rel, config.eval_fraction)
      report.keep(split)
      examples[split].append(rel)
    report.write_to(self.info.metadata)
    return common.nonempty_splits(
        {split: self._generate_split(paths) for split, paths in examples.items()},
        report, f"source tree {config.root!r} (extensions {list(config.extensions)})")

  def _generate_split(self, rel_paths):
    config = self.builder_config
    for rel in rel_paths:
      with open(os.path.join(config.root, rel), "rb") as f:
        data = f.read()
      yield rel, {"path": rel, "language": language_of(rel), "content": data.decode("utf-8"),
                  "sha256": common.content_hash(data)}

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
