"""Typed access and validation for ml_collections experiment configs.

Every check raises ``ConfigError`` whose message names the offending field, its value and the fix,
so a typo on the command line (``--config.mesh.tensor=3``) fails before any compilation.

``parse_flags`` is the absl flag parser of the command-line programs: an override of a field the
config does not declare (``--config.model.preset=small``) ends the program with one line naming the
field and the closest declared names ("did you mean ...") instead of ml_collections' bare
``AttributeError``.
"""
from __future__ import annotations

import difflib
import importlib.util
import sys
from typing import Optional, Sequence

import ml_collections

from kat_jax import sharding
from kat_jax.errors import ConfigError
from kat_jax.model import presets


def require(cfg: ml_collections.ConfigDict, path: str):
  """Returns ``cfg.<path>`` or raises a ConfigError naming the missing field."""
  node = cfg
  for part in path.split("."):
    if part not in node:
      raise ConfigError(f"config.{path} is missing: set it in the experiment config or with "
                        f"--config.{path}=...")
    node = node[part]
  return node


def _positive(train, fields) -> None:
  for field in fields:
    if train[field] <= 0:
      raise ConfigError(f"config.train.{field}={train[field]} must be positive")


def _validate_model_name(model_cfg: ml_collections.ConfigDict) -> None:
  """``config.model.name`` is a label (a preset's name, or ``hf_<type>`` for an import); it never
  chooses shapes, so an unknown one is refused rather than silently ignored."""
  name = model_cfg.name if "name" in model_cfg else ""
  if name in presets.preset_names() or str(name).startswith("hf_"):
    return
  close = difflib.get_close_matches(str(name), presets.preset_names(), n=1)
  raise ConfigError(
      f"config.model.name={name!r} is not a model preset {presets.preset_names()} nor an imported "
      f"'hf_<model_type>' model{f' (did you mean {close[0]!r}?)' if close else ''}. The name is "
      "only a label: the preset is chosen in the experiment file (get_base_config(<preset>)) and "
      "shapes are set field by field (--config.model.d_model=...)")


def _validate_tree(cfg: ml_collections.ConfigDict) -> None:
  if "tree" not in cfg:
    return
  for field in ("max_tokens", "max_nodes", "max_traj", "max_len"):
    if field in cfg.tree and cfg.tree[field] <= 0:
      raise ConfigError(f"config.tree.{field}={cfg.tree[field]} must be positive")


def _validate_qat(model: presets.ModelConfig) -> None:
  """``config.model.qat`` in a training config (its fields are checked by ``QatConfig``)."""
  if model.qat.quantized_params:
    raise ConfigError(
        "config.model.qat.quantized_params=True is the int8 export's model (inference only: "
        "kat_jax.model.qat.load_export); a stage trains float weights with QAT: set "
        "--config.model.qat.quantized_params=False, and export the trained run with "
        "python -m experiments.convert --from_workdir=RUN --to_int8=OUT")


def validate(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """Cross-field checks of a full experiment config against the devices at hand."""
  _validate_model_name(require(cfg, "model"))
  model = presets.ModelConfig.from_config(require(cfg, "model"))
  _validate_qat(model)
  mesh_shape = sharding.mesh_shape(require(cfg, "mesh"), num_devices)
  train = require(cfg, "train")
  _positive(train, ("steps", "batch_size", "seq_len", "log_every", "checkpoint_every",
                    "keep_checkpoints", "check_finite_every", "eval_steps", "learning_rate"))
  batch_shards = mesh_shape["data"] * mesh_shape["fsdp"]
  if train.batch_size % batch_shards:
    raise ConfigError(
        f"config.train.batch_size={train.batch_size} is not divisible by data×fsdp="
        f"{mesh_shape['data']}×{mesh_shape['fsdp']}={batch_shards}: use a multiple of {batch_shards}")
  accum = train.grad_accum_steps
  if accum < 1 or (train.batch_size // batch_shards) % accum:
    raise ConfigError(
        f"config.train.grad_accum_steps={accum} must be >= 1 and divide the per-shard batch "
        f"{train.batch_size // batch_shards} (config.train.batch_size / data×fsdp)")
  if train.logits_chunk < 0:
    raise ConfigError(f"config.train.logits_chunk={train.logits_chunk} must be >= 0 "
                      f"(0 = the whole [T, V] logits at once)")
  if not 0.0 <= train.warmup_steps <= train.steps:
    raise ConfigError(f"config.train.warmup_steps={train.warmup_steps} must be in [0, "
                      f"config.train.steps={train.steps}]")
  if train.eval_every < 0:
    raise ConfigError(f"config.train.eval_every={train.eval_every} must be >= 0 (0 = never)")
  _validate_objective(train, model)
  validate_distill(cfg)
  from kat_jax.tree.prune import settings_from_config  # local: the pruning module imports jax
  try:
    settings_from_config(train.prune)
  except ValueError as e:
    raise ConfigError(f"config.train.{e}") from None
  _validate_tree(cfg)


def _validate_objective(train, model) -> None:
  """The tree losses' objective, KL, value and aggregation knobs (names from the registries of
  kat_jax.train.objectives and kat_jax.train.losses)."""
  from kat_jax.train import losses, objectives  # local: the loss modules import jax
  for field, known in (("objective", objectives.names()),
                       ("kl_estimator", sorted(objectives.KL_ESTIMATORS)),
                       ("loss_agg", sorted(losses.AGGREGATIONS))):
    if train[field] not in known:
      raise ConfigError(f"config.train.{field}={train[field]!r} is not one of {known}")
  for low, high in (("clip_eps", "clip_eps_high"), ("gspo_clip_eps", "gspo_clip_eps_high")):
    if train[low] < 0 or (train[high] < 0 and train[high] != -1):
      raise ConfigError(f"config.train.{low}={train[low]} and {high}={train[high]} must be >= 0 "
                        f"({high}=-1: same as {low})")
  for field in ("kl_coef", "value_coef", "entropy_coef", "value_clip"):
    if train[field] < 0:
      raise ConfigError(f"config.train.{field}={train[field]} must be >= 0")
  if train.dual_clip != 0 and train.dual_clip <= 1:
    raise ConfigError(f"config.train.dual_clip={train.dual_clip} must be > 1 (the loss of a pair "
                      "with advantage A < 0 is capped at dual_clip·|A|) or 0 (off)")
  if train.decoupled_max_weight != 0 and train.decoupled_max_weight < 1:
    raise ConfigError(f"config.train.decoupled_max_weight={train.decoupled_max_weight} must be "
                      ">= 1 (a cap below 1 down-weights on-policy tokens) or 0 (no cap)")
  if train.agg_constant <= 0:
    raise ConfigError(f"config.train.agg_constant={train.agg_constant} must be positive (the "
                      "per-trajectory token count of loss_agg='constant', e.g. the max length)")
  if train.value_coef > 0 and not model.value_head:
    raise ConfigError(
        f"config.train.value_coef={train.value_coef} trains a value head but "
        "config.model.value_head=False: set --config.model.value_head=True (a checkpoint without "
        "one gets a zero-initialized head) or --config.train.value_coef=0")
  if train.kl_coef > 0 and not train.use_reference:
    raise ConfigError(
        f"config.train.kl_coef={train.kl_coef} needs the reference policy's log-probs: set "
        "--config.train.use_reference=True (or --config.train.kl_coef=0)")


def validate_distill(cfg: ml_collections.ConfigDict, loss: Optional[str] = None) -> None:
  """``config.train.distill`` (kat_jax.train.distill): its fields always; when the loss
  (``loss``, default ``config.train.loss``) is 'distill' also a teacher (in the step or
  precomputed) and no policy knob the distill loss would ignore."""
  from kat_jax.train import distill, stages  # local: the loss modules import jax
  train = require(cfg, "train")
  d = require(cfg, "train.distill")
  if d.divergence not in distill.DIVERGENCES:
    raise ConfigError(f"config.train.distill.divergence={d.divergence!r} is not one of "
                      f"{list(distill.DIVERGENCES)}")
  if not 0.0 <= d.alpha <= 1.0:
    raise ConfigError(f"config.train.distill.alpha={d.alpha} must be in [0, 1] (loss = (1 - alpha)"
                      "·CE + alpha·T²·divergence)")
  if not d.temperature > 0:
    raise ConfigError(f"config.train.distill.temperature={d.temperature} must be > 0 (1 = the "
                      "distributions as they are)")
  if not 0.0 < d.jsd_beta < 1.0:
    raise ConfigError(f"config.train.distill.jsd_beta={d.jsd_beta} must be in (0, 1) (its ends are "
                      "divergence='forward_kl' / 'reverse_kl')")
  vocab = require(cfg, "model.vocab_size")
  if not 0 <= d.top_k <= vocab:
    raise ConfigError(f"config.train.distill.top_k={d.top_k} must be in [0, config.model.vocab_size"
                      f"={vocab}] (0 = the whole vocabulary)")
  if (train.loss if loss is None else loss) != distill.NAME:
    return
  if not d.teacher and not d.topk_data:
    raise ConfigError(
        "config.train.loss='distill' needs a teacher: set --config.train.distill.teacher to a "
        "kat_jax workdir[@step] or a Hugging Face checkpoint dir, or --config.train.distill."
        "topk_data to its top-k precomputed by python -m experiments.distill_topk")
  if d.topk_data and d.top_k == 0:
    raise ConfigError(
        f"config.train.distill.topk_data={d.topk_data!r} holds the teacher's top-k logits only: "
        "set --config.train.distill.top_k to k (at most the k they were computed with)")
  if d.topk_data and "stage" in cfg and stages.get_stage(cfg.stage).make_data is None:
    raise ConfigError(
        f"config.train.distill.topk_data is set but config.stage={cfg.stage!r} samples its own "
        "batches (no data iterator to precompute over): use the in-step teacher "
        "(config.train.distill.teacher) and topk_data=''")
  ignored = [f"{f}={train[f]!r}" for f, off in (("objective", "nll"), ("kl_coef", 0.0),
                                               ("value_coef", 0.0), ("entropy_coef", 0.0))
             if train[f] != off]
  if ignored:
    raise ConfigError(
        f"config.train.loss='distill' mixes cross-entropy and the teacher's divergence only; it "
        f"would ignore config.train.{', '.join(ignored)}: set objective='nll' and the "
        "coefficients to 0")


# ---------------------------------------------------------------------------------- the CLI

def _load_config_file(spec: str) -> ml_collections.ConfigDict:
  """The ConfigDict of ``--config=path.py[:arg]`` (as ml_collections' config flag loads it)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_kat_jax_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def _paths(node, prefix: str = "") -> list[str]:
  out = []
  for key, value in node.items():
    out.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      out += _paths(value, f"{prefix}{key}.")
  return out


def unknown_field(cfg: ml_collections.ConfigDict, path: str, flag: str = "config") -> Optional[str]:
  """The message for ``--{flag}.{path}`` if ``path`` is not declared in ``cfg`` (else None): the
  missing field, the closest names in its block and the same name elsewhere ("did you mean")."""
  node, walked = cfg, []
  for part in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return (f"--{flag}.{path}: config.{'.'.join(walked)} is a value ({node!r}), not a block of "
              "fields")
    if part not in node:
      block = "config" + "".join(f".{w}" for w in walked)
      close = [f"{block}.{c}" for c in difflib.get_close_matches(part, list(node.keys()), n=3)]
      close += [f"config.{p}" for p in _paths(cfg) if p.rsplit(".", 1)[-1] == part]
      hint = f"; did you mean {' or '.join(close)}?" if close else (
          f"; its fields: {sorted(node.keys())}" if len(node) <= 40 else "")
      if walked == ["model"] and part == "preset":
        hint += (" (a model preset is chosen in the experiment file, get_base_config(<preset>); "
                 "override its fields one by one, --config.model.d_model=...)")
      return f"--{flag}.{path}: {block} has no field {part!r}{hint}"
    node, walked = node[part], walked + [part]
  return None


def _config_overrides(argv: Sequence[str], flag: str) -> tuple[Optional[str], list[str]]:
  spec, paths = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith(f"--{flag}="):
      spec = arg.split("=", 1)[1]
    elif arg == f"--{flag}" and i + 1 < len(args):
      spec = args[i + 1]
    elif arg.startswith(f"--{flag}."):
      paths.append(arg[len(flag) + 3:].split("=", 1)[0])
  return spec, paths


def parse_flags(argv: Sequence[str], flag: str = "config") -> list[str]:
  """``absl.app``'s flag parsing (pass as ``app.run(..., flags_parser=parse_flags)``); an unknown
  ``--config.<path>`` override exits with status 1 and one line ``error: ConfigError: ...``."""
  from absl import app  # local: absl is the CLI's dependency, not validation's
  try:
    return app.parse_flags_with_usage(list(argv))
  except (AttributeError, KeyError) as error:
    spec, paths = _config_overrides(argv, flag)
    try:
      cfg = _load_config_file(spec) if spec else None
      messages = [m for m in (unknown_field(cfg, p, flag) for p in paths) if m] if cfg else []
    except Exception:  # noqa: BLE001 - the original error then speaks for itself
      messages = []
    if not messages:
      raise error
    sys.stderr.write("".join(f"error: ConfigError: {m}\n" for m in messages))
    sys.exit(1)
