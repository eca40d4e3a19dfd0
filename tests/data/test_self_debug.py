"""Self-debugging synthesis (kat_jax.data.self_debug): the pipeline keeps exactly the samples the
sandbox fails and exactly the refinements it passes, records the sandbox's real error output,
counts every stage, labels mutants as a second source, runs with the KV-cache sampler as the
programmer on a fixed seed, and its records round-trip through JSONL, the TFDS corpus and the
SFT conversations of both formats."""
import json
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data import chat, corpora, procedural, self_debug
from kat_jax.data.corpora import self_debug as self_debug_corpus
from kat_jax.data.generator import SamplerGenerator, ScriptedGenerator
from kat_jax.eval.scoring import extract_code, procedural_job
from kat_jax.sandbox import Limits, SandboxPool
from tests.data.byte_tokenizer import ByteTokenizer

LIMITS = Limits(wall_time_s=5.0, cpu_time_s=3, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=16 << 10)
N = 6


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


@pytest.fixture(scope="module")
def tasks():
  found = procedural.generate_tasks(seed=3, num_tasks=6, split="train", levels=(0,))
  return [t for t in found if len(procedural.buggy_variants(t, max_variants=2)) == 2][:3]


def programmer(tasks, seed=0):
  """Per (task, sample), from a seeded draw: the reference, a mutant (twice as likely: repeats
  exercise the dedupe), a program that does not parse, or one defining the wrong function."""
  by_spec = {t.spec: (i, t) for i, t in enumerate(tasks)}

  def respond(prompt, j):
    i, task = by_spec[prompt]
    kind = int(np.random.default_rng([seed, i, j]).integers(5))
    if kind == 0:
      return f"Here you go:\n```python\n{task.solution}```"
    if kind in (1, 2):
      return procedural.buggy_variants(task, max_variants=2)[kind - 1].code
    if kind == 3:
      return f"```python\ndef {task.entry_point}(:\n    pass\n```"
    return "def unrelated():\n    return 0\n"

  return ScriptedGenerator(respond, name="scripted:programmer")


def coin_refiner(tasks):
  """The reference for about half the prompts (by a hash of the prompt), else the code back."""
  right, wrong = self_debug.reference_refiner(tasks), self_debug.copy_refiner()

  def respond(prompt, j):
    chosen = right if zlib.crc32(f"{prompt}/{j}".encode()) % 2 else wrong
    return chosen.respond(prompt, j)

  return ScriptedGenerator(respond, name="scripted:coin")


def config(**overrides):
  c = self_debug.default_self_debug_config()
  c.update({**dict(samples_per_task=N, max_failing_per_task=0, mutants_per_task=2,
                   refinements_per_explanation=2), **overrides})
  return c


def verdict(pool, task, code):
  return pool.run(procedural_job(task, code))


@pytest.fixture(scope="module")
def synthesized(tasks, pool):
  cfg = config()
  result = self_debug.synthesize(tasks, programmer(tasks), pool, cfg,
                                 explainer=self_debug.oracle_explainer(tasks),
                                 refiner=coin_refiner(tasks))
  return cfg, result


def test_keeps_exactly_the_failing_samples_and_the_passing_refinements(tasks, pool, synthesized):
  cfg, result = synthesized
  gen = programmer(tasks)
  samples = gen.sample([t.spec for t in tasks], N)
  expected_failing, failing_count = [], 0
  for t, task in enumerate(tasks):
    seen = set()
    for j, text in enumerate(samples[t]):
      code = extract_code(text)
      if verdict(pool, task, code).passed:
        continue
      failing_count += 1
      if code.strip() not in seen:
        seen.add(code.strip())
        expected_failing.append((task.task_id, "model", j, code))
  mutants = [(task.task_id, "mutant", k, v.code) for task in tasks
             for k, v in enumerate(procedural.buggy_variants(task, max_variants=2))]
  assert all(not verdict(pool, task, v.code).passed for task in tasks
             for v in procedural.buggy_variants(task, max_variants=2))
  kept = [(tasks[b.task_index].task_id, b.source, b.index, b.code) for b in result.failing]
  assert kept == expected_failing + mutants
  assert 0 < failing_count < len(tasks) * N          # some samples passed, some failed
  # One record per (failing program, explanation, refinement); passed = the sandbox's verdict.
  assert len(result.records) == len(kept) * cfg.refinements_per_explanation
  by_task = {t.task_id: t for t in tasks}
  outcomes = [verdict(pool, by_task[r.task_id], r.refinement).passed for r in result.records]
  assert [r.passed for r in result.records] == outcomes
  assert 0 < sum(outcomes) < len(outcomes)
  for r in result.records:
    assert r.refinement == extract_code(r.refinement_text)
    assert (r.refinement_error == "") == r.passed
  counts = result.counts
  model, mutant = counts["by_source"]["model"], counts["by_source"]["mutant"]
  assert (model["sampled"], model["failing"], model["kept"]) == (
      len(tasks) * N, failing_count, len(expected_failing))
  assert model["duplicates"] == failing_count - len(expected_failing)
  assert (mutant["sampled"], mutant["failing"], mutant["kept"]) == (len(mutants),) * 3
  assert counts["explained"] == len(kept) and counts["refined"] == len(result.records)
  assert counts["passing"] == sum(outcomes)
  assert counts["sampled"] == model["sampled"] + mutant["sampled"]
  assert counts["generators"]["refiner"]["calls"] == 1        # one batched call per stage


def test_records_hold_the_real_error_output(tasks, pool, synthesized):
  _, result = synthesized
  by_task = {t.task_id: t for t in tasks}
  kinds = set()
  for b in result.failing:
    task = by_task[tasks[b.task_index].task_id]
    raw = verdict(pool, task, b.code)
    failed = [o for o in raw.tests if not o.passed]
    if raw.load_error_type is not None:
      kinds.add("load")
      assert f"{raw.load_error_type}: {raw.load_error}" in b.verdict.error
    else:
      kinds.add("tests")
      first = failed[0]
      assert f"{first.error_type}: {first.error}" in b.verdict.error
      call = task.tests[int(first.name.split("_")[1])].call_source(task.entry_point)
      assert f"FAILED {first.name}: {call}" in b.verdict.error
    assert b.verdict.pass_rate == raw.num_passed / len(raw.tests)
  assert kinds == {"load", "tests"}
  for r in result.records:
    index = r.lineage["sample_index" if r.source == "model" else "mutant_index"]
    source = next(b for b in result.failing if (tasks[b.task_index].task_id, b.source, b.index)
                  == (r.task_id, r.source, index))
    assert r.buggy_code == source.code
    assert r.error == source.verdict.error and r.source == source.source
    assert r.lineage["source"] == r.source and r.lineage["explainer"] == "scripted:oracle"
    if r.source == "mutant":
      assert r.lineage["mutation"] and "mutant_index" in r.lineage
    else:
      assert "sample_index" in r.lineage
    assert r.explanation == self_debug.oracle_explanation(r.buggy_code, r.reference, r.error)


def test_prompts_round_trip_and_the_oracle_explanation(tasks):
  task = tasks[0]
  for mode in ("explain", "refine_only", "explain_refine"):
    text = self_debug.debug_prompt(task.spec, task.solution, "1 of 3 tests failed.", mode)
    assert self_debug.parse_debug_prompt(text) == (task.spec, task.solution,
                                                   "1 of 3 tests failed.", None, mode)
  text = self_debug.debug_prompt(task.spec, "x = 1\n", "boom", "refine_with_explanation",
                                 explanation="Line 1 is wrong.")
  assert self_debug.parse_debug_prompt(text) == (task.spec, "x = 1\n", "boom", "Line 1 is wrong.",
                                                 "refine_with_explanation")
  with pytest.raises(ValueError, match="needs an explanation"):
    self_debug.debug_prompt(task.spec, "x\n", "e", "refine_with_explanation")
  code = "def f(x):\n    return x + 4\n"
  explanation = self_debug.oracle_explanation(
      code, "def f(x):\n    return x + 3\n",
      "1 of 3 visible tests failed.\nFAILED test_0: f(1)\n  expected: 4\n"
      "  AssertionError: f(...) returned 5, expected 4")
  assert explanation == ("Line 2 `return x + 4` is wrong: it should be `return x + 3`. Because "
                         "of it, f(1) fails with AssertionError: f(...) returned 5, expected 4.")
  assert self_debug.split_answer("Because.\n\n```python\nx = 1\n```") == ("Because.", "x = 1\n")
  assert self_debug.split_answer("x = 1\n") == ("", "x = 1\n")


def test_round_trip_through_jsonl_tfds_and_sft(tmp_path, synthesized):
  _, result = synthesized
  path = self_debug.write_records(result.records, str(tmp_path / "records.jsonl"))
  assert self_debug.read_records(path) == result.records
  builder = corpora.prepare(self_debug_corpus.SelfDebugRecords,
                            self_debug_corpus.self_debug_config([path], eval_fraction=0.3),
                            str(tmp_path / "tfds"))
  back = [r for split in builder.info.splits
          for r in self_debug_corpus.read_records(builder, split)]
  assert sorted(back, key=lambda r: r.record_id) == sorted(result.records,
                                                           key=lambda r: r.record_id)
  for fmt in self_debug.SFT_FORMATS:
    out = self_debug.write_sft_jsonl(result.records, fmt, str(tmp_path / f"sft_{fmt}.jsonl"))
    with open(out) as f:
      convs = [chat.Conversation.from_json(line) for line in f]
    passing = [r for r in result.records if r.passed]
    assert len(convs) == len(passing)
    for conv, record in zip(convs, passing):
      user, answer = conv.messages[0].content, conv.messages[1].content
      assert self_debug.parse_debug_prompt(user) == (record.prompt, record.buggy_code,
                                                     record.error.strip(), None, fmt)
      explanation, code = self_debug.split_answer(answer)
      assert code == record.refinement
      assert explanation == (record.explanation if fmt == "explain_refine" else "")
      assert conv.meta["source"] == f"self_debug/{record.source}"
  with pytest.raises(ValueError, match="did not pass"):
    self_debug.sft_conversation(next(r for r in result.records if not r.passed), "refine_only")


def _tiny_sampler(tok):
  from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
  from kat_jax.sample import Sampler
  c = get_preset("tiny")
  c.update(vocab_size=tok.vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
           head_dim=16, mlp_dim=64)
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(0), t, t, intervals_from_segment_ids(
      jnp.ones((1, 4), jnp.int32)))["params"])
  return Sampler(model, params, max_len=256, prefill_bucket=64, output_bucket=16)


def test_sampler_programmer_on_a_fixed_seed(tasks, pool):
  tok = ByteTokenizer()
  sampler = _tiny_sampler(tok)
  cfg = config(samples_per_task=3, sources="model", refinements_per_explanation=1,
               max_failing_per_task=2)
  runs = []
  for _ in range(2):
    gen = SamplerGenerator(sampler, tok, temperature=1.0, max_new_tokens=12, batch_size=4, seed=5)
    runs.append(self_debug.synthesize(tasks[:2], gen, pool, cfg,
                                      explainer=self_debug.oracle_explainer(tasks),
                                      refiner=self_debug.reference_refiner(tasks)))
  first, second = runs
  assert first.records == second.records and first.counts["by_source"] == \
      second.counts["by_source"]
  texts = SamplerGenerator(sampler, tok, temperature=1.0, max_new_tokens=12, batch_size=4,
                           seed=5).sample([t.spec for t in tasks[:2]], 3)
  want = []
  for t, task in enumerate(tasks[:2]):
    seen = []
    for j, text in enumerate(texts[t]):
      code = extract_code(text)
      if not verdict(pool, task, code).passed and code.strip() not in seen and len(seen) < 2:
        seen.append(code.strip())
        want.append((task.task_id, j, code))
  assert len(want) >= 2
  assert [(tasks[b.task_index].task_id, b.index, b.code) for b in first.failing] == want
  assert first.counts["sampled"] == 6 and all(r.passed for r in first.records)
  assert json.loads(json.dumps(first.counts))["passing"] == len(first.records) == len(want)


@pytest.mark.parametrize("fmt", self_debug.SFT_FORMATS)
def test_sft_stage_trains_on_the_fixes_of_either_format(tmp_path, synthesized, fmt):
  from configs import sft_tiny_debug
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import special_tokens, tokenizer as tokenizer_lib
  from kat_jax.train import stages
  _, result = synthesized
  path = self_debug.write_sft_jsonl(result.records, fmt, str(tmp_path / f"sft_{fmt}.jsonl"))
  convs = [chat.Conversation.from_json(line) for line in open(path)]
  tokenizer = tokenizer_lib.SentencePieceTokenizer.train(
      [chat.render_text(c) for c in convs] * 4, vocab_size=400, max_sentences=4000)
  init = str(tmp_path / "midtrain")
  tokenizer.save(workdir_lib.tokenizer_dir(init))
  c = sft_tiny_debug.get_config(fmt)
  assert c.data.trajectories.paths.endswith(f"sft_{fmt}.jsonl")
  c.init_from, c.data.data_dir = init, str(tmp_path / "tfds")
  c.data.trajectories.paths, c.data.eval_fraction, c.train.seq_len = path, 0.0, 1024
  it, tok = stages.get_stage("sft").make_data(c, str(tmp_path / "run"), split="train",
                                              batch_size=2, seed=0, shard_index=0, shard_count=1)
  answers = {chat.render_assistant_body(conv.messages[1]) + special_tokens.IM_END
             for conv in convs}
  batch = next(it)
  weighted = []          # each run of trained targets: one assistant turn
  for targets, weights in zip(batch["targets"], batch["weights"]):
    edges = np.flatnonzero(np.diff(np.concatenate([[0], weights > 0, [0]]).astype(int)))
    weighted += [tok.decode(targets[a:b].tolist()) for a, b in zip(edges[::2], edges[1::2])]
  assert weighted and all(w in answers for w in weighted)
  if fmt == "refine_only":
    assert all(w.startswith("```python\n") for w in weighted)
  else:
    assert all(not w.startswith("```") and "\n\n```python\n" in w for w in weighted)
  it.close()
  with pytest.raises(ValueError, match="the format is one of"):
    sft_tiny_debug.get_config("explain")


def test_entry_point_writes_records_sft_files_and_corpora(tasks, pool, tmp_path):
  from experiments import make_self_debug_data
  cfg = config(samples_per_task=2, refinements_per_explanation=1, refiner="scripted:reference",
               num_tasks=2, seed=3)
  assert [t.task_id for t in make_self_debug_data.tasks_of(cfg)] == [
      t.task_id for t in procedural.generate_tasks(seed=3, num_tasks=2, split="train")]
  report = make_self_debug_data.run(tasks, programmer(tasks), pool, cfg,
                                    out_dir=str(tmp_path / "out"),
                                    data_dir=str(tmp_path / "tfds"))
  records = self_debug.read_records(report["paths"]["records"])
  counts = report["counts"]
  assert counts["refined"] == len(records) == counts["passing"] > 0    # the reference passes
  assert sum(report["corpora"]["records"].values()) == len(records)
  for fmt in self_debug.SFT_FORMATS:
    assert sum(report["corpora"][fmt].values()) == len(records)
    with open(report["paths"][fmt]) as f:
      assert len(f.readlines()) == len(records)
  assert {r.lineage["refiner"] for r in records} == {"scripted:reference"}
  with open(tmp_path / "out" / "report.json") as f:
    assert json.load(f)["counts"] == json.loads(json.dumps(counts))
  with pytest.raises(ValueError, match="refiner='same' needs a programmer"):
    self_debug.synthesize(tasks, None, pool, config(sources="mutant"))
  with pytest.raises(ValueError, match="refiner='gpt'"):
    self_debug.synthesize(tasks, None, pool, config(sources="mutant", refiner="gpt"))
