"""Sampling speed of kat_jax's KV-cache sampler against Google Tunix's, on the same Qwen3-shaped
model with the same weights and the same prompts, side by side in one run.

  python -m experiments.bench_sample_tunix [--vocab=32000 --d_model=512 --layers=8 --heads=8
      --kv_heads=4 --head_dim=64 --mlp_dim=1536 --tie_embeddings --batch=8 --prompt_len=64
      --new_tokens=128 --rounds=5 --tunix_python=$HOME/.cache/kat_jax/tunix_venv/bin/python]

Tunix is a comparison only, never a dependency of kat_jax: its side runs in a subprocess of
``--tunix_python`` (a virtualenv with ``google-tunix==0.1.7``; build one with
``python -m venv V && V/bin/pip install google-tunix==0.1.7``):
``experiments/_tunix_sampler_worker.py``, which takes commands over stdin/stdout JSON lines.
kat_jax's side runs in this process.

**Same weights.** The kat_jax ``Transformer`` is initialized at random (numpy; norm scales
``1 + 0.1·N(0, 1)``, so a norm mapped to the wrong tensor changes the logits) and exported with
kat_jax's own exporter (``kat_jax.model.hf.export_hf``: ``config.json`` + safetensors, float32)
to a temporary directory; the worker loads that directory with Tunix's own Qwen3 loader
(``tunix.models.qwen3.params.create_model_from_safe_tensors``). Both report their parameter
count (they must be equal), and the logits of one full forward pass over the prompts are compared
at every position: the run fails (``ImplementationsDisagree``, exit status 1) if the largest
absolute difference exceeds ``--tolerance`` (1e-3, float32) — before anything is timed. The
first generated token's log-prob of each sampler, checked against the full forward's logits, must
agree as closely. RoPE theta is 1e6 on both sides: Tunix 0.1.7's qwen3 ignores its config's
theta and always uses 1e6 (Qwen3's own value).

**Same prompts.** ``--batch`` rows of ``--prompt_len`` random ids go to kat_jax as lists and to
Tunix as text ``"5 17 3"`` that the worker's ``IdTokenizer`` maps back to the same ids (no BOS);
the worker checks Tunix's tokenization gives exactly those ids, and every timed Tunix call
reports that its padded prompt buffer equals them (``max_prompt_length = prompt_len``: no
padding). Both caches hold ``prompt_len + new_tokens`` slots.

**Sampling.** Temperature 1 over the whole vocabulary, log-probs returned on both sides (kat_jax
always returns them; Tunix ``return_logprobs=True``, ``top_p=1``: without ``top_p`` Tunix samples
greedily whatever the temperature), no stop token (Tunix's end-of-sequence id lies outside the
vocabulary), so every row generates exactly ``n`` tokens. The draws differ (each sampler has its
own PRNG use); the work does not. Both samplers compute n single-token forward passes after the
prefill for n tokens (the last one's logits unused); Tunix's prefill computes the output head at
every prompt position ([B, P, V]), kat_jax's at the last one only. Each timed call is the
library's public call from host prompts to host results (kat_jax ``Sampler.generate``, Tunix
``Sampler.__call__``), measured inside its own process.

**Timing.** Per side and round: ``prefill`` = a call generating 1 token, ``total`` = a call
generating ``--new_tokens``, ``decode_step = (total - prefill) / (new_tokens - 1)``. A warm-up
call of each size first (Tunix compiles one program pair per size; kat_jax one for both; the
worker starts and compiles while kat_jax compiles). Each side's turn in a round begins with one
untimed 1-token call: the first call after the other process ran is slower (seen at small
shapes: a 1-token call twice as slow as the following 8-token one). Rounds alternate the order
of the sides (kat_jax first, then Tunix first, ...). Reported: per-side medians over rounds
(``kat_s``, ``tunix_s``), and ``tunix_over_kat`` for each phase, the median of the per-round
ratios (> 1: kat_jax is faster). Prints one JSON object.

On GPUs both processes share the device: neither preallocates memory
(``XLA_PYTHON_CLIENT_PREALLOCATE=false``).
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Optional

from absl import app, flags

from kat_jax import errors

FLAGS = flags.FLAGS

# The comparison's own virtualenv (.ci/run builds it there; KAT_TUNIX_PYTHON overrides).
DEFAULT_TUNIX_PYTHON = os.environ.get(
    "KAT_TUNIX_PYTHON", os.path.join(os.path.expanduser("~"), ".cache", "kat_jax", "tunix_venv",
                                     "bin", "python"))
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_tunix_sampler_worker.py")
ROPE_THETA = 1_000_000.0      # what tunix 0.1.7's qwen3 applies, whatever its config says
BUILD_HINT = "python -m venv V && V/bin/pip install google-tunix==0.1.7"


class ImplementationsDisagree(RuntimeError):
  """kat_jax and Tunix computed different logits (or log-probs) from the same weights."""


def define_flags() -> None:
  """The command line, defined only when run as a script: flags defined at import would clash
  with those of the other experiments/ modules imported into the same process (the tests)."""
  flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")
  flags.DEFINE_integer("d_model", 512, "Hidden size.")
  flags.DEFINE_integer("layers", 8, "Decoder layers.")
  flags.DEFINE_integer("heads", 8, "Query heads.")
  flags.DEFINE_integer("kv_heads", 4, "Key/value heads.")
  flags.DEFINE_integer("head_dim", 64, "Head dimension.")
  flags.DEFINE_integer("mlp_dim", 1536, "MLP hidden size.")
  flags.DEFINE_bool("tie_embeddings", True, "Output head = embedding (41.56M params at the "
                    "default shape; --notie_embeddings: 57.94M).")
  flags.DEFINE_integer("batch", 8, "Prompts sampled together.")
  flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per row.")
  flags.DEFINE_integer("new_tokens", 128, "Generated tokens per row (>= 2).")
  flags.DEFINE_integer("rounds", 5, "Timing rounds of both sides (medians reported).")
  flags.DEFINE_string("tunix_python", DEFAULT_TUNIX_PYTHON,
                      f"Python of a virtualenv with Tunix ({BUILD_HINT}).")
  flags.DEFINE_float("tolerance", 1e-3, "Largest allowed |logit difference| between the two.")


def check_tunix_python(tunix_python: str) -> None:
  """ConfigError unless ``tunix_python`` is an executable file."""
  if not (os.path.isfile(tunix_python) and os.access(tunix_python, os.X_OK)):
    raise errors.ConfigError(
        f"--tunix_python={tunix_python!r} is not an executable Python: the Tunix side runs in its "
        f"own virtualenv; build one with `{BUILD_HINT}` and pass --tunix_python=V/bin/python")


def random_params(cfg, seed: int = 0):
  """Random kat_jax params of ``cfg`` (numpy, fast): matrices normal with std fan_in^-1/2 (the
  embedding d_model^-1/2, so logits are O(1) with a tied head), 1-D norm scales 1 + 0.1·N(0, 1)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kat_jax.model import hf

  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    shape = leaf.shape
    if len(shape) == 1:
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      if name == "embedding":
        fan_in = shape[1]
      elif name.endswith("o_proj"):
        fan_in = shape[0] * shape[1]
      else:
        fan_in = shape[0]
      value = rng.normal(size=shape) * fan_in ** -0.5
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(init, hf.abstract_params(cfg))


class TunixWorker:
  """The worker subprocess (``_tunix_sampler_worker.py``) and its JSON-line protocol; stderr goes
  to ``log_path``, whose tail any failure message quotes."""

  def __init__(self, python: str, checkpoint: str, cache_size: int, log_path: str,
               timeout_s: float = 900.0):
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")
    self.log_path, self.timeout_s = log_path, timeout_s
    self._log = open(log_path, "w")
    self.proc = subprocess.Popen(
        [python, WORKER, f"--checkpoint={checkpoint}", f"--cache_size={cache_size}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, env=env)
    self._lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read_lines, daemon=True).start()
    self._pending = ["start"]         # its first line, {"ready": ...}, answers the start

  def _read_lines(self) -> None:
    for line in self.proc.stdout:
      self._lines.put(line)
    self._lines.put(None)

  def _log_tail(self, chars: int = 3000) -> str:
    self._log.flush()
    with open(self.log_path) as f:
      return f.read()[-chars:]

  def _reply(self, what: str) -> dict:
    try:
      line = self._lines.get(timeout=self.timeout_s)
    except queue.Empty:
      self.close()
      raise RuntimeError(f"the Tunix worker did not answer {what!r} within {self.timeout_s:.0f} s;"
                         f" its log:\n{self._log_tail()}") from None
    if line is None:
      rc = self.proc.wait()
      raise RuntimeError(f"the Tunix worker exited (status {rc}) before answering {what!r}; "
                         f"its log:\n{self._log_tail()}")
    message = json.loads(line)
    if "error" in message:
      hint = (f" (is Tunix installed in that Python? {BUILD_HINT})"
              if "ModuleNotFoundError" in message["error"] else "")
      raise RuntimeError(f"the Tunix worker failed on {what!r}{hint}:\n{message['error']}")
    return message

  def send(self, cmd: str, **args) -> None:
    """Queues a command (the worker answers commands in order; ``receive`` reads the answers)."""
    self._pending.append(cmd)
    try:
      self.proc.stdin.write(json.dumps(dict(cmd=cmd, **args)) + "\n")
      self.proc.stdin.flush()
    except OSError:                   # the worker is gone: its own answer says why
      while self._pending:
        self.receive()
      raise

  def receive(self) -> dict:
    """The answer to the oldest command sent and not yet received."""
    return self._reply(self._pending.pop(0))

  def call(self, cmd: str, **args) -> dict:
    self.send(cmd, **args)
    return self.receive()

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps(dict(cmd="quit")) + "\n")
        self.proc.stdin.flush()
        self.proc.wait(timeout=60)
      except (OSError, subprocess.TimeoutExpired):
        self.proc.kill()
        self.proc.wait()
    self._log.close()


def _phases(prefill_s: list, total_s: list, new_tokens: int) -> dict:
  """Per-round and median prefill / total / decode-step seconds of one side."""
  step = [(t - p) / (new_tokens - 1) for p, t in zip(prefill_s, total_s)]
  return dict(prefill_s=statistics.median(prefill_s), total_s=statistics.median(total_s),
              decode_step_s=statistics.median(step), prefill_s_by_round=prefill_s,
              total_s_by_round=total_s, decode_step_s_by_round=step)


def measure(*, vocab: int = 32000, d_model: int = 512, layers: int = 8, heads: int = 8,
            kv_heads: int = 4, head_dim: int = 64, mlp_dim: int = 1536,
            tie_embeddings: bool = True, batch: int = 8, prompt_len: int = 64,
            new_tokens: int = 128, rounds: int = 5,
            tunix_python: str = DEFAULT_TUNIX_PYTHON, tolerance: float = 1e-3,
            workdir: Optional[str] = None) -> dict:
  """Runs both sides (module docstring) and returns the record the script prints. Raises
  ``ConfigError`` for a missing ``tunix_python`` or bad sizes, ``ImplementationsDisagree`` when
  the logits differ by more than ``tolerance``."""
  check_tunix_python(tunix_python)
  if new_tokens < 2:
    raise errors.ConfigError(f"--new_tokens={new_tokens}: need >= 2 (decode_step = (total - "
                             "prefill) / (new_tokens - 1))")
  for name, value in dict(batch=batch, prompt_len=prompt_len, rounds=rounds).items():
    if value < 1:
      raise errors.ConfigError(f"--{name}={value} must be >= 1")

  import jax
  import jax.numpy as jnp
  import numpy as np
  from kat_jax.model import ModelConfig, Transformer, hf, intervals_from_segment_ids
  from kat_jax.sample import Sampler, SamplingConfig

  t_setup = time.perf_counter()
  cfg = ModelConfig(vocab_size=vocab, d_model=d_model, num_layers=layers, num_heads=heads,
                    num_kv_heads=kv_heads, head_dim=head_dim, mlp_dim=mlp_dim,
                    rope_theta=ROPE_THETA, norm_eps=1e-6, qk_norm=True,
                    tie_embeddings=tie_embeddings, param_dtype="float32", dtype="float32")
  cfg.validate()
  model = Transformer(cfg)
  params = random_params(cfg)
  num_params = int(sum(x.size for x in jax.tree.leaves(params)))
  prompts = np.random.default_rng(1).integers(0, vocab, (batch, prompt_len)).astype(np.int32)
  max_len = prompt_len + new_tokens

  own_dir = workdir is None
  workdir = tempfile.mkdtemp(prefix="bench_sample_tunix_") if own_dir else workdir
  worker, keep = None, False
  try:
    checkpoint = os.path.join(workdir, "hf")
    hf.export_hf(params, cfg, checkpoint, torch_dtype="float32")
    export_s = time.perf_counter() - t_setup
    # The worker imports Tunix, loads the checkpoint and compiles its programs while this process
    # compiles kat_jax's: its commands are queued now and their answers read later, in order.
    t0 = time.perf_counter()
    worker = TunixWorker(tunix_python, checkpoint, max_len, os.path.join(workdir, "tunix.log"))
    logits_path = os.path.join(workdir, "tunix_logits.npy")
    worker.send("prompts", ids=prompts.tolist())
    worker.send("logits", path=logits_path)
    worker.send("warm", new_tokens=[new_tokens, 1])

    # Agreement: full-forward logits at every prompt position.
    positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
    forward = jax.jit(lambda p, t: model.apply(
        {"params": p}, t, positions,
        intervals_from_segment_ids(jnp.ones(t.shape, jnp.int32))).logits)
    kat_logits = np.asarray(forward(params, jnp.asarray(prompts)), np.float32)
    last_logp = np.asarray(jax.nn.log_softmax(jnp.asarray(kat_logits[:, -1]), axis=-1))

    # kat_jax's warm-up (compiles; 1 and new_tokens tokens share one program pair).
    sampler = Sampler(model, params, max_len=max_len, prefill_bucket=prompt_len,
                      output_bucket=new_tokens)
    prompt_lists = prompts.tolist()

    def kat_call(n: int, seed: int):
      return sampler.generate(prompt_lists, jax.random.key(seed),
                              SamplingConfig(temperature=1.0, max_new_tokens=n))

    t1 = time.perf_counter()
    kat_first = kat_call(1, 0)
    kat_call(new_tokens, 0)
    kat_warm_s = time.perf_counter() - t1

    hello = worker.receive()
    if hello["params"] != num_params:
      raise ImplementationsDisagree(f"Tunix built {hello['params']} parameters from the "
                                    f"checkpoint in {workdir}, kat_jax has {num_params}")
    worker.receive()                                               # prompts
    worker.receive()                                               # logits
    tunix_logits = np.load(logits_path)
    if tunix_logits.shape != kat_logits.shape:
      raise ImplementationsDisagree(f"Tunix logits have shape {tunix_logits.shape}, kat_jax's "
                                    f"{kat_logits.shape}")
    logits_diff = float(np.max(np.abs(tunix_logits - kat_logits)))
    tunix_first = worker.receive()                                 # warm
    tunix_ready_s = time.perf_counter() - t0
    rows = np.arange(batch)
    kat_lp_diff = float(np.max(np.abs(
        kat_first.logprobs[:, 0] - last_logp[rows, kat_first.tokens[:, 0]])))
    tunix_lp_diff = float(np.max(np.abs(
        np.asarray(tunix_first["first_logprobs"]) -
        last_logp[rows, np.asarray(tunix_first["first_tokens"])])))
    agreement = dict(logits_max_abs_diff=logits_diff,
                     logits_max_abs=float(np.max(np.abs(kat_logits))),
                     first_token_logprob_max_abs_diff=dict(kat=kat_lp_diff, tunix=tunix_lp_diff),
                     tolerance=tolerance)
    worst = max(logits_diff, kat_lp_diff, tunix_lp_diff)
    if not worst <= tolerance:
      raise ImplementationsDisagree(
          f"kat_jax and Tunix disagree on the same weights: max |logit difference| "
          f"{logits_diff:.3g}, first-token log-prob vs the forward pass: kat_jax "
          f"{kat_lp_diff:.3g}, Tunix {tunix_lp_diff:.3g} (tolerance {tolerance:g}); "
          f"checkpoint and Tunix log kept in {workdir}")

    def time_kat(seed: int) -> tuple[float, float]:
      kat_call(1, seed)                            # untimed: the turn's first call runs slower
      t0 = time.perf_counter()
      first = kat_call(1, seed)
      t1 = time.perf_counter()
      out = kat_call(new_tokens, seed)
      t2 = time.perf_counter()
      if first.lengths.tolist() != [1] * batch or out.lengths.tolist() != [new_tokens] * batch:
        raise RuntimeError(f"kat_jax generated {out.lengths.tolist()} tokens per row, not "
                           f"{new_tokens} ({out.finish_reason})")
      return t1 - t0, t2 - t1

    def time_tunix(seed: int) -> tuple[float, float]:
      worker.call("time", new_tokens=1, seed=seed)   # untimed, as kat_jax's
      replies = [worker.call("time", new_tokens=n, seed=seed) for n in (1, new_tokens)]
      for n, r in zip((1, new_tokens), replies):
        if r["lengths"] != [n] * batch or not r["prompts_as_sent"] or not r["logprobs_ok"]:
          raise RuntimeError(f"Tunix call for {n} tokens: lengths {r['lengths']}, prompts as "
                             f"sent {r['prompts_as_sent']}, log-probs ok {r['logprobs_ok']}")
      return replies[0]["seconds"], replies[1]["seconds"]

    kat_p, kat_t, tunix_p, tunix_t, order = [], [], [], [], []
    for r in range(rounds):
      if r % 2 == 0:
        kp, kt = time_kat(r)
        tp, tt = time_tunix(r)
      else:
        tp, tt = time_tunix(r)
        kp, kt = time_kat(r)
      order.append("kat_first" if r % 2 == 0 else "tunix_first")
      kat_p.append(kp)
      kat_t.append(kt)
      tunix_p.append(tp)
      tunix_t.append(tt)
  except ImplementationsDisagree:
    keep = True                       # the checkpoint and the worker's log, to look into
    raise
  finally:
    if worker is not None:
      worker.close()
    if own_dir and not keep:
      shutil.rmtree(workdir, ignore_errors=True)

  kat = _phases(kat_p, kat_t, new_tokens)
  tunix = _phases(tunix_p, tunix_t, new_tokens)
  by_round = {phase: [t / k for t, k in zip(tunix[f"{phase}_s_by_round"],
                                            kat[f"{phase}_s_by_round"])]
              for phase in ("prefill", "decode_step", "total")}
  for side in (kat, tunix):       # None where noise made total <= prefill (tiny shapes)
    side["decode_tokens_per_s"] = (batch / side["decode_step_s"] if side["decode_step_s"] > 0
                                   else None)
  return dict(
      shape=dict(vocab=vocab, d_model=d_model, layers=layers, heads=heads, kv_heads=kv_heads,
                 head_dim=head_dim, mlp_dim=mlp_dim, tie_embeddings=tie_embeddings,
                 qk_norm=True, rope_theta=ROPE_THETA, dtype="float32"),
      params=num_params, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
      cache_slots=max_len, temperature=1.0, rounds=rounds, order_by_round=order,
      jax_version=jax.__version__, device=str(jax.devices()[0].device_kind),
      tunix=dict(version=hello["tunix_version"], jax_version=hello["jax_version"],
                 device=hello["device"], params=hello["params"]),
      agreement=agreement, kat_s=kat, tunix_s=tunix,
      tunix_over_kat={phase: statistics.median(r) for phase, r in by_round.items()},
      tunix_over_kat_by_round=by_round,
      setup_s=dict(init_and_export=export_s, tunix_ready=tunix_ready_s,
                   tunix_load=hello["load_s"], kat_warm=kat_warm_s,
                   tunix_warm=tunix_first["seconds"]))


def main(argv):
  del argv
  record = measure(vocab=FLAGS.vocab, d_model=FLAGS.d_model, layers=FLAGS.layers,
                   heads=FLAGS.heads, kv_heads=FLAGS.kv_heads, head_dim=FLAGS.head_dim,
                   mlp_dim=FLAGS.mlp_dim, tie_embeddings=FLAGS.tie_embeddings, batch=FLAGS.batch,
                   prompt_len=FLAGS.prompt_len, new_tokens=FLAGS.new_tokens, rounds=FLAGS.rounds,
                   tunix_python=FLAGS.tunix_python, tolerance=FLAGS.tolerance)
  print(json.dumps(record), flush=True)


if __name__ == "__main__":
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the worker shares the device
  define_flags()
  app.run(errors.run_main(main))
