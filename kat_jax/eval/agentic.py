"""Held-out agentic evaluation of a checkpoint: greedy episodes in the real environments, plus
HumanEval pass@1 — the per-stage evaluation of a training chain (``kat_jax.train.chain``)::

    cfg = agentic.default_agentic_eval_config()         # suites on/off, tasks, turns, tokens
    with agentic.AgenticEvaluator(cfg) as evaluator:
      report = evaluator.evaluate(model, params, tokenizer)
    report["code"]["pass_rate"], report["code"]["tool_call_share"], report["repo"]["resolve_rate"],
    report["humaneval"]["pass_at_1"]
    agentic.evaluate_workdir(config, workdir, cfg)       # the latest checkpoint of a workdir

Suites (``SUITES``, each on or off by its config flag):

* ``code``: ``cfg.code_tasks`` held-out procedural function tasks (``data.procedural``'s
  ``heldout`` split: no (template, params) pair of them is in any training split) in the
  multi-turn ``code`` environment with its default config (system prompt, run_tests / submit
  tools — the layout of the SFT teacher trajectories): pass rate (hidden tests), mean assistant
  turns, the share of sampled turns that parse as valid tool calls (``classify_turns``; and of
  those whose arguments also fit the tool's schema), submissions and statuses.
* ``code_single``: ``cfg.code_single_tasks`` held-out procedural function tasks in the
  single-turn ``code_single`` environment laid out as mid-training's procedural data and the RL
  stage of configs/rl_tiny.py (no system turn, no listed tests): one answer of at most
  ``cfg.code_single_max_new_tokens`` tokens, graded on the hidden tests — the task the tiny
  chain's mid-training and RL train, so the stage chart shows what they add.
* ``repo``: ``cfg.repo_tasks`` held-out procedural repositories (``repos.make_repo_task``,
  ``heldout`` split) in the ``repo`` environment: resolve rate (FAIL_TO_PASS and PASS_TO_PASS
  all pass), mean turns, tool-call shares, submissions.
* ``humaneval``: the first ``cfg.humaneval_tasks`` HumanEval problems (0 = all 164) as plain
  code completions, greedy, cut at the HumanEval stop strings, graded in the sandbox
  (``eval.scoring.score_humaneval``, as ``experiments.eval`` does): pass@1.

Every episode is one row of ``rl.rollout.rollout`` (token-in / token-out, the sampler's KV cache
kept across turns) at temperature 0 with ``cfg.max_turns`` turns of ``cfg.max_new_tokens``
tokens and observations cut to ``cfg.max_observation_tokens``; the task lists depend only on
``cfg`` (seed, levels, heldout fraction), so every checkpoint evaluated with one config sees the
same tasks. The evaluator keeps its ``Sampler`` and only swaps the params between checkpoints of
one model (same shapes: nothing recompiles), and its sandbox pool until ``close``.
"""
from __future__ import annotations

import collections
import time
from typing import Any, Callable, Optional, Sequence

import ml_collections

from kat_jax.data.config import split_list
from kat_jax.errors import ConfigError

CONFIG_PATH = "config.chain.eval"   # where the section lives in a chain config (error messages)
SUITES = ("code", "code_single", "repo", "humaneval")
OBSERVATION_SLACK = 16   # cache slots per turn beyond its tokens and observation (turn markers)


def default_agentic_eval_config() -> ml_collections.ConfigDict:
  """Every knob of the held-out evaluation (``config.chain.eval`` of a chain)."""
  c = ml_collections.ConfigDict()
  c.code = True                    # held-out procedural function tasks in the 'code' env
  c.code_single = True             # held-out procedural function tasks, one answer, no tools
  c.repo = True                    # held-out procedural repositories in the 'repo' env
  c.humaneval = True               # HumanEval pass@1 (greedy completions)
  c.code_tasks = 8                 # episodes of the code suite
  c.code_single_tasks = 16         # episodes of the code_single suite
  c.code_single_max_new_tokens = 96   # tokens of one code_single answer
  c.repo_tasks = 4                 # episodes of the repo suite
  c.humaneval_tasks = 8            # the first N HumanEval problems (0 = all 164)
  c.max_turns = 3                  # assistant turns per episode (code, repo)
  c.max_new_tokens = 160           # tokens sampled per turn (code, repo)
  c.max_observation_tokens = 256   # a longer tool result is cut in the middle
  c.humaneval_max_new_tokens = 128   # tokens of one HumanEval completion
  c.code_levels = "0"              # procedural difficulty levels of the code tasks
  c.repo_level = 1                 # level (1 or 2) of the functions in the repositories
  c.heldout_fraction = 0.1         # of the procedural (template, params) pairs, as in training
  c.seed = 0                       # task draws
  c.sandbox_workers = 2            # sandbox processes grading the episodes
  c.env_threads = 2                # environments stepped at once
  return c


def validate_config(cfg: ml_collections.ConfigDict, path: str = CONFIG_PATH) -> None:
  """ConfigError naming the field of a section that cannot drive the evaluation."""
  defaults = default_agentic_eval_config()
  unknown = sorted(set(cfg.keys()) - set(defaults.keys()))
  if unknown:
    raise ConfigError(f"{path} has unknown fields {unknown}: its fields are "
                      f"{sorted(defaults.keys())}")
  for field in defaults.keys():
    if field not in cfg:
      raise ConfigError(f"{path}.{field} is missing: start from "
                        "agentic.default_agentic_eval_config()")
  for field, low in (("code_tasks", 1), ("code_single_tasks", 1),
                     ("code_single_max_new_tokens", 1), ("repo_tasks", 1), ("humaneval_tasks", 0),
                     ("max_turns", 1), ("max_new_tokens", 1), ("max_observation_tokens", 0),
                     ("humaneval_max_new_tokens", 1), ("sandbox_workers", 1),
                     ("env_threads", 1)):
    if cfg[field] < low:
      raise ConfigError(f"{path}.{field}={cfg[field]} must be >= {low}")
  if cfg.repo_level not in (1, 2):
    raise ConfigError(f"{path}.repo_level={cfg.repo_level}: use 1 or 2")
  if not 0.0 < cfg.heldout_fraction < 1.0:
    raise ConfigError(f"{path}.heldout_fraction={cfg.heldout_fraction} must be in (0, 1)")
  try:
    levels = [int(v) for v in split_list(cfg.code_levels)]
  except ValueError:
    levels = []
  if not levels:
    raise ConfigError(f"{path}.code_levels={cfg.code_levels!r}: give comma-separated integer "
                      "levels, e.g. '0' or '0,1'")


def enabled_suites(cfg: ml_collections.ConfigDict) -> list[str]:
  """The suites switched on, in ``SUITES`` order."""
  return [s for s in SUITES if cfg[s]]


# -- tasks ------------------------------------------------------------------------------------

def heldout_code_tasks(cfg: ml_collections.ConfigDict, num_tasks: Optional[int] = None) -> list:
  """The code suite's tasks: ``cfg.code_tasks`` (or ``num_tasks``) distinct held-out procedural
  tasks; a shorter list is a prefix of a longer one."""
  from kat_jax.data import procedural
  num_tasks = int(cfg.code_tasks if num_tasks is None else num_tasks)
  return procedural.generate_tasks(seed=int(cfg.seed), num_tasks=num_tasks,
                                   split="heldout",
                                   levels=tuple(int(v) for v in split_list(cfg.code_levels)),
                                   heldout_fraction=float(cfg.heldout_fraction))


# Repository seeds of the evaluation: far from those of the SFT data (seed * 1_000_003 + i).
_REPO_SEED_OFFSET = 700_000_001


def heldout_repo_tasks(cfg: ml_collections.ConfigDict) -> list:
  """The repo suite's tasks: ``cfg.repo_tasks`` held-out procedural repositories (distinct)."""
  from kat_jax.data.procedural import repos
  tasks, seen = [], set()
  for i in range(100 * int(cfg.repo_tasks)):
    if len(tasks) == cfg.repo_tasks:
      break
    task = repos.make_repo_task(_REPO_SEED_OFFSET + int(cfg.seed) * 1_000_003 + i,
                                split="heldout", level=int(cfg.repo_level),
                                heldout_fraction=float(cfg.heldout_fraction))
    if task.repo_id not in seen:
      seen.add(task.repo_id)
      tasks.append(task)
  if len(tasks) < cfg.repo_tasks:
    raise ConfigError(f"{CONFIG_PATH}.repo_tasks={cfg.repo_tasks}: only {len(tasks)} distinct "
                      "held-out repositories were drawn; ask for fewer")
  return tasks


def humaneval_problems(cfg: ml_collections.ConfigDict) -> list:
  """The first ``cfg.humaneval_tasks`` HumanEval problems (all with 0)."""
  from kat_jax.eval import humaneval
  problems = list(humaneval.load_problems().values())
  return problems[:cfg.humaneval_tasks] if cfg.humaneval_tasks else problems


# -- metrics ----------------------------------------------------------------------------------

def classify_turns(trajectory, tokenizer, tools) -> list[dict]:
  """Per sampled turn of a ``rollout.Trajectory``: ``valid`` (its text parses into at least one
  tool call of ``tools``), ``schema`` (and every call's arguments fit its tool), ``attempted``
  (the text opens a ``<tool_call>``) and ``error`` (the parse error's kind, or None)."""
  from kat_jax.data import special_tokens, toolcall
  from kat_jax.rl.envs.tools import check_arguments
  by_name = {t.name: t for t in tools}
  out = []
  for turn in range(trajectory.num_turns):
    text = tokenizer.decode(trajectory.tokens[trajectory.sampled & (trajectory.turn == turn)])
    parsed = toolcall.parse_assistant_output(text, tools)
    error = parsed.kind if isinstance(parsed, toolcall.ParseError) else None
    calls = () if error else parsed.tool_calls
    out.append({"valid": bool(calls), "error": error,
                "attempted": special_tokens.TOOL_CALL_OPEN in text,
                "schema": bool(calls) and all(check_arguments(by_name[c.name], c.arguments)
                                              is None for c in calls)})
  return out


def episode_metrics(trajectories: Sequence, turns: Sequence[Sequence[dict]]) -> dict:
  """The figures of one suite's episodes: success rate (``passed``: the environment's grade),
  mean turns, tool-call shares over all sampled turns, submissions, statuses, parse errors."""
  flat = [v for per in turns for v in per]
  share = lambda key: sum(bool(v[key]) for v in flat) / len(flat) if flat else 0.0
  n = len(trajectories)
  passed = sum(bool(t.grade is not None and t.grade.passed) for t in trajectories)
  return {"episodes": n, "passed": passed, "pass_rate": passed / n if n else 0.0,
          "mean_turns": sum(t.num_turns for t in trajectories) / n if n else 0.0,
          "turns": len(flat), "tool_call_share": share("valid"),
          "schema_valid_share": share("schema"), "attempted_share": share("attempted"),
          "submitted": sum(t.grade is not None for t in trajectories),
          "statuses": dict(collections.Counter(t.status for t in trajectories)),
          "parse_errors": dict(collections.Counter(v["error"] for v in flat if v["error"]))}


# -- the evaluator ----------------------------------------------------------------------------

class AgenticEvaluator:
  """The suites of ``cfg`` on any number of checkpoints of one model (see the module docstring).
  ``pool`` (a ``SandboxPool``) is shared with the caller; without one, the evaluator makes its own
  on first use and closes it in ``close``."""

  def __init__(self, cfg: ml_collections.ConfigDict, pool=None):
    validate_config(cfg)
    self.cfg = cfg
    self._pool, self._own_pool = pool, pool is None
    self._sampler = None
    self._sampler_key: Any = None
    self._tasks: dict[str, list] = {}

  def __enter__(self) -> "AgenticEvaluator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  @property
  def pool(self):
    if self._pool is None:
      from kat_jax.eval.humaneval import HUMANEVAL_LIMITS
      from kat_jax.sandbox import SandboxPool
      self._pool = SandboxPool(num_workers=int(self.cfg.sandbox_workers), limits=HUMANEVAL_LIMITS)
    return self._pool

  def tasks(self, suite: str) -> list:
    """The (fixed) tasks of a suite, drawn once."""
    if suite not in self._tasks:
      self._tasks[suite] = _TASKS[suite](self.cfg)
    return self._tasks[suite]

  def sampler(self, model, params, max_len: int):
    """The evaluator's sampler with ``params``: the same one for every checkpoint of one model
    (only the params change, so nothing recompiles), a new one for another model or a longer
    cache than it holds."""
    from kat_jax.sample import Sampler
    key = (model.cfg, tuple(model.mesh.axis_names) if model.mesh is not None else None,
           tuple(d.id for d in model.mesh.devices.flat) if model.mesh is not None else None,
           tuple(tuple(r) if isinstance(r, list) else r for r in model.rules))
    if self._sampler is None or key != self._sampler_key or self._sampler.max_len < max_len:
      self._sampler = Sampler(model, params, max_len=max_len)
      self._sampler_key = key
    self._sampler.params = params
    return self._sampler

  def evaluate(self, model, params, tokenizer, seed: int = 0) -> dict:
    """Every enabled suite on ``params``: ``{suite: figures, ..., "seconds": {suite: s}}``."""
    report: dict[str, Any] = {"seconds": {}}
    for suite in enabled_suites(self.cfg):
      start = time.perf_counter()
      report[suite] = _SUITES[suite](self, model, params, tokenizer, seed)
      report["seconds"][suite] = round(time.perf_counter() - start, 2)
    return report

  def close(self) -> None:
    if self._own_pool and self._pool is not None:
      self._pool.close()
    self._pool = None
    self._sampler = None


def _rollout_config(cfg: ml_collections.ConfigDict, max_turns: int,
                    max_new_tokens: int) -> ml_collections.ConfigDict:
  from kat_jax.rl import rollout
  c = rollout.default_rollout_config()
  c.update(dict(max_turns=max_turns, max_new_tokens=max_new_tokens, temperature=0.0,
                max_observation_tokens=int(cfg.max_observation_tokens),
                env_threads=int(cfg.env_threads)))
  return c


def _episodes(evaluator: AgenticEvaluator, suite: str, env_name: str, model, params, tokenizer,
              seed: int, env_config: Optional[ml_collections.ConfigDict] = None,
              max_turns: Optional[int] = None,
              max_new_tokens: Optional[int] = None) -> tuple[list, list]:
  """Greedy episodes of ``params`` on the suite's tasks in ``env_name`` (``env_config``, default:
  the environment's own), ``cfg.max_turns`` turns of ``cfg.max_new_tokens`` unless given:
  (trajectories, per-turn classification)."""
  import jax
  from kat_jax.data import chat
  from kat_jax.rl import envs, rollout
  cfg, tasks = evaluator.cfg, evaluator.tasks(suite)
  max_turns = int(cfg.max_turns if max_turns is None else max_turns)
  max_new_tokens = int(cfg.max_new_tokens if max_new_tokens is None else max_new_tokens)
  env_list = [envs.make(env_name, env_config, pool=evaluator.pool) for _ in tasks]
  try:
    prompt = max(len(chat.render_prompt(chat.Conversation(e.reset(t).messages, e.tools),
                                        tokenizer)) for e, t in zip(env_list, tasks))
    per_turn = max_new_tokens + cfg.max_observation_tokens + OBSERVATION_SLACK
    sampler = evaluator.sampler(model, params, prompt + max_turns * per_turn)
    trajectories = rollout.rollout(sampler, env_list, tasks, jax.random.key(seed),
                                   _rollout_config(cfg, max_turns, max_new_tokens), tokenizer)
    turns = [classify_turns(t, tokenizer, e.tools) for t, e in zip(trajectories, env_list)]
  finally:
    for env in env_list:
      env.close()
  return trajectories, turns


def _code_suite(evaluator, model, params, tokenizer, seed: int) -> dict:
  trajectories, turns = _episodes(evaluator, "code", "code", model, params, tokenizer, seed)
  return episode_metrics(trajectories, turns)


def single_turn_env_config() -> ml_collections.ConfigDict:
  """The ``code_single`` layout of the suite: as configs/rl_tiny.py's RL environment."""
  from kat_jax.rl.envs.code import default_code_env_config
  c = default_code_env_config()
  c.show_visible_tests = False
  c.with_system_prompt = False
  return c


def _code_single_suite(evaluator, model, params, tokenizer, seed: int) -> dict:
  cfg = evaluator.cfg
  trajectories, turns = _episodes(evaluator, "code_single", "code_single", model, params,
                                  tokenizer, seed, env_config=single_turn_env_config(),
                                  max_turns=1,
                                  max_new_tokens=int(cfg.code_single_max_new_tokens))
  out = episode_metrics(trajectories, turns)
  return {k: out[k] for k in ("episodes", "passed", "pass_rate", "statuses") if k in out}


def _repo_suite(evaluator, model, params, tokenizer, seed: int) -> dict:
  trajectories, turns = _episodes(evaluator, "repo", "repo", model, params, tokenizer, seed)
  out = episode_metrics(trajectories, turns)
  out["resolve_rate"] = out["pass_rate"]   # a repository episode passes when it is resolved
  return out


def _humaneval_suite(evaluator, model, params, tokenizer, seed: int) -> dict:
  import jax
  from kat_jax.data import special_tokens
  from kat_jax.eval.sampling import sample_completions
  from kat_jax.eval.scoring import HUMANEVAL_STOP_STRINGS, humaneval_completion, score_humaneval
  from kat_jax.sample import SamplingConfig
  cfg, problems = evaluator.cfg, evaluator.tasks("humaneval")
  prompts = [tokenizer.encode(p.prompt) for p in problems]
  sampler = evaluator.sampler(model, params,
                              max(len(p) for p in prompts) + cfg.humaneval_max_new_tokens)
  sampling = SamplingConfig(temperature=0.0, max_new_tokens=int(cfg.humaneval_max_new_tokens),
                            stop_token_ids=(tokenizer.eos_id,
                                            tokenizer.token_id(special_tokens.IM_END)),
                            stop_strings=HUMANEVAL_STOP_STRINGS, vocab_limit=tokenizer.vocab_size)
  samples = sample_completions(sampler, prompts, 1, sampling, jax.random.key(seed),
                               batch_size=len(prompts), tokenizer=tokenizer)
  completions = {p.task_id: [humaneval_completion(s[0][0])] for p, s in zip(problems, samples)}
  result = score_humaneval(completions, (1,), evaluator.pool,
                           problems={p.task_id: p for p in problems})
  passed = sum(r.passed for records in result.tasks.values() for r in records)
  return {"tasks": len(problems), "passed": passed, "pass_at_1": result.pass_at_k["pass@1"]}


# Suite name -> its task source and its evaluation (SUITES order).
_TASKS: dict[str, Callable] = {
    "code": heldout_code_tasks,
    "code_single": lambda cfg: heldout_code_tasks(cfg, cfg.code_single_tasks),
    "repo": heldout_repo_tasks, "humaneval": humaneval_problems}
_SUITES: dict[str, Callable] = {"code": _code_suite, "code_single": _code_single_suite,
                                "repo": _repo_suite, "humaneval": _humaneval_suite}
assert tuple(_SUITES) == SUITES == tuple(_TASKS)


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str,
                    step: Optional[int] = None):
  """(model, params, tokenizer) of a workdir's checkpoint (latest, or ``step``), read-only: the
  params are what a sampler takes (a LoRA run's base and adapters together)."""
  from kat_jax import workdir as workdir_lib
  from kat_jax.data import tokenizer as tokenizer_lib
  from kat_jax.train.trainer import Trainer
  tokenizer = tokenizer_lib.load_tokenizer(workdir_lib.find_tokenizer_dir(workdir, config))
  trainer = Trainer(config, workdir, restore_step=step, lock=False)
  trainer.close()
  if trainer.restored_step is None:
    raise FileNotFoundError(f"no checkpoint in {trainer.checkpointer.directory} to evaluate")
  return trainer.model, trainer.params, tokenizer


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str,
                     cfg: ml_collections.ConfigDict, step: Optional[int] = None,
                     evaluator: Optional[AgenticEvaluator] = None) -> dict:
  """``AgenticEvaluator.evaluate`` of a workdir's checkpoint (``evaluator`` reused if given)."""
  model, params, tokenizer = load_checkpoint(config, workdir, step)
  if evaluator is not None:
    return evaluator.evaluate(model, params, tokenizer)
  with AgenticEvaluator(cfg) as own:
    return own.evaluate(model, params, tokenizer)
