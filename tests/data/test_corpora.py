"""TFDS corpus builders: contents, splits, caching and counted bad input."""
import json
import os
import subprocess

import pytest

from kat_jax.data import chat
from kat_jax.data import corpora
from kat_jax.data.corpora import common
from kat_jax.data.corpora import git_commits
from kat_jax.data.corpora import jsonl
from kat_jax.data.corpora import source_code


def _all(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _decode(example):
  return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in example.items()}


# ----------------------------------------------------------------------------------- source code


@pytest.fixture()
def code_tree(tmp_path):
  root = tmp_path / "tree"
  (root / "pkg" / "sub").mkdir(parents=True)
  (root / "tests").mkdir()
  files = {f"pkg/m{i}.py": f"def f{i}(x):\n    return x + {i}\n" for i in range(30)}
  files["pkg/sub/copy.py"] = files["pkg/m3.py"]                # exact duplicate
  files["pkg/sub/util.c"] = "int main(void) { return 0; }\n"   # other extension, filtered
  files["tests/test_x.py"] = "assert True\n"                   # excluded directory
  for rel, text in files.items():
    (root / rel).write_text(text, encoding="utf-8")
  (root / "pkg" / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))   # undecodable
  (root / "pkg" / "big.py").write_text("x = 1\n" * 1000)                          # oversized
  return str(root), files


def test_source_code_corpus_contents_and_bad_input(code_tree, tmp_path):
  root, files = code_tree
  config = source_code.source_code_config(root, max_file_bytes=2000, eval_fraction=0.3)
  builder = corpora.prepare(source_code.SourceCode, config, str(tmp_path / "tfds"))
  examples = {split: [_decode(e) for e in _all(builder, split)] for split in common.SPLITS}
  paths = {split: {e["path"] for e in rows} for split, rows in examples.items()}
  expected = {rel for rel in files if rel.startswith("pkg/") and rel.endswith(".py")}
  expected.discard("pkg/sub/copy.py")  # the later path of the duplicate pair
  assert paths["train"] | paths["eval"] == expected
  assert not paths["train"] & paths["eval"] and paths["eval"]
  for split, rows in examples.items():
    for e in rows:
      assert e["content"] == files[e["path"]] and e["language"] == "python"
      assert common.split_of(e["path"], 0.3) == split
  stats = common.builder_stats(builder)
  assert stats["skipped"] == {"duplicate": 1, "oversized": 1, "undecodable": 1}
  assert stats["kept"] == {"train": len(paths["train"]), "eval": len(paths["eval"])}
  assert any(p.startswith(os.path.join(root, "pkg", "latin1.py") + ": undecodable")
             for p in stats["problems"])
  assert any("big.py: oversized: 6000 bytes > max_file_bytes=2000" in p for p in stats["problems"])


def test_source_code_build_is_cached(code_tree, tmp_path, monkeypatch):
  root, _ = code_tree
  config = source_code.source_code_config(root)
  data_dir = str(tmp_path / "tfds")
  first = _all(corpora.prepare(source_code.SourceCode, config, data_dir), "train")
  monkeypatch.setattr(source_code.SourceCode, "_split_generators",
                      lambda *a: pytest.fail("rebuilt a prepared corpus"))
  again = corpora.prepare(source_code.SourceCode, source_code.source_code_config(root), data_dir)
  assert _all(again, "train") == first
  assert common.builder_stats(again)["skipped"]["undecodable"] == 1  # stats survive the reload


def test_document_text_header():
  assert source_code.document_text("asyncio/tasks.py", "python", "x = 1\n") == (
      "# path: asyncio/tasks.py\n# language: python\nx = 1\n")
  assert source_code.header_text("a/b.rs", "rust") == "// path: a/b.rs\n// language: rust\n"


def test_bad_source_config_errors(tmp_path):
  with pytest.raises(ValueError, match="is not a directory"):
    source_code.source_code_config(str(tmp_path / "missing"))
  with pytest.raises(ValueError, match="unknown source extensions"):
    source_code.source_code_config(str(tmp_path), extensions=(".zz",))


def test_stdlib_is_the_default_root():
  config = source_code.source_code_config()
  assert config.root == os.path.abspath(source_code.stdlib_root())
  assert "asyncio/tasks.py" in source_code.list_source_files(config.root, (".py",),
                                                             config.exclude_dirs)


# ------------------------------------------------------------------------------------------- git


def _git(repo, *args, env=None):
  base_env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
              "GIT_COMMITTER_EMAIL": "t@x", "HOME": str(repo), "PATH": os.environ["PATH"],
              "GIT_CONFIG_NOSYSTEM": "1",
              # Fixed dates make the shas, hence the sha-hashed train / eval split, deterministic.
              "GIT_AUTHOR_DATE": "2024-01-01T00:00:00Z", "GIT_COMMITTER_DATE": "2024-01-01T00:00:00Z"}
  return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True,
                        env={**base_env, **(env or {})}).stdout


@pytest.fixture()
def repo(tmp_path):
  repo = tmp_path / "repo"
  repo.mkdir()
  _git(repo, "init", "-q", "-b", "main")
  messages = {}
  for i in range(6):
    (repo / f"f{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", f"Add f{i}\n\nBody of commit {i}.")
    messages[_git(repo, "rev-parse", "HEAD").decode().strip()] = f"Add f{i}\n\nBody of commit {i}."
  (repo / "f0.py").write_text("def f0():\n    return 'zero'\n")
  _git(repo, "commit", "-q", "-am", "Fix f0")
  messages[_git(repo, "rev-parse", "HEAD").decode().strip()] = "Fix f0"
  _git(repo, "commit", "-q", "--allow-empty", "-m", "Empty")                   # empty diff
  (repo / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
  _git(repo, "add", ".")
  _git(repo, "commit", "-q", "-m", "Latin-1 file")                             # undecodable diff
  (repo / "big.txt").write_text("line\n" * 3000)
  _git(repo, "add", ".")
  _git(repo, "commit", "-q", "-m", "Big file")                                 # oversized diff
  _git(repo, "checkout", "-q", "-b", "side", "HEAD~1")
  (repo / "side.py").write_text("SIDE = 1\n")
  _git(repo, "add", ".")
  _git(repo, "commit", "-q", "-m", "Side branch")
  messages[_git(repo, "rev-parse", "HEAD").decode().strip()] = "Side branch"
  _git(repo, "checkout", "-q", "main")
  _git(repo, "merge", "-q", "--no-edit", "side")                               # merge: excluded
  return repo, messages


def test_git_commits_corpus(repo, tmp_path):
  repo, messages = repo
  config = git_commits.git_commits_config(str(repo), max_diff_bytes=5000, eval_fraction=0.3)
  builder = corpora.prepare(git_commits.GitCommits, config, str(tmp_path / "tfds"))
  rows = {split: [_decode(e) for e in _all(builder, split)] for split in common.SPLITS}
  assert all(rows[split] for split in common.SPLITS), {s: len(r) for s, r in rows.items()}
  by_sha = {e["sha"]: e for split in rows for e in rows[split]}
  assert set(by_sha) == set(messages)
  for split in rows:
    for e in rows[split]:
      assert common.split_of(e["sha"], 0.3) == split
  for sha, e in by_sha.items():
    assert e["message"] == messages[sha] and e["repo"] == "repo"
    show = _git(repo, "show", "--format=", "--no-color", sha).decode()
    assert e["diff"].strip() == show.strip()
  fix = next(e for e in by_sha.values() if e["message"] == "Fix f0")
  assert "-    return 0\n+    return 'zero'" in fix["diff"]
  stats = common.builder_stats(builder)
  assert stats["skipped"] == {"empty_diff": 1, "oversized": 1, "undecodable": 1}
  assert any("undecodable" in p and str(repo) in p for p in stats["problems"])


def test_git_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match="does not exist"):
    git_commits.git_commits_config(str(tmp_path / "nope"))
  (tmp_path / "plain").mkdir()
  with pytest.raises(ValueError, match="has no commit 'HEAD'"):
    git_commits.git_commits_config(str(tmp_path / "plain"))


# ----------------------------------------------------------------------------------------- JSONL


def _conversation(i, task_id=None):
  meta = {"task_id": task_id} if task_id is not None else {}
  return chat.Conversation((chat.Message("user", f"question {i}"),
                            chat.Message("assistant", f"answer {i}")), meta=meta).to_json()


def test_jsonl_corpus_reports_bad_lines_with_file_and_line(tmp_path):
  good = [_conversation(i) for i in range(12)] + [_conversation(100 + i, task_id="T") for i in range(4)]
  first = tmp_path / "a.jsonl"
  first.write_text("\n".join(good[:8] + ["{not json", "", "[1, 2]", good[0]]) + "\n")
  second = tmp_path / "b.jsonl"
  second.write_bytes(("\n".join(good[8:]) + "\n").encode() + b'{"messages": "\xff"}\n' +
                     json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode() + b"\n")
  config = jsonl.jsonl_config([str(tmp_path / "*.jsonl")], eval_fraction=0.3)
  builder = corpora.prepare(jsonl.JsonlConversations, config, str(tmp_path / "tfds"))
  rows = [_decode(e) for split in common.SPLITS for e in _all(builder, split)]
  assert sorted(r["conversation"] for r in rows) == sorted(good)
  for r in rows:  # the stored JSON is the line itself, and it round-trips through chat
    assert chat.Conversation.from_json(r["conversation"]).to_json() == r["conversation"]
  assert {r["source"] for r in rows if r["conversation"] == good[9]} == {f"{second}:2"}
  stats = common.builder_stats(builder)
  assert stats["skipped"] == {"blank_line": 1, "duplicate": 1, "invalid_json": 1,
                              "not_a_conversation": 2, "undecodable": 1}
  problems = "\n".join(stats["problems"])
  assert f"{first}:9: invalid_json: Expecting property name" in problems
  assert f"{first}:11: not_a_conversation: expected a JSON object" in problems
  assert f"{second}:9: undecodable" in problems
  assert f"{second}:10: not_a_conversation: ValueError: unknown role 'robot'" in problems
  # All trajectories of one task land in one split.
  eval_sources = {e["source"].decode() for e in _all(builder, "eval")}
  task_rows = [r for r in rows if json.loads(r["conversation"]).get("meta", {}).get("task_id")]
  assert len({r["source"] in eval_sources for r in task_rows}) == 1


def test_jsonl_missing_file_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="no JSONL file matches"):
    jsonl.jsonl_config([str(tmp_path / "none*.jsonl")])


def test_corpus_without_usable_examples_is_a_clear_error(tmp_path):
  root = tmp_path / "bad"
  root.mkdir()
  (root / "a.py").write_bytes(b"\xff\xfe\x00")
  with pytest.raises(ValueError, match="has no usable examples.*undecodable"):
    corpora.prepare(source_code.SourceCode, source_code.source_code_config(str(root)),
                    str(tmp_path / "tfds"))


# ------------------------------------------------------------------------------------ procedural


def test_procedural_corpus(tmp_path):
  from kat_jax.data import procedural as procedural_tasks
  from kat_jax.data.corpora import procedural
  config = procedural.procedural_config(num_train=60, num_eval=15, levels=(0, 1), seed=3)
  builder = corpora.prepare(procedural.ProceduralTasks, config, str(tmp_path / "tfds"))
  tasks = {split: [procedural_tasks.Task.from_json(e["task"].decode()) for e in _all(builder, split)]
           for split in common.SPLITS}
  assert len(tasks["train"]) == 60 and len(tasks["eval"]) == 15
  expected = {split: procedural_tasks.generate_tasks(3, n, split=generator_split, levels=(0, 1))
              for split, n, generator_split in (("train", 60, "train"), ("eval", 15, "heldout"))}
  for split in common.SPLITS:
    assert sorted(t.to_json() for t in tasks[split]) == sorted(t.to_json() for t in expected[split])
  pairs = {split: {(t.template, json.dumps(t.params)) for t in tasks[split]} for split in tasks}
  assert not pairs["train"] & pairs["eval"]
  assert common.builder_stats(builder)["kept"] == {"train": 60, "eval": 15}
