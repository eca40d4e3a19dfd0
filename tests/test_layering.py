"""Layering: kat_jax/model imports nothing from kat_jax/train; config, model presets and sharding
form no import cycle; the library never imports experiments/ scripts; comments and docs cite only
documents inside this repository."""
import ast
import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path: str) -> set[str]:
  """Every module a file imports (module level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def _files(pattern: str) -> list[str]:
  return glob.glob(os.path.join(REPO, pattern), recursive=True)


def test_model_does_not_import_train():
  bad = {os.path.relpath(p, REPO): sorted(m for m in _imports(p) if m.startswith("kat_jax.train"))
         for p in _files("kat_jax/model/**/*.py")}
  assert not {k: v for k, v in bad.items() if v}


def test_library_does_not_import_experiments():
  bad = {os.path.relpath(p, REPO): sorted(m for m in _imports(p) if m.startswith("experiments"))
         for p in _files("kat_jax/**/*.py") + _files("kernels/**/*.py")}
  assert not {k: v for k, v in bad.items() if v}


def test_no_cycle_between_config_presets_and_sharding():
  """kat_jax.config uses the other two; neither imports it, and they do not import each other."""
  presets = _imports(os.path.join(REPO, "kat_jax/model/presets.py"))
  sharding = _imports(os.path.join(REPO, "kat_jax/sharding.py"))
  assert "kat_jax.config" not in presets | sharding
  assert not any(m.startswith("kat_jax.sharding") for m in presets)
  assert not any(m.startswith("kat_jax.model") for m in sharding)


def test_citations_stay_inside_the_repo():
  """Comments and docs may point at docs/*.md; a document that is not in this repository (a
  planning note such as RESEARCH.md or STYLE.md, anything under ../shared) is not a citation."""
  cited = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
  missing = []
  for path in (_files("kat_jax/**/*.py") + _files("kernels/**/*.py") + _files("experiments/*.py")
               + _files("configs/*.py") + _files("docs/*.md") + [os.path.join(REPO, "README.md")]):
    text = open(path).read()
    if "../shared" in text:
      missing.append(f"{os.path.relpath(path, REPO)}: ../shared")
    for name in set(cited.findall(text)):
      if not (os.path.exists(os.path.join(REPO, "docs", name)) or
              os.path.exists(os.path.join(REPO, name))):
        missing.append(f"{os.path.relpath(path, REPO)}: {name}")
  assert not missing, missing
