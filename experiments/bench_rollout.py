"""Multi-turn rollout throughput: cross-turn KV reuse against re-prefilling the history each turn.

  python -m experiments.bench_rollout [--presets=tiny,small --turns=2 --turns=4 --turns=8
                                       --episodes=16 --new_tokens=64 --tool_tokens=64 --rounds=3
                                       --sandbox_workers=2]

Both sides run ``kat_jax.rl.rollout.rollout`` — the agent loop itself — on the same ``Sampler``
(same model, random init, same buckets and compiled programs), greedy, on ``--episodes`` episodes
of exactly ``--turns`` turns of up to ``--new_tokens`` tokens, each answered by a tool result of
``--tool_tokens`` tokens (byte-level tokenizer: one token per byte):

* ``reuse``: the sampler as the loop drives it — every row's KV cache is kept between turns and
  the observation is appended to it (``Sampler.extend``): the history is prefilled once.
* ``reprefill``: the baseline a loop without cross-turn reuse runs: after each turn it starts a
  fresh episode (``Sampler.start_episode``) on every running row's whole context so far (the
  history is prefilled again each turn), then samples the next turn from it. ``Reprefill`` wraps
  the same sampler behind the episode API, so ``rollout`` is unchanged.

Greedy decoding makes both sides produce the same tokens; the benchmark asserts it (every
trajectory, token for token). The environment is deterministic: each tool result is text derived
from the task, the turn and the action; with ``--sandbox_workers > 0`` it is the stdout of a real
sandboxed ``print`` (``kat_jax.sandbox.SandboxPool``), so tool time is real and
``tool_time_fraction`` (wall time with at least one tool running / rollout wall time, reuse side)
says how much of a rollout it is. After a warm-up round of both sides (compiles every program),
``--rounds`` rounds alternate which side goes first; medians are reported. Prints one JSON object
per (preset, turns).
"""
import dataclasses
import hashlib
import json
import statistics
import threading
import time
from typing import Any

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_list("presets", ["tiny", "small"], "Model presets (random init).")
  flags.DEFINE_multi_integer("turns", [2, 4, 8], "Assistant turns per episode.")
  flags.DEFINE_integer("episodes", 16, "Episodes rolled out together (batch rows).")
  flags.DEFINE_integer("new_tokens", 64, "Tokens sampled per turn at most.")
  flags.DEFINE_integer("tool_tokens", 64, "Tokens of each tool result's text.")
  flags.DEFINE_integer("rounds", 3, "Timed rounds per side (after one warm-up round).")
  flags.DEFINE_integer("sandbox_workers", 2,
                       "Sandbox workers running each tool call (0 = no sandbox: the "
                       "tool result is computed in-process).")
  flags.DEFINE_integer("seed", 0, "Seed of the random init.")


class ByteTokenizer:
  """The tokenizer protocol over UTF-8 bytes (ids 0..255), special tokens after them: one token
  per byte, so lengths are exact and nothing needs training."""

  def __init__(self):
    from kat_jax.data import special_tokens
    self.specials = {s: 256 + i for i, s in enumerate(special_tokens.ALL)}
    self.by_id = {i: s for s, i in self.specials.items()}
    self.vocab_size = 256 + len(special_tokens.ALL)
    self.eos_id = self.specials[special_tokens.END_OF_TEXT]
    self.pad_id = self.specials[special_tokens.PAD]

  def encode(self, text):
    return list(text.encode("utf-8"))

  def token_id(self, special):
    return self.specials[special]

  def decode(self, ids):
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if i in self.by_id:
        out += [buf.decode("utf-8", errors="replace"), self.by_id[i]]
        buf = bytearray()
      else:
        buf.append(i)
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)

  def save(self, directory):
    raise NotImplementedError("the benchmark's tokenizer is not saved")


class ToolClock:
  """Wall-time intervals of tool calls (from any thread); ``busy_s`` is their union's length."""

  def __init__(self):
    self.intervals, self.lock = [], threading.Lock()

  def add(self, start: float, end: float) -> None:
    with self.lock:
      self.intervals.append((start, end))

  def busy_s(self) -> float:
    total, last = 0.0, float("-inf")
    for start, end in sorted(self.intervals):
      if end > last:
        total += end - max(start, last)
        last = end
    return total


def make_env_class():
  from kat_jax.data import chat
  from kat_jax.rl.envs import base
  from kat_jax.sandbox import Job

  class ToolEnv(base.Environment):
    """Never done (the loop's max_turns ends each episode); every step answers with one tool
    result of ``tool_tokens`` characters, a function of (task, turn, action) — through the sandbox
    (``print``) when there is a pool."""

    def __init__(self, tool_tokens: int, pool, clock: ToolClock):
      self.tool_tokens, self.pool, self.clock = tool_tokens, pool, clock

    def reset(self, task):
      self.task, self.turn = task, 0
      return base.Observation((
          chat.Message("system", "You are a coding agent. Call tools; read their results."),
          chat.Message("user", f"Task {task}: inspect the repository and fix the failing test.")))

    def step(self, action):
      start = time.perf_counter()
      digest = hashlib.sha256(f"{self.task}/{self.turn}/{action}".encode()).hexdigest()
      text = (f"turn {self.turn} " + digest * (self.tool_tokens // 64 + 1))[:self.tool_tokens]
      if self.pool is not None:
        result = self.pool.run(Job(program=f"print({text!r}, end='')\n", tests=()))
        text = result.stdout if result.stdout else f"sandbox: {result.status}"[:self.tool_tokens]
      self.turn += 1
      self.clock.add(start, time.perf_counter())
      return base.StepResult(base.Observation((chat.tool_result(text, name="shell"),)), False,
                             base.OK)

  return ToolEnv


@dataclasses.dataclass(frozen=True)
class ReprefillEpisode:
  """The baseline's episode: every row's context, and the fresh inner episode of the rows that
  run (``rows[j]`` is inner row j; None once no row runs)."""
  inner: Any
  rows: tuple
  contexts: tuple
  end_reasons: tuple
  turn: int
  rng: Any

  @property
  def num_rows(self) -> int:
    return len(self.contexts)


class Reprefill:
  """The no-reuse baseline behind the episode API of ``sampler``: ``extend`` does not append to
  the kept caches; it starts a fresh episode on every running row's whole context (the history
  prefilled again), and the next ``generate_turn`` samples from that. Rows whose episode ended
  leave the batch (the reuse side keeps them masked in its batch: in this benchmark every episode
  runs every turn, so the batches are the same)."""

  def __init__(self, sampler):
    self.sampler, self.max_len = sampler, sampler.max_len

  def start_episode(self, prompts, rng) -> ReprefillEpisode:
    inner = self.sampler.start_episode(prompts, rng)
    return ReprefillEpisode(inner, tuple(range(len(prompts))), inner.contexts,
                            (None,) * len(prompts), 0, rng)

  def generate_turn(self, episode: ReprefillEpisode, config, tokenizer=None):
    import numpy as np
    from kat_jax.sample import SampleOutput
    n, width = episode.num_rows, config.max_new_tokens
    arrays = {k: np.zeros((n, width), np.float32) for k in (
        "logprobs", "entropies", "logprobs_policy", "entropies_policy")}
    tokens, lengths = np.zeros((n, width), np.int32), np.zeros((n,), np.int32)
    reasons = [r or "inactive" for r in episode.end_reasons]
    contexts, ends = list(episode.contexts), list(episode.end_reasons)
    inner = episode.inner
    if inner is not None:
      inner, out = self.sampler.generate_turn(inner, config, tokenizer)
      for j, i in enumerate(episode.rows):
        k = int(out.lengths[j])
        tokens[i, :k], lengths[i] = out.tokens[j, :k], k
        for name in arrays:
          arrays[name][i, :k] = getattr(out, name)[j, :k]
        reasons[i], contexts[i], ends[i] = (out.finish_reason[j], inner.contexts[j],
                                            inner.end_reasons[j])
    texts = None if tokenizer is None else [tokenizer.decode(tokens[i, :lengths[i]].tolist())
                                            for i in range(n)]
    out = SampleOutput(tokens=tokens, lengths=lengths, finish_reason=reasons, texts=texts,
                       **arrays)
    return dataclasses.replace(episode, inner=inner, contexts=tuple(contexts),
                               end_reasons=tuple(ends), turn=episode.turn + 1), out

  def extend(self, episode: ReprefillEpisode, new_tokens) -> ReprefillEpisode:
    import jax
    import numpy as np
    contexts, ends = list(episode.contexts), list(episode.end_reasons)
    for i, chunk in enumerate(new_tokens):
      if chunk is None:
        ends[i] = ends[i] or "inactive"
      elif ends[i] is None:
        if len(contexts[i]) + len(chunk) > self.max_len - 1:   # Sampler.extend's rule
          ends[i] = "max_len"
        else:
          contexts[i] = np.concatenate([contexts[i], np.asarray(chunk, np.int32)])
    rows = tuple(i for i, end in enumerate(ends) if end is None)
    inner = None
    if rows:                                     # the history, prefilled again
      inner = self.sampler.start_episode([contexts[i] for i in rows],
                                         jax.random.fold_in(episode.rng, episode.turn))
    return dataclasses.replace(episode, inner=inner, rows=rows, contexts=tuple(contexts),
                               end_reasons=tuple(ends))


def _numpy_params(model, seed: int = 0):
  """Random params like the model's initializers (normal, std fan_in^-1/2; norm scales 1),
  drawn with numpy (as in bench_sample: compiling init costs more than the draw)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kat_jax.model import intervals_from_segment_ids
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"]))
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(
      rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1 else np.ones(a.shape),
      a.dtype), abstract)


def measure(preset: str, turns: int, *, episodes: int, new_tokens: int, tool_tokens: int,
            rounds: int, pool, seed: int = 0) -> dict:
  import jax
  import numpy as np
  from kat_jax.data import chat
  from kat_jax.model import ModelConfig, Transformer, get_preset
  from kat_jax.rl import rollout
  from kat_jax.sample import Sampler

  tok = ByteTokenizer()
  cfg = ModelConfig.from_config(get_preset(preset))
  model = Transformer(cfg)
  params = _numpy_params(model, seed)
  clock = ToolClock()
  env_class = make_env_class()
  tasks = [f"bench-{k:03d}" for k in range(episodes)]
  opening = env_class(tool_tokens, None, clock).reset(tasks[0])
  prompt = len(chat.render_prompt(chat.Conversation(opening.messages), tok).tokens)
  observation, _ = rollout.observation_tokens(
      [chat.tool_result("x" * tool_tokens, name="shell")], tok)
  per_turn = new_tokens + 2 + len(observation)           # sampled + closing + observation
  max_len = -(-(prompt + turns * per_turn + 1) // 64) * 64
  sampler = Sampler(model, params, max_len=max_len, prefill_bucket=64, output_bucket=64,
                    extend_bucket=64)
  rcfg = rollout.default_rollout_config()
  rcfg.update(max_turns=turns, max_new_tokens=new_tokens, temperature=0.0,
              max_observation_tokens=0, env_threads=max(1, min(episodes, 8)))
  sides = {"reuse": sampler, "reprefill": Reprefill(sampler)}

  def run(side):
    envs = [env_class(tool_tokens, pool, clock) for _ in tasks]
    clock.intervals = []
    start = time.perf_counter()
    trajs = rollout.rollout(sides[side], envs, tasks, jax.random.key(seed), rcfg, tok)
    wall = time.perf_counter() - start
    return wall, clock.busy_s(), trajs

  reference = {}
  for side in sides:                                     # warm-up: compiles every program
    reference[side] = run(side)[2]
  for t in reference["reuse"]:
    if t.status != "max_turns" or t.num_turns != turns:
      raise RuntimeError(f"{preset}/{turns} turns: an episode ended with {t.status!r} after "
                         f"{t.num_turns} turns ({dict(t.info)}): the benchmark needs every "
                         f"episode to run every turn")
  for a, b in zip(reference["reuse"], reference["reprefill"]):
    assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.sampled, b.sampled), (
        f"{preset}/{turns} turns: greedy KV reuse and re-prefill disagree on task {a.task_id}")
  times = {side: [] for side in sides}
  tools = {side: [] for side in sides}
  for r in range(rounds):
    for side in (("reuse", "reprefill") if r % 2 == 0 else ("reprefill", "reuse")):
      wall, busy, trajs = run(side)
      for a, b in zip(trajs, reference[side]):
        assert np.array_equal(a.tokens, b.tokens), f"{side}: round {r} sampled other tokens"
      times[side].append(wall)
      tools[side].append(busy)
  trajs = reference["reuse"]
  sampled = int(sum(t.sampled.sum() for t in trajs))
  reuse_s, reprefill_s = (statistics.median(times[s]) for s in ("reuse", "reprefill"))
  tool_s = statistics.median(tools["reuse"])
  statuses = sorted({t.status for t in trajs})
  return dict(
      case=f"{preset}/turns={turns}", preset=preset, turns=turns, episodes=episodes,
      new_tokens=new_tokens, tool_tokens=tool_tokens, observation_tokens=len(observation),
      prompt_tokens=prompt, max_len=max_len, params=cfg.num_params(),
      device=str(jax.devices()[0].device_kind), sandbox=pool is not None, rounds=rounds,
      sampled_tokens=sampled, context_tokens=int(sum(len(t) for t in trajs)),
      statuses=statuses, tokens_equal=True,
      reuse_s=reuse_s, reprefill_s=reprefill_s,
      reuse_tokens_per_s=sampled / reuse_s, reprefill_tokens_per_s=sampled / reprefill_s,
      speedup=reprefill_s / reuse_s,
      model_speedup=(reprefill_s - statistics.median(tools["reprefill"])) / (reuse_s - tool_s),
      tool_time_fraction=tool_s / reuse_s,
      reuse_s_rounds=times["reuse"], reprefill_s_rounds=times["reprefill"])


def main(argv):
  del argv
  import contextlib
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")   # greedy ties: same on both
  from kat_jax.sandbox import SandboxPool
  with contextlib.ExitStack() as stack:
    pool = (stack.enter_context(SandboxPool(num_workers=FLAGS.sandbox_workers))
            if FLAGS.sandbox_workers > 0 else None)
    for preset in FLAGS.presets:
      for turns in FLAGS.turns:
        print(json.dumps(measure(preset, turns, episodes=FLAGS.episodes,
                                 new_tokens=FLAGS.new_tokens, tool_tokens=FLAGS.tool_tokens,
                                 rounds=FLAGS.rounds, pool=pool, seed=FLAGS.seed)), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
