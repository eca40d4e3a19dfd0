"""The model-backed generator interface (kat_jax.data.generator) and Evol-Instruct driven by it:
a SamplerGenerator equals the sampler's own batched sampling of the rendered prompts (chat or raw),
independently of the batch size and reproducibly from its seed; an imported Hugging Face checkpoint
generates what the same params generate natively; evolve runs on a real (random) model; the
execution filter keeps exactly the solutions that pass their tests in the sandbox, with lineage
and per-operation counts; the entry point writes the verified records, code files and corpus."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data import chat, evol_instruct, generator, procedural
from kat_jax.data.evol_instruct import EvolConfig
from kat_jax.eval.sampling import sample_completions
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.sample import Sampler
from kat_jax.sandbox import Limits, SandboxPool
from tests.data.byte_tokenizer import ByteTokenizer

LIMITS = Limits(wall_time_s=5.0, cpu_time_s=3, memory_bytes=256 << 20, max_processes=8,
                file_size_bytes=1 << 20, disk_bytes=4 << 20, disk_inodes=128, open_files=64,
                output_bytes=1 << 20, capture_bytes=4096)
TOK = ByteTokenizer()


def tiny_model(vocab_size, seed=0):
  c = get_preset("tiny")
  c.update(vocab_size=vocab_size, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
           head_dim=16, mlp_dim=64)
  cfg = ModelConfig.from_config(c)
  model = Transformer(cfg)
  t = jnp.zeros((1, 4), jnp.int32)
  params = nn.unbox(model.init(jax.random.key(seed), t, t, intervals_from_segment_ids(
      jnp.ones((1, 4), jnp.int32)))["params"])
  return cfg, model, params


@pytest.fixture(scope="module")
def sampler():
  _, model, params = tiny_model(TOK.vocab_size)
  return Sampler(model, params, max_len=640, prefill_bucket=128, output_bucket=16)


@pytest.fixture(scope="module")
def pool():
  with SandboxPool(num_workers=2, limits=LIMITS) as sandbox_pool:
    yield sandbox_pool


PROMPTS = ["Write f(x) that returns x plus 3.", "Sum a list.", "Reverse a string s."]


def test_sampler_generator_equals_batched_sampling(sampler):
  gen = generator.SamplerGenerator(sampler, TOK, temperature=1.0, max_new_tokens=10,
                                   batch_size=4, seed=7)
  out = gen.sample(PROMPTS, 2)
  encoded = [chat.render_prompt(generator.as_conversation(p), TOK).tokens.tolist()
             for p in PROMPTS]
  assert gen.encode(PROMPTS[0]) == encoded[0]
  ref = sample_completions(sampler, encoded, 2, gen.config, jax.random.fold_in(
      jax.random.key(7), 0), 4, TOK)
  assert out == [[generator.cut_at_end(text) for text, _, _ in row] for row in ref]
  assert all("<|im_end|>" not in t for row in out for t in row)
  # Batch size does not change the draws; the seed fixes them; the next call draws anew.
  other = generator.SamplerGenerator(sampler, TOK, temperature=1.0, max_new_tokens=10,
                                     batch_size=1, seed=7)
  assert other.sample(PROMPTS, 2) == out
  assert other.sample(PROMPTS, 2) != out
  assert gen.stats() == {"name": "sampler", "calls": 1, "prompts": 3, "samples": 6,
                         "overflowed": 0}
  # A conversation prompt renders as is; raw prompts continue plain text.
  conv = chat.Conversation((chat.Message("user", "a"), chat.Message("assistant", "b"),
                            chat.Message("user", "c")))
  assert gen.encode(conv) == chat.render_prompt(conv, TOK).tokens.tolist()
  raw = generator.SamplerGenerator(sampler, TOK, max_new_tokens=4, prompt_format="raw")
  assert raw.encode("def f(") == TOK.encode("def f(")
  with pytest.raises(TypeError, match="pass str prompts"):
    raw.encode(conv)
  with pytest.raises(ValueError, match="raise max_len"):
    gen.sample(["x" * 700])
  # overflow="empty": a prompt that does not fit gets "" and is counted; the others are as before.
  lenient = generator.SamplerGenerator(sampler, TOK, temperature=1.0, max_new_tokens=10,
                                       batch_size=4, seed=7, overflow="empty")
  assert lenient.sample([PROMPTS[0], "x" * 700, PROMPTS[1]], 2) == [out[0], ["", ""], out[1]]
  assert lenient.overflowed == 1
  with pytest.raises(ValueError, match="prompt_format='html'"):
    generator.SamplerGenerator(sampler, TOK, prompt_format="html")


def test_scripted_generator_and_its_contract():
  gen = generator.ScriptedGenerator(lambda p, j: f"{generator.prompt_text(p)}#{j}")
  assert gen.sample(["a", "b"], 2) == [["a#0", "a#1"], ["b#0", "b#1"]]
  assert gen(["c"]) == ["c#0"] and gen.calls == 2 and gen.samples_drawn == 5
  bad = generator.ScriptedGenerator(lambda p, j: "x")
  bad._sample = lambda prompts, n: [["x"]]
  with pytest.raises(ValueError, match="must return exactly"):
    bad.sample(["a", "b"])


def test_hf_import_generates_what_the_params_generate(tmp_path):
  pytest.importorskip("safetensors", reason="extra 'hf' not installed")
  from kat_jax.data.hf_tokenizer import HFTokenizer
  from kat_jax.model import hf
  tok = HFTokenizer.train(["def add(a, b):\n    return a + b\n"] * 20, vocab_size=300,
                          tokenizer_config={"eos_token": "<|im_end|>"})
  cfg, model, params = tiny_model(320, seed=3)
  path = str(tmp_path / "hf")
  hf.export_hf(params, cfg, path)
  tok.save(path)
  imported = generator.from_hf(path, max_len=256, temperature=0.0, max_new_tokens=8)
  native = generator.SamplerGenerator(Sampler(model, params, max_len=256), tok, temperature=0.0,
                                      max_new_tokens=8)
  assert imported.name == f"hf:{path}"
  prompts = ["def add(a, b):", "return a"]
  assert imported.encode(prompts[0]) == native.encode(prompts[0])
  assert imported.sample(prompts, 1) == native.sample(prompts, 1)


def test_evolve_runs_on_a_sampler_generator(sampler):
  gen = generator.SamplerGenerator(sampler, TOK, temperature=1.0, max_new_tokens=12,
                                   batch_size=4, seed=0)
  seeds = ["Write f(x) that returns x plus 3.", "Sum the even numbers of a list."]
  records, stats = evol_instruct.evolve(seeds, gen, np.random.default_rng(0),
                                        EvolConfig(rounds=2, min_new_ngram_fraction=0.0))
  assert stats.generate_calls == gen.calls and stats.prompts == gen.prompts_seen >= 2
  assert sum(stats.proposed_per_operation.values()) == stats.prompts - sum(
      stats.accepted_per_round) - sum(v for k, v in stats.rejected.items()
                                      if k.startswith("solution_"))
  assert sum(stats.accepted_per_operation.values()) == len(records) == sum(
      stats.accepted_per_round)


CLAUSES = (" Also handle negative numbers without any special case.",
           " Also keep it a single expression with no loops or branches.")


def _scripted_evolver():
  """Rewrites append a clause; solutions are right unless the instruction says 'buggy'; tests
  are asserts of the instruction's expected behaviour."""

  def respond(prompt, j):
    del j
    if prompt.startswith("Please increase the difficulty"):
      question = prompt.split("#Given Question#:\n", 1)[1].split("\n\n#Rewritten", 1)[0]
      return question + CLAUSES[question.count(" Also ")]
    if prompt.startswith("Write 3 to 5 assert"):
      if "notests" in prompt:
        return "Sorry, no tests."
      return "```python\nassert add3(1) == 4\nassert add3(-3) == 0\nprint('hi')\n```"
    if "buggy" in prompt:
      return "```python\ndef add3(x):\n    return x + 2\n```"
    if "noname" in prompt:
      return "```python\nadd3 = lambda x: x + 3\n```"
    return "```python\ndef add3(x):\n    return x + 3\n```"

  return generator.ScriptedGenerator(respond, name="scripted:evol")


SEEDS = [{"id": "ok", "instruction": "Write add3(x) returning x plus 3.",
          "tests": ["assert add3(0) == 3"]},
         {"id": "bad", "instruction": "Write a buggy add3(x) returning x plus 3.",
          "tests": ["assert add3(0) == 3"]},
         {"id": "nt", "instruction": "Write add3(x), notests, returning x plus 3.", "tests": []},
         {"id": "nn", "instruction": "Write add3 noname returning x plus 3.",
          "tests": ["assert add3(0) == 3"]}]


def test_verify_keeps_exactly_the_passing_solutions(pool):
  gen = _scripted_evolver()
  records, stats = evol_instruct.evolve(SEEDS, gen, np.random.default_rng(0),
                                        EvolConfig(rounds=2, near_duplicate_jaccard=1.0))
  assert len(records) == 8 and stats.accepted_per_round == [4, 4]
  for mode, want in (("generated", {"ok"}), ("given", {"ok"}), ("both", {"ok"})):
    kept, report = evol_instruct.verify(records, gen, pool, tests=mode, seeds=SEEDS)
    assert {v.lineage[0] for v in kept} == want, mode
    assert len(kept) == report["verified"] == 2
    for v in kept:
      assert v.lineage[1:] == tuple(r.id for r in records if r.id in v.lineage)
      assert v.lineage[-1] == v.record.id and v.tests_source == mode
    # 'bad' fails its tests, 'nt' has none (no asserts generated, none given), 'nn' defines no
    # function the tests could call.
    assert report["rejected"] == {"no_tests": 2, "tests_failed": 2, "no_function": 2}
    generated = ("assert add3(1) == 4", "assert add3(-3) == 0")
    assert kept[0].tests == {"generated": generated, "given": ("assert add3(0) == 3",),
                             "both": generated + ("assert add3(0) == 3",)}[mode]
    assert sum(v["evolved"] for v in report["per_operation"].values()) == 8
    assert sum(v["verified"] for v in report["per_operation"].values()) == 2
  with pytest.raises(ValueError, match="tests='unit'"):
    evol_instruct.verify(records, gen, pool, tests="unit")


def test_entry_point_writes_verified_records_code_files_and_corpus(pool, tmp_path):
  from experiments import evolve_instructions
  from kat_jax.data.corpora import jsonl
  seeds = evolve_instructions.procedural_seeds(seed=0, num_seeds=2)
  task = procedural.generate_tasks(seed=0, num_tasks=2, split="train", levels=(0,))[0]
  assert seeds[0]["instruction"] == task.spec and seeds[0]["tests"] == [
      line for line in task.assert_source().splitlines()]

  def respond(prompt, j):
    del j
    if prompt.startswith("Please increase the difficulty"):
      question = prompt.split("#Given Question#:\n", 1)[1].split("\n\n#Rewritten", 1)[0]
      return question + " Keep the same function name and arguments."
    spec = next(s for s in seeds if s["instruction"] in prompt)
    return "```python\n" + spec["solution"] + "```"

  summary = evolve_instructions.run(seeds, generator.ScriptedGenerator(respond), pool,
                                    out_dir=str(tmp_path / "out"), rounds=1, tests="given",
                                    data_dir=str(tmp_path / "tfds"), seed=0, eval_fraction=0.0)
  assert summary["verified"] == 2 and summary["evolved"] == 2
  with open(summary["verified_path"]) as f:
    lines = [json.loads(line) for line in f]
  assert [l["lineage"][0] for l in lines] == [s["id"] for s in seeds]
  files = sorted(os.listdir(os.path.join(str(tmp_path / "out"), "code_files")))
  assert files == sorted(f"{l['id']}.py" for l in lines)
  text = open(os.path.join(str(tmp_path / "out"), "code_files", files[0])).read()
  assert text.startswith(f"# path: evol/{files[0]}\n# language: python\n")
  assert summary["fim_examples"] > 0 and summary["corpus"] == {"train": 2}
  assert set(summary["per_operation"]) <= set(evol_instruct.EVOL_METHODS)
  builder_cfg = jsonl.jsonl_config([summary["verified_path"]], name_prefix="evol",
                                   eval_fraction=0.0)
  assert builder_cfg.paths == (os.path.abspath(summary["verified_path"]),)
