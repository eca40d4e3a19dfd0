"""Rewards by name with their terms, complexity, validation and running normalization."""
import json
import math

import numpy as np
import pytest
from radon.complexity import cc_visit
from radon.visitors import ComplexityVisitor

from kat_jax.data import procedural
from kat_jax.errors import ConfigError
from kat_jax.rl import codebleu as cb
from kat_jax.rl import complexity, rewards
from kat_jax.rl.envs.base import Grade

REFERENCE = "def largest(xs):\n    return max(xs)\n"                    # radon: 1
LOOPED = ("def largest(xs):\n    best = xs[0]\n    for x in xs:\n        if x > best:\n"
          "            best = x\n    return best\n")                 # radon: 1 + for + if = 3
TERMS = {"kat_composite": {"reward", "compile", "test", "complexity"},
         "pass_rate": {"reward", "test"}, "swe_resolved": {"reward", "resolved"},
         "math_exact": {"reward", "exact"},
         "codebleu": {"reward", "ngram", "weighted_ngram", "syntax", "dataflow"}}


def grade(passed=False, compiled=True, tests_passed=0, tests_total=4, prediction=REFERENCE,
          reference=REFERENCE):
  return Grade(passed=passed, compiled=compiled, tests_passed=tests_passed,
               tests_total=tests_total, prediction=prediction, reference=reference)


def score(g, **overrides):
  cfg = rewards.default_reward_config()
  for path, value in overrides.items():
    node = cfg
    *parents, leaf = path.split("__")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return rewards.score(g, cfg, task_id="t0")


# --- kat_composite --------------------------------------------------------------------------------

def test_radon_numbers_of_the_fixtures():
  assert [b.complexity for b in cc_visit(REFERENCE)] == [1]
  assert [b.complexity for b in cc_visit(LOOPED)] == [3]
  assert complexity.cyclomatic_complexity(REFERENCE) == 1
  assert complexity.cyclomatic_complexity(LOOPED) == 3


def test_composite_compile_only():
  assert score(grade(compiled=True, tests_passed=0)) == {
      "reward": pytest.approx(0.4), "compile": 1.0, "test": 0.0, "complexity": 0.0}


def test_composite_all_tests_equal_complexity_is_one():
  # A different program with the reference's complexity (1) gets the full complexity term.
  same = "def largest(xs):\n    return sorted(xs)[-1]\n"
  terms = score(grade(passed=True, tests_passed=4, prediction=same))
  assert terms == {"reward": pytest.approx(1.0), "compile": 1.0, "test": 1.0, "complexity": 1.0}


def test_composite_half_tests_gives_no_complexity_term():
  # Simpler than the reference, but a test fails: the complexity term is withheld.
  terms = score(grade(tests_passed=2, tests_total=4, prediction="def largest(xs):\n    return 0\n"))
  assert terms == {"reward": pytest.approx(0.4 + 0.25), "compile": 1.0, "test": 0.5,
                   "complexity": 0.0}


def test_composite_more_complex_than_reference_is_penalized():
  terms = score(grade(passed=True, tests_passed=4, prediction=LOOPED))
  assert terms["complexity"] == pytest.approx(1 / 3)               # C_ref / C_pred = 1 / 3
  assert terms["reward"] == pytest.approx(0.4 + 0.5 + 0.1 / 3)
  squared = score(grade(passed=True, tests_passed=4, prediction=LOOPED), complexity__power=2.0)
  assert squared["complexity"] == pytest.approx(1 / 9)
  # Simpler than the reference: capped at 1.
  assert score(grade(passed=True, tests_passed=4, prediction=REFERENCE,
                     reference=LOOPED))["complexity"] == 1.0


def test_composite_weights_come_from_config():
  g = grade(passed=True, tests_passed=4, prediction=LOOPED)
  terms = score(g, kat_composite__w_compile=0.0, kat_composite__w_test=2.0,
                kat_composite__w_complexity=3.0)
  assert terms["reward"] == pytest.approx(2.0 + 3.0 / 3)


def test_composite_complexity_counts_branches_hidden_in_closures():
  hidden = ("def largest(xs):\n    def pick(a, b):\n        if a > b:\n            return a\n"
            "        return b\n    best = xs[0]\n    for x in xs:\n"
            "        best = pick(x, best) or best\n    return best\n")
  # radon's total leaves the closure's `if` out (3); ours counts for + or + if: 1 + 3 = 4.
  assert ComplexityVisitor.from_code(hidden).total_complexity == 3
  assert complexity.cyclomatic_complexity(hidden) == 4
  assert score(grade(passed=True, tests_passed=4, prediction=hidden))["complexity"] == \
      pytest.approx(1 / 4)


def test_complexity_equals_radon_on_single_functions():
  checked = 0
  for task in procedural.generate_tasks(seed=3, num_tasks=12, split="train", levels=(0, 1, 2)):
    for code in [task.solution] + [m for _, m in procedural.mutants(task.solution,
                                                                   list(task.arg_names))][:4]:
      blocks = cc_visit(code)
      assert len(blocks) == 1 and not blocks[0].closures
      assert complexity.cyclomatic_complexity(code) == blocks[0].complexity
      assert complexity.cyclomatic_complexity(code) == \
          ComplexityVisitor.from_code(code).total_complexity
      checked += 1
  assert checked >= 40


def test_unparsable_prediction_has_zero_complexity():
  assert complexity.cyclomatic_complexity("def f(:\n") is None
  assert complexity.cyclomatic_complexity("(" * 5000 + ")" * 5000) is None
  assert complexity.complexity_score("def f(:\n", REFERENCE) == 0.0
  terms = score(grade(passed=True, tests_passed=4, prediction="def f(:\n"))
  assert terms["complexity"] == 0.0 and terms["reward"] == pytest.approx(0.9)


def test_composite_needs_a_reference_when_complexity_is_given():
  with pytest.raises(ValueError, match="reference solution is empty or does not parse"):
    score(grade(passed=True, tests_passed=4, reference=""))


# --- the other rewards ----------------------------------------------------------------------------

def test_pass_rate():
  assert score(grade(tests_passed=3, tests_total=4), name="pass_rate") == \
      {"reward": 0.75, "test": 0.75}
  assert score(grade(passed=True, tests_passed=0, tests_total=0), name="pass_rate") == \
      {"reward": 1.0, "test": 1.0}


@pytest.mark.parametrize("name,term", [("swe_resolved", "resolved"), ("math_exact", "exact")])
def test_binary_rewards(name, term):
  assert score(grade(passed=True, tests_passed=4), name=name) == {"reward": 1.0, term: 1.0}
  assert score(grade(passed=False, tests_passed=3), name=name) == {"reward": 0.0, term: 0.0}


def test_codebleu_reward_terms_and_weights():
  task = procedural.generate_tasks(seed=0, num_tasks=1, split="train", levels=(1,))[0]
  _, mutant = next(iter(procedural.mutants(task.solution, list(task.arg_names))))
  c = cb.components(mutant, task.solution)
  terms = score(grade(prediction=mutant, reference=task.solution), name="codebleu",
                codebleu__w_ngram=0.1, codebleu__w_weighted_ngram=0.2, codebleu__w_syntax=0.3,
                codebleu__w_dataflow=0.4)
  assert terms == {"reward": pytest.approx(0.1 * c.ngram + 0.2 * c.weighted_ngram
                                           + 0.3 * c.syntax + 0.4 * c.dataflow),
                   "ngram": c.ngram, "weighted_ngram": c.weighted_ngram, "syntax": c.syntax,
                   "dataflow": c.dataflow}
  assert 0 < terms["reward"] < 1
  same = score(grade(prediction=task.solution, reference=task.solution), name="codebleu")
  assert same["reward"] == pytest.approx(1.0)
  for bad in ("", "def f(:\n"):
    assert set(score(grade(prediction=bad), name="codebleu").values()) == {0.0}


@pytest.mark.parametrize("name", sorted(TERMS))
def test_never_submitted_scores_zero_on_every_term(name):
  terms = score(None, name=name)
  assert set(terms) == TERMS[name]
  assert set(terms.values()) == {0.0}


# --- registry, validation and config --------------------------------------------------------------

def test_builtin_rewards_are_registered():
  assert set(TERMS) <= set(rewards.names())


def test_unknown_reward_name_lists_the_registered_ones():
  with pytest.raises(ValueError,
                     match=r"unknown reward 'kat'.*'kat_composite'.*config\.rl\.reward"):
    rewards.get("kat")
  cfg = rewards.default_reward_config()
  cfg.name = "kat"
  with pytest.raises(ConfigError, match="unknown reward 'kat'"):
    rewards.validate_config(cfg)


def test_register_rejects_duplicates_and_score_rejects_nan_naming_the_task(monkeypatch):
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("pass_rate", rewards.pass_rate)
  monkeypatch.setitem(rewards._REWARDS, "broken", lambda g, cfg: {"reward": 1.0, "x": math.nan})
  cfg = rewards.default_reward_config()
  cfg.name = "broken"
  with pytest.raises(ValueError, match=r"'x' of task 'task-17' is nan"):
    rewards.score(grade(), cfg, task_id="task-17")


def test_validate_rewards_names_the_task():
  rewards.validate_rewards([0.0, 1.0, {"reward": 0.5, "test": 0.5}], ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"'reward' of task 'b' is nan"):
    rewards.validate_rewards(np.array([0.0, np.nan, 1.0]), ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"'test' of task 'c' is inf"):
    rewards.validate_rewards([0.0, 1.0, {"reward": 0.5, "test": math.inf}], ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"task 'a' is 'high'"):
    rewards.validate_rewards(["high"], ["a"])
  with pytest.raises(ValueError, match="2 rewards for 1 task ids"):
    rewards.validate_rewards([0.0, 1.0], ["a"])


def test_default_config_validates_for_every_reward():
  for name in TERMS:
    cfg = rewards.default_reward_config()
    cfg.name = name
    rewards.validate_config(cfg)


@pytest.mark.parametrize("path,value,match", [
    ("kat_composite__w_test", -0.5, r"config\.rl\.reward\.kat_composite\.w_test=-0\.5"),
    ("kat_composite__w_compile", math.inf, r"kat_composite\.w_compile=inf"),
    ("normalize__mode", "zscore", r"normalize\.mode='zscore' is unknown.*'welford'"),
    ("normalize__ema_decay", 1.0, r"normalize\.ema_decay=1\.0"),
])
def test_bad_config_names_the_field(path, value, match):
  cfg = rewards.default_reward_config()
  section, field = path.split("__")
  cfg[section][field] = value
  with pytest.raises(ConfigError, match=match):
    rewards.validate_config(cfg)


def test_bad_codebleu_weight_names_the_field():
  cfg = rewards.default_reward_config()
  cfg.name = "codebleu"
  cfg.codebleu.w_syntax = -1.0
  with pytest.raises(ConfigError, match=r"codebleu\.w_syntax=-1\.0"):
    rewards.validate_config(cfg)
  cfg = rewards.default_reward_config()
  cfg.name = "codebleu"
  cfg.codebleu.max_tree_work = 0
  with pytest.raises(ConfigError, match=r"codebleu\.max_tree_work=0 must be an int > 0"):
    rewards.validate_config(cfg)


# --- running normalization ------------------------------------------------------------------------

def _batches(seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(loc=rng.uniform(-1, 3), scale=rng.uniform(0.1, 2), size=rng.integers(1, 9))
          for _ in range(7)]


def test_welford_matches_numpy_over_all_rewards():
  norm = rewards.RewardNormalizer("welford", eps=1e-8, clip=0.0)
  seen = []
  for batch in _batches():
    out = norm(batch)
    seen.extend(batch)
    assert norm.mean == pytest.approx(np.mean(seen), rel=1e-12, abs=1e-12)
    assert norm.std == pytest.approx(np.std(seen), rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(out, (batch - np.mean(seen)) / np.sqrt(np.var(seen) + 1e-8),
                               rtol=1e-10, atol=1e-12)
  assert norm.stats.count == len(seen)


def test_ema_matches_numpy_weighted_moments():
  decay = 0.8
  norm = rewards.RewardNormalizer("ema", ema_decay=decay)
  batches = _batches(1)
  for k, batch in enumerate(batches):
    norm.update(batch)
    # Batch j's weight: decay ** (k - j) * (1 - decay), the first batch's (1 - decay) replaced by 1.
    weights = np.concatenate([
        np.full(len(b), decay ** (k - j) * (1.0 if j == 0 else 1 - decay) / len(b))
        for j, b in enumerate(batches[:k + 1])])
    values = np.concatenate(batches[:k + 1])
    mean = np.average(values, weights=weights)
    assert norm.mean == pytest.approx(mean, rel=1e-12, abs=1e-12)
    assert norm.std == pytest.approx(np.sqrt(np.average((values - mean) ** 2, weights=weights)),
                                     rel=1e-12)


@pytest.mark.parametrize("mode", ["welford", "ema"])
def test_state_round_trips_through_json(mode):
  batches = _batches(2)
  whole = rewards.RewardNormalizer(mode, ema_decay=0.9)
  first = rewards.RewardNormalizer(mode, ema_decay=0.9)
  for b in batches[:4]:
    whole(b)
    first(b)
  resumed = rewards.RewardNormalizer(mode, ema_decay=0.9)
  resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
  assert resumed.state_dict() == first.state_dict()
  for b in batches[4:]:
    np.testing.assert_array_equal(resumed(b), whole(b))
  assert resumed.state_dict() == whole.state_dict()


def test_state_mismatch_is_an_error():
  state = rewards.RewardNormalizer("welford").state_dict()
  with pytest.raises(ValueError, match="saved in mode 'welford'.*'ema'"):
    rewards.RewardNormalizer("ema").load_state_dict(state)
  with pytest.raises(ValueError, match="keys"):
    rewards.RewardNormalizer("welford").load_state_dict({"mode": "welford", "mean": 0.0})
  with pytest.raises(ValueError, match="invalid"):
    rewards.RewardNormalizer("welford").load_state_dict({**state, "var": -1.0})


def test_none_mode_passes_rewards_through_and_clip_bounds():
  np.testing.assert_array_equal(rewards.RewardNormalizer("none")([0.2, 5.0]), [0.2, 5.0])
  norm = rewards.RewardNormalizer("welford", clip=1.5)
  out = norm([0.0] * 9 + [1.0])   # the outlier is 3 std above the mean
  assert out.max() == 1.5 and out.min() == pytest.approx(-1 / 3)
  cfg = rewards.default_reward_config().normalize
  assert rewards.RewardNormalizer.from_config(cfg).mode == cfg.mode == "none"


def test_normalizer_rejects_non_finite_rewards_without_touching_its_state():
  norm = rewards.RewardNormalizer("welford")
  norm([1.0, 2.0])
  before = norm.state_dict()
  with pytest.raises(ValueError, match="at index 1 is not finite"):
    norm([0.5, math.nan])
  assert norm.state_dict() == before
  with pytest.raises(ValueError, match="before any update"):
    rewards.RewardNormalizer("ema").normalize([1.0])
