"""The 8 task types × 8 scenarios taxonomy that KAT-Coder balances its SFT trajectories over.

Every conversation may carry a ``TaskLabel`` (task type, scenario). Labels travel with rendered
examples (``chat.RenderedExample.labels``) so mixtures can be balanced and metrics broken down per
cell. Typical use::

    label = TaskLabel("bug_fixing", "database_systems")
    label.cell_id                                   # 2 * 8 + 4 = 20, a stable int for batching
    weights = balanced_sampling_weights(labels)     # per-example sampling probabilities

Names are snake_case ids; ``TASK_TYPE_NAMES`` / ``SCENARIO_NAMES`` give the published wording
(docs/DESIGN.md, "Background").
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Sequence

import numpy as np

TASK_TYPES = (
    "feature_implementation",
    "feature_enhancement",
    "bug_fixing",
    "refactoring",
    "performance_optimization",
    "test_case_generation",
    "code_understanding",
    "configuration_deployment",
)
SCENARIOS = (
    "application_development",
    "ui_ux_engineering",
    "data_science_engineering",
    "machine_learning_ai",
    "database_systems",
    "infrastructure_development",
    "specialized_programming_domains",
    "security_engineering",
)
TASK_TYPE_NAMES = dict(zip(TASK_TYPES, (
    "Feature Implementation", "Feature Enhancement", "Bug Fixing", "Refactoring",
    "Performance Optimization", "Test Case Generation", "Code Understanding",
    "Configuration & Deployment")))
SCENARIO_NAMES = dict(zip(SCENARIOS, (
    "Application Development", "UI/UX Engineering", "Data Science & Engineering",
    "Machine Learning & AI", "Database Systems", "Infrastructure Development",
    "Specialized Programming Domains", "Security Engineering")))

NUM_TASK_TYPES = len(TASK_TYPES)
NUM_SCENARIOS = len(SCENARIOS)
NUM_CELLS = NUM_TASK_TYPES * NUM_SCENARIOS
UNLABELED_ID = -1  # task/scenario/cell id used in arrays for examples without a label


def _check_member(value: str, allowed: Sequence[str], what: str) -> None:
  if value not in allowed:
    raise ValueError(f"unknown {what} {value!r}: use one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class TaskLabel:
  """One cell of the taxonomy. Construction validates both names."""
  task_type: str
  scenario: str

  def __post_init__(self):
    _check_member(self.task_type, TASK_TYPES, "task type")
    _check_member(self.scenario, SCENARIOS, "scenario")

  @property
  def task_type_id(self) -> int:
    return TASK_TYPES.index(self.task_type)

  @property
  def scenario_id(self) -> int:
    return SCENARIOS.index(self.scenario)

  @property
  def cell_id(self) -> int:
    """Row-major index in the 8×8 grid: ``task_type_id * NUM_SCENARIOS + scenario_id``."""
    return self.task_type_id * NUM_SCENARIOS + self.scenario_id

  @classmethod
  def from_cell_id(cls, cell_id: int) -> "TaskLabel":
    if not 0 <= cell_id < NUM_CELLS:
      raise ValueError(f"cell id {cell_id} is outside [0, {NUM_CELLS})")
    return cls(TASK_TYPES[cell_id // NUM_SCENARIOS], SCENARIOS[cell_id % NUM_SCENARIOS])

  def to_dict(self) -> dict:
    return {"task_type": self.task_type, "scenario": self.scenario}

  @classmethod
  def from_dict(cls, d: Optional[dict]) -> Optional["TaskLabel"]:
    return None if d is None else cls(d["task_type"], d["scenario"])


def label_ids(label: Optional[TaskLabel]) -> tuple[int, int, int]:
  """(task_type_id, scenario_id, cell_id), each ``UNLABELED_ID`` when ``label`` is None."""
  if label is None:
    return UNLABELED_ID, UNLABELED_ID, UNLABELED_ID
  return label.task_type_id, label.scenario_id, label.cell_id


def cell_counts(labels: Iterable[Optional[TaskLabel]]) -> np.ndarray:
  """int64 [NUM_TASK_TYPES, NUM_SCENARIOS] histogram; unlabeled examples are not counted."""
  counts_ts = np.zeros((NUM_TASK_TYPES, NUM_SCENARIOS), np.int64)
  for label in labels:
    if label is not None:
      counts_ts[label.task_type_id, label.scenario_id] += 1
  return counts_ts


def balanced_sampling_weights(labels: Sequence[Optional[TaskLabel]], *,
                              cell_weights: Optional[np.ndarray] = None,
                              unlabeled_mass: float = 0.0) -> np.ndarray:
  """Per-example sampling probabilities (float64 [N], sum 1) that balance the taxonomy cells.

  Each non-empty cell receives total mass proportional to ``cell_weights[t, s]`` (uniform over the
  non-empty cells by default), split evenly among its examples. Unlabeled examples share
  ``unlabeled_mass`` (0 excludes them). Cells with weight but no examples are simply absent: their
  mass goes to the other cells (the function never returns NaN).
  """
  n = len(labels)
  if n == 0:
    raise ValueError("balanced_sampling_weights needs at least one example")
  if not 0.0 <= unlabeled_mass <= 1.0:
    raise ValueError(f"unlabeled_mass={unlabeled_mass} must lie in [0, 1]")
  if cell_weights is None:
    cell_weights = np.ones((NUM_TASK_TYPES, NUM_SCENARIOS))
  cell_weights = np.asarray(cell_weights, np.float64)
  if cell_weights.shape != (NUM_TASK_TYPES, NUM_SCENARIOS) or (cell_weights < 0).any():
    raise ValueError(f"cell_weights must be non-negative with shape {(NUM_TASK_TYPES, NUM_SCENARIOS)}, "
                     f"got shape {cell_weights.shape}")
  counts_ts = cell_counts(labels)
  n_unlabeled = sum(label is None for label in labels)
  present_ts = (counts_ts > 0) * cell_weights
  labeled_total = present_ts.sum()
  if labeled_total == 0 and n_unlabeled == 0:
    raise ValueError("every labeled example falls in a cell with zero weight")
  labeled_mass = 1.0 - unlabeled_mass if n_unlabeled else 1.0
  if labeled_total == 0:
    labeled_mass, unlabeled_mass = 0.0, 1.0
  elif n_unlabeled == 0:
    unlabeled_mass = 0.0
  weights = np.zeros(n, np.float64)
  for i, label in enumerate(labels):
    if label is None:
      weights[i] = unlabeled_mass / n_unlabeled
    else:
      t, s = label.task_type_id, label.scenario_id
      weights[i] = labeled_mass * present_ts[t, s] / labeled_total / counts_ts[t, s]
  return weights / weights.sum()
