"""Multi-turn episodes of the KV-cache sampler against recomputation from scratch: a turn after
``extend`` decodes exactly as a fresh prefill of the whole history does (ragged prompts and
observations, rows appending nothing or ending, stop-string cuts, over three turns), behaviour
log-probs are the policy's own T=1 log-probs of a full forward pass, observation lengths within a
bucket compile nothing, rows that run out of cache finish with "max_len", and forked rows decode as
their sources (or, with new keys, as a batch of repeated prompts)."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax import sharding as sharding_lib
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.sample import Sampler, SamplingConfig
from kat_jax.sample import distribution

MAX_LEN = 48
PROMPTS = [[5, 17, 300], [9, 8, 7, 6, 5, 4, 3], list(range(100, 112)), [42, 43, 44, 45, 46]]
# Observations appended after turns 0 and 1: ragged, one row appends nothing each time.
OBSERVATIONS = [
    [[7, 8, 9], [], list(range(1000, 1011)), [3] * 6],
    [[11, 12], list(range(500, 505)), [], [77]],
]
ATOL = 1e-5


def _numpy_init(abstract, seed=0):
  """Random params like the model's initializers (normal, std fan_in^-1/2; norm scales 1), drawn
  with numpy: compiling ``model.init`` costs more than the rest of a test here."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


def _abstract_params(model):
  t = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"])


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.from_config(get_preset("tiny"))
  model = Transformer(cfg)
  params = _numpy_init(nn.unbox(_abstract_params(model)))

  @jax.jit
  def full_log_probs(tokens_bt, lengths_b):
    seg = (jnp.arange(tokens_bt.shape[1])[None] < lengths_b[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    logits = model.apply({"params": params}, tokens_bt, pos, intervals_from_segment_ids(seg)).logits
    return logits, jax.nn.log_softmax(logits, axis=-1)

  sampler = Sampler(model, params, max_len=MAX_LEN, prefill_bucket=16, output_bucket=8,
                    extend_bucket=16)
  return cfg, model, params, full_log_probs, sampler


def _assert_same_turn(out, ref, rows=None):
  """``out`` (an episode turn) equals ``ref`` (a fresh generation) on ``rows``."""
  rows = list(range(len(ref.lengths))) if rows is None else rows
  for i, j in enumerate(rows):
    assert out.finish_reason[j] == ref.finish_reason[i], (j, out.finish_reason, ref.finish_reason)
    assert out.lengths[j] == ref.lengths[i]
    np.testing.assert_array_equal(out.tokens[j], ref.tokens[i])
    for name in ("logprobs", "entropies", "logprobs_policy", "entropies_policy"):
      np.testing.assert_allclose(getattr(out, name)[j], getattr(ref, name)[i], atol=ATOL,
                                 err_msg=f"{name}, row {j}")


def test_extend_then_decode_equals_prefilling_the_whole_history(setup):
  _, _, _, _, sampler = setup
  probe = sampler.generate(PROMPTS, jax.random.key(0), SamplingConfig(temperature=0.0,
                                                                      max_new_tokens=6))
  stop = int(probe.tokens[1, 2])                  # row 1 stops early in turn 0: ragged turns
  configs = [SamplingConfig(temperature=0.0, max_new_tokens=n, stop_token_ids=(stop,))
             for n in (6, 5, 7)]
  histories = [list(p) for p in PROMPTS]
  episode = sampler.start_episode(PROMPTS, jax.random.key(1))
  for turn, config in enumerate(configs):
    ref = sampler.generate(histories, jax.random.key(2), config)      # prefills everything
    episode, out = sampler.generate_turn(episode, config)
    _assert_same_turn(out, ref)
    # Greedy with no filtering: the sampling distribution is the policy.
    np.testing.assert_array_equal(out.logprobs, out.logprobs_policy)
    if turn == 0:
      assert out.finish_reason[1] == "stop_token" and out.lengths[1] < 6
    for i in range(len(PROMPTS)):
      histories[i] += out.tokens[i, :out.lengths[i]].tolist()
    if turn < len(OBSERVATIONS):
      episode = sampler.extend(episode, OBSERVATIONS[turn])
      for i, obs in enumerate(OBSERVATIONS[turn]):
        histories[i] += obs
    assert [c.tolist() for c in episode.contexts] == histories
  # A row ended with None finishes every later turn at once; the others go on unchanged.
  episode = sampler.extend(episode, [[1, 2], None, [], [5]])
  histories[0] += [1, 2]
  histories[3] += [5]
  assert episode.running.tolist() == [True, False, True, True]
  ref = sampler.generate([histories[i] for i in (0, 2, 3)], jax.random.key(2), configs[0])
  episode, out = sampler.generate_turn(episode, configs[0])
  _assert_same_turn(out, ref, rows=[0, 2, 3])
  assert out.finish_reason[1] == "inactive" and out.lengths[1] == 0
  assert not out.tokens[1].any() and not out.logprobs_policy[1].any()
  with pytest.raises(ValueError, match="row 1's episode was ended"):
    sampler.extend(episode, [[], [4], [], []])


class _LetterTokenizer:
  """Token i decodes to one letter (i mod 26): stop strings span several tokens."""

  def decode(self, ids):
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


def test_a_turn_cut_at_a_stop_string_continues_after_its_last_kept_token(setup):
  _, _, _, _, sampler = setup
  tok = _LetterTokenizer()
  greedy = SamplingConfig(temperature=0.0, max_new_tokens=12)
  base = sampler.generate(PROMPTS, jax.random.key(0), greedy, tok)
  stop = base.texts[2][5:7]                        # completed by token 6 of row 2
  cut_config = SamplingConfig(temperature=0.0, max_new_tokens=12, stop_strings=(stop,),
                              stop_check_every=4)  # the loop runs on past token 6: a real cut
  episode = sampler.start_episode(PROMPTS, jax.random.key(1))
  episode, first = sampler.generate_turn(episode, cut_config, tok)
  _assert_same_turn(first, sampler.generate(PROMPTS, jax.random.key(1), cut_config, tok))
  assert first.finish_reason[2] == "stop_string" and first.lengths[2] <= 7
  assert first.lengths[2] % cut_config.stop_check_every, "no tokens past the cut: nothing tested"
  histories = [p + first.tokens[i, :first.lengths[i]].tolist() for i, p in enumerate(PROMPTS)]
  # The next turn continues right after the cut, with or without an observation in between.
  ref = sampler.generate(histories, jax.random.key(0), SamplingConfig(temperature=0.0,
                                                                      max_new_tokens=5))
  episode, second = sampler.generate_turn(episode, SamplingConfig(temperature=0.0,
                                                                  max_new_tokens=5))
  _assert_same_turn(second, ref)
  histories = [h + second.tokens[i, :second.lengths[i]].tolist() + [9] * (i + 1)
               for i, h in enumerate(histories)]
  episode = sampler.extend(episode, [[9] * (i + 1) for i in range(len(PROMPTS))])
  ref = sampler.generate(histories, jax.random.key(0), greedy)
  episode, third = sampler.generate_turn(episode, greedy)
  _assert_same_turn(third, ref)


def test_behaviour_logprobs_are_the_policys_own_t1_logprobs_of_a_full_forward(setup):
  _, _, _, full_log_probs, sampler = setup
  config = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=6)
  episode = sampler.start_episode(PROMPTS, jax.random.key(4))
  turns, starts = [], []
  for turn in range(3):
    starts.append(episode.context_lengths)
    episode, out = sampler.generate_turn(episode, config)
    turns.append(out)
    if turn < len(OBSERVATIONS):
      episode = sampler.extend(episode, OBSERVATIONS[turn])
  seqs = np.zeros((len(PROMPTS), MAX_LEN), np.int32)
  for i, context in enumerate(episode.contexts):
    seqs[i, :len(context)] = context
  logits, logp = (np.asarray(a) for a in full_log_probs(jnp.asarray(seqs),
                                                        jnp.asarray(episode.context_lengths)))
  gaps = []
  for out, start in zip(turns, starts):
    for i in range(len(PROMPTS)):
      n = int(out.lengths[i])
      assert n == config.max_new_tokens
      at = start[i] - 1 + np.arange(n)              # the positions predicting this turn's tokens
      np.testing.assert_array_equal(seqs[i, at + 1], out.tokens[i, :n])
      chosen = logp[i, at, out.tokens[i, :n]]
      np.testing.assert_allclose(out.logprobs_policy[i, :n], chosen, atol=ATOL)
      np.testing.assert_allclose(out.entropies_policy[i, :n],
                                 -(np.exp(logp[i, at]) * logp[i, at]).sum(-1), atol=ATOL)
      pi = np.asarray(distribution.sampling_log_probs(jnp.asarray(logits[i, at]), config))
      np.testing.assert_allclose(out.logprobs[i, :n], pi[np.arange(n), out.tokens[i, :n]],
                                 atol=ATOL)
      gaps.append(np.abs(out.logprobs[i, :n] - out.logprobs_policy[i, :n]).max())
  # The two log-probs are different quantities here (T = 0.7, top-p): recording pi alone would
  # give a biased PPO ratio.
  assert max(gaps) > 0.05


def test_observation_lengths_within_a_bucket_compile_nothing(setup):
  _, _, _, _, sampler = setup
  compiles = []

  def count(event, duration, **kwargs):   # a program compiled, or loaded from the persistent cache
    if event in ("/jax/core/compile/backend_compile_duration",
                 "/jax/compilation_cache/cache_retrieval_time_sec"):
      compiles.append(event)

  config = SamplingConfig(temperature=1.0, max_new_tokens=3)
  episode = sampler.start_episode(PROMPTS, jax.random.key(5))
  episode, _ = sampler.generate_turn(episode, config)
  episode = sampler.extend(episode, [[1] * 3, [], [2] * 7, [3]])          # warm: bucket 16
  episode, _ = sampler.generate_turn(episode, config)
  jax.monitoring.register_event_duration_secs_listener(count)
  try:
    extend_programs = sampler._extend._cache_size()
    for obs in ([[4] * 9, [5] * 2, [], [6] * 16], [[7], [8] * 16, [9] * 4, []]):
      episode = sampler.extend(episode, obs)
      episode, out = sampler.generate_turn(episode, config)
      assert out.finish_reason == ["length"] * 4
    assert compiles == [] and sampler._extend._cache_size() == extend_programs
    episode = sampler.extend(episode, [[1] * 17, [], [], []])           # the next bucket: 32
    assert sampler._extend._cache_size() == extend_programs + 1 and compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(count)


def test_rows_that_run_out_of_cache_finish_with_max_len(setup):
  _, _, _, _, sampler = setup
  config = SamplingConfig(temperature=0.0, max_new_tokens=12)
  prompts = [list(range(1, MAX_LEN - 9)),     # fills the cache in turn 0 (10 tokens left)
             [5, 6, 7, 8, 9],                  # 17 after turn 0; its observation will not fit
             [1, 2, 3],                        # 15 after turn 0; observation leaves one slot
             [4, 3, 2, 1]]                     # an ordinary row
  episode = sampler.start_episode(prompts, jax.random.key(0))
  episode, first = sampler.generate_turn(episode, config)
  assert first.finish_reason == ["max_len", "length", "length", "length"]
  assert first.lengths.tolist() == [10, 12, 12, 12]
  assert episode.end_reasons == ("max_len", None, None, None)
  history = [p + first.tokens[i, :first.lengths[i]].tolist() for i, p in enumerate(prompts)]
  observations = [[1, 2], list(range(200, MAX_LEN - 17 + 200)),   # 17 + 31 = MAX_LEN: too long
                  list(range(300, MAX_LEN - 16 + 300)),            # 15 + 32 = MAX_LEN - 1: fits
                  [8, 8]]
  episode = sampler.extend(episode, observations)
  assert episode.end_reasons == ("max_len", "max_len", None, None)
  assert episode.context_lengths.tolist() == [MAX_LEN, 17, MAX_LEN - 1, 18]
  episode, second = sampler.generate_turn(episode, config)
  assert second.finish_reason == ["max_len", "max_len", "max_len", "length"]
  assert second.lengths.tolist() == [0, 0, 1, 12]
  ref = sampler.generate([history[2] + observations[2], history[3] + observations[3]],
                         jax.random.key(0), config)
  _assert_same_turn(second, ref, rows=[2, 3])
  assert episode.end_reasons == ("max_len", "max_len", "max_len", None)
  # Ended rows take nothing more (tokens for full rows are dropped, not an error).
  episode = sampler.extend(episode, [[1], [1], None, [2]])
  episode, third = sampler.generate_turn(episode, config)
  assert third.finish_reason[:3] == ["max_len", "max_len", "max_len"]
  assert third.lengths.tolist()[:3] == [0, 0, 0]
  with pytest.raises(ValueError, match="3 token lists for an episode of 4 rows"):
    sampler.extend(episode, [[1], [1], [1]])
  with pytest.raises(ValueError, match=r"outside \[0, 2048\)"):
    sampler.extend(episode, [[], [], [], [2048]])


def test_forked_rows_decode_as_their_sources(setup):
  _, _, _, _, sampler = setup
  config = SamplingConfig(temperature=1.0, top_k=50, max_new_tokens=8)
  episode = sampler.start_episode(PROMPTS, jax.random.key(6))
  episode, _ = sampler.generate_turn(episode, config)
  episode = sampler.extend(episode, OBSERVATIONS[0])
  rows = [2, 0, 2, 1]
  children = sampler.fork(episode, rows)                 # same keys: the same continuations
  assert [c.tolist() for c in children.contexts] == [episode.contexts[r].tolist() for r in rows]
  children, forked = sampler.generate_turn(children, config)
  episode, original = sampler.generate_turn(episode, config)
  _assert_same_turn(forked, _rows(original, rows))
  with pytest.raises(ValueError, match=r"row indices in \[0, 4\)"):
    sampler.fork(episode, [4])


def _rows(out, rows):
  """``out`` restricted to ``rows``, in that order."""
  arrays = {name: getattr(out, name)[rows] for name in (
      "tokens", "logprobs", "entropies", "logprobs_policy", "entropies_policy", "lengths")}
  return dataclasses.replace(out, finish_reason=[out.finish_reason[i] for i in rows], **arrays)


def test_forking_a_prefilled_prompt_equals_sampling_the_repeated_prompts(setup):
  _, _, _, _, sampler = setup
  config = SamplingConfig(temperature=1.0, max_new_tokens=8)
  keys = jax.random.split(jax.random.key(9), 4)
  episode = sampler.start_episode(PROMPTS[:2], jax.random.key(0))
  group = sampler.fork(episode, [0, 0, 0, 1], keys)      # a prompt prefilled once, 3 samples
  group, out = sampler.generate_turn(group, config)
  ref = sampler.generate([PROMPTS[0]] * 3 + [PROMPTS[1]], keys, config)
  _assert_same_turn(out, ref)
  assert len({tuple(t) for t in out.tokens[:3].tolist()}) > 1    # new keys: new samples


@pytest.mark.slow
def test_sharded_episode_equals_single_device(setup):
  cfg, _, params, _, sampler = setup
  if jax.device_count() < 8:
    pytest.fail("tests/conftest.py should simulate 8 CPU devices")
  mesh_cfg = sharding_lib.default_mesh_config()
  mesh_cfg.update(data=1, fsdp=2, tensor=4)
  mesh = sharding_lib.make_mesh(mesh_cfg)
  rules = sharding_lib.DEFAULT_RULES
  sharded_model = Transformer(cfg, mesh=mesh, rules=rules)
  shardings = sharding_lib.logical_to_mesh(nn.get_partition_spec(_abstract_params(sharded_model)),
                                           mesh, rules)
  sharded = Sampler(sharded_model, jax.device_put(params, shardings), max_len=MAX_LEN,
                    prefill_bucket=16, output_bucket=8, extend_bucket=16)
  config = SamplingConfig(temperature=0.8, top_p=0.9, max_new_tokens=5)
  outs = []
  for s in (sampler, sharded):
    episode = s.start_episode(PROMPTS[:3], jax.random.key(3))       # 3 rows padded to 4
    episode, first = s.generate_turn(episode, config)
    episode = s.extend(episode, OBSERVATIONS[0][:3])
    episode = s.fork(episode, [2, 0, 1])
    episode, second = s.generate_turn(episode, config)
    outs.append((first, second))
  for out, ref in zip(outs[1], outs[0]):
    assert out.finish_reason == ref.finish_reason
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs_policy, ref.logprobs_policy, atol=1e-4)
