"""The layout holds: no import cycle, layers import only downwards, the loop stays small.

Imports are read from the source (every ``import`` statement, also inside functions), so a cycle
hidden by a function-level import counts as a cycle.
"""

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / 'mixer_vit'
# The top level holds the commands (``python -m mixer_vit.NAME``) and the pieces they share
# (``cli``); the library lives in the packages below it.
COMMANDS = (
  'mixer_vit.main',
  'mixer_vit.infer',
  'mixer_vit.evaluate',
  'mixer_vit.attention',
  'mixer_vit.benchmark',
  'mixer_vit.benchmark_vs_original',
  'mixer_vit.pick_augreg',
  'mixer_vit.export',
  'mixer_vit.plot',
)
TOOLS = tuple(c for c in COMMANDS if c != 'mixer_vit.main') + ('mixer_vit.analysis',)
LIBRARY = (
  'mixer_vit.runtime',
  'mixer_vit.models',
  'mixer_vit.data',
  'mixer_vit.training',
  'mixer_vit.workdir',
)
# Modules (or packages) that may only import what is listed beside them (within mixer_vit),
# from the bottom up.
LOWER_LAYERS = {
  'mixer_vit.runtime': ('mixer_vit.runtime.env', 'mixer_vit.runtime.paths'),
  'mixer_vit.runtime.env': (),
  'mixer_vit.runtime.paths': (),
  'mixer_vit.runtime.sizes': (),
  'mixer_vit.runtime.install': (),
  'mixer_vit.models': ('mixer_vit.models', 'mixer_vit.runtime'),
  'mixer_vit.data': ('mixer_vit.data', 'mixer_vit.runtime'),
  'mixer_vit.training.config_utils': (),
  'mixer_vit.training.losses': (),
  'mixer_vit.training.optim': (),
  'mixer_vit.training.steps': (
    'mixer_vit.models',
    'mixer_vit.runtime',
    'mixer_vit.training.losses',
  ),
  'mixer_vit.training.run_setup': (
    'mixer_vit.runtime',
    'mixer_vit.training.optim',
    'mixer_vit.training.steps',
  ),
  'mixer_vit.training.fewshot': ('mixer_vit.data', 'mixer_vit.models', 'mixer_vit.runtime'),
  'mixer_vit.training': (
    'mixer_vit.data',
    'mixer_vit.models',
    'mixer_vit.runtime',
    'mixer_vit.training',
    'mixer_vit.workdir',
  ),
  'mixer_vit.workdir': (
    'mixer_vit.data',
    'mixer_vit.models',
    'mixer_vit.runtime',
    'mixer_vit.training.config_utils',
    'mixer_vit.training.optim',
    'mixer_vit.training.steps',
    'mixer_vit.training.losses',
    'mixer_vit.workdir',
  ),
}


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """The project modules ``path`` imports (``from mixer_vit import x`` counts as importing x)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f'{node.module}.{a.name}' for a in node.names]
      if not any(n in modules for n in names):  # Names defined in the module, not submodules.
        names = [node.module]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition('.')[0]
      if name:
        found.add(name)
  return found


def _graph() -> dict[str, set[str]]:
  paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
  modules = set(paths)
  graph = {m: _imports(p, modules) - {m} for m, p in paths.items()}
  # A package's __init__ re-exports its modules; importing a submodule runs it, so edges into
  # the package from its own modules are not cycles of the code.
  for m in graph:
    graph[m] = {t for t in graph[m] if not m.startswith(t + '.')}
  return graph


GRAPH = _graph()


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, int] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = 1
    stack.append(node)
    for target in sorted(graph.get(node, ())):
      if state.get(target) == 1:
        return stack[stack.index(target) :] + [target]
      if target not in state:
        cycle = visit(target)
        if cycle:
          return cycle
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_cycle_finder_finds_a_cycle():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


def test_the_import_graph_reads_the_package():
  assert 'mixer_vit.training.steps' in GRAPH['mixer_vit.training.train']
  assert 'mixer_vit.data.preprocess' in GRAPH['mixer_vit.data.pipeline']


def test_no_module_imports_itself_back_through_others():
  assert _find_cycle(GRAPH) is None, ' -> '.join(_find_cycle(GRAPH))


@pytest.mark.parametrize('layer', sorted(LOWER_LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
  allowed = LOWER_LAYERS[layer]
  for module, targets in GRAPH.items():
    if module != layer and not module.startswith(layer + '.'):
      continue
    above = {t for t in targets if not any(t == a or t.startswith(a + '.') for a in allowed)}
    assert not above, f'{module} imports {sorted(above)}'


@pytest.mark.parametrize('tool', TOOLS)
def test_tools_do_not_import_the_training_loop(tool):
  assert 'mixer_vit.training.train' not in GRAPH[tool]


def test_the_training_loop_stays_a_loop():
  assert len((PACKAGE / 'training' / 'train.py').read_text().splitlines()) <= 350


def test_the_top_level_holds_the_commands_and_packages_the_library():
  top = {_module_name(p) for p in PACKAGE.glob('*.py')} - {'mixer_vit', 'mixer_vit.cli'}
  assert top == set(COMMANDS)
  for command in COMMANDS:
    source = (PACKAGE / f'{command.rpartition(".")[2]}.py').read_text()
    assert "if __name__ == '__main__':" in source, command
  packages = {f'mixer_vit.{p.parent.name}' for p in PACKAGE.glob('*/__init__.py')}
  assert packages == set(LIBRARY) | {'mixer_vit.analysis'}
  assert (PACKAGE / 'analysis' / '__main__.py').exists()
  # Library modules run nothing: no command hides among them.
  for path in PACKAGE.glob('*/*.py'):
    if path.parent.name in ('runtime', 'training', 'workdir', 'models'):
      assert "if __name__ == '__main__':" not in path.read_text(), path


def test_workdir_file_names_are_defined_once():
  names = ('config.json', 'dataset_info.json', 'metrics.jsonl', 'params.npz', 'params_ema.npz')
  for path in PACKAGE.rglob('*.py'):
    if (
      path.parts[-2:] == ('workdir', 'files.py') or path.parent.name == 'data'
    ):  # tfds has a dataset_info.json.
      continue
    code = [line for line in path.read_text().splitlines() if not line.lstrip().startswith('#')]
    for name in names:
      hits = [line for line in code if re.search(rf"""['"]{re.escape(name)}['"]""", line)]
      assert not hits, f'{path.name} spells {name!r}; use mixer_vit.workdir (files.py): {hits}'
