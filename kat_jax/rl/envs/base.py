"""The interface every agentic environment implements, the grade rewards read, and the registry.

An environment runs one episode at a time; the agent loop (``kat_jax.rl.rollout``) holds one per
batch row and steps them in lockstep::

    env = envs.make("code", config.env, pool=pool)   # by name, from config.rl.env
    obs = env.reset(task)       # Observation: opening messages (system + user) and the tools offered
    res = env.step(text)        # the assistant's decoded output -> StepResult
    while not res.done:
      ...                       # append res.observation.messages, sample the next turn
      res = env.step(text)
    res.info["grade"]           # Grade of the final submission (or None: never submitted)
    env.close()

Statuses are data, never exceptions: a malformed tool call, an unknown tool, a tool that crashes or
times out all come back as a ``StepResult`` with an error observation and its ``status``; the episode
goes on until the model submits or a limit of the loop ends it. Environments never raise on model
behaviour; an exception out of ``step`` is an environment bug, which the loop records as
``env_error`` (and still does not crash).

Environments get what they need (a ``SandboxPool``, a tokenizer) by keyword from ``make``; the task
is whatever their task source yields (``data.procedural.Task``, ``RepoTask``, a math problem).
"""
from __future__ import annotations

import abc
import dataclasses
import importlib
from typing import Any, Callable, Mapping, Optional, Sequence

from kat_jax.data.chat import Message
from kat_jax.data.toolcall import ToolSpec

# Per-step statuses (StepResult.status). The episode's final status is that of its last step, or
# one the loop sets when a limit ends the episode.
OK = "ok"                              # the tool calls ran (their results may still be failures)
SUBMITTED = "submitted"                # submit() (or a single-turn answer) was graded: done
PARSE_ERROR = "parse_error"            # the output could not be parsed into tool calls
UNKNOWN_TOOL = "unknown_tool"          # a call named a tool the environment does not offer
TOOL_ERROR = "tool_error"              # a tool rejected its arguments or failed
TOOL_TIMEOUT = "tool_timeout"          # a tool ran past its time limit
NO_ACTION = "no_action"                # neither a tool call nor an answer
# Set by the agent loop:
MAX_TURNS = "max_turns"
CONTEXT_EXHAUSTED = "context_exhausted"
ENV_ERROR = "env_error"                # the environment raised (its bug); recorded, not re-raised
DEVIATED = "deviated"                  # ended early by the RFT deviation monitor (kat_jax.rl.rft)

STEP_STATUSES = (OK, SUBMITTED, PARSE_ERROR, UNKNOWN_TOOL, TOOL_ERROR, TOOL_TIMEOUT, NO_ACTION)
LOOP_STATUSES = (MAX_TURNS, CONTEXT_EXHAUSTED, ENV_ERROR, DEVIATED)
STATUSES = STEP_STATUSES + LOOP_STATUSES
# Statuses that mean the episode ended on a limit rather than by the model (RL may mask them).
LIMIT_STATUSES = (MAX_TURNS, CONTEXT_EXHAUSTED, TOOL_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class Grade:
  """The hidden-test outcome of a submission: what the reward functions read.

  ``passed`` is the environment's success criterion (all hidden tests pass; SWE: resolved; math:
  the answer is equivalent). ``compiled`` means the program parsed and its module loaded in the
  sandbox. ``prediction`` is what was graded (code, a patch, an answer) and ``reference`` the
  ground truth of the same kind (reference solution, gold patch, exact answer); ``details`` holds
  environment-specific data (per-test outcomes, sandbox status)."""
  passed: bool
  compiled: bool
  tests_passed: int
  tests_total: int
  prediction: str = ""
  reference: str = ""
  details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def pass_fraction(self) -> float:
    return self.tests_passed / self.tests_total if self.tests_total else float(self.passed)


@dataclasses.dataclass(frozen=True)
class Observation:
  """Messages to append to the conversation (reset: system + user; step: tool results or user
  feedback), and on reset the tools offered (rendered into the system turn by
  ``data.toolcall.render_tools_block`` through ``data.chat``)."""
  messages: tuple[Message, ...]
  tools: tuple[ToolSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class StepResult:
  observation: Observation
  done: bool
  status: str
  reward_terms: Mapping[str, float] = dataclasses.field(default_factory=dict)
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # "grade": Grade when graded

  def __post_init__(self):
    if self.status not in STATUSES:
      raise ValueError(f"unknown status {self.status!r}: use one of {list(STATUSES)}")


class Environment(abc.ABC):
  """One episode at a time; ``reset`` may be called again for the next task."""

  tools: tuple[ToolSpec, ...] = ()

  @abc.abstractmethod
  def reset(self, task: Any) -> Observation:
    ...

  @abc.abstractmethod
  def step(self, action: str) -> StepResult:
    """``action`` is the assistant's decoded output text (tool calls in ``<tool_call>`` tags)."""

  def close(self) -> None:
    """Releases what the environment holds (workspaces); the shared sandbox pool is not closed."""


_ENVS: dict[str, Callable[..., Environment]] = {}
# Built-in environments by module, imported on first use (so importing the registry is cheap).
_BUILTIN_MODULES = {"code": "kat_jax.rl.envs.code", "code_single": "kat_jax.rl.envs.code",
                    "humaneval": "kat_jax.rl.envs.code", "repo": "kat_jax.rl.envs.repo",
                    "math": "kat_jax.rl.envs.math", "refine": "kat_jax.rl.envs.refine"}


def register(name: str) -> Callable:
  """Decorator: ``@register("code")`` on a factory ``(config, **deps) -> Environment``."""
  def wrap(factory):
    if name in _ENVS and _ENVS[name] is not factory:
      raise ValueError(f"environment {name!r} is already registered")
    _ENVS[name] = factory
    return factory
  return wrap


def names() -> list[str]:
  return sorted(set(_ENVS) | set(_BUILTIN_MODULES))


def make(name: str, config: Any = None, **deps) -> Environment:
  """The environment registered as ``name`` (config.rl.env), built with its config section."""
  if name not in _ENVS and name in _BUILTIN_MODULES:
    importlib.import_module(_BUILTIN_MODULES[name])
  if name not in _ENVS:
    raise ValueError(f"unknown environment {name!r}: registered environments are {names()} "
                     f"(config.rl.env)")
  return _ENVS[name](config, **deps)


def first_error(statuses: Sequence[str]) -> Optional[str]:
  """The first non-ok status of a step's tool calls (the step's status), or None."""
  return next((s for s in statuses if s != OK), None)
