"""Hypothesis strategies for random trajectory sets (shared by the tree tests)."""
import hypothesis.strategies as st
import numpy as np


@st.composite
def trajectory_sets(draw, max_traj=8, max_len=10, alphabet=4, with_tags=True):
  """Random trajectories with forced sharing: duplicates, prefixes, forks at random depths.

  Tags are a random function of the token id, so shared prefixes are always tagged consistently.
  Returns (trajectories: list[list[int]], tags: list[list[int]]).
  """
  n = draw(st.integers(1, max_traj))
  trajs = []
  for _ in range(n):
    kind = draw(st.sampled_from(["fresh", "copy", "prefix", "fork"])) if trajs else "fresh"
    if kind == "fresh":
      t = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=max_len))
    else:
      base = trajs[draw(st.integers(0, len(trajs) - 1))]
      if kind == "copy":
        t = list(base)
      elif kind == "prefix":
        t = base[:draw(st.integers(1, len(base)))]
      else:
        cut = draw(st.integers(0, len(base)))
        tail = draw(st.lists(st.integers(0, alphabet - 1), min_size=1, max_size=max_len))
        t = (base[:cut] + tail)[:max_len + 4]
    trajs.append(t)
  if with_tags:
    tag_of = draw(st.lists(st.integers(0, 3), min_size=alphabet, max_size=alphabet))
  else:
    tag_of = [0] * alphabet
  tags = [[tag_of[x] for x in t] for t in trajs]
  return trajs, tags


def random_float_fields(trajs, seed):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=len(t)).astype(np.float32) for t in trajs]
