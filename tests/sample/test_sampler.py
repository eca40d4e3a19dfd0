"""The KV-cache sampler against full recomputation: greedy tokens are the argmax of a full forward
pass over the sequence so far, reported log-probs / entropies are those of the recomputed
distribution, stop conditions cut where they should, a batch of ragged prompts equals one-by-one
generation, fixed keys reproduce, top-k/top-p stay in their sets, and a sharded mesh equals one
device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax import sharding as sharding_lib
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.sample import Sampler, SamplingConfig, cut_at_stop_string, generate_ids
from kat_jax.sample import distribution

MAX_LEN = 40
N = 12
PROMPTS = [[5, 17, 300], [9, 8, 7, 6, 5, 4, 3], list(range(100, 112))]
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=N)
PLAIN = SamplingConfig(temperature=1.0, max_new_tokens=N)
TOP_P = SamplingConfig(temperature=1.5, top_p=0.3, max_new_tokens=N)


def _numpy_init(abstract, seed=0):
  """Random params like the model's initializers (normal, std fan_in^-1/2; norm scales 1), drawn
  with numpy: compiling ``model.init`` costs more than the rest of a test here."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * a.shape[0] ** -0.5 if a.ndim > 1
                            else np.ones(a.shape), a.dtype), abstract)


@pytest.fixture(scope="module")
def setup():
  cfg = ModelConfig.from_config(get_preset("tiny"))
  model = Transformer(cfg)
  t = jnp.zeros((1, 8), jnp.int32)
  abstract = nn.unbox(jax.eval_shape(lambda: model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"]))
  params = _numpy_init(abstract)

  @jax.jit
  def full_logits(tokens_bt, lengths_b):
    seg = (jnp.arange(tokens_bt.shape[1])[None] < lengths_b[:, None]).astype(jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
    return model.apply({"params": params}, tokens_bt, pos, intervals_from_segment_ids(seg)).logits

  sampler = Sampler(model, params, max_len=MAX_LEN, prefill_bucket=16, output_bucket=16)
  return cfg, model, params, full_logits, sampler


def _recomputed(full_logits, prompts, out):
  """[B, N, V] logits of a full forward over prompt + generated, at the positions that predict
  each generated token."""
  seqs = np.zeros((len(prompts), MAX_LEN), np.int32)
  lengths = []
  for i, p in enumerate(prompts):
    seq = list(p) + out.tokens[i, :out.lengths[i]].tolist()
    seqs[i, :len(seq)] = seq
    lengths.append(len(seq))
  logits = np.asarray(full_logits(jnp.asarray(seqs), jnp.asarray(lengths)))
  rows = []
  for i, p in enumerate(prompts):
    at = len(p) - 1 + np.arange(out.tokens.shape[1])
    rows.append(logits[i, np.minimum(at, MAX_LEN - 1)])
  return np.stack(rows)


def test_greedy_equals_argmax_of_full_forward_with_its_logprobs_and_entropies(setup):
  _, _, _, full_logits, sampler = setup
  out = sampler.generate(PROMPTS, jax.random.key(0), GREEDY)
  assert out.finish_reason == ["length"] * 3 and out.lengths.tolist() == [N] * 3
  ref = _recomputed(full_logits, PROMPTS, out)
  np.testing.assert_array_equal(out.tokens, ref.argmax(-1))
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(ref)))
  chosen = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(out.logprobs, chosen, atol=1e-4)
  np.testing.assert_allclose(out.entropies, -(np.exp(logp) * logp).sum(-1), atol=1e-4)


@pytest.mark.parametrize("config", [PLAIN, SamplingConfig(temperature=0.7, top_k=3,
                                                           max_new_tokens=N), TOP_P])
def test_sampled_logprobs_entropies_and_allowed_sets_match_recomputation(setup, config):
  _, _, _, full_logits, sampler = setup
  out = sampler.generate(PROMPTS, jax.random.key(3), config)
  ref = _recomputed(full_logits, PROMPTS, out)                   # [B, N, V]
  b, n, v = ref.shape
  logp = np.asarray(distribution.sampling_log_probs(jnp.asarray(ref.reshape(b * n, v)), config))
  logp = logp.reshape(b, n, v)
  chosen = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
  assert np.all(np.isfinite(chosen)), "a token outside the allowed set was sampled"
  np.testing.assert_allclose(out.logprobs, chosen, atol=1e-4)
  probs = np.exp(logp)
  np.testing.assert_allclose(out.entropies,
                             -(probs * np.where(probs > 0, logp, 0)).sum(-1), atol=1e-4)
  if config.top_k:
    top = np.argsort(-ref, -1)[..., :config.top_k]
    assert all(out.tokens[i, j] in top[i, j] for i in range(b) for j in range(n))


def test_stop_token_max_new_tokens_and_max_len(setup):
  _, _, _, _, sampler = setup
  base = sampler.generate(PROMPTS, jax.random.key(0), GREEDY)
  stop = int(base.tokens[0, 4])
  out = sampler.generate(PROMPTS, jax.random.key(0),
                         SamplingConfig(temperature=0.0, max_new_tokens=N, stop_token_ids=(stop,)))
  for i in range(3):
    hits = np.flatnonzero(base.tokens[i] == stop)
    expected = int(hits[0]) + 1 if len(hits) else N
    assert out.lengths[i] == expected
    assert out.finish_reason[i] == ("stop_token" if len(hits) else "length")
    np.testing.assert_array_equal(out.tokens[i, :expected], base.tokens[i, :expected])
    assert np.all(out.tokens[i, expected:] == 0) and np.all(out.logprobs[i, expected:] == 0)
  assert out.lengths[0] <= 5
  short = sampler.generate(PROMPTS, jax.random.key(0), SamplingConfig(temperature=0.0,
                                                                      max_new_tokens=5))
  np.testing.assert_array_equal(short.tokens, base.tokens[:, :5])
  assert short.finish_reason == ["length"] * 3
  # A prompt of MAX_LEN - 3 tokens leaves room for 3 generated tokens (prompt + output <= MAX_LEN).
  long_prompt = list(range(1, MAX_LEN - 2))
  full = sampler.generate([long_prompt] + PROMPTS[:2], jax.random.key(0), GREEDY)
  assert full.lengths.tolist() == [3, N, N]
  assert full.finish_reason == ["max_len", "length", "length"]
  np.testing.assert_array_equal(full.tokens[1:], base.tokens[:2])
  with pytest.raises(ValueError, match="prompt 0 has 40 tokens"):
    sampler.generate([list(range(MAX_LEN))], jax.random.key(0), SamplingConfig())


class _LetterTokenizer:
  """Token i decodes to one letter (i mod 26): stop strings span several tokens."""

  def decode(self, ids):
    return "".join(chr(ord("a") + int(i) % 26) for i in ids)


@pytest.mark.parametrize("check_every", [1, 5, 32])
def test_stop_strings_cut_after_the_completing_token(setup, check_every):
  _, _, _, _, sampler = setup
  tok = _LetterTokenizer()
  base = sampler.generate(PROMPTS, jax.random.key(0), GREEDY, tok)
  stop = base.texts[1][6:9]                         # spans tokens 6..8 of row 1
  config = SamplingConfig(temperature=0.0, max_new_tokens=N, stop_strings=("@@", stop),
                          stop_check_every=check_every)
  out = sampler.generate(PROMPTS, jax.random.key(0), config, tok)
  for i in range(3):
    text = base.texts[i]
    ks = [k for k in range(1, N + 1) if stop in text[:k]]
    expected = ks[0] if ks else N
    assert out.lengths[i] == expected, (i, text, stop)
    assert out.finish_reason[i] == ("stop_string" if ks else "length")
    assert out.texts[i] == text[:expected]
    np.testing.assert_array_equal(out.tokens[i, :expected], base.tokens[i, :expected])
  assert out.lengths[1] <= 9
  assert cut_at_stop_string("abXcdYe", ("Y", "X")) == "ab"
  assert cut_at_stop_string("abXcdYe", ("Y", "cd"), keep=True) == "abXcd"
  with pytest.raises(ValueError, match="need a tokenizer"):
    sampler.generate(PROMPTS, jax.random.key(0), config)
  small = _LetterTokenizer()
  small.vocab_size = 26
  with pytest.raises(ValueError, match="vocab_limit=26"):
    sampler.generate(PROMPTS, jax.random.key(0), config, small)


def test_batch_equals_one_by_one_and_fixed_keys_reproduce(setup):
  _, model, params, _, sampler = setup
  rng = jax.random.key(7)
  for config in (GREEDY, PLAIN):
    batch = sampler.generate(PROMPTS, rng, config)
    again = sampler.generate(PROMPTS, rng, config)
    np.testing.assert_array_equal(batch.tokens, again.tokens)
    np.testing.assert_array_equal(batch.logprobs, again.logprobs)
    for i, prompt in enumerate(PROMPTS):
      alone = sampler.generate([prompt], jax.random.fold_in(rng, i)[None], config)
      np.testing.assert_array_equal(alone.tokens[0], batch.tokens[i])
      np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[i], atol=1e-5)
      np.testing.assert_allclose(alone.entropies[0], batch.entropies[i], atol=1e-5)
  other = sampler.generate(PROMPTS, jax.random.key(8), config)
  assert not np.array_equal(other.tokens, batch.tokens)
  # The pure core (what an RL step jits) gives the sampler's result.
  padded = np.zeros((3, 16), np.int32)
  for i, p in enumerate(PROMPTS):
    padded[i, :len(p)] = p
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, jnp.arange(3))
  state = jax.jit(lambda p, t, l, k: generate_ids(model, p, t, l, k, config=config,
                                                  max_len=MAX_LEN))(
      params, jnp.asarray(padded), jnp.asarray([len(p) for p in PROMPTS]), keys)
  np.testing.assert_array_equal(np.asarray(state.tokens_bn), batch.tokens)


def test_sharded_mesh_equals_single_device(setup):
  cfg, model, params, _, sampler = setup
  if jax.device_count() < 8:
    pytest.fail("tests/conftest.py should simulate 8 CPU devices")
  mesh_cfg = sharding_lib.default_mesh_config()
  mesh_cfg.update(data=1, fsdp=2, tensor=4)
  mesh = sharding_lib.make_mesh(mesh_cfg)
  rules = sharding_lib.DEFAULT_RULES
  sharded_model = Transformer(cfg, mesh=mesh, rules=rules)
  t = jnp.zeros((1, 8), jnp.int32)
  boxed = jax.eval_shape(lambda: sharded_model.init(
      jax.random.key(0), t, t, intervals_from_segment_ids(jnp.ones((1, 8), jnp.int32)))["params"])
  shardings = sharding_lib.logical_to_mesh(nn.get_partition_spec(boxed), mesh, rules)
  sharded_params = jax.device_put(params, shardings)
  assert len(sharded_params["layer_0"]["mlp"]["up_proj"].sharding.device_set) == 8
  sharded = Sampler(sharded_model, sharded_params, max_len=MAX_LEN, prefill_bucket=16,
                    output_bucket=16)
  for config in (TOP_P,):
    ref = sampler.generate(PROMPTS, jax.random.key(5), config)
    out = sharded.generate(PROMPTS, jax.random.key(5), config)    # 3 rows padded to 4 (fsdp=2)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-4)
    np.testing.assert_allclose(out.entropies, ref.entropies, atol=1e-4)
    assert out.finish_reason == ref.finish_reason


def test_prefill_never_materializes_logits_at_every_prompt_position():
  # A Qwen-sized vocabulary: [B, P, V] float32 logits would be 2 x 512 x 151936 x 4 B = 594 MiB.
  from kat_jax.sample import decode
  c = get_preset("tiny")
  c.vocab_size = 151936
  model = Transformer(ModelConfig.from_config(c))
  b, p = 2, 512
  tokens = jnp.zeros((b, p), jnp.int32)
  params = jax.eval_shape(lambda: nn.unbox(model.init(
      jax.random.key(0), tokens[:, :4], tokens[:, :4],
      intervals_from_segment_ids(jnp.ones((1, 4), jnp.int32)))["params"]))
  fn = jax.jit(lambda prm, toks, lens, keys, act: decode.prefill(
      model, prm, toks, lens, keys, act, max_len=p + 8, max_new_tokens=8))
  compiled = fn.lower(params, tokens, jnp.full((b,), p, jnp.int32), jax.random.split(
      jax.random.key(0), b), jnp.ones((b,), bool)).compile()
  all_positions = b * p * c.vocab_size * 4
  assert compiled.memory_analysis().temp_size_in_bytes < all_positions / 4
