"""Imports run one way: no cycle between dsjax's modules, no import from a lower layer up.

The imports are read with `ast` from every module of the package, module-level and inside
functions alike (`import dsjax.x`, `from dsjax.x import y`, relative imports). An import
names the most specific module it reaches: `from dsjax.nas import ops` is an edge to
`dsjax.nas.ops`, `from dsjax.nas import SearchSpace` one to the package `dsjax.nas`.
"""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dsjax"

# Low to high; a module may import its own package and any lower layer. Packages side by
# side in one layer do not import each other (an edge between them first needs an order).
LAYERS = (
    ("dsjax",),  # The root package: its docstring and version.
    ("errors",),
    ("measure",),  # FLOPs, collective bytes, memory, trace time, AUC: read by all above.
    ("precision",),  # Policy, plan, loss scale, controller; nn's layers read the plan.
    ("nn", "parallel", "data"),
    ("nas",),  # Ops, search spaces, cost, derivation: models/supernet is built on them.
    ("models",),
    # plots reads only a run's metrics files: the loop draws them at the end of a run.
    ("config", "plots"),
    ("train",),
    ("export", "profile"),
    ("cli",),
    ("__main__",),  # Every `python -m dsjax.<package>` entry point.
)

# Imports that break the layering today, each to be removed by the change its comment
# names. An entry that no longer exists fails `test_known_violations_still_exist`: delete
# it, so the list only shrinks.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
  modules = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    modules[".".join(parts)] = path
  return modules


def import_graph() -> dict[str, set[str]]:
  """{module: the dsjax modules it imports}, from every import statement of every module."""
  modules = _modules()

  def resolve(name: str) -> str:
    while name not in modules:  # `dsjax.nas.SearchSpace` -> `dsjax.nas`.
      name = name.rpartition(".")[0]
    return name

  graph = {}
  for module, path in modules.items():
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        imported.update(resolve(alias.name) for alias in node.names
                        if alias.name.split(".")[0] == "dsjax")
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          base = ".".join([*package.split(".")[:len(package.split(".")) - node.level + 1],
                           *([base] if base else [])])
        if base.split(".")[0] == "dsjax":
          imported.update(resolve(f"{base}.{alias.name}") for alias in node.names)
    graph[module] = imported
  return graph


def layer_of(module: str) -> tuple[int, str]:
  """(layer index, package) of a module: `dsjax.nas.cost` -> (5, "nas")."""
  parts = module.split(".")
  package = "__main__" if parts[-1] == "__main__" else (parts[1] if len(parts) > 1 else "dsjax")
  for index, packages in enumerate(LAYERS):
    if package in packages:
      return index, package
  raise AssertionError(f"{module}: package {package!r} has no layer; add it to LAYERS")


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """One cycle (a module path back to its start) per strongly connected component."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for target in sorted(graph.get(node, ())):
      if target not in index:
        visit(target)
        low[node] = min(low[node], low[target])
      elif target in on_stack:
        low[node] = min(low[node], index[target])
    if low[node] == index[node]:
      component = set()
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.add(member)
        if member == node:
          break
      if len(component) > 1 or node in graph.get(node, ()):
        found.append(_path_back(graph, min(component), component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return found


def _path_back(graph: dict[str, set[str]], start: str, component: set[str]) -> list[str]:
  """The shortest import path from `start` back to itself inside its component."""
  parents, queue = {start: None}, collections.deque([start])
  while queue:
    node = queue.popleft()
    for target in sorted(graph.get(node, set()) & component):
      if target == start:
        path = [node]
        while parents[path[-1]] is not None:
          path.append(parents[path[-1]])
        return [*reversed(path), start]
      if target not in parents:
        parents[target] = node
        queue.append(target)
  raise AssertionError(f"no cycle through {start}")


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
  """Imports from a module to a higher layer, or to a package side by side with its own."""
  out = set()
  for module, targets in graph.items():
    layer, package = layer_of(module)
    for target in targets:
      target_layer, target_package = layer_of(target)
      if target_package != package and target_layer >= layer:
        out.add((module, target))
  return out


def _describe(module: str, target: str) -> str:
  (layer, package), (target_layer, target_package) = layer_of(module), layer_of(target)
  where = "a higher layer" if target_layer > layer else "a package beside it"
  return f"{module} ({package}) imports {target} ({target_package}, {where})"


def test_every_module_has_a_layer():
  for module in _modules():
    layer_of(module)


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)


def test_imports_point_down_the_layers():
  new = sorted(violations(import_graph()) - KNOWN_VIOLATIONS)
  assert not new, ("imports against the layering (low to high: "
                   + " -> ".join("/".join(packages) for packages in LAYERS) + "):\n"
                   + "\n".join(_describe(*edge) for edge in new))


def test_known_violations_still_exist():
  graph = import_graph()
  gone = sorted(edge for edge in KNOWN_VIOLATIONS if edge[1] not in graph.get(edge[0], ()))
  assert not gone, ("no longer imported; delete from KNOWN_VIOLATIONS:\n"
                    + "\n".join(f"{module} -> {target}" for module, target in gone))
  assert KNOWN_VIOLATIONS <= violations(graph), "a KNOWN_VIOLATIONS entry breaks no rule"


def test_the_checks_catch_a_cycle_and_an_upward_import():
  graph = {"dsjax.nas.ops": {"dsjax.models.supernet"}, "dsjax.models.supernet": {
      "dsjax.nas.ops", "dsjax.errors"}, "dsjax.errors": set(), "dsjax.nn.layers": {
      "dsjax.nn.layers"}, "dsjax.data.text": {"dsjax.parallel.mesh"}}
  assert cycles(graph) == [["dsjax.models.supernet", "dsjax.nas.ops", "dsjax.models.supernet"],
                           ["dsjax.nn.layers", "dsjax.nn.layers"]]
  assert violations(graph) == {("dsjax.nas.ops", "dsjax.models.supernet"),
                               ("dsjax.data.text", "dsjax.parallel.mesh")}
  assert _describe("dsjax.nas.ops", "dsjax.models.supernet") == (
      "dsjax.nas.ops (nas) imports dsjax.models.supernet (models, a higher layer)")
