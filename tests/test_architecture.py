"""The layout rules of docs/architecture.md: no import cycle among the package's modules, no
function-local import of them, no library function over 80 lines, no config fallbacks."""

import ast
import pathlib
import re

import pytest

import maskfreevis_jax

PACKAGE_DIR = pathlib.Path(maskfreevis_jax.__file__).resolve().parent
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}
IDS = sorted(MODULES)


def _imported_modules(node: ast.AST) -> list[str]:
  """The package's modules an import statement loads (resolved to modules, not names)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
    names = [f"{node.module}.{a.name}" for a in node.names]
  else:
    return []
  found = []
  for name in names:
    while name and name not in MODULES:
      name = name.rpartition(".")[0]
    if name.startswith("maskfreevis_jax"):
      found.append(name)
  return found


def _tree(module: str) -> ast.Module:
  return ast.parse(MODULES[module].read_text())


@pytest.mark.parametrize("module", IDS, ids=IDS)
def test_no_function_local_import_of_the_package(module):
  tree = _tree(module)
  top_level = {id(node) for node in tree.body}
  local = [
      f"line {node.lineno}: {name}"
      for node in ast.walk(tree)
      if id(node) not in top_level
      for name in _imported_modules(node)
  ]
  assert not local, f"{module} imports the package's modules inside functions: {local}"


def test_the_package_imports_without_a_cycle():
  graph = {
      module: {dep for node in _tree(module).body for dep in _imported_modules(node)} - {module}
      for module in MODULES
  }
  assert graph["maskfreevis_jax.experiment"], "the import graph must be read, not empty"
  done, path = set(), []

  def visit(module):
    assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
    if module in done:
      return
    path.append(module)
    for dep in sorted(graph[module]):
      visit(dep)
    path.pop()
    done.add(module)

  for module in sorted(graph):
    visit(module)


@pytest.mark.parametrize("module", IDS, ids=IDS)
def test_no_library_function_over_80_lines(module):
  long = [
      f"{node.name} (line {node.lineno}): {node.end_lineno - node.lineno + 1} lines"
      for node in ast.walk(_tree(module))
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
      and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
  ]
  assert not long, f"{module}: {long}"


# `config.x.get("field", default)`, `cfg.get(...)`, `eval_config.get(...)`: a fallback that can
# drift from the schema's default.
_CONFIG_FALLBACK = re.compile(r"\b(config|cfg|tcfg|ecfg|[a-z_]+_config)(\.[a-z_]+)*\.get\(")


@pytest.mark.parametrize("module", IDS, ids=IDS)
def test_no_config_fallbacks(module):
  lines = MODULES[module].read_text().splitlines()
  found = [f"line {i}: {line.strip()}" for i, line in enumerate(lines, 1)]
  found = [f for f, line in zip(found, lines) if _CONFIG_FALLBACK.search(line)]
  assert not found, f"{module} reads config fields with a fallback: {found}"
