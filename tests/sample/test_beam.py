"""Beam search against references on a tiny random model (vocabulary of 8): a beam as wide as the
tree equals exhaustive search (every continuation up to the horizon, scored by a full-recompute
forward pass), a narrow beam equals a plain re-implementation of the algorithm that recomputes
every prefix, width 1 is the sampler's greedy decoding, ragged batches equal prompts alone, the
reported log-probs are the full forward's, early stopping changes nothing but the step count,
prompt lengths within a bucket compile nothing, and a sharded mesh equals one device."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax import sharding as sharding_lib
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.sample import BeamOutput, Sampler, SamplingConfig

VOCAB = 8
MAX_LEN = 16
STOP = 3
PROMPTS = [[5, 1, 7], [2], [6, 0, 4, 4, 1, 2]]
ATOL = 1e-5


def _tiny_config():
  c = get_preset("tiny")
  c.update(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8,
           mlp_dim=64)
  return ModelConfig.from_config(c)


def _abstract_params(model):
  t = jnp.zeros((1, 8), jnp.int32)
  return jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"])


def _numpy_init(abstract, seed=0):
  """Random params like the model's initializers (normal, std fan_in^-1/2; norm scales 1), drawn
  with numpy, scaled up so the next-token distributions are far from uniform."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(2.0 * rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


@pytest.fixture(scope="module")
def setup():
  cfg = _tiny_config()
  model = Transformer(cfg)
  params = _numpy_init(nn.unbox(_abstract_params(model)))

  @jax.jit
  def full_log_probs(tokens_bt, lengths_b):
    seg = (jnp.arange(tokens_bt.shape[1])[None] < lengths_b[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    logits = model.apply({"params": params}, tokens_bt, pos, intervals_from_segment_ids(seg)).logits
    return jax.nn.log_softmax(logits, axis=-1)

  sampler = Sampler(model, params, max_len=MAX_LEN, prefill_bucket=8, output_bucket=4)
  return cfg, model, params, full_log_probs, sampler


def _forward(full_log_probs, seqs, lengths):
  """``full_log_probs`` with the rows padded to a multiple of 8 (few compiled shapes)."""
  rows = -(-len(seqs) // 8) * 8
  padded = np.zeros((rows, MAX_LEN), np.int32)
  padded[:len(seqs)] = seqs
  padded_lengths = np.ones((rows,), np.int32)
  padded_lengths[:len(seqs)] = lengths
  return np.asarray(full_log_probs(jnp.asarray(padded), jnp.asarray(padded_lengths)))[:len(seqs)]


def _token_log_probs(full_log_probs, prompt, continuations):
  """[C, T] log p of each continuation's tokens under a full forward over prompt + continuation
  (0 past a continuation's end)."""
  seqs = np.zeros((len(continuations), MAX_LEN), np.int32)
  lengths = []
  for i, cont in enumerate(continuations):
    seq = list(prompt) + list(cont)
    seqs[i, :len(seq)] = seq
    lengths.append(len(seq))
  logp = _forward(full_log_probs, seqs, lengths)
  width = max(len(c) for c in continuations)
  out = np.zeros((len(continuations), width), np.float32)
  for i, cont in enumerate(continuations):
    for j, token in enumerate(cont):
      out[i, j] = logp[i, len(prompt) - 1 + j, token]
  return out


def _next_log_probs(full_log_probs, prompt, prefixes):
  """[C, V] log p of the token after prompt + each prefix, by a full forward pass."""
  seqs = np.zeros((len(prefixes), MAX_LEN), np.int32)
  lengths = [len(prompt) + len(prefix) for prefix in prefixes]
  for i, prefix in enumerate(prefixes):
    seqs[i, :lengths[i]] = list(prompt) + list(prefix)
  logp = _forward(full_log_probs, seqs, lengths)
  return logp[np.arange(len(prefixes)), np.asarray(lengths) - 1]


def _score(total, length, alpha):
  return total / length ** alpha


def _exhaustive(full_log_probs, prompt, horizon, stop_ids, alpha, allowed=VOCAB):
  """Every finished continuation (ends at its first stop token, or has ``horizon`` tokens),
  scored by full recomputation; sorted best first: [(score, tokens, sum, finish_reason)]."""
  sequences = []
  for length in range(1, horizon + 1):
    for seq in itertools.product(range(allowed), repeat=length):
      if any(t in stop_ids for t in seq[:-1]):
        continue
      if seq[-1] in stop_ids:
        sequences.append((list(seq), "stop_token"))
      elif length == horizon:
        sequences.append((list(seq), "length"))
  logps = _token_log_probs(full_log_probs, prompt, [s for s, _ in sequences])
  scored = [(_score(float(logps[i].sum()), len(s), alpha), s, float(logps[i].sum()), reason)
            for i, (s, reason) in enumerate(sequences)]
  return sorted(scored, key=lambda x: -x[0])


def _reference_beam(full_log_probs, prompt, beam_width, horizon, stop_ids, alpha):
  """HF's beam search step by step, every live prefix recomputed from scratch."""
  live = [([], 0.0)]
  pool = []
  for t in range(horizon):
    logp = _next_log_probs(full_log_probs, prompt, [toks for toks, _ in live])
    cands = sorted(((s + logp[i, v], i * VOCAB + v) for i, (_, s) in enumerate(live)
                    for v in range(VOCAB)), key=lambda x: -x[0])[:2 * beam_width]
    new_live = []
    for rank, (total, index) in enumerate(cands):
      toks = live[index // VOCAB][0] + [index % VOCAB]
      if index % VOCAB in stop_ids:
        if rank < beam_width:
          pool.append((_score(total, t + 1, alpha), toks, total, "stop_token"))
      elif len(new_live) < beam_width:
        new_live.append((toks, total))
    if t + 1 == horizon:
      pool += [(_score(s, t + 1, alpha), toks, s, "length") for toks, s in new_live]
    pool = sorted(pool, key=lambda x: -x[0])[:beam_width]
    live = new_live
    if not live:
      break
  return pool


def _assert_matches(out: BeamOutput, i, expected):
  """Prompt i's beams equal ``expected`` [(score, tokens, sum, reason)] in order."""
  assert out.num_beams[i] == len(expected)
  assert out.beams(i) == [e[1] for e in expected]
  assert out.finish_reason[i] == [e[3] for e in expected]
  # Sums of a few float32 log-probs of magnitude ~10: relative tolerance.
  np.testing.assert_allclose(out.scores[i, :len(expected)], [e[0] for e in expected],
                             rtol=1e-5, atol=ATOL)
  np.testing.assert_allclose(out.sum_logprobs[i, :len(expected)], [e[2] for e in expected],
                             rtol=1e-5, atol=ATOL)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_a_beam_as_wide_as_the_tree_equals_exhaustive_search(setup, alpha):
  _, _, _, full_log_probs, sampler = setup
  horizon = 3
  out = sampler.beam_search(PROMPTS[:2], beam_width=VOCAB ** horizon, max_new_tokens=horizon,
                            length_penalty=alpha, stop_token_ids=(STOP,))
  for i, prompt in enumerate(PROMPTS[:2]):
    expected = _exhaustive(full_log_probs, prompt, horizon, (STOP,), alpha)
    assert len(expected) == 1 + 7 + 49 + 343          # stop at 1, 2, 3 tokens; 3 without a stop
    _assert_matches(out, i, expected)
    assert {"stop_token", "length"} <= set(out.finish_reason[i])
  # vocab_limit restricts the candidates (log-probs stay those of the whole vocabulary).
  limited = sampler.beam_search(PROMPTS[:1], beam_width=5 ** horizon, max_new_tokens=horizon,
                                length_penalty=alpha, stop_token_ids=(STOP,), vocab_limit=5)
  _assert_matches(limited, 0, _exhaustive(full_log_probs, PROMPTS[0], horizon, (STOP,), alpha,
                                          allowed=5))


# (1, 0.0, (1, STOP)) has a stop candidate ranked past the beam width that would win if kept.
@pytest.mark.parametrize("beam_width,alpha,stop_ids", [(3, 1.0, (STOP,)), (2, 0.0, (STOP, 6)),
                                                      (4, 2.0, (1, STOP)), (1, 0.0, (1, STOP))])
def test_narrow_beams_equal_a_recomputing_reference(setup, beam_width, alpha, stop_ids):
  _, _, _, full_log_probs, sampler = setup
  horizon = 5
  out = sampler.beam_search(PROMPTS, beam_width=beam_width, max_new_tokens=horizon,
                            length_penalty=alpha, stop_token_ids=stop_ids)
  for i, prompt in enumerate(PROMPTS):
    _assert_matches(out, i, _reference_beam(full_log_probs, prompt, beam_width, horizon,
                                            stop_ids, alpha))


def test_width_one_is_greedy_decoding(setup):
  _, _, _, _, sampler = setup
  n = 7
  long_prompt = [i % VOCAB for i in range(MAX_LEN - 4)]   # room for 4 tokens: ends with max_len
  prompts = PROMPTS + [long_prompt]
  base = sampler.generate(prompts, jax.random.key(0), SamplingConfig(temperature=0.0,
                                                                     max_new_tokens=n))
  stop = int(base.tokens[0, 2])
  cases = [((), 1.0), ((stop,), 0.0)]
  for stop_ids, alpha in cases:
    greedy = sampler.generate(prompts, jax.random.key(0), SamplingConfig(
        temperature=0.0, max_new_tokens=n, stop_token_ids=stop_ids))
    out = sampler.beam_search(prompts, beam_width=1, max_new_tokens=n, length_penalty=alpha,
                              stop_token_ids=stop_ids)
    assert out.best() == greedy.token_lists()
    assert [r[0] for r in out.finish_reason] == greedy.finish_reason
    np.testing.assert_allclose(out.logprobs[:, 0], greedy.logprobs_policy, atol=ATOL)
  assert greedy.finish_reason[0] == "stop_token" and greedy.finish_reason[-1] == "max_len"
  assert out.lengths[-1, 0] == 4 and "length" in greedy.finish_reason


def test_ragged_batch_equals_each_prompt_alone_and_logprobs_equal_full_forward(setup):
  _, _, _, full_log_probs, sampler = setup
  kwargs = dict(beam_width=4, max_new_tokens=6, length_penalty=1.0, stop_token_ids=(STOP,))
  batch = sampler.beam_search(PROMPTS, **kwargs)
  for i, prompt in enumerate(PROMPTS):
    alone = sampler.beam_search([prompt], **kwargs)
    assert alone.beams(0) == batch.beams(i) and alone.finish_reason[0] == batch.finish_reason[i]
    assert alone.steps[0] == batch.steps[i]
    np.testing.assert_allclose(alone.scores[0], batch.scores[i], atol=ATOL)
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=ATOL)
    # Log-probs of every kept beam are those of a full forward pass over prompt + beam.
    beams = batch.beams(i)
    ref = _token_log_probs(full_log_probs, prompt, beams)
    k = batch.num_beams[i]
    np.testing.assert_allclose(batch.logprobs[i, :k, :ref.shape[1]], ref, atol=ATOL)
    np.testing.assert_allclose(batch.sum_logprobs[i, :k], ref.sum(-1), atol=ATOL)
    np.testing.assert_allclose(batch.scores[i, :k],
                               batch.sum_logprobs[i, :k] / batch.lengths[i, :k], rtol=1e-6)
    assert np.all(np.diff(batch.scores[i, :k]) <= 0)             # best first
    assert len(set(map(tuple, beams))) == k                      # no hypothesis twice
    assert all(b[-1] == STOP for b, r in zip(beams, batch.finish_reason[i]) if r == "stop_token")
    assert all(STOP not in b[:-1] for b in beams)


def test_early_stopping_changes_only_the_step_count(setup):
  _, _, _, _, sampler = setup
  n = 8
  for beam_width, alpha, stop_ids in [(1, 0.0, None), (3, 0.0, (STOP, 1, 6)),
                                      (3, 1.0, (STOP, 1, 6)), (2, -1.0, (STOP, 1))]:
    if stop_ids is None:      # the greedy first token of prompt 0 stops: done after one step
      probe = sampler.beam_search(PROMPTS[:1], beam_width=1, max_new_tokens=1)
      stop_ids = (probe.best()[0][0],)
    kwargs = dict(beam_width=beam_width, max_new_tokens=n, length_penalty=alpha,
                  stop_token_ids=stop_ids)
    early = sampler.beam_search(PROMPTS, early_stopping=True, **kwargs)
    full = sampler.beam_search(PROMPTS, early_stopping=False, **kwargs)
    assert [early.beams(i) for i in range(3)] == [full.beams(i) for i in range(3)]
    np.testing.assert_allclose(early.scores, full.scores, atol=ATOL)
    assert early.finish_reason == full.finish_reason
    assert np.all(early.steps <= full.steps)
    assert full.steps.tolist() == [n] * 3 or alpha != 0.0 or beam_width > 1
    if beam_width == 1:
      assert early.steps[0] == 1
    if beam_width == 3 and alpha == 0.0:
      assert np.any(early.steps < full.steps), "expected an early stop with three stop tokens"


def test_prompt_lengths_within_a_bucket_compile_once(setup):
  _, model, params, _, _ = setup
  sampler = Sampler(model, params, max_len=MAX_LEN, prefill_bucket=8, output_bucket=4)
  sampler.beam_search([[1, 2, 3]], beam_width=3, max_new_tokens=4, stop_token_ids=(STOP,))
  assert sampler._beam._cache_size() == 1
  prefills = sampler._prefill._cache_size()
  # Other prompt lengths (same bucket), limits within the output bucket, penalties, stop ids,
  # early stopping: the same programs.
  sampler.beam_search([[4, 5, 6, 7, 1]], beam_width=3, max_new_tokens=3, length_penalty=0.5,
                      stop_token_ids=(STOP, 5), early_stopping=False)
  sampler.beam_search([[2]], beam_width=3, max_new_tokens=2, length_penalty=0.0)
  assert sampler._beam._cache_size() == 1 and sampler._prefill._cache_size() == prefills
  sampler.beam_search([[2]], beam_width=2, max_new_tokens=2)      # a new width is a new program
  assert sampler._beam._cache_size() == 2


def test_sharded_mesh_equals_single_device(setup):
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
                    prefill_bucket=8, output_bucket=4)
  kwargs = dict(beam_width=3, max_new_tokens=5, length_penalty=1.0, stop_token_ids=(STOP,))
  ref = sampler.beam_search(PROMPTS, **kwargs)
  out = sharded.beam_search(PROMPTS, **kwargs)          # 3 prompts padded to 4 rows (fsdp=2)
  assert [out.beams(i) for i in range(3)] == [ref.beams(i) for i in range(3)]
  np.testing.assert_allclose(out.scores, ref.scores, atol=1e-4)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
  assert out.finish_reason == ref.finish_reason


def test_bad_arguments_are_clear_errors(setup):
  _, _, _, _, sampler = setup
  with pytest.raises(ValueError, match="beam_width=0"):
    sampler.beam_search(PROMPTS, beam_width=0, max_new_tokens=2)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    sampler.beam_search(PROMPTS, beam_width=2, max_new_tokens=0)
  with pytest.raises(ValueError, match=r"stop_token_ids \[8\]"):
    sampler.beam_search(PROMPTS, beam_width=2, max_new_tokens=2, stop_token_ids=(8,))
  with pytest.raises(ValueError, match="length_penalty=nan"):
    sampler.beam_search(PROMPTS, beam_width=2, max_new_tokens=2, length_penalty=float("nan"))
  with pytest.raises(ValueError, match="vocab_limit=9"):
    sampler.beam_search(PROMPTS, beam_width=2, max_new_tokens=2, vocab_limit=9)
  with pytest.raises(ValueError, match="prompt 0 has 16 tokens"):
    sampler.beam_search([[1] * MAX_LEN], beam_width=2, max_new_tokens=2)
  with pytest.raises(ValueError, match=r"prompt 1 holds ids outside \[0, 8\).*\[9\]"):
    sampler.beam_search([[1], [2, 9]], beam_width=2, max_new_tokens=2)
  with pytest.raises(ValueError, match="at least one prompt"):
    sampler.beam_search([], beam_width=2, max_new_tokens=2)
