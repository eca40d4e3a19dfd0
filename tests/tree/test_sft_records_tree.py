"""Tree-mode SFT of self-debugging records (``sft_data.SelfDebugGroups``): each tree row holds
exactly the passing records of one prompt (tokens and loss masks of ``chat.render`` of their SFT
conversations), the prompt stored once; failing records never appear; train / eval are disjoint by
task id; batches are deterministic and resume exactly; the tree loss equals the flat per-trajectory
token mean; bad settings are ConfigErrors naming the field; configs/sft_tiny_debug.py:<format>_tree
trains through the normal entry."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kat_jax.data import chat, self_debug
from kat_jax.data.corpora import common
from kat_jax.errors import ConfigError
from kat_jax.model import ModelConfig, Transformer, get_preset, intervals_from_segment_ids
from kat_jax.train import losses
from kat_jax.tree import sft_data
from configs.base import train_config
from tests.data.byte_tokenizer import ByteTokenizer

EVAL_FRACTION = 0.5
FMTS = self_debug.SFT_FORMATS


def _task_ids():
  """Three train and two eval task ids under EVAL_FRACTION (the first such ids)."""
  found = {"train": [], "eval": []}
  for i in range(100):
    tid = f"task{i}"
    split = common.split_of(f"task:{tid}", EVAL_FRACTION)
    if len(found[split]) < (3 if split == "train" else 2):
      found[split].append(tid)
  return found["train"] + found["eval"]


def _record(tid, program, k, *, passed=True):
  """Refinement k of program ``program`` of task ``tid``: explanations start with distinct
  letters; refinements 0 and 3 have the same code."""
  name = f"f{program}"
  fix = ["a + b", "b + a", "a+b"][k % 3]
  buggy = f"def {name}(a, b):\n    return a - b\n"
  return self_debug.SelfDebugRecord(
      record_id=f"{tid}/m{program}/e{k}/r0", task_id=tid, source="mutant",
      prompt=f"Write {name}(a, b) returning a + b. ({tid})", task="{}",
      reference=f"def {name}(a, b):\n    return a + b\n", buggy_code=buggy,
      error=f"FAILED {name}(1, 2): expected 3, got -1", buggy_tests_passed=0,
      explanation=f"{'ABCD'[k]}: line 2 subtracts instead of adding.",
      refinement=f"def {name}(a, b):\n    return {fix}\n",
      refinement_text="", passed=passed, tests_passed=3 if passed else 1, tests_total=3,
      status="ok", refinement_error="" if passed else "FAILED", lineage={"source": "mutant"})


def _records():
  """Per task: program 0 with three passing refinements (two with the same code: identical
  refine_only trajectories) and a failing one; program 1 with one passing refinement."""
  out = []
  for tid in _task_ids():
    out += [_record(tid, 0, 0), _record(tid, 0, 1), _record(tid, 0, 3),
            _record(tid, 0, 2, passed=False), _record(tid, 1, 0)]
  return out


@pytest.fixture(scope="module")
def records_path(tmp_path_factory):
  return self_debug.write_records(_records(), str(tmp_path_factory.mktemp("sd") / "records.jsonl"))


def _tree_cfg(path, fmt="explain_refine", **overrides):
  c = sft_data.default_tree_config()
  c.update(dict(source="self_debug", records_path=path, format=fmt, eval_fraction=EVAL_FRACTION,
                max_len=512, max_tokens=768, max_traj=4, max_nodes=64))
  c.update(overrides)
  return c


def _iterator(path, fmt="explain_refine", split="train", batch_size=3, seed=0, **overrides):
  return sft_data.TreeSFTIterator(_tree_cfg(path, fmt, **overrides), ByteTokenizer(), split=split,
                                  batch_size=batch_size, seed=seed)


def _expected_groups(fmt, split):
  """{user turn: [(tokens, loss_mask)] of its passing records, file order} of ``split``."""
  tok, groups = ByteTokenizer(), {}
  for r in _records():
    if r.passed and common.split_of(f"task:{r.task_id}", EVAL_FRACTION) == split:
      conv = self_debug.sft_conversation(r, fmt)
      ex = chat.render(conv, tok)
      groups.setdefault(conv.messages[0].content, []).append((ex.tokens.tolist(), ex.loss_mask))
  return groups


def _rows(batch):
  """Per row: [(tokens, weights)] of its trajectories, and its stored tree token count."""
  out = []
  for b in range(batch["tokens"].shape[0]):
    trajs = []
    for k in np.flatnonzero(batch["traj_valid"][b]):
      n = batch["lengths"][b, k]
      trajs.append((batch["tokens"][b, batch["row_map"][b, k, :n]].tolist(),
                    batch["field/weight"][b, k, :n]))
    out.append((trajs, int(batch["token_valid"][b].sum())))
  return out


def _distinct_prefixes(token_lists):
  return len({tuple(t[:i + 1]) for t in token_lists for i in range(len(t))})


@pytest.mark.parametrize("fmt", FMTS)
def test_each_row_is_the_passing_records_of_one_prompt_with_the_prompt_stored_once(
    records_path, fmt):
  groups = _expected_groups(fmt, "train")
  assert len(groups) == 6 and sorted(len(g) for g in groups.values()) == [1, 1, 1, 3, 3, 3]
  failing = {tuple(chat.render(self_debug.sft_conversation(dataclasses.replace(r, passed=True),
                                                           fmt), ByteTokenizer()).tokens.tolist())
             for r in _records() if not r.passed}
  it = _iterator(records_path, fmt)
  source = it.source
  assert isinstance(source, sft_data.SelfDebugGroups) and source.prompts == list(groups)
  seen = set()
  for _ in range(3):
    for trajs, n_tree in _rows(next(it)):
      match = [p for p, g in groups.items() if [t for t, _ in g] == [t for t, _ in trajs]]
      assert len(match) == 1, "a row is not exactly one prompt group"
      seen.add(match[0])
      for (_, weights), (_, mask) in zip(trajs, groups[match[0]]):
        np.testing.assert_array_equal(weights, mask.astype(np.float32))
      tokens = [t for t, _ in trajs]
      assert not failing & {tuple(t) for t in tokens}
      assert n_tree == _distinct_prefixes(tokens)
      user = chat.Conversation((chat.Message("user", match[0]),))
      prompt_len = len(chat.render_prompt(user, ByteTokenizer()).tokens)
      assert all(t[:prompt_len] == tokens[0][:prompt_len] for t in tokens)
      if fmt == "explain_refine":   # siblings fork at the answer's first token
        assert n_tree == sum(map(len, tokens)) - (len(tokens) - 1) * prompt_len
      else:                         # the fixes share "```python\ndef f..." beyond the prompt
        assert n_tree <= sum(map(len, tokens)) - (len(tokens) - 1) * prompt_len
  assert len(seen) >= 3          # rows draw different groups
  m = it.metrics()
  assert m["dropped_trajectories"] == 0 and m["skipped_groups"] == 0 and m["por"] > 0.3


def test_splits_are_disjoint_by_task_id(records_path):
  task_ids = {}
  for split in ("train", "eval"):
    src = _iterator(records_path, split=split).source
    assert src.split == split
    task_ids[split] = {c.meta["task_id"] for g in src.conversations for c in g}
    assert all(common.split_of(f"task:{t}", EVAL_FRACTION) == split for t in task_ids[split])
    assert [[c.meta["record_id"] for c in g] for g in src.conversations] == [
        [r.record_id for r in _records()
         if r.passed and self_debug.sft_conversation(r, "explain_refine").messages[0].content == p]
        for p in src.prompts]
  assert len(task_ids["train"]) == 3 and len(task_ids["eval"]) == 2
  assert not task_ids["train"] & task_ids["eval"]
  assert task_ids["train"] | task_ids["eval"] == {r.task_id for r in _records()}
  heldout = _iterator(records_path, split="heldout").source   # the stage's other name for eval
  assert heldout.prompts == _iterator(records_path, split="eval").source.prompts


def _assert_batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_batches_are_deterministic_and_resume_from_get_state(records_path):
  first = _iterator(records_path, seed=3)
  batches = [next(first) for _ in range(3)]
  again = _iterator(records_path, seed=3)
  for b in batches:
    _assert_batches_equal(b, next(again))
  resumed = _iterator(records_path, seed=3)
  probe = _iterator(records_path, seed=3)
  next(probe), next(probe)
  resumed.set_state(probe.get_state())
  assert resumed.get_state() == {"index": 2}
  _assert_batches_equal(next(resumed), batches[2])
  other = next(_iterator(records_path, seed=4))
  assert any(not np.array_equal(other[k], batches[0][k]) for k in batches[0])


def test_trajectories_that_do_not_fit_are_dropped_and_counted(records_path):
  it = _iterator(records_path, max_traj=1)
  batch = next(it)
  groups = _expected_groups("explain_refine", "train")
  dropped = 0
  for trajs, _ in _rows(batch):
    assert len(trajs) == 1
    group = next(g for g in groups.values() if g[0][0] == trajs[0][0])
    dropped += len(group) - 1
  assert it.metrics()["dropped_trajectories"] == dropped > 0
  # max_tokens below two trajectories: the first of each group alone fits.
  single = max(len(t) for g in groups.values() for t, _ in g)
  it = _iterator(records_path, max_tokens=single + 10)
  assert all(len(trajs) == 1 for trajs, _ in _rows(next(it)))
  with pytest.raises(ValueError, match="no trajectory of 64 groups .* fits config.tree"):
    next(_iterator(records_path, max_len=16))


@pytest.fixture(scope="module")
def model_and_params():
  vocab = ByteTokenizer().vocab_size
  c = get_preset("tiny")
  c.update(vocab_size=vocab, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16,
           mlp_dim=64)
  model = Transformer(ModelConfig.from_config(c))
  t = jnp.zeros((1, 4), jnp.int32)
  init = jax.jit(lambda key: model.init(key, t, t, intervals_from_segment_ids(jnp.ones_like(t))))
  params = nn.unbox(init(jax.random.key(0))["params"])
  return model, params


@pytest.mark.parametrize("fmt", FMTS)   # refine_only: with identical sibling trajectories
def test_tree_loss_equals_the_flat_per_trajectory_loss(records_path, model_and_params, fmt):
  batch = next(_iterator(records_path, fmt, batch_size=2))
  model, params = model_and_params
  loss = losses.get_loss("tree")
  ctx = losses.LossContext(apply_fn=model.apply, config=train_config(objective="nll"))
  device_batch = jax.tree.map(jnp.asarray, batch)
  tree_value = jax.jit(lambda p: loss.numerator(p, device_batch, ctx)[0]
                       / loss.denominator(device_batch))(params)
  # Reference: every trajectory as its own padded flat row, NLL of each trained token.
  trajs = [t for trajs, _ in _rows(batch) for t in trajs]
  width = max(len(t) for t, _ in trajs)
  tokens = np.zeros((len(trajs), width), np.int32)
  seg = np.zeros((len(trajs), width), np.int32)
  weights = np.zeros((len(trajs), width), np.float32)
  for k, (t, w) in enumerate(trajs):
    tokens[k, :len(t)], seg[k, :len(t)], weights[k, :len(t)] = t, 1, w
  pos = jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), tokens.shape)
  logits = jax.jit(lambda p, x, s: model.apply({"params": p}, x, pos,
                                               intervals_from_segment_ids(s)).logits)(
      params, jnp.asarray(tokens), jnp.asarray(seg))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -np.take_along_axis(np.asarray(logp[:, :-1]), tokens[:, 1:, None], axis=-1)[..., 0]
  flat_value = (nll * weights[:, 1:]).sum() / weights[:, 1:].sum()
  assert weights[:, 1:].sum() == float(loss.denominator(device_batch)) > 0
  np.testing.assert_allclose(float(tree_value), flat_value, rtol=2e-5)


def test_bad_settings_are_config_errors_naming_the_field(records_path, tmp_path):
  tok = ByteTokenizer()
  cases = [(dict(source="records"), r"config.tree.source='records': use one of \['procedural', "
                                    r"'self_debug'\]"),
           (dict(format="explain"), r"config.tree.format='explain': use one of "
                                    r"\['explain_refine', 'refine_only'\]"),
           (dict(records_path=""), r"set config.tree.records_path"),
           (dict(records_path=str(tmp_path / "none.jsonl")),
            r"config.tree.records_path='.*none.jsonl' is not a file"),
           (dict(eval_fraction=1.0), r"config.tree.eval_fraction=1.0 must lie in \[0, 1\)")]
  for overrides, match in cases:
    with pytest.raises(ConfigError, match=match):
      sft_data.make_group_source(_tree_cfg(records_path, **overrides), tok, "train")
  with pytest.raises(ConfigError, match=r"no passing record in split 'eval'.*eval_fraction=0.0"):
    sft_data.make_group_source(_tree_cfg(records_path, eval_fraction=0.0), tok, "eval")
  only_failing = self_debug.write_records([r for r in _records() if not r.passed],
                                          str(tmp_path / "failing.jsonl"))
  with pytest.raises(ConfigError, match=r"no passing record in split 'train' \(5 records, 0 pass"):
    sft_data.make_group_source(_tree_cfg(only_failing), tok, "train")


@pytest.mark.slow   # about 30 s: two steps and an eval of the tiny model
def test_tree_variant_of_the_debug_config_trains_through_the_stage(records_path, tmp_path):
  from configs import sft_tiny_debug
  from kat_jax.data import tokenizer as tokenizer_lib
  from kat_jax.train import loop, stages
  for fmt in FMTS:
    c = sft_tiny_debug.get_config(f"{fmt}_tree")
    assert (c.stage, c.tree.source, c.tree.format) == ("sft_tree", "self_debug", fmt)
    assert c.tree.records_path.endswith(self_debug.RECORDS_FILE)
    assert sft_tiny_debug.get_config(fmt).stage == "sft"   # the flat variants are unchanged
  convs = [self_debug.sft_conversation(r, "explain_refine") for r in _records() if r.passed]
  tokenizer = tokenizer_lib.SentencePieceTokenizer.train(
      [chat.render_text(conv) for conv in convs] * 4, vocab_size=400, max_sentences=4000)
  tokenizer.save(str(tmp_path / "tok"))
  c = sft_tiny_debug.get_config("explain_refine_tree")
  c.tree.update(dict(records_path=records_path, eval_fraction=EVAL_FRACTION, max_len=384,
                     max_tokens=512))
  c.data.tokenizer_path, c.data.data_dir = str(tmp_path / "tok"), str(tmp_path / "tfds")
  c.model.update(dict(vocab_size=512, d_model=32, num_layers=1, num_heads=2, num_kv_heads=2,
                      head_dim=16, mlp_dim=64))
  c.mesh.update(dict(data=1, fsdp=4, tensor=2))   # 8 simulated devices; 4 trees over fsdp
  c.train.update(dict(steps=2, seq_len=512, warmup_steps=1, eval_every=2, eval_steps=1,
                      checkpoint_every=2, progress_bar=False, log_every=1))
  it, tok = stages.get_stage("sft_tree").make_data(c, str(tmp_path / "probe"), split="eval",
                                                   batch_size=4, seed=0, shard_index=0,
                                                   shard_count=1)
  assert isinstance(it.source, sft_data.SelfDebugGroups) and it.source.split == "eval"
  assert tok.vocab_size == tokenizer.vocab_size
  result = loop.train(c, str(tmp_path / "run"))
  assert result["step"] == 2
  assert np.isfinite(result["train_loss"]) and np.isfinite(result["eval_loss"]), result
  assert result["train_data/por"] > 0.3 and result["train_data/dropped_trajectories"] == 0
