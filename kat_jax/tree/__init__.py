"""Trajectory trees: prefix-tree build/serialization, padded batches, entropy-budget pruning.

  tree = build_tree(trajectories, tags=..., fields=...)     # kat_jax.tree.build
  batch = batch_trees([tree, ...], max_tokens=T, ...)        # kat_jax.tree.batch
  keep_bt, metrics = prune_tree_batch(batch, entropies_bt, config.prune)   # kat_jax.tree.prune
"""
from kat_jax.tree.batch import TreeBatch, batch_trees, concat_trees, per_tree_token
from kat_jax.tree.build import (EVENT_TAGS, TAG_MEMORY, TAG_PLAIN, TAG_TOOL_CALL, TAG_TOOL_RESULT,
                                TrajectoryTree, build_tree, interval_mask, prediction_index)
from kat_jax.tree.prune import (PruneResult, PruneSettings, default_prune_config,
                                entropy_node_scores, longest_path_node_scores,
                                prune_longest_path, prune_nodes, prune_random,
                                prune_tree_batch, prune_with_scores, random_node_scores,
                                settings_from_config, tree_budgets, unit_structure)

__all__ = [
    "EVENT_TAGS", "TAG_MEMORY", "TAG_PLAIN", "TAG_TOOL_CALL", "TAG_TOOL_RESULT", "PruneResult",
    "PruneSettings", "TrajectoryTree", "TreeBatch", "batch_trees", "build_tree", "concat_trees",
    "default_prune_config", "entropy_node_scores", "interval_mask", "longest_path_node_scores",
    "per_tree_token", "prediction_index", "prune_longest_path", "prune_nodes",
    "prune_random", "prune_tree_batch", "prune_with_scores", "random_node_scores",
    "settings_from_config", "tree_budgets", "unit_structure",
]
