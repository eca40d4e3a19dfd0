"""The chain's held-out suites (kat_jax.eval.agentic): the single-turn suite shows the model the
exact prompts the RL stage of configs/rl_tiny.py trains on, its tasks are held out and a shorter
list is a prefix of a longer one; bad suite configs name the field."""
import pytest

from configs import rl_tiny
from kat_jax.data.procedural import generate
from kat_jax.errors import ConfigError
from kat_jax.eval import agentic
from kat_jax.rl import envs
from kat_jax.sandbox import SandboxPool


def test_single_turn_suite_prompts_are_the_rl_stages():
  cfg = agentic.default_agentic_eval_config()
  cfg.code_single_tasks = 6
  tasks = agentic._TASKS["code_single"](cfg)
  assert len(tasks) == 6 and len({t.task_id for t in tasks}) == 6
  assert [t.task_id for t in tasks[:3]] == [t.task_id for t in
                                            agentic.heldout_code_tasks(cfg, 3)]
  rl = rl_tiny.get_config()
  pool = SandboxPool(num_workers=1)
  ours = envs.make("code_single", agentic.single_turn_env_config(), pool=pool)
  theirs = envs.make(rl.rl.env_name, rl.rl.env, pool=pool)
  for task in tasks:
    a, b = ours.reset(task), theirs.reset(task)
    assert a.messages == b.messages and ours.tools == theirs.tools
    assert [m.role for m in a.messages] == ["user"]          # no system turn, as mid-training
    # The held-out split: no (template, params) pair of the task is in the training split.
    assert generate.split_of(task.template, task.params, cfg.heldout_fraction) == "heldout"
  pool.close()


def test_suite_fields_are_validated():
  cfg = agentic.default_agentic_eval_config()
  agentic.validate_config(cfg)
  assert agentic.enabled_suites(cfg) == list(agentic.SUITES)
  cfg.code_single_max_new_tokens = 0
  with pytest.raises(ConfigError, match="code_single_max_new_tokens=0 must be >= 1"):
    agentic.validate_config(cfg)
  cfg = agentic.default_agentic_eval_config()
  cfg.code_single = False
  assert "code_single" not in agentic.enabled_suites(cfg)
