"""colab/quickstart.ipynb executed end to end with nbclient at its smallest scale (``SCALE =
"smoke"``, injected after the ``parameters`` cell as papermill does): no cell errors; the kernel
is this test's Python on one CPU device; the chain's report, as the notebook displays it, has one
row per stage; the sample cell sampled tokens; the trajectory tree holds exactly the distinct
prefixes of its sampled trajectories; the picture cells drew PNGs. The committed notebook holds
no outputs."""
import base64
import json
import os
import re
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "colab", "quickstart.ipynb")
LABELS = ["1_midtrain", "2_sft", "3_rft", "4_rl"]
SMOKE_STEPS = [4, 2, 1, 1]            # the "smoke" scale's final step of each stage
PNG = b"\x89PNG\r\n\x1a\n"

# Appended to the executed copy: the notebook's own objects, as JSON on one line.
PROBE = '''
import json as _json, sys as _sys
print("PROBE " + _json.dumps({
    "prefix": _sys.prefix, "kat_jax": kat_jax.__file__, "devices": jax.device_count(),
    "prompt": list(map(int, prompt)), "sampled": out.token_lists()[0],
    "trajectories": [list(map(int, t)) for t in trajectories], "n_tree": tree.n_tree,
    "n_flat": tree.n_flat, "por": tree.por,
    "shared_tokens": int(tree.node_size[shared].sum())}))
'''


def _one_device_xla_flags() -> str:
  """The XLA flags without the tests' 8 simulated devices (the kernel inherits them)."""
  return " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                  if "xla_force_host_platform_device_count" not in f)


def _code_cell(nb, marker: str):
  found = [c for c in nb.cells if c.cell_type == "code" and marker in c.source]
  assert len(found) == 1, (marker, len(found))
  return found[0]


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _pngs(cell) -> list[bytes]:
  return [base64.b64decode(o.data["image/png"]) for o in cell.outputs
          if o.output_type in ("display_data", "execute_result") and "image/png" in o.data]


def test_committed_notebook_is_clean():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs == [] and c.execution_count is None for c in code)
  assert [c for c in code if "parameters" in c.metadata.get("tags", [])], "no parameters cell"
  assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  workdir = str(tmp_path / "quickstart")
  params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  injected = nbformat.v4.new_code_cell(f'WORKDIR = {workdir!r}\nSCALE = "smoke"\nSEED = 0')
  injected.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(params[0] + 1, injected)
  nb.cells.append(nbformat.v4.new_code_cell(PROBE))
  monkeypatch.setenv("XLA_FLAGS", _one_device_xla_flags())   # the kernel: one CPU device
  client = NotebookClient(nb, kernel_name="python3", timeout=600, startup_timeout=120,
                          resources={"metadata": {"path": os.path.join(REPO, "colab")}})
  try:
    client.execute()   # raises CellExecutionError on the first failing cell
  finally:
    nbformat.write(nb, str(tmp_path / "quickstart_executed.ipynb"))   # to read a failure

  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not [o for o in cell.outputs if o.output_type == "error"], cell.source[:80]
  probe_lines = [line for line in _text(nb.cells[-1]).splitlines() if line.startswith("PROBE ")]
  probe = json.loads(probe_lines[0][len("PROBE "):])
  # The kernel is this Python (the virtualenv's ipykernel) with this checkout's package.
  assert probe["prefix"] == sys.prefix
  assert probe["kat_jax"] == os.path.join(REPO, "kat_jax", "__init__.py")
  assert probe["devices"] == 1

  # The chain ran every stage, each from the one before; the displayed table has a row each.
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["finished"] == LABELS == report["chain"]
  assert [r["final_step"] for r in report["stages"]] == SMOKE_STEPS
  for row, prev in zip(report["stages"][1:], report["stages"]):
    assert row["init_from"] == f"{prev['workdir']}@{prev['final_step']}"
  report_cell = _code_cell(nb, "display(Markdown(report[")
  tables = [o.data["text/markdown"] for o in report_cell.outputs
            if o.output_type == "display_data" and "text/markdown" in o.data]
  assert len(tables) == 1
  rows = [line.split(" | ")[0][2:] for line in tables[0].splitlines()
          if re.match(r"\| \d+_", line)]
  assert rows == LABELS

  # The sample: tokens after the prompt, reported by the cell.
  sample_cell = _code_cell(nb, "sampler.generate([prompt]")
  reported = re.search(r"---- (\d+) tokens sampled, finish reason: (\w+)", _text(sample_cell))
  assert reported, _text(sample_cell)[-500:]
  assert int(reported.group(1)) == len(probe["sampled"]) >= 1
  assert len(probe["prompt"]) > 10

  # The tree: 2 × 2 continuations of 16 tokens; its tokens are the trajectories' distinct
  # prefixes (each shared token once), and the prompt is on all four.
  prompt, trajectories = probe["prompt"], probe["trajectories"]
  assert len(trajectories) == 4
  assert all(t[:len(prompt)] == prompt and len(t) == len(prompt) + 32 for t in trajectories)
  assert trajectories[0][:len(prompt) + 16] == trajectories[1][:len(prompt) + 16]
  assert trajectories[2][:len(prompt) + 16] == trajectories[3][:len(prompt) + 16]
  prefixes = {tuple(t[:j]) for t in trajectories for j in range(1, len(t) + 1)}
  assert probe["n_tree"] == len(prefixes) and probe["n_flat"] == 4 * (len(prompt) + 32)
  assert probe["por"] == pytest.approx(1 - probe["n_tree"] / probe["n_flat"])
  # The plot's "shared" nodes hold exactly the prefixes of more than one trajectory.
  on_several = {p for p in prefixes if sum(tuple(t[:len(p)]) == p for t in trajectories) > 1}
  assert probe["shared_tokens"] == len(on_several) >= len(prompt) + 16
  tree_cell = _code_cell(nb, "build_tree(trajectories)")
  assert f"prefix-overlap ratio {probe['por']:.3f}" in _text(tree_cell)

  # The pictures: the report's chart and the tree, as PNG outputs.
  for marker in ("chain.REPORT_PNG", "build_tree(trajectories)"):
    pngs = _pngs(_code_cell(nb, marker))
    assert len(pngs) == 1 and pngs[0][:8] == PNG, marker
