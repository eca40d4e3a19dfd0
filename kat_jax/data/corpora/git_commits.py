"""The commit history of a local git repository as a TFDS corpus of PR-like examples.

Each non-merge commit reachable from ``revision`` becomes ``{"sha", "parents", "timestamp",
"message", "diff", "repo"}``: the commit message is the request, the unified diff the answer
(the pipeline renders it as a user/assistant conversation). Only the ``git`` executable is needed;
the history is read with one streaming ``git log -p``. Commits whose diff is empty, larger than
``max_diff_bytes`` or not UTF-8, and exact duplicate diffs (cherry-picks), are skipped and counted
(``common.builder_stats``). The ``eval`` split holds the commits whose sha hashes below
``eval_fraction``::

  builder = corpora.prepare(GitCommits, git_commits_config("/path/to/repo"), data_dir)
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from kat_jax.data.corpora import common

# Begins each commit's header in the log output; the header fields are NUL-separated.
_MARKER = b"\x1e\x1fkat-commit\x1f"
_FORMAT = "%x1e%x1fkat-commit%x1f%H%x00%P%x00%at%x00%B%x00"


def _git(repo: str, *args: str) -> list[str]:
  return ["git", "-C", repo, "-c", "safe.directory=*", "-c", "core.quotepath=off",
          "-c", "color.ui=never", *args]


def resolve_revision(repo: str, revision: str = "HEAD") -> str:
  """The commit sha ``revision`` names in ``repo``; a clear error if either is wrong."""
  if not os.path.isdir(repo):
    raise ValueError(f"git repository {repo!r} does not exist; set data.commits.repo to a local clone")
  try:
    result = subprocess.run(_git(repo, "rev-parse", "--verify", f"{revision}^{{commit}}"),
                            capture_output=True, check=True, text=True)
  except FileNotFoundError as e:
    raise RuntimeError("the git executable was not found on PATH; install git to read commits") from e
  except subprocess.CalledProcessError as e:
    raise ValueError(f"{repo!r} has no commit {revision!r} (is it a git repository?): "
                     f"{e.stderr.strip()}") from e
  return result.stdout.strip()


@dataclasses.dataclass
class GitCommitsConfig(common.KatBuilderConfig):
  repo: str = ""
  head_sha: str = ""          # the resolved revision: a new commit on the branch means a new cache
  max_commits: int = 20_000
  max_diff_bytes: int = 200_000


def git_commits_config(repo: str, *, revision: str = "HEAD", max_commits: int = 20_000,
                       max_diff_bytes: int = 200_000, eval_fraction: float = 0.05
                       ) -> GitCommitsConfig:
  repo = os.path.abspath(repo)
  head_sha = resolve_revision(repo, revision)
  fields = dict(repo=repo, head_sha=head_sha, max_commits=int(max_commits),
                max_diff_bytes=int(max_diff_bytes), eval_fraction=float(eval_fraction))
  name = f"{os.path.basename(repo.rstrip(os.sep)) or 'repo'}_{common.config_fingerprint(fields)}"
  name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
  return GitCommitsConfig(name=name, **fields)


@dataclasses.dataclass
class RawCommit:
  sha: str
  parents: str
  timestamp: int
  message: bytes
  diff: bytes


def iter_commits(repo: str, head_sha: str, max_commits: int) -> Iterator[RawCommit]:
  """Non-merge commits reachable from ``head_sha``, newest first, with their diffs (raw bytes)."""
  command = _git(repo, "log", "--no-merges", "-p", "--no-color", "--no-ext-diff", "--no-textconv",
                 f"--format={_FORMAT}", f"--max-count={int(max_commits)}", head_sha)
  process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  buffer = b""

  def parse(block: bytes) -> Optional[RawCommit]:
    fields = block.split(b"\x00", 4)
    if len(fields) < 5:
      return None
    sha, parents, timestamp, message, diff = fields
    return RawCommit(sha.decode("ascii"), parents.decode("ascii"), int(timestamp or 0),
                     message.strip(b"\n"), diff.lstrip(b"\n"))

  try:
    assert process.stdout is not None
    for chunk in iter(lambda: process.stdout.read(1 << 20), b""):
      buffer += chunk
      parts = buffer.split(_MARKER)
      buffer = parts.pop()
      for part in parts:
        if part:
          commit = parse(part)
          if commit is not None:
            yield commit
    if buffer:
      commit = parse(buffer)
      if commit is not None:
        yield commit
  finally:
    process.stdout.close()
    stderr = process.stderr.read().decode("utf-8", "replace")
    process.stderr.close()
    if process.wait() != 0:
      raise RuntimeError(f"git log failed in {repo!r}: {stderr.strip()}")


class GitCommits(tfds.core.GeneratorBasedBuilder):
  """Commits of a local repository; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Non-merge commits of a local git repository: message (request) and diff.",
        features=tfds.features.FeaturesDict({
            "sha": tfds.features.Text(), "parents": tfds.features.Text(),
            "timestamp": np.int64, "message": tfds.features.Text(),
            "diff": tfds.features.Text(), "repo": tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict())

  def _split_generators(self, dl_manager):
    del dl_manager
    config = self.builder_config
    report = common.BuildReport()
    examples = {split: [] for split in common.SPLITS}
    seen_diffs = {}
    repo_name = os.path.basename(config.repo.rstrip(os.sep))
    for commit in iter_commits(config.repo, config.head_sha, config.max_commits):
      where = f"{config.repo}@{commit.sha[:12]}"
      if not commit.diff.strip():
        report.skip("empty_diff", where, warn=False)
        continue
      if len(commit.diff) > config.max_diff_bytes:
        report.skip("oversized", where,
                    f"diff of {len(commit.diff)} bytes > max_diff_bytes={config.max_diff_bytes}")
        continue
      try:
        message = commit.message.decode("utf-8")
        diff = commit.diff.decode("utf-8")
      except UnicodeDecodeError as e:
        report.skip("undecodable", where, str(e))
        continue
      digest = common.content_hash(commit.diff)
      if digest in seen_diffs:
        report.skip("duplicate", where, f"same diff as {seen_diffs[digest][:12]}", warn=False)
        continue
      seen_diffs[digest] = commit.sha
      split = common.split_of(commit.sha, config.eval_fraction)
      report.keep(split)
      examples[split].append({"sha": commit.sha, "parents": commit.parents,
                              "timestamp": commit.timestamp, "message": message, "diff": diff,
                              "repo": repo_name})
    report.write_to(self.info.metadata)
    return common.nonempty_splits(
        {split: ((e["sha"], e) for e in rows) for split, rows in examples.items()},
        report, f"git repository {config.repo!r} at {config.head_sha[:12]}")

  def _generate_examples(self):  # required by the base class; splits come from _split_generators
    raise NotImplementedError
