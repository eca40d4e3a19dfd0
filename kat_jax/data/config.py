"""The data section of every experiment config (``config.data``): corpora, tokenizer, packing, mixture.

Usage: ``config.data = default_data_config()`` in an experiment file, then override fields, e.g.
``--config.data.mixture.commits=0.2 --config.data.commits.repo=/path/to/repo``. Lists are
comma-separated strings so that they can be overridden on the command line.
"""
from __future__ import annotations

import ml_collections

from kat_jax.data.corpora import source_code

# Names of the mixture streams, in the order used for tie-breaking and metrics.
STREAMS = ("code", "commits", "trajectories", "instructions", "procedural", "tool_use",
           "multi_turn", "instruction_following")


def _episode_stream(experts: str, num_train: int, num_eval: int) -> ml_collections.ConfigDict:
  """A generated stream of expert episodes (``tool_use``, ``multi_turn``)."""
  c = ml_collections.ConfigDict()
  c.experts = experts          # kat_jax.rl.experts names; the episodes are shared out evenly
  c.num_train = num_train      # episodes run on generator-train tasks (the passed ones are kept)
  c.num_eval = num_eval        # episodes run on held-out tasks (0 = no eval examples)
  c.seed = 0                   # task draws
  c.code_levels = "0"          # difficulty levels of the code experts' function tasks
  c.math_levels = "0,1"        # levels of the math expert's problems
  c.repo_level = 1             # level (1 or 2) of the functions in the repository experts' tasks
  c.max_turns = 16             # per episode; an expert needs at most 9
  c.workers = 2                # sandbox pool workers while building (does not change the data)
  c.loss_on = "assistant"      # 'assistant' (as data.procedural) | 'all' | 'assistant_and_tool'
  return c


def default_data_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # TFDS cache of the built corpora; '' = $KAT_JAX_DATA_DIR or ~/.cache/kat_jax/tfds.
  config.data_dir = ""
  # Fraction of each corpus (by stable hash of a file path / commit sha / file:line) held out as "eval".
  config.eval_fraction = 0.05

  # Tokenizer: a saved tokenizer directory, or '' to train one from the code corpus (train split)
  # once and cache it in tokenizer_cache_dir ('' = <workdir>/tokenizer).
  config.tokenizer_path = ""
  config.tokenizer_cache_dir = ""
  config.vocab_size = 2048
  config.tokenizer_max_sentences = 100_000  # sampled multi-line chunks; bounds training time
  config.tokenizer_lines_per_sentence = 4

  # Packing of documents into [batch, seq_len] rows. Each row packs its own documents (drawn from the
  # mixture in row order), so a batch's rows hold different documents. 'split' cuts a document that
  # does not fit at the row end and continues it in the same row of the next batch (no padding);
  # 'pad' pads the row instead when the document would fit a whole row (longer ones are still split).
  config.packing = "split"
  config.prefetch_documents = 32  # per stream, tokenized ahead on worker threads
  config.num_threads = 2

  # Mixture weights in tokens (normalized over streams with weight > 0).
  config.mixture = ml_collections.ConfigDict()
  config.mixture.code = 1.0          # source files of data.code (FIM by data.fim)
  config.mixture.commits = 0.0       # commits of data.commits.repo as request/diff conversations
  config.mixture.trajectories = 0.0  # JSONL conversations of data.trajectories.paths
  config.mixture.instructions = 0.0  # JSONL instruction data of data.instructions.paths
  config.mixture.procedural = 0.0    # procedural function tasks (data.procedural), generated
  config.mixture.tool_use = 0.0      # expert episodes on function / math tasks (data.tool_use)
  config.mixture.multi_turn = 0.0    # expert episodes in repositories (data.multi_turn)
  config.mixture.instruction_following = 0.0  # constraint-checked requests (same-named section)
  assert set(config.mixture) == set(STREAMS), (sorted(config.mixture), STREAMS)

  # Source-code corpus; root '' = the installed Python standard library.
  config.code = ml_collections.ConfigDict(dict(
      root="", extensions=".py", exclude_dirs=",".join(source_code.DEFAULT_EXCLUDE_DIRS),
      max_file_bytes=1_000_000, language_headers=True))
  # Commits of a local git repository rendered as a conversation: user = the commit message (the
  # request), assistant = the diff (the answer). loss_on: 'all' | 'assistant' (see chat.LossPolicy).
  config.commits = ml_collections.ConfigDict(dict(
      repo="", revision="HEAD", max_commits=20_000, max_diff_bytes=200_000, loss_on="all"))
  # Conversations / trajectories (tool use, multi-turn, SFT / RFT teacher trajectories): JSONL files
  # or globs, comma-separated, one chat.Conversation JSON per line (experiments/make_agentic_data.py
  # writes the teacher trajectories of kat_jax.rl.experts run through the real environments).
  # balance: '' = each example once per (reshuffled) epoch; 'taxonomy' = examples drawn with
  # replacement so that every taxonomy cell of their labels gets equal mass
  # (taxonomy.balanced_sampling_weights), unlabeled examples sharing unlabeled_mass.
  config.trajectories = ml_collections.ConfigDict(dict(paths="", loss_on="all",
                                                       render="conversation", balance="",
                                                       unlabeled_mass=0.0))
  # Instruction data: JSONL conversations or Evol-Instruct records ({"instruction", "solution"}).
  # render: 'conversation' (user instruction, assistant solution) or 'code_file' (aiXcoder: the
  # solution as a code file with the instruction as its docstring, FIM-transformed like code).
  # Instruction following with checkable constraints: kat_jax.data.instructions (same script).
  # balance / unlabeled_mass: as for trajectories.
  config.instructions = ml_collections.ConfigDict(dict(paths="", loss_on="all",
                                                       render="conversation", balance="",
                                                       unlabeled_mass=0.0))
  # Procedural tasks from kat_jax.data.procedural, rendered as conversations.
  # families '' = all; levels: comma-separated difficulty levels. The corpus holds num_train distinct
  # training and num_eval distinct held-out tasks (the stream repeats them, reshuffled, every epoch),
  # and building it raises when the levels hold fewer: level 0 (the one a tiny model can learn,
  # docs/DESIGN.md, "Background") has about 1,070 training and 130 held-out tasks
  # (heldout_fraction 0.1); add levels ("0,1") for more. Generation is slow (the default corpus
  # takes over a minute on 2 CPU cores; built once, cached in data_dir), so the defaults stay near
  # what level 0 holds.
  config.procedural = ml_collections.ConfigDict(dict(
      families="", levels="0", num_train=1_000, num_eval=100, seed=0, heldout_fraction=0.1,
      loss_on="assistant"))

  # Generated streams (kat_jax.data.corpora.agentic): the SFT data's builders (kat_jax.data.agentic)
  # run at mid-training. Scripted experts act through the real environments (every tool result a
  # real sandboxed execution; only the episodes the environment grades passed are kept), and
  # instruction-following requests carry constraints that code verifies. Built once on first use
  # into data_dir (a corpus fingerprinting the section, as data.procedural), a few seconds; train
  # examples come from the procedural generator's train tasks, eval ones from its held-out tasks
  # (data.procedural.heldout_fraction). Rendered as conversations with loss_on like procedural.
  # tool_use: function tasks (run_tests / read the report / fix / submit) and math (submit).
  config.tool_use = _episode_stream("code_direct,code_fix,math_answer", 240, 24)
  # multi_turn: repositories (search, read_file, str_replace / create_file, run_tests, submit).
  config.multi_turn = _episode_stream("repo_fix,repo_reproduce,repo_explore", 60, 12)
  config.instruction_following = ml_collections.ConfigDict()
  config.instruction_following.num_train = 400    # examples (each category leads in turn)
  config.instruction_following.num_eval = 40      # from another seed stream, none repeating train
  config.instruction_following.seed = 0           # example draws
  config.instruction_following.max_constraints = 2  # constraints per example (1 .. this)
  config.instruction_following.loss_on = "assistant"  # 'assistant' (as procedural) | 'all'

  # Fill-in-the-middle, applied per code document before packing (Bavarian et al. 2022; aiXcoder),
  # by kat_jax.data.fim.apply_fim; the path/language header stays in front, untransformed.
  config.fim = ml_collections.ConfigDict(dict(
      rate=0.0,              # probability that a code document is FIM-transformed
      spm_rate=0.5,          # of those, the fraction in SPM order (else PSM)
      structured_rate=1.0,   # of those, the fraction that take a complete AST node as the middle
                             # (else character-level random spans); non-Python falls back to characters
      max_middle_chars=2048,
  ))
  return config


def split_list(value: str) -> list[str]:
  """``"a, b,,c"`` -> ``["a", "b", "c"]`` (config lists are comma-separated strings)."""
  if isinstance(value, (list, tuple)):
    return [str(v).strip() for v in value if str(v).strip()]
  return [part.strip() for part in str(value).split(",") if part.strip()]
