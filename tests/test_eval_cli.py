"""Evaluation scoring (kat_jax.eval.scoring) and the experiments.eval CLI: the scoring path gives
1.0 on known-correct completions and 0 on wrong ones
(HumanEval canonical solutions, procedural reference solutions, through the sandbox), and the CLI
end to end on a tiny checkpoint writes a pass@k table consistent with its per-sample verdicts."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kat_jax import workdir as workdir_lib
from kat_jax.data import procedural
from kat_jax.eval import humaneval, scoring
from kat_jax.eval.pass_at_k import pass_at_k
from kat_jax.sandbox import SandboxPool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_extract_code_and_humaneval_cut():
  assert scoring.extract_code("Here:\n```python\ndef f():\n  return 1\n```\nok") == \
      "def f():\n  return 1\n"
  assert scoring.extract_code("def f():\n  return 1\n<|im_end|>junk") == "def f():\n  return 1\n"
  assert scoring.extract_code("```\nx = 1\n") == "x = 1\n"       # unclosed fence
  body = "    return a + b\n"
  assert scoring.humaneval_completion(body + "\n\ndef other():\n  pass") == body + "\n"
  assert scoring.humaneval_completion(body + "<|endoftext|>\nprint(1)") == body
  assert scoring.humaneval_completion(body) == body


def test_find_tokenizer_dir(tmp_path):
  import ml_collections
  config = ml_collections.ConfigDict({"data": {"tokenizer_path": ""}})
  root = tmp_path / "tokenizer"
  with pytest.raises(FileNotFoundError, match="no tokenizer"):
    workdir_lib.find_tokenizer_dir(str(tmp_path), config)
  (root / "abc123").mkdir(parents=True)                  # mid-training's cache layout
  (root / "abc123" / "tokenizer.model").write_bytes(b"")
  assert workdir_lib.find_tokenizer_dir(str(tmp_path), config) == str(root / "abc123")
  (root / "tokenizer.model").write_bytes(b"")            # saved by the loop
  assert workdir_lib.find_tokenizer_dir(str(tmp_path), config) == str(root)


def _check_consistent(suite: dict, ks):
  """Table pass@k = mean over tasks of the unbiased estimator of that task's recorded verdicts."""
  assert suite["num_tasks"] == len(suite["tasks"])
  assert suite["num_samples"] == sum(len(t["samples"]) for t in suite["tasks"])
  for k in ks:
    per_task = []
    for task in suite["tasks"]:
      n, correct = len(task["samples"]), sum(s["passed"] for s in task["samples"])
      assert (task["n"], task["correct"]) == (n, correct)
      assert task[f"pass@{k}"] == pytest.approx(pass_at_k(n, correct, k))
      per_task.append(pass_at_k(n, correct, k))
    assert suite["pass_at_k"][f"pass@{k}"] == pytest.approx(np.mean(per_task))


def test_known_correct_completions_score_one_and_wrong_ones_zero():
  problems = humaneval.load_problems()
  ids = list(problems)[:3]
  tasks = procedural.generate_tasks(seed=0, num_tasks=4, split="heldout", levels=(0,))
  with SandboxPool(num_workers=2) as pool:
    right = scoring.score_humaneval({i: [problems[i].canonical_solution] * 2 for i in ids},
                                     (1, 2), pool, problems)
    mixed = scoring.score_humaneval(
        {i: [problems[i].canonical_solution, "    pass\n", "    return None\n"] for i in ids},
        (1, 2, 3), pool, problems)
    fenced = {t.task_id: [f"Sure:\n```python\n{t.solution}```\n<|im_end|>", t.solution]
              for t in tasks}
    proc_right = scoring.score_procedural(tasks, fenced, (1, 2), pool)
    proc_wrong = scoring.score_procedural(
        tasks, {t.task_id: [t.solution.replace("return", "return None and"),
                            "def unrelated():\n  return 0\n"] for t in tasks}, (1,), pool)
  assert right.pass_at_k == {"pass@1": 1.0, "pass@2": 1.0}
  assert proc_right.pass_at_k == {"pass@1": 1.0, "pass@2": 1.0}
  assert proc_wrong.pass_at_k == {"pass@1": 0.0}
  assert mixed.pass_at_k["pass@3"] == 1.0
  assert mixed.pass_at_k["pass@1"] == pytest.approx(1 / 3)
  assert mixed.pass_at_k["pass@2"] == pytest.approx(1 - 1 / 3)     # 1 - C(2,2)/C(3,2)
  for result, ks in ((right, (1, 2)), (mixed, (1, 2, 3)), (proc_right, (1, 2)),
                     (proc_wrong, (1,))):
    _check_consistent(json.loads(json.dumps(result.to_dict())), ks)
  record = proc_right.tasks[tasks[0].task_id][0]
  assert record.completion == tasks[0].solution and record.tests_passed == len(tasks[0].tests)


def _tiny_checkpoint(workdir: str, data_dir: str) -> list[str]:
  """Two steps of configs/synthetic_tiny.py, plus a small tokenizer saved beside the checkpoint
  (the synthetic stage trains none). Returns the config overrides used."""
  from configs import synthetic_tiny
  from kat_jax.data.tokenizer import SentencePieceTokenizer
  from kat_jax.train import loop
  overrides = dict(steps=2, checkpoint_every=2, seq_len=32, eval_every=0, warmup_steps=1,
                   progress_bar=False, log_every=1, async_checkpoint=False)
  c = synthetic_tiny.get_config()
  c.train.update(overrides)
  c.data.data_dir = data_dir
  loop.train(c, workdir)
  problems = humaneval.load_problems()
  texts = [p.prompt + p.canonical_solution for p in problems.values()]
  SentencePieceTokenizer.train(texts, vocab_size=400).save(os.path.join(workdir, "tokenizer"))
  return [f"--config.train.{k}={v}" for k, v in overrides.items()] + [
      f"--config.data.data_dir={data_dir}"]


@pytest.mark.slow
def test_eval_cli_end_to_end_on_a_tiny_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  overrides = _tiny_checkpoint(workdir, str(tmp_path / "data"))
  ks = (1, 2)
  cmd = [sys.executable, "-m", "experiments.eval", "--config=configs/synthetic_tiny.py",
         f"--workdir={workdir}", "--num_samples=2", "--ks=1,2", "--temperature=1.0",
         "--max_new_tokens=24", "--limit=2", "--batch_size=4", "--sandbox_workers=2",
         *overrides]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-4000:]
  path = os.path.join(workdir, "eval", "step_2.json")
  assert f"wrote {path}" in proc.stdout
  with open(path) as f:
    report = json.load(f)
  assert report["step"] == 2 and report["table"] in proc.stdout
  assert set(report["suites"]) == {"humaneval", "procedural"}
  for name, suite in report["suites"].items():
    assert suite["num_tasks"] == 2 and set(suite["pass_at_k"]) == {"pass@1", "pass@2"}
    _check_consistent(suite, ks)
    for task in suite["tasks"]:
      assert task["n"] == 2
      for sample in task["samples"]:
        assert 1 <= sample["num_tokens"] <= 24
        assert sample["finish_reason"] in ("stop_token", "stop_string", "length", "max_len")
        assert sample["status"] in ("completed", "load_error", "crashed", "timeout",
                                    "output_limit")
    line = [l for l in report["table"].splitlines() if l.startswith(name)][0]
    assert f"{suite['pass_at_k']['pass@1']:.4f}" in line
  he_ids = [t["task_id"] for t in report["suites"]["humaneval"]["tasks"]]
  assert he_ids == ["HumanEval/0", "HumanEval/1"]


class _LetterTokenizer:
  """Token i decodes to one letter (i mod 26): stop strings span several tokens."""

  def decode(self, ids):
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_eval_beam_decode_scores_the_top_beam_of_each_prompt():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from experiments import eval as eval_cli
  from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
  from kat_jax.sample import Sampler, SamplingConfig

  c = get_preset("tiny")
  c.update(vocab_size=16, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
           mlp_dim=64)
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 4), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 4), jnp.int32)))["params"]))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda a: jnp.asarray(2 * rng.normal(size=a.shape) * a.shape[0] ** -0.5
                                              if a.ndim > 1 else np.ones(a.shape), a.dtype),
                        abstract)
  sampler = Sampler(model, params, max_len=24, prefill_bucket=8, output_bucket=8)
  tok = _LetterTokenizer()
  prompts = [[1, 2, 3], [4], [5, 6, 7, 8, 9]]
  config = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=(0,))
  beams = sampler.beam_search(prompts, beam_width=3, max_new_tokens=6, stop_token_ids=(0,))
  # 4 rows per decode batch: one prompt of 3 beams per call.
  out = eval_cli.generate_completions(sampler, prompts, config, decode="beam", num_samples=1,
                                      rng=None, batch_size=4, tokenizer=tok, beam_width=3)
  assert out == [[(tok.decode(b), r[0], len(b))] for b, r in zip(beams.best(),
                                                                  beams.finish_reason)]
  # A stop string cuts the top beam after the token completing it, as the sampler would.
  best = beams.best()[2]
  stop = tok.decode(best[1:3])
  cut = eval_cli.generate_completions(
      sampler, prompts[2:], SamplingConfig(temperature=0.0, max_new_tokens=6,
                                           stop_token_ids=(0,), stop_strings=(stop,)),
      decode="beam", num_samples=1, rng=None, batch_size=16, tokenizer=tok, beam_width=3)
  k = min(j for j in range(1, len(best) + 1) if stop in tok.decode(best[:j]))
  assert cut == [[(tok.decode(best[:k]), "stop_string", k)]] and k <= 3
  # Beam decoding needs one completion per prompt and no sampling knobs.
  with pytest.raises(ValueError, match="needs --num_samples=1, not 2"):
    eval_cli.run_eval(None, "/nonexistent", decode="beam", num_samples=2, ks=(1,))
  with pytest.raises(ValueError, match="--temperature, --top_p"):
    eval_cli.run_eval(None, "/nonexistent", decode="beam", temperature=0.7)
  with pytest.raises(ValueError, match="--decode='greedy'"):
    eval_cli.run_eval(None, "/nonexistent", decode="greedy")
