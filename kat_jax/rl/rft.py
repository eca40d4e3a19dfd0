"""Rejection fine-tuning (RFT) with teacher trajectories: the pieces the RFT stage
(``kat_jax.rl.rft_loop``) adds to the RL stage — teachers, the deviation monitor, trajectory
correction and the relative reward. docs/RFT.md has the design and the measurements.

KAT-Coder puts RFT between SFT and RL: ground-truth ("teacher") trajectories guide exploration, a
rollout's reward is its difference from the ground truth rather than an absolute score, rollouts
that clearly deviate are stopped while they are generated, and deviating rollouts can be
corrected against the teacher. The formula, the deviation measure and the thresholds are not
published; ours:

**Teachers** (``teachers_for``): per task, the trajectories of the scripted experts named in
``rft.teachers`` (``kat_jax.rl.experts``: real tool executions in the same environment, so they
are verified, not assumed; ``reference`` is the task's reference solution as one answer turn, or
one ``submit`` call in a tool environment). Only teachers the environment grades as passed are
kept, and identical action sequences once.

**Actions.** A turn's *signature* (``action_signature``) is what it does: each tool call's name
and its code (or its arguments), or for a plain answer its code block — the prose around it does
not count. A trajectory's *final code* is the code of its last call or answer that has one.

**Deviation monitor** (``DeviationMonitor``, run by the agent loop at every turn boundary, after
the turn was stepped and before its observation is appended):

* ``measure="action"``: the turn's deviation is ``1 - max_k ratio(sig(a_t), sig(T_k[t]))``
  (``difflib.SequenceMatcher`` ratio; ``T_k[t]`` is teacher k's turn t, or its last turn when it
  has fewer) — host only, free.
* ``measure="teacher_nll"``: the mean per-token negative log-likelihood (nats) of the teachers'
  next turn ``T_k[t + 1]`` after the rollout's context, under the current policy (one score
  pass per turn over every watched row; teachers sharing a context share it in one tree); the
  deviation is the least over teachers. It asks whether the policy, where it now is, would still
  take the teacher's path.

A rollout whose deviation exceeds ``threshold`` on ``patience`` consecutive turns, from turn
``min_turn`` on, is stopped (status ``deviated``; ``info["deviation"]`` holds the turn, the score,
the teacher closest at that turn and the *guide*: the teacher the rollout followed most closely
before it — mean signature similarity over the earlier turns, or at turn 0 the closest one). Stopped rollouts stay in their group and are trained on with their
reward, never dropped.

**Trajectory correction** (``correction.enabled``): a stopped rollout gets a *corrected branch*:
its history before the deviating turn, the guide's turn in its place (not trainable: it
is context, the policy did not sample it), the environment's real answer, and the policy's own
turns after it (watched too, never corrected twice). It shares the rollout's tokens up to the
splice, so the two are one tree with a shared prefix; at most ``correction.max_per_group``
branches per group, which joins the group (GRPO statistics over rollouts + branches).

**Relative reward** (``relative_reward``): ``test_weight · test + similarity_weight · sim −
deviated_penalty · [deviated]``, where ``test`` is the hidden-test pass fraction (or 1 / 0 for
passed, ``test_term``) of the final submission (0 without one) and ``sim`` the largest over
teachers of ``(1 − call_weight) · code_sim + call_weight · call_sim``: ``code_sim`` compares the
final code to the teacher's (``difflib`` ratio, or CodeBLEU with ``code_similarity="codebleu"``),
``call_sim`` the sequences of tool names. Teachers pass their tests, so a rollout that copies one
gets the top reward ``test_weight + similarity_weight``.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from typing import Any, Callable, Optional, Sequence

import ml_collections
import numpy as np

from kat_jax.data import chat
from kat_jax.data import toolcall
from kat_jax.data.config import split_list
from kat_jax.errors import ConfigError
from kat_jax.eval.scoring import extract_code
from kat_jax.rl import experts as experts_lib
from kat_jax.rl import rollout as rollout_lib
from kat_jax.rl.envs import base

MEASURES = ("action", "teacher_nll")
CODE_SIMILARITIES = ("difflib", "codebleu")
TEST_TERMS = ("pass_fraction", "passed")
REFERENCE = "reference"      # the task's reference solution as a teacher


def default_rft_config() -> ml_collections.ConfigDict:
  """``config.rl.rft``: the RFT stage's teachers, monitor, correction and relative reward."""
  c = ml_collections.ConfigDict()
  c.teachers = REFERENCE           # teacher sources: REFERENCE and / or expert names, comma-separated
  c.monitor = ml_collections.ConfigDict(dict(
      measure="action",            # action | teacher_nll (see the module docstring)
      threshold=0.7,               # action: 1 - similarity; teacher_nll: nats per token
      patience=1,                  # consecutive deviating turns before the stop
      min_turn=0,                  # the first turn after which a rollout may be stopped
  ))
  c.correction = ml_collections.ConfigDict(dict(
      enabled=True,                # splice the closest teacher's turn into stopped rollouts
      max_per_group=2,             # corrected branches per group at most
  ))
  c.reward = ml_collections.ConfigDict(dict(
      test_weight=1.0,             # weight of the hidden-test term
      test_term="pass_fraction",   # pass_fraction | passed
      similarity_weight=0.5,       # weight of the similarity to the closest teacher
      call_weight=0.3,             # share of the tool-name sequence in the similarity
      code_similarity="difflib",   # difflib | codebleu
      deviated_penalty=0.0,        # subtracted from a stopped rollout's reward
  ))
  return c


def validate_config(rft, env_name: str) -> None:
  """ConfigError naming the field when ``rft`` (``config.rl.rft``) cannot drive the stage in
  the environment ``env_name``."""
  path = "config.rl.rft"
  sources = split_list(rft.teachers)
  if not sources:
    raise ConfigError(f"{path}.teachers is empty: name at least one of {REFERENCE!r} or "
                      f"{sorted(experts_lib.EXPERTS)}")
  for name in sources:
    if name != REFERENCE and name not in experts_lib.EXPERTS:
      raise ConfigError(f"{path}.teachers names {name!r}: use {REFERENCE!r} or one of "
                        f"{sorted(experts_lib.EXPERTS)}")
    if name != REFERENCE and experts_lib.EXPERTS[name].env != env_name:
      raise ConfigError(f"{path}.teachers names the expert {name!r} of the "
                        f"{experts_lib.EXPERTS[name].env!r} environment, but config.rl.env_name="
                        f"{env_name!r}: use {REFERENCE!r} or experts of {env_name!r} "
                        f"{sorted(n for n, e in experts_lib.EXPERTS.items() if e.env == env_name)}")
  m = rft.monitor
  if m.measure not in MEASURES:
    raise ConfigError(f"{path}.monitor.measure={m.measure!r}: use one of {list(MEASURES)}")
  if not m.threshold > 0:
    raise ConfigError(f"{path}.monitor.threshold={m.threshold!r} must be > 0")
  for field in ("patience", "min_turn"):
    low = 1 if field == "patience" else 0
    if not isinstance(m[field], int) or m[field] < low:
      raise ConfigError(f"{path}.monitor.{field}={m[field]!r} must be an int >= {low}")
  if not isinstance(rft.correction.max_per_group, int) or rft.correction.max_per_group < 0:
    raise ConfigError(f"{path}.correction.max_per_group={rft.correction.max_per_group!r} must be "
                      "an int >= 0")
  r = rft.reward
  if r.test_term not in TEST_TERMS:
    raise ConfigError(f"{path}.reward.test_term={r.test_term!r}: use one of {list(TEST_TERMS)}")
  if r.code_similarity not in CODE_SIMILARITIES:
    raise ConfigError(f"{path}.reward.code_similarity={r.code_similarity!r}: use one of "
                      f"{list(CODE_SIMILARITIES)}")
  if not 0.0 <= r.call_weight <= 1.0:
    raise ConfigError(f"{path}.reward.call_weight={r.call_weight!r} must be in [0, 1]")


def branches_per_group(rft) -> int:
  """Corrected branches a group may gain (its size is at most group_size + this)."""
  return int(rft.correction.max_per_group) if rft.correction.enabled else 0


# -- actions -------------------------------------------------------------------------------------


def _parsed(text: str):
  parsed = toolcall.parse_assistant_output(text, None)
  return None if isinstance(parsed, toolcall.ParseError) else parsed


def _call_code(call: toolcall.ToolCall) -> Optional[str]:
  code = call.arguments.get("code") if isinstance(call.arguments, dict) else None
  return code if isinstance(code, str) else None


def action_signature(text: str) -> str:
  """What a turn does, without its prose: ``name: code`` (or ``name: {arguments}``) per tool
  call; a plain answer's code; an unparsable turn's text."""
  parsed = _parsed(text)
  if parsed is None:
    return text.strip()
  if parsed.tool_calls:
    return "\n".join(
        f"{c.name}: " + (_call_code(c) if _call_code(c) is not None
                         else json.dumps(c.arguments, sort_keys=True))
        for c in parsed.tool_calls)
  return extract_code(parsed.content).strip()


def final_code(actions: Sequence[str]) -> str:
  """The code of the last turn that has some (a tool call's ``code``, else an answer's code
  block / text); '' if none."""
  for text in reversed(actions):
    parsed = _parsed(text)
    if parsed is None:
      continue
    codes = [_call_code(c) for c in parsed.tool_calls if _call_code(c) is not None]
    if codes:
      return codes[-1]
    if not parsed.tool_calls and parsed.content.strip():
      return extract_code(parsed.content).strip()
  return ""


def call_names(actions: Sequence[str]) -> tuple[str, ...]:
  """The tool names called, in order (a plain answer counts as ``answer``)."""
  names: list[str] = []
  for text in actions:
    parsed = _parsed(text)
    if parsed is None:
      names.append("unparsable")
    elif parsed.tool_calls:
      names += [c.name for c in parsed.tool_calls]
    else:
      names.append("answer")
  return tuple(names)


def ratio(a, b) -> float:
  """``difflib.SequenceMatcher`` similarity in [0, 1] (1: equal; two empty sequences: 1)."""
  return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


# -- teachers ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Teacher:
  """One verified ground-truth trajectory of a task: its assistant turns, in order."""
  name: str
  messages: tuple            # chat.Message (assistant turns)
  actions: tuple             # chat.render_assistant_body of each (what a model would emit)
  signatures: tuple          # action_signature of each
  final_code: str
  calls: tuple               # call_names(actions)

  @classmethod
  def of(cls, name: str, messages: Sequence[chat.Message]) -> "Teacher":
    actions = tuple(chat.render_assistant_body(m) for m in messages)
    return cls(name, tuple(messages), actions, tuple(action_signature(a) for a in actions),
               final_code(actions), call_names(actions))

  def turn(self, t: int) -> int:
    """The teacher turn compared with a rollout's turn ``t`` (its last when it has fewer)."""
    return min(t, len(self.actions) - 1)


def reference_message(task: Any, env_tools: bool) -> chat.Message:
  """The task's reference solution as one assistant turn: the code as the answer of a
  single-turn environment, a ``submit`` call in a tool environment."""
  solution = getattr(task, "solution", None)
  if not isinstance(solution, str) or not solution.strip():
    raise ConfigError(f"config.rl.rft.teachers names {REFERENCE!r}, but a task of type "
                      f"{type(task).__name__} has no reference solution: name experts instead")
  if not env_tools:
    return chat.Message("assistant", solution)
  return chat.Message("assistant", "Submitting the solution.",
                      (toolcall.ToolCall("submit", {"code": solution}),))


def _play(env: base.Environment, task: Any, messages: Sequence[chat.Message]
          ) -> Optional[base.Grade]:
  """Steps ``messages`` through a fresh episode of ``env``; the grade if the last one ended it."""
  env.reset(task)
  result = None
  for message in messages:
    result = env.step(chat.render_assistant_body(message))
    if result.done:
      break
  return result.info.get("grade") if result is not None and result.done else None


def teachers_for(task: Any, sources: Sequence[str], make_env: Callable[[], base.Environment],
                 env_tools: bool, *, max_turns: int = 16) -> tuple[list[Teacher], dict]:
  """The verified teachers of ``task`` from ``sources`` (see the module docstring) and why the
  others were not kept (``{source: reason}``). Never raises for a teacher that fails: an expert
  that cannot script the task, or whose trajectory the environment does not pass, is reported."""
  teachers: list[Teacher] = []
  rejected: dict = {}
  for source in sources:
    env = make_env()
    try:
      if source == REFERENCE:
        messages = (reference_message(task, env_tools),)
        grade = _play(env, task, messages)
      else:
        episode = experts_lib.run_expert(env, source, task, max_turns=max_turns)
        messages = tuple(m for m in episode.conversation.messages if m.role == "assistant")
        grade = episode.grade if episode.done else None
    except ConfigError:
      raise
    except Exception as e:   # an expert that cannot script this task: reported, not raised
      rejected[source] = f"{type(e).__name__}: {e}"
      continue
    finally:
      env.close()
    if grade is None or not grade.passed:
      rejected[source] = "not passed"
      continue
    teacher = Teacher.of(source, messages)
    if any(t.actions == teacher.actions for t in teachers):
      rejected[source] = f"same actions as {next(t.name for t in teachers if t.actions == teacher.actions)}"
      continue
    teachers.append(teacher)
  return teachers, rejected


# -- the relative reward -------------------------------------------------------------------------


def similarity(actions: Sequence[str], teacher: Teacher, reward_cfg) -> float:
  """``(1 − call_weight) · code_sim + call_weight · call_sim`` of a trajectory's actions."""
  code = final_code(actions)
  if reward_cfg.code_similarity == "codebleu":
    from kat_jax.rl import codebleu
    code_sim = float(codebleu.codebleu(code, teacher.final_code)) if code.strip() else 0.0
  else:
    code_sim = ratio(code, teacher.final_code)
  w = float(reward_cfg.call_weight)
  return (1.0 - w) * code_sim + w * ratio(call_names(actions), teacher.calls)


def relative_reward(grade: Optional[base.Grade], actions: Sequence[str], status: str,
                    teachers: Sequence[Teacher], reward_cfg) -> dict:
  """The reward terms of one trajectory (``reward`` the total; see the module docstring). Without
  teachers the similarity is 0."""
  if grade is None:
    test = 0.0
  elif reward_cfg.test_term == "passed":
    test = float(grade.passed)
  else:
    test = float(grade.pass_fraction)
  sims = [similarity(actions, t, reward_cfg) for t in teachers]
  sim = max(sims) if sims else 0.0
  deviated = float(status == base.DEVIATED)
  total = (reward_cfg.test_weight * test + reward_cfg.similarity_weight * sim
           - reward_cfg.deviated_penalty * deviated)
  return {"reward": float(total), "test": test, "similarity": float(sim), "deviated": deviated}


# -- the deviation monitor -----------------------------------------------------------------------

# score_continuations(pairs) -> mean NLL per continuation token of each (context, continuation).
Scorer = Callable[[Sequence[tuple[np.ndarray, np.ndarray]]], np.ndarray]


class DeviationMonitor:
  """The ``rollout.Monitor`` of one RFT rollout call (see the module docstring).

  ``teachers(task)`` gives a task's teachers; ``group_of(source)`` the group of a source row
  (for the branch budget); ``scorer`` scores teacher continuations (``teacher_nll`` only);
  ``teacher_tokens(message)`` the ids of a teacher turn (``teacher_nll``). Counts what it did in
  ``stats``."""

  def __init__(self, rft, teachers: Callable[[Any], Sequence[Teacher]],
               group_of: Callable[[int], int], scorer: Optional[Scorer] = None,
               teacher_tokens: Optional[Callable[[chat.Message], np.ndarray]] = None,
               max_len: int = 0):
    if rft.monitor.measure == "teacher_nll" and (scorer is None or teacher_tokens is None):
      raise ValueError("measure='teacher_nll' needs a scorer and teacher_tokens")
    self.cfg, self.teachers, self.group_of = rft, teachers, group_of
    self.scorer, self.teacher_tokens, self.max_len = scorer, teacher_tokens, max_len
    self.strikes: dict[int, int] = {}
    self.branches: dict[int, int] = {}
    self.stats = {"watched": 0, "stopped": 0, "spliced": 0, "scored_pairs": 0}

  def __call__(self, candidates: Sequence[rollout_lib.Candidate]) -> dict:
    scored = self._deviations(candidates)
    m, verdicts = self.cfg.monitor, {}
    self.stats["watched"] += len(candidates)
    for c in candidates:
      if c.index not in scored:
        continue
      score, closest = scored[c.index]
      deviating = score > m.threshold
      self.strikes[c.index] = self.strikes.get(c.index, 0) + 1 if deviating else 0
      if not deviating or self.strikes[c.index] < m.patience or c.turn < m.min_turn:
        continue
      teacher = self.guide(c)
      info = {"score": float(score), "closest": closest.name, "teacher": teacher.name,
              "measure": m.measure}
      splice = None
      group = self.group_of(c.source)
      if (not c.branch and self.cfg.correction.enabled
          and self.branches.get(group, 0) < self.cfg.correction.max_per_group
          and c.turn < len(teacher.messages)):
        splice = teacher.messages[c.turn]
        self.branches[group] = self.branches.get(group, 0) + 1
        self.stats["spliced"] += 1
      self.stats["stopped"] += 1
      verdicts[c.index] = rollout_lib.Verdict(True, info, splice)
    return verdicts

  def guide(self, c: rollout_lib.Candidate) -> Teacher:
    """The teacher a stopped rollout is corrected with: the one it followed most closely before
    the deviating turn (mean signature similarity over turns 0..t-1; at turn 0, the one closest
    to the turn itself). Its turn t replaces the rollout's."""
    teachers = self.teachers(c.task)
    turns = range(c.turn) if c.turn else [c.turn]
    def followed(t: Teacher) -> float:
      return float(np.mean([ratio(action_signature(c.actions[u]), t.signatures[t.turn(u)])
                            for u in turns]))
    return max(teachers, key=followed)

  def _deviations(self, candidates) -> dict:
    """{candidate index: (deviation, closest teacher)} of the candidates that have teachers."""
    out = {}
    if self.cfg.monitor.measure == "action":
      for c in candidates:
        teachers = self.teachers(c.task)
        if not teachers:
          continue
        sig = action_signature(c.actions[c.turn])
        sims = [ratio(sig, t.signatures[t.turn(c.turn)]) for t in teachers]
        k = int(np.argmax(sims))
        out[c.index] = (1.0 - sims[k], teachers[k])
      return out
    pairs, owners = [], []
    for c in candidates:
      for t in self.teachers(c.task):
        if c.turn + 1 < len(t.messages):
          cont = self.teacher_tokens(t.messages[c.turn + 1])
          if len(c.context) + len(cont) <= self.max_len:
            pairs.append((c.context, cont))
            owners.append((c.index, t))
    if not pairs:
      return out
    nll = self.scorer(pairs)
    self.stats["scored_pairs"] += len(pairs)
    for (index, teacher), value in zip(owners, nll):
      if index not in out or value < out[index][0]:
        out[index] = (float(value), teacher)
    return out
