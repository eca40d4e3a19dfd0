"""The recipe's four stages for Qwen3-8B and Qwen3-32B on TPU v5p slices, one config per
(model, stage): ``--config=configs/pod.py:<model>_<stage>`` with model ``qwen3_8b`` | ``qwen3_32b``
and stage ``midtrain`` | ``sft`` | ``rft`` | ``rl`` (docs/LAUNCH.md has the commands)::

  python -m experiments.convert --from_hf=/ckpt/Qwen3-8B --to=/mnt/kat/qwen3_8b_base
  python -m experiments.main --multihost --config=configs/pod.py:qwen3_8b_midtrain \
      --workdir=/mnt/kat/runs/qwen3_8b_midtrain --config.init_from=/mnt/kat/qwen3_8b_base

``init_from`` has no usable default: each stage starts from the previous one's workdir (mid-training
from the ``experiments.convert`` import, whose ``WORKDIR/tokenizer`` it also reads), and a run
that leaves it unset stops before any compilation with ``init_from='UNSET: pass
--config.init_from=...' is not a directory``. Corpora and JSONL files live under ``DATA`` (a
filesystem every host mounts at the same path; override the fields below to move them).

One table, ``MODELS``, holds what differs per model: the slice, the mesh, the learning rates and
the rows one device computes at a time (the micro-batch; ``grad_accum_steps`` follows from it).
Every stage uses bfloat16 compute over float32 params and Adam moments, full rematerialization of
each block, the Pallas tree-attention kernel (flash-style, no [T, T] scores; flat batches use it
through their segment intervals) and the output head 1,024 rows at a time. The mesh is
data=1 × fsdp × tensor=4: tensor parallelism within the 4 chips of a v5p host, FSDP over the
hosts (``sharding.DEFAULT_RULES``: weights FSDP-sharded on ``embed``, heads / kv heads / MLP /
vocabulary over ``tensor``). The per-device memory of each stage — train state, reference
params, gradients, activations, the rollout KV cache — is bounded in tests/test_pod_configs.py.
"""
import ml_collections

from configs.base import get_base_config
from configs.rl_presets import apply_preset
from kat_jax import sharding
from kat_jax.data import agentic
from kat_jax.errors import ConfigError

DATA = "/mnt/kat/data"            # corpora, JSONL files and the TFDS cache, on every host
STAGES = ("midtrain", "sft", "rft", "rl")

MODELS = {
    # slice: 4 chips per host. micro_rows: rows per device per micro-batch (flat stages: of
    # train.seq_len tokens; tree stages: trees). rl_tasks: tasks (groups of 8 rollouts) per
    # RFT / RL iteration; rl_batch: trees per optimizer step (2 steps per iteration).
    "qwen3_8b": dict(slice="v5p-64", chips=32, fsdp=8, tensor=4,
                     lr=dict(midtrain=3e-5, sft=1e-5, rft=1e-6, rl=1e-6),
                     micro_rows=dict(midtrain=4, sft=2, rft=1, rl=1),
                     rl_tasks=32, rl_batch=16),
    "qwen3_32b": dict(slice="v5p-256", chips=128, fsdp=32, tensor=4,
                      lr=dict(midtrain=2e-5, sft=7e-6, rft=5e-7, rl=5e-7),
                      micro_rows=dict(midtrain=2, sft=1, rft=1, rl=1),
                      rl_tasks=64, rl_batch=32),
}
CONFIG_NAMES = tuple(f"{m}_{s}" for m in MODELS for s in STAGES)

CODE_EXTENSIONS = ".py,.js,.ts,.java,.go,.rs,.c,.h,.cc,.cpp,.hpp,.cs,.kt,.rb,.php,.sh,.sql"
RL_MAX_LEN = 16_384               # tokens per trajectory (prompt + turns) = the sampler's cache
RL_PRUNE_BUDGET = 32_768          # tree tokens kept per group by entropy-budget pruning


def _base(model: str, stage: str, unset: str) -> ml_collections.ConfigDict:
  """The model's preset on its mesh, with the pod-wide model and training settings."""
  m = MODELS[model]
  c = get_base_config(model)
  c.lock()                        # a field that configs/base.py does not declare is an error
  c.stage = stage
  c.init_from = f"UNSET: pass --config.init_from=<{unset}>"
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, m["fsdp"], m["tensor"]
  c.sharding_rules = [list(r) for r in sharding.DEFAULT_RULES]
  c.model.dtype, c.model.param_dtype = "bfloat16", "float32"
  c.model.remat, c.model.attention_impl = "full", "pallas"
  c.train.learning_rate = m["lr"][stage]
  c.train.logits_chunk = 1024
  c.data.data_dir = f"{DATA}/tfds"
  c.data.vocab_size = c.model.vocab_size
  return c


def _accumulate(c: ml_collections.ConfigDict, micro_rows: int) -> None:
  """``grad_accum_steps`` so that one device computes ``micro_rows`` rows at a time."""
  per_device = c.train.batch_size // (c.mesh.data * c.mesh.fsdp)
  c.train.grad_accum_steps = max(per_device // micro_rows, 1)


def midtrain(model: str) -> ml_collections.ConfigDict:
  """Source code (30% FIM-transformed) plus the procedural and agentic streams at 6% together:
  10k steps of 256 × 8,192 tokens (21B tokens). Add git history with data.mixture.commits and
  data.commits.repo, JSONL trajectories with data.mixture.trajectories (configs/midtrain_tiny.py
  lists them)."""
  c = _base(model, "midtrain", "the experiments.convert workdir of the HF checkpoint")
  t, d = c.train, c.data
  t.steps, t.warmup_steps, t.batch_size, t.seq_len = 10_000, 500, 256, 8192
  t.eval_every, t.eval_steps, t.checkpoint_every = 1000, 4, 500
  d.tokenizer_path = c.get_ref("init_from") + "/tokenizer"   # the imported checkpoint's
  d.num_threads, d.prefetch_documents = 16, 128
  d.code.root, d.code.extensions, d.fim.rate = f"{DATA}/code", CODE_EXTENSIONS, 0.3
  mix = d.mixture
  mix.code, mix.procedural, mix.tool_use, mix.multi_turn = 0.94, 0.01, 0.02, 0.01
  mix.instruction_following = 0.02
  d.procedural.levels, d.procedural.num_train = "0,1,2", 3000
  d.tool_use.num_train, d.tool_use.code_levels = 12_000, "0,1,2"   # level 0 has ~1k tasks
  d.multi_turn.num_train = 5_000
  d.instruction_following.num_train = 50_000
  d.tool_use.workers = d.multi_turn.workers = 32
  _accumulate(c, MODELS[model]["micro_rows"]["midtrain"])
  return c


def sft(model: str) -> ml_collections.ConfigDict:
  """Teacher trajectories (balanced over the taxonomy) and instruction following, loss on the
  assistant turns: 3k steps of 128 × 16,384 tokens."""
  c = _base(model, "sft", "the midtrain workdir")
  t, d = c.train, c.data
  t.steps, t.warmup_steps, t.batch_size, t.seq_len = 3000, 100, 128, 16_384
  t.eval_every, t.eval_steps, t.checkpoint_every = 250, 4, 250
  d.packing, d.num_threads = "pad", 16
  d.mixture.code, d.mixture.trajectories, d.mixture.instructions = 0.0, 0.8, 0.2
  d.trajectories.paths = f"{DATA}/agentic/" + agentic.TRAJECTORIES_FILE.format(split="train")
  d.trajectories.loss_on, d.trajectories.balance = "assistant", "taxonomy"
  d.instructions.paths = f"{DATA}/agentic/" + agentic.INSTRUCTIONS_FILE.format(split="train")
  d.instructions.loss_on = "assistant"
  _accumulate(c, MODELS[model]["micro_rows"]["sft"])
  return c


def _tree_stage(model: str, stage: str, unset: str, branches: int) -> ml_collections.ConfigDict:
  """RFT and RL: multi-turn episodes in the ``code`` environment over a level curriculum, one
  tree per group, pruned to ``RL_PRUNE_BUDGET`` tokens on the host before scoring."""
  m = MODELS[model]
  c = _base(model, stage, unset)
  r, t = c.rl, c.train
  r.env_name, r.task_levels, r.curriculum.enabled = "code", "0,1,2", True
  r.iterations, r.tasks_per_iteration, r.group_size, r.ppo_epochs = 300, m["rl_tasks"], 8, 1
  r.eval_every, r.eval_tasks, r.checkpoint_every = 20, 128, 10
  r.sandbox_workers, r.rollout.env_threads = 32, 64
  r.rollout.max_turns, r.rollout.max_new_tokens, r.rollout.max_observation_tokens = 8, 1024, 1024
  r.prune.enabled, r.prune.budget_tokens = True, RL_PRUNE_BUDGET
  c.tree.max_traj = r.group_size + branches
  c.tree.max_len = RL_MAX_LEN
  c.tree.max_tokens = c.tree.max_traj * RL_MAX_LEN   # a whole unpruned group tree fits
  c.tree.max_nodes = 512
  t.loss, t.batch_size, t.seq_len = "tree", m["rl_batch"], RL_PRUNE_BUDGET
  t.steps = r.iterations * r.ppo_epochs * (r.tasks_per_iteration // t.batch_size)
  t.warmup_steps, t.weight_decay, t.log_every, t.eval_every = 10, 0.0, 1, 0
  t.checkpoint_every = r.checkpoint_every * (t.steps // r.iterations)
  _accumulate(c, m["micro_rows"][stage])
  return apply_preset(c, "grpo")


def rft(model: str) -> ml_collections.ConfigDict:
  """Teacher-guided rollouts (deviation monitor, at most 2 corrected branches per group,
  relative reward), as configs/rft_tiny.py."""
  c = _tree_stage(model, "rft", "the sft workdir", branches=2)
  c.rl.rft.teachers = "code_direct,code_fix,reference"
  c.rl.rft.monitor.measure, c.rl.rft.monitor.threshold = "action", 0.7
  c.rl.rft.correction.max_per_group = 2
  return c


def rl(model: str) -> ml_collections.ConfigDict:
  """GRPO (k3 KL to the frozen reference) on the ``code`` environment's kat_composite reward."""
  return _tree_stage(model, "rl", "the rft workdir", branches=0)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  model, _, stage = (arg or "").rpartition("_")
  if model not in MODELS or stage not in STAGES:
    raise ConfigError(f"configs/pod.py:{arg}: name one of {list(CONFIG_NAMES)} "
                      "(--config=configs/pod.py:<model>_<stage>)")
  return {"midtrain": midtrain, "sft": sft, "rft": rft, "rl": rl}[stage](model)
