"""Teacher trajectories for SFT: scripted experts run through the real environments, kept when the
environment grades them passed, as labelled ``chat.Conversation`` s in JSONL, served as a TFDS
corpus (array_record) by the JSONL corpus builder (``corpora.jsonl``).

    config = default_agentic_config()                   # how many episodes of which experts
    with SandboxPool(num_workers=2) as pool:
      conversations, report = teacher_trajectories(config, pool)
    write_jsonl(conversations, "/data/agentic/trajectories_train.jsonl")
    builder = dataset_builder(["/data/agentic/*.jsonl"], data_dir)   # built once, cached
    read_conversations(builder, "train")                # the conversations back, equal

Each episode is one expert (``kat_jax.rl.experts``) on one task of its environment: procedural
function tasks (``code``), procedural repositories (``repo``), procedural math problems (``math``),
all from the requested split of ``data.procedural`` — the ``heldout`` split shares no (template,
params) pair with ``train``, so trajectories built from ``train`` never show a held-out task.
Tasks are drawn deterministically from ``config.seed``; experts take turns over the tasks of
their environment. An episode is kept when the environment ended it with a passed grade;
the others are counted in the report by expert and reason, never kept. Every conversation
carries the expert's taxonomy label and ``meta`` (task id — the corpus splits train/eval by it —
expert, environment, step statuses, grade), and renders with loss on the assistant turns only
(``chat.render``; the mistaken first attempt of ``code_fix`` is not trained at all).

Sandboxed episodes (code, repo) run ``config.num_threads`` at once over the shared pool (a fresh
environment per episode), math episodes in the calling thread; the output order is the plan's
whatever the threads do.
"""
from __future__ import annotations

import collections
import concurrent.futures
import os
import tempfile
from typing import Any, Optional, Sequence

import ml_collections

from kat_jax.data import chat
from kat_jax.data import corpora
from kat_jax.data import instructions
from kat_jax.data.config import split_list
from kat_jax.data.corpora import jsonl
from kat_jax.data.procedural import generate, math_tasks, repos
from kat_jax.errors import ConfigError
from kat_jax.rl import envs
from kat_jax.rl import experts
from kat_jax.sandbox import SandboxPool

CONFIG_PATH = "agentic"   # how errors name this config's fields
TRAJECTORIES_FILE = "trajectories_{split}.jsonl"
INSTRUCTIONS_FILE = "instructions_{split}.jsonl"
SANDBOXED_ENVS = ("code", "repo")   # environments whose steps wait on the sandbox pool
DEFAULT_OUT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kat_jax", "agentic")


def default_agentic_config() -> ml_collections.ConfigDict:
  """Every knob of teacher-trajectory generation (experiments/make_agentic_data.py)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                            # task draws
  c.split = "train"                     # procedural split the tasks come from: train | heldout
  c.heldout_fraction = 0.1              # of the procedural (template, params) pairs
  c.code_episodes = 240                 # procedural function tasks, one episode each
  c.code_levels = "0"                   # their difficulty levels
  c.code_experts = "code_direct,code_fix"          # taking turns over the code tasks
  c.repo_episodes = 60                  # procedural repositories, one episode each
  c.repo_level = 1                      # level of their functions (1 or 2)
  c.repo_experts = "repo_fix,repo_reproduce,repo_explore"
  c.math_episodes = 60                  # procedural math problems, one episode each
  c.math_levels = "0,1"
  c.math_experts = "math_answer"
  c.math_submit_tool = True             # offer submit(answer): math answers as tool calls
  c.max_turns = 16                      # per episode; an expert needs at most 9
  c.num_threads = 2                     # episodes run at once (one pool worker each)
  c.instructions = 400                  # instruction-following examples (data.instructions)
  c.instruction_max_constraints = 2     # constraints per instruction example (1 .. this)
  return c


def _experts(names: str, env: str, field: str) -> list[str]:
  chosen = split_list(names)
  for name in chosen:
    if name not in experts.EXPERTS or experts.EXPERTS[name].env != env:
      raise ConfigError(f"{CONFIG_PATH}.{field}: {name!r} is not an expert of the {env!r} "
                        f"environment; use some of "
                        f"{sorted(n for n, e in experts.EXPERTS.items() if e.env == env)}")
  return chosen


def _validate(c: ml_collections.ConfigDict) -> None:
  if c.split not in generate.SPLITS:
    raise ConfigError(f"{CONFIG_PATH}.split={c.split!r}: use one of {list(generate.SPLITS)}")
  for field in ("code_episodes", "repo_episodes", "math_episodes", "instructions"):
    if c[field] < 0:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be >= 0")
  for field in ("max_turns", "num_threads", "instruction_max_constraints"):
    if c[field] < 1:
      raise ConfigError(f"{CONFIG_PATH}.{field}={c[field]} must be >= 1")
  if c.repo_level not in (1, 2):
    raise ConfigError(f"{CONFIG_PATH}.repo_level={c.repo_level}: use 1 or 2")


def episode_plan(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
  """(expert, task) of every episode, in output order: code, then repository, then math tasks,
  the experts of each environment taking turns."""
  _validate(config)
  plan: list[tuple[str, Any]] = []
  levels = [int(v) for v in split_list(config.code_levels)]
  names = _experts(config.code_experts, "code", "code_experts")
  if config.code_episodes and names:
    tasks = generate.generate_tasks(config.seed, config.code_episodes, split=config.split,
                                    levels=levels, heldout_fraction=config.heldout_fraction)
    plan += [(names[i % len(names)], task) for i, task in enumerate(tasks)]
  names = _experts(config.repo_experts, "repo", "repo_experts")
  if config.repo_episodes and names:
    seen = set()
    for i in range(config.repo_episodes):
      task = repos.make_repo_task(config.seed * 1_000_003 + i, split=config.split,
                                  level=config.repo_level,
                                  heldout_fraction=config.heldout_fraction)
      if task.repo_id not in seen:
        seen.add(task.repo_id)
        plan.append((names[i % len(names)], task))
  names = _experts(config.math_experts, "math", "math_experts")
  if config.math_episodes and names:
    levels = [int(v) for v in split_list(config.math_levels)]
    problems = math_tasks.generate_problems(config.seed, config.math_episodes,
                                            split=config.split, levels=levels)
    plan += [(names[i % len(names)], p) for i, p in enumerate(problems)]
  return plan


def env_config(env: str, config: ml_collections.ConfigDict) -> Optional[dict]:
  """The environment config the episodes of ``env`` run with (None = its defaults)."""
  return {"submit_tool": bool(config.math_submit_tool)} if env == "math" else None


def run_episode(expert: str, task: Any, pool: SandboxPool,
                config: ml_collections.ConfigDict) -> experts.Episode:
  """One episode in a fresh environment of the expert's kind."""
  name = experts.get_expert(expert).env
  env = envs.make(name, env_config(name, config), pool=pool)
  try:
    return experts.run_expert(env, expert, task, max_turns=config.max_turns)
  finally:
    env.close()


def episodes_config(expert_names, num_episodes: int, *, split: str, seed: int,
                    heldout_fraction: float, code_levels: str = "0", math_levels: str = "0,1",
                    repo_level: int = 1, max_turns: int = 16, num_threads: int = 2,
                    field: str = CONFIG_PATH) -> ml_collections.ConfigDict:
  """The generation config that runs ``num_episodes`` episodes over ``expert_names`` (a list or
  a comma-separated string), shared out evenly: expert j of n gets ``num_episodes // n`` (one
  more for the first ``num_episodes % n``); each environment runs the episodes of its experts,
  who take turns (``episode_plan``). How the mid-training streams ``data.tool_use`` /
  ``data.multi_turn`` call the builders of the SFT data; errors name ``<field>.<knob>``."""
  names = split_list(expert_names)
  if not names or len(set(names)) != len(names):
    raise ConfigError(f"{field}.experts={','.join(names)!r}: name each expert once, some of "
                      f"{sorted(experts.EXPERTS)}")
  for name in names:
    if name not in experts.EXPERTS:
      raise ConfigError(f"{field}.experts: {name!r} is not an expert; use some of "
                        f"{sorted(experts.EXPERTS)}")
  if num_episodes < 0:
    raise ConfigError(f"{field}: the number of episodes must be >= 0, got {num_episodes}")
  c = default_agentic_config()
  c.seed, c.split, c.heldout_fraction = int(seed), split, float(heldout_fraction)
  c.code_levels, c.math_levels, c.repo_level = code_levels, math_levels, int(repo_level)
  c.max_turns, c.num_threads, c.instructions = int(max_turns), int(num_threads), 0
  share = [num_episodes // len(names) + (j < num_episodes % len(names))
           for j in range(len(names))]
  for env in ("code", "repo", "math"):
    mine = [j for j, name in enumerate(names) if experts.EXPERTS[name].env == env]
    c[f"{env}_experts"] = ",".join(names[j] for j in mine)
    c[f"{env}_episodes"] = sum(share[j] for j in mine)
  try:
    _validate(c)
  except ConfigError as e:   # name the caller's fields, not this module's
    raise ConfigError(str(e).replace(f"{CONFIG_PATH}.", f"{field}.")) from None
  return c


def _drop_reason(episode: experts.Episode) -> str:
  if not episode.done:
    return f"not_done:{episode.statuses[-1] if episode.statuses else 'no_turn'}"
  return "not_graded" if episode.grade is None else "failed"


def teacher_trajectories(config: ml_collections.ConfigDict, pool: SandboxPool
                         ) -> tuple[list[chat.Conversation], dict]:
  """The kept conversations of every planned episode (in plan order) and a report:
  ``{expert: {"episodes", "kept", "turns", "dropped": {reason: n}}}``."""
  plan = episode_plan(config)
  run_job = lambda job: run_episode(job[0], job[1], pool, config)
  # Sandboxed episodes wait on the pool, so they run on threads; the others run here (math is
  # graded in this process by sympy, whose parser builds ASTs: not thread-safe in CPython 3.11).
  threaded = [i for i, (expert, _) in enumerate(plan)
              if experts.get_expert(expert).env in SANDBOXED_ENVS]
  episodes: list = [None] * len(plan)
  with concurrent.futures.ThreadPoolExecutor(max_workers=int(config.num_threads)) as executor:
    for i, episode in zip(threaded, executor.map(run_job, [plan[i] for i in threaded])):
      episodes[i] = episode
  for i in sorted(set(range(len(plan))) - set(threaded)):
    episodes[i] = run_job(plan[i])
  report: dict = {}
  kept = []
  for episode in episodes:
    entry = report.setdefault(episode.expert, {"episodes": 0, "kept": 0, "turns": 0,
                                               "dropped": collections.Counter()})
    entry["episodes"] += 1
    if episode.passed:
      entry["kept"] += 1
      entry["turns"] += len(episode.statuses)
      kept.append(episode.conversation)
    else:
      entry["dropped"][_drop_reason(episode)] += 1
  for entry in report.values():
    entry["dropped"] = dict(entry["dropped"])
  return kept, report


def instruction_conversations(config: ml_collections.ConfigDict) -> list[chat.Conversation]:
  """``config.instructions`` instruction-following conversations (``data.instructions``); the
  held-out split draws from another seed stream."""
  seed = config.seed * 2 + generate.SPLITS.index(config.split)
  examples = instructions.make_examples(seed, config.instructions,
                                        max_constraints=config.instruction_max_constraints)
  return [e.conversation() for e in examples]


def write_jsonl(conversations: Sequence[chat.Conversation], path: str) -> str:
  """Writes one conversation JSON per line to ``path`` (atomically: a reader never sees half a
  file); returns the path."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".agentic_", suffix=".jsonl", dir=directory)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(chat.conversations_to_jsonl(conversations))
  os.replace(tmp, path)
  return path


def dataset_builder(patterns: Sequence[str], data_dir: str = "", *, eval_fraction: float = 0.05,
                    name_prefix: str = "agentic"):
  """The prepared TFDS corpus (array_record) of the JSONL files ``patterns``: the builder of
  ``corpora.jsonl`` that the ``trajectories`` / ``instructions`` streams read."""
  config = jsonl.jsonl_config(list(patterns), name_prefix=name_prefix,
                              eval_fraction=eval_fraction)
  return corpora.prepare(jsonl.JsonlConversations, config, data_dir)


def read_conversations(builder, split: str) -> list[chat.Conversation]:
  """Every conversation of one split of a prepared JSONL corpus, in corpus order."""
  source = builder.as_data_source(split=split)
  out = []
  for i in range(len(source)):
    value = source[i]["conversation"]
    out.append(chat.Conversation.from_json(value.decode("utf-8") if isinstance(value, bytes)
                                           else value))
  return out
