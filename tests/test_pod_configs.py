"""configs/pod.py: each of the 8 (model, stage) configs loads through experiments.main's flag
parser, passes every check the stage runs before training on its intended device count, declares
no field configs/base.py lacks, and fits one TPU v5p chip on its intended mesh.

Memory is computed on a ``jax.sharding.AbstractMesh`` of the intended shape from abstract shapes
only (``state_lib.abstract_state``, as the Trainer builds it; no array is allocated). Per device
(bytes; s = 2 for bfloat16 compute, f = 4 for float32; tp = mesh.tensor; L layers, width d,
H query / Hkv kv heads of size hd, MLP width m, vocabulary V, logits chunk C =
train.logits_chunk):

* **held**: the train state (float32 params and both Adam moments, sharded) plus, with
  ``train.use_reference``, the frozen reference params sharded like the params (what
  ``Trainer.reference_params`` holds); a value head, when ``model.value_head``, is in the params.
* **per token of one block's working set**, every intermediate counted in float32:
  ``blk = f · (4d + 3·(H + 2Hkv)·hd/tp + H·hd/tp + 3·m/tp)`` — the f32 norm copies and the two
  sublayer outputs (4d), q / k / v and RoPE's f32 temporaries, the attention output, the MLP's
  gate / up / gated product. Attention is the Pallas flash-style kernel: no [T, T] scores, its
  log-sum-exp (H/tp floats per token) is negligible. Plus ``head = d · (f + s)`` per token, the
  label-logit gather of the output head (one weight column per token).
* **train step** (micro-batch of ``r`` rows × ``T`` tokens, ``model.remat='full'``): saved block
  inputs ``(L + 1)·r·T·d·s`` + one block recomputed with its cotangents ``2·r·T·(blk + head)`` +
  one logits chunk with its softmax and cotangent ``3·r·C·(V/tp)·f``; gradients, 1× the params
  (2× with gradient accumulation: accumulator and micro-batch gradients); two FSDP-gathered
  layers with their weight cotangents ``4·f·layer_params/tp`` and the gathered output head with
  its cotangent ``2·f·d·V/tp``; the state counted twice (the finite-select of the update may not
  fuse in place). Flat stages: r = micro-batch rows, T = train.seq_len. Tree stages: r = trees per
  micro-batch, T = the padded tree size after host-side pruning,
  ``token_bucket(rl.prune.budget_tokens + tree.max_traj, tree.max_tokens)``.
* **forward only** (held-out evaluation of the flat stages: the whole per-device batch at once;
  scoring of the RL / RFT stages: all the iteration's trees at once): ``r·T·(2·d·s + blk + head)
  + 2·r·C·(V/tp)·f`` + one gathered layer and the head.
* **rollout** (RL / RFT): the sampler's KV cache ``L · rows · tree.max_len · (Hkv/tp) · hd · 2 · s``
  with ``rows = max(tasks_per_iteration · tree.max_traj, eval_tasks) / (data·fsdp)`` (corrected
  branches included), plus the forward working set of one prefill / extend chunk of
  ``PREFILL_TOKENS`` tokens per row (prompts and observations stay below it).

Asserted: every large tensor is sharded over all devices and the state's per-device bytes are
within 10% of total / devices; state + reference take at most a quarter of HBM; every phase's
bound at most 85% of HBM (the rest for XLA's own temporaries, fragmentation and the runtime).
HBM: 95e9 bytes, Google's figure for a v5p chip (88.5 GiB; conservative against 95 GiB).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

import test_config_contract as config_contract  # tests/ is on sys.path (rootdir conftest)
from configs import pod
from configs.base import get_base_config
from kat_jax import config as config_lib
from kat_jax import sharding
from kat_jax.model import ModelConfig, Transformer
from kat_jax.model import hf as hf_lib
from kat_jax.rl import loop as rl_loop
from kat_jax.rl import rft_loop
from kat_jax.train import losses, optimizer, stages
from kat_jax.train import state as state_lib
from kat_jax.tree.prune import settings_from_config

HBM = 95e9
PREFILL_TOKENS = 2048
GIB = 2 ** 30


def _parse(name: str, *overrides: str) -> ml_collections.ConfigDict:
  """What experiments.main does with ``--config=configs/pod.py:<name> --config.x=y ...``."""
  return config_contract._parse(f"configs/pod.py:{name}", *overrides)


def _paths(cfg, prefix=""):
  out = set()
  for key, value in cfg.items():
    out.add(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out |= _paths(value, f"{prefix}{key}.")
  return out


def _model_of(name: str) -> str:
  return name.rsplit("_", 1)[0]


def _mesh(cfg, devices: int) -> AbstractMesh:
  sizes = sharding.mesh_shape(cfg.mesh, devices)
  return AbstractMesh(tuple(sizes[a] for a in sharding.MESH_AXES), sharding.MESH_AXES,
                      axis_types=(AxisType.Auto,) * 3)


def _traced(model_cfg: ModelConfig) -> ModelConfig:
  """The model traced for shapes: the same params, with dense attention and no remat (neither
  changes a param's shape, dtype or logical names — checked by
  test_traced_model_has_the_configured_models_state — and tracing is twice as fast)."""
  return dataclasses.replace(model_cfg, attention_impl="xla", remat="none")


@functools.lru_cache(maxsize=None)
def _abstract(model_cfg: ModelConfig, mesh_shape: tuple, rules: tuple):
  """(abstract state, shardings) as the Trainer builds them (``state_lib.abstract_state``), cached
  per model and mesh: the optimizer's state structure does not depend on a stage's
  hyperparameters (checked per test), nor the params on the example batch's shape."""
  mesh = AbstractMesh(mesh_shape, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  tx, _ = optimizer.make_optimizer(get_base_config().train)
  example = {"inputs": jax.ShapeDtypeStruct((mesh_shape[0] * mesh_shape[1], 128), jnp.int32)}
  return state_lib.abstract_state(Transformer(_traced(model_cfg)), tx, example, mesh, rules)


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _activations(m: ModelConfig, tp: int, rows: int, tokens: int, chunk: int, grad: bool) -> int:
  """The module docstring's bound for ``rows`` × ``tokens`` per device (train step or forward)."""
  s, f, d = 2, 4, m.d_model
  blk = f * (4 * d + 3 * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim // tp
             + m.num_heads * m.head_dim // tp + 3 * m.mlp_dim // tp)
  head = d * (f + s)
  vocab = math.ceil(m.vocab_size / tp)
  if grad:
    per_token = (m.num_layers + 1) * d * s + 2 * (blk + head)
    return rows * tokens * per_token + 3 * rows * chunk * vocab * f
  return rows * tokens * (2 * d * s + blk + head) + 2 * rows * chunk * vocab * f


def _weights_in_flight(m: ModelConfig, tp: int, grad: bool) -> int:
  layer = m.num_params(include_embedding=False) // m.num_layers
  vocab = math.ceil(m.vocab_size / tp)
  copies = 2 if grad else 1
  return copies * (2 * 4 * layer // tp + 4 * m.d_model * vocab)


def _phases(cfg, m: ModelConfig, state: int, params: int, reference: int) -> dict:
  """Per-device bytes of each phase of the stage (module docstring)."""
  mesh = cfg.mesh
  shards, tp = mesh.data * mesh.fsdp, mesh.tensor
  t, chunk = cfg.train, cfg.train.logits_chunk
  accum = t.grad_accum_steps
  micro = t.batch_size // shards // accum
  grads = params * (2 if accum > 1 else 1)
  held = state + reference
  out = {}
  if cfg.stage in ("midtrain", "sft"):
    tokens = t.seq_len
    out["eval"] = held + _weights_in_flight(m, tp, False) + _activations(
        m, tp, t.batch_size // shards, tokens, chunk, grad=False)
  else:
    rl = cfg.rl
    full = cfg.tree.max_tokens
    tokens = (rl_loop.token_bucket(rl.prune.budget_tokens + cfg.tree.max_traj, full)
              if rl.prune.enabled else full)
    reads_scores = rl.advantage.name == "gae" or rl.advantage.kl_in_reward > 0
    score_tokens = tokens if rl.prune.enabled and not reads_scores else full
    out["score"] = held + _weights_in_flight(m, tp, False) + _activations(
        m, tp, -(-rl.tasks_per_iteration // shards), score_tokens, chunk, grad=False)
    rows = -(-max(rl.tasks_per_iteration * cfg.tree.max_traj, rl.eval_tasks) // shards)
    kv = (m.num_layers * rows * cfg.tree.max_len * (m.num_kv_heads // tp) * m.head_dim * 2 * 2)
    out["rollout_kv"] = kv
    out["rollout"] = held + kv + _weights_in_flight(m, tp, False) + _activations(
        m, tp, rows, PREFILL_TOKENS, chunk, grad=False)
  out["activations"] = _activations(m, tp, micro, tokens, chunk, grad=True)
  out["step"] = (2 * state + reference + grads + _weights_in_flight(m, tp, True)
                 + out["activations"])
  out["tokens"], out["micro_rows"] = tokens, micro
  return out


def _stage_checks(cfg, devices: int) -> None:
  """What experiments.main runs before the first step of ``cfg.stage``."""
  stage = stages.get_stage(cfg.stage)
  losses.get_loss(cfg.train.loss or stage.loss)
  sharding.rules_from_config(cfg)
  if cfg.stage == "sft":
    stages._check_sft_data(cfg.data)
  if cfg.stage == "rl":
    rl_loop.validate(cfg)
    settings_from_config(cfg.rl.prune)
  if cfg.stage == "rft":
    rft_loop.validate(cfg)
    settings_from_config(cfg.rl.prune)
  config_lib.validate(cfg, devices)


@pytest.mark.parametrize("name", pod.CONFIG_NAMES)
def test_pod_config_loads_and_validates_on_its_slice(name):
  spec = pod.MODELS[_model_of(name)]
  cfg = _parse(name, "--config.init_from=/mnt/kat/runs/previous")
  assert cfg.stage == name.rsplit("_", 1)[1]
  assert _paths(cfg) == _paths(get_base_config(_model_of(name)))   # no invented field
  assert cfg.mesh.data * cfg.mesh.fsdp * cfg.mesh.tensor == spec["chips"]
  assert cfg.mesh.tensor == 4                  # within the 4 chips of a v5p host
  assert (cfg.model.dtype, cfg.model.remat) == ("bfloat16", "full")
  if cfg.stage == "midtrain":                  # the imported checkpoint's tokenizer follows
    assert cfg.data.tokenizer_path == "/mnt/kat/runs/previous/tokenizer"
  _stage_checks(cfg, spec["chips"])
  micro = cfg.train.batch_size // (cfg.mesh.data * cfg.mesh.fsdp) // cfg.train.grad_accum_steps
  assert micro == spec["micro_rows"][cfg.stage]
  # On any other device count the mesh is refused, naming the count.
  with pytest.raises(config_lib.ConfigError, match=f"mesh has {spec['chips'] // 2} devices"):
    config_lib.validate(cfg, spec["chips"] // 2)


@pytest.mark.parametrize("name", pod.CONFIG_NAMES)
def test_pod_state_is_sharded_and_fits_a_v5p_chip(name):
  cfg = pod.get_config(name)
  devices = pod.MODELS[_model_of(name)]["chips"]
  m = ModelConfig.from_config(cfg.model)
  assert m.lora.rank == 0                       # the state holds every param (no frozen base)
  mesh = _mesh(cfg, devices)
  rules = sharding.rules_from_config(cfg)
  abstract, shardings = _abstract(m, tuple(mesh.shape.values()), rules)
  tx, _ = optimizer.make_optimizer(cfg.train)
  opt = jax.eval_shape(tx.init, abstract.params)
  assert (jax.tree.structure(opt) == jax.tree.structure(abstract.opt_state) and
          [x.shape for x in jax.tree.leaves(opt)] ==
          [x.shape for x in jax.tree.leaves(abstract.opt_state)])

  total = _nbytes(abstract)
  state = sharding.per_device_bytes(abstract, shardings)
  params = sharding.per_device_bytes(abstract.params, shardings.params)
  reference = params if cfg.train.use_reference else 0
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  assert abs(n_params - m.num_params()) / m.num_params() < 0.01
  assert abs(state - total / devices) <= 0.10 * total / devices
  for leaf, sh in zip(jax.tree.leaves(abstract), jax.tree.leaves(
      shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    size = int(np.prod(leaf.shape))
    if size >= 2 ** 20:                         # every large tensor split over all devices
      assert int(np.prod(sh.shard_shape(leaf.shape))) * devices <= 1.1 * size, (leaf.shape, sh)

  phases = _phases(cfg, m, state, params, reference)
  shown = {k: f"{v / GIB:.1f}" for k, v in phases.items() if k not in ("tokens", "micro_rows")}
  print(f"\n{name}: {n_params / 1e9:.2f}B params on {devices} devices "
        f"{dict(mesh.shape)}; state {total / GIB:.0f} GiB total, {state / GIB:.2f} GiB/device, "
        f"reference {reference / GIB:.2f} GiB/device; micro-batch {phases['micro_rows']} × "
        f"{phases['tokens']} tokens; GiB/device: {shown}")
  assert state + reference <= 0.25 * HBM
  for phase in ("step", "eval", "score", "rollout"):
    if phase in phases:
      assert phases[phase] <= 0.85 * HBM, (phase, phases[phase] / GIB)


def test_traced_model_has_the_configured_models_state():
  """The pod models' attention implementation and remat policy change no param or optimizer
  leaf (shape, dtype, sharding): on the tiny preset's shapes, on a 2 × 4 abstract mesh."""
  cfg = pod.get_config("qwen3_8b_sft")
  cfg.model.update(get_base_config("tiny").model)   # tiny shapes, the pod's other fields
  cfg.model.dtype, cfg.model.remat, cfg.model.attention_impl = "bfloat16", "full", "pallas"
  m = ModelConfig.from_config(cfg.model)
  mesh = AbstractMesh((1, 2, 4), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  tx, _ = optimizer.make_optimizer(cfg.train)
  example = {"inputs": jax.ShapeDtypeStruct((2, 128), jnp.int32)}
  rules = sharding.rules_from_config(cfg)
  real = state_lib.abstract_state(Transformer(m), tx, example, mesh, rules)[0]
  traced = state_lib.abstract_state(Transformer(_traced(m)), tx, example, mesh, rules)[0]
  assert jax.tree.structure(real) == jax.tree.structure(traced)
  for a, b in zip(jax.tree.leaves(real), jax.tree.leaves(traced)):
    assert (a.shape, a.dtype, a.sharding) == (b.shape, b.dtype, b.sharding)


def test_unset_init_from_stops_naming_the_flag():
  """Left at its placeholder, init_from fails at the first read, before any compilation, with a
  message naming --config.init_from (the Trainer's init_params_from on a new workdir)."""
  for name in pod.CONFIG_NAMES:
    cfg = pod.get_config(name)
    assert cfg.init_from.startswith("UNSET: pass --config.init_from=")
    with pytest.raises(FileNotFoundError, match="UNSET: pass --config.init_from=<"):
      hf_lib.init_params_from(cfg.init_from, None)


def test_unknown_name_is_refused_listing_the_configs():
  for arg in ("qwen3_8b", "qwen3_8b_ppo", "llama_sft", ""):
    with pytest.raises(config_lib.ConfigError, match="qwen3_32b_rl"):
      pod.get_config(arg)
