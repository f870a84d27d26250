"""The documentation stays true: its commands, config keys, links and pictures exist.

Every ``python -m mixer_vit.X ...`` command in README.md and docs/*.md (fenced code blocks and
inline code spans) must name a module that exists and use only flags that module accepts, read from
its own ``--help`` output (one subprocess per module; absl commands also from ``--helpfull``);
``--config=FILE[:ARG]`` must load and every ``--config.KEY=...`` must name a key of that config.
Every relative link and picture must resolve, anchors included. The commands in the config files'
docstrings are held to the same rules.
"""

import ast
import functools
import importlib.util
import os
import pathlib
import re
import shlex
import subprocess
import sys

from mixer_vit import models
from mixer_vit.training import config_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC_FILES = [REPO_ROOT / 'README.md', *sorted((REPO_ROOT / 'docs').glob('*.md'))]
_COMMAND = re.compile(r'(?:^|[\s/])python3?\s+-m\s+mixer_vit[\w.]*')
_SEPARATORS = ('&&', '||', ';', '|', '>', '>>', '2>&1', '&')
# An upper-case word standing for a value the reader fills in: WORKDIR, IMAGE, DATA_DIR, N, ...
_PLACEHOLDER = re.compile(r'[A-Z][A-Z0-9_]*|\.\.\.')


# --- Reading the docs ----------------------------------------------------------------------------


def code_snippets(text: str):
  """Yields (line number, text) of each fenced block's logical lines and each inline code span."""
  lines = text.split('\n')
  in_fence = False
  prose = []  # (line number, line) outside fences, for the inline spans.
  pending, pending_line = '', 0
  for number, line in enumerate(lines, 1):
    if line.lstrip().startswith('```'):
      in_fence = not in_fence
      continue
    if not in_fence:
      prose.append((number, line))
      continue
    if not pending:
      pending_line = number
    if line.rstrip().endswith('\\'):
      pending += line.rstrip()[:-1] + ' '
      continue
    yield pending_line, pending + line
    pending = ''
  # Inline spans may run over a line break within a paragraph.
  paragraph, start = [], 0
  for number, line in prose + [(len(lines) + 1, '')]:
    if line.strip():
      if not paragraph:
        start = number
      paragraph.append(line)
      continue
    joined = '\n'.join(paragraph)
    for match in re.finditer(r'`([^`]+)`', joined):
      yield start + joined.count('\n', 0, match.start()), match.group(1).replace('\n', ' ')
    paragraph = []


def _tokens(snippet: str) -> list[str]:
  lexer = shlex.shlex(snippet, posix=True)
  lexer.whitespace_split = True
  lexer.commenters = '#'
  try:
    return list(lexer)
  except ValueError:  # An unclosed quote: an excerpt, not a command line.
    return []


def find_commands(snippet: str):
  """(module, args) of each ``python -m mixer_vit.X`` command in a line of shell."""
  if not _COMMAND.search(snippet):
    return
  tokens = _tokens(snippet)
  for i, token in enumerate(tokens):
    if ' ' in token and _COMMAND.search(' ' + token):  # A quoted command: --command="...".
      yield from find_commands(token.split('=', 1)[-1] if token.startswith('--') else token)
      continue
    is_python = re.fullmatch(r'(.*/)?python3?', token)
    if not (is_python and tokens[i + 1 : i + 2] == ['-m'] and i + 2 < len(tokens)):
      continue
    if not tokens[i + 2].startswith('mixer_vit'):
      continue
    args, depth = [], 0
    for arg in tokens[i + 3 :]:
      if depth == 0 and arg in _SEPARATORS:
        break
      depth += arg.count('[') - arg.count(']')
      args.append(arg)
    yield tokens[i + 2], args


def _anchor(heading: str) -> str:
  """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(text: str) -> set[str]:
  text = re.sub(r'^```.*?^```', '', text, flags=re.M | re.S)
  return {_anchor(m.group(1)) for m in re.finditer(r'^#+\s+(.*)$', text, flags=re.M)}


# --- What the code accepts -----------------------------------------------------------------------


def _run_help(module: str, flag: str) -> str:
  env = dict(os.environ, MIXER_VIT_TCMALLOC='0', TF_CPP_MIN_LOG_LEVEL='3', JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, '-m', module, flag],
    capture_output=True,
    text=True,
    cwd=REPO_ROOT,
    env=env,
    timeout=300,
  )
  return result.stdout + '\n' + result.stderr


@functools.cache
def module_flags(module: str) -> frozenset[str] | None:
  """The long flag names ``module`` accepts (read from its --help), or None if it does not exist."""
  try:
    if importlib.util.find_spec(module) is None:
      return None
  except ImportError:
    return None
  text = _run_help(module, '--help')
  names = set()
  usage = re.search(r'^usage:.*?(?:\n\s*\n|\Z)', text, flags=re.M | re.S)
  if usage:  # argparse: every option appears in the usage block and in its own line.
    names.update(re.findall(r'(?<![\w-])--([\w][\w.-]*)', usage.group(0)))
    for line in text.split('\n'):
      if re.match(r'\s{2}-', line):
        head = re.split(r'\s{2,}', line.strip())[0]
        names.update(re.findall(r'(?<![\w-])--([\w][\w.-]*)', head))
  else:  # absl: `  --name: help` and `  --[no]name: help`; --helpfull adds absl's own flags.
    text += _run_help(module, '--helpfull')
    for negatable, name in re.findall(r'^\s+--(\[no\])?([\w.-]+):', text, flags=re.M):
      names.add(name)
      if negatable:
        names.add('no' + name)
    names.update({'help', 'helpfull', 'helpshort'})
  if not names:
    raise AssertionError(f'no flags found in `python -m {module} --help`:\n{text[-2000:]}')
  return frozenset(names)


def _is_placeholder(value: str) -> bool:
  return bool(_PLACEHOLDER.fullmatch(value.strip()))


def _config_key_exists(config, key: str) -> bool:
  node = config
  parts = key.split('.')
  for i, part in enumerate(parts):
    if hasattr(node, 'keys') and part in node:
      node = node[part]
      continue
    if i == 1 and parts[0] == 'model' and 'model_name' in config:  # Any key of the model.
      try:
        return part in models.get_model_config(config.model_name)
      except (KeyError, ValueError):
        return False
    return False
  return True


def check_config(spec: str, keys: list[str]) -> list[str]:
  """Errors of ``--config=spec`` and its ``--config.KEY`` overrides (empty: all fine)."""
  spec = re.sub(r'[\[\]]', '', spec)
  path, _, arg = spec.partition(':')
  if _is_placeholder(pathlib.Path(path).stem) or '*' in path:
    return []
  if not (REPO_ROOT / path).is_file():
    return [f'--config={spec}: no file {path}']
  args = [a.split('=', 1)[-1] for a in arg.split(',')] if arg else []
  if any(_is_placeholder(a) for a in args):
    arg = ''  # MODEL,DATASET etc.: check the keys against the default config.
  try:
    config = config_utils.load_config(f'{REPO_ROOT / path}:{arg}' if arg else str(REPO_ROOT / path))
  except Exception as e:  # noqa: BLE001 (any failure of the config file is the finding)
    return [f'--config={spec} does not load: {type(e).__name__}: {e}']
  return [
    f'--config.{k}: no key {k!r} in {spec}' for k in keys if not _config_key_exists(config, k)
  ]


# --- The checks ----------------------------------------------------------------------------------


def check_command(module: str, args: list[str]) -> list[str]:
  """Errors of one documented command line (empty: all fine)."""
  flags = module_flags(module)
  if flags is None:
    return [f'no module {module}']
  errors, config_spec, config_keys = [], None, []
  for arg in args:
    arg = arg.lstrip('[')
    match = re.match(r'--([\w][\w.-]*)', arg)
    if not match:
      continue
    name = match.group(1)
    value = arg[match.end() + 1 :].rstrip(']') if arg[match.end() : match.end() + 1] == '=' else ''
    if name.startswith('config.') and 'config' in flags:
      config_keys.append(name[len('config.') :])
    elif name not in flags:
      errors.append(f'{module} has no flag --{name} (it has: {", ".join(sorted(flags))})')
    elif name == 'config':
      config_spec = value
  if config_spec:
    errors += check_config(config_spec, config_keys)
  return errors


def check_links(path: pathlib.Path, text: str) -> list[str]:
  """Errors of the relative links and pictures of one markdown file."""
  errors = []
  body = re.sub(r'```.*?```', lambda m: '\n' * m.group(0).count('\n'), text, flags=re.S)
  body = re.sub(r'`[^`\n]*`', '``', body)
  for match in re.finditer(r'!?\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)', body):
    target = match.group(1)
    line = body.count('\n', 0, match.start()) + 1
    if re.match(r'[a-z][a-z0-9+.-]*:', target):  # http:, https:, mailto:
      continue
    file, _, anchor = target.partition('#')
    resolved = (path.parent / file).resolve()
    if file and not resolved.exists():
      errors.append(f'{path.name}:{line}: link {target} does not resolve (no {resolved})')
    elif anchor and (not file or resolved.suffix == '.md'):
      anchors = _anchors(resolved.read_text() if file else text)
      if anchor not in anchors:
        name = resolved.name if file else path.name
        errors.append(f'{path.name}:{line}: link {target}: no heading #{anchor} in {name}')
  return errors


def check_doc(path: pathlib.Path, text: str) -> list[str]:
  """Every error of one markdown file, each as 'FILE:LINE: what is wrong'."""
  errors = check_links(path, text)
  for line, snippet in code_snippets(text):
    for module, args in find_commands(snippet):
      errors += [f'{path.name}:{line}: {e}' for e in check_command(module, args)]
  return errors


def test_docs_commands_configs_and_links_hold():
  errors, commands = [], 0
  for path in DOC_FILES:
    text = path.read_text()
    commands += sum(len(list(find_commands(s))) for _, s in code_snippets(text))
    errors += check_doc(path, text)
  assert commands >= 20, f'only {commands} documented commands found: is the parser broken?'
  assert not errors, '\n'.join(errors)


def test_config_docstring_commands_hold():
  errors = []
  for path in sorted((REPO_ROOT / 'configs').glob('*.py')):
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False) or ''
    # The docstring starts on line 1; a fence line before it keeps the numbering.
    for line, snippet in code_snippets('```\n' + doc + '\n```'):
      for module, args in find_commands(snippet):
        errors += [f'configs/{path.name}:{line - 1}: {e}' for e in check_command(module, args)]
  assert not errors, '\n'.join(errors)


def test_readme_keeps_the_ci_command_and_stays_short():
  readme = (REPO_ROOT / 'README.md').read_text()
  ci = (REPO_ROOT / '.ci' / 'run').read_text().strip().split('\n')[-1]
  assert ci in readme, f'README.md lacks the CI command of .ci/run: {ci}'
  assert len(readme.split('\n')) <= 201, 'README.md is over 200 lines; move detail to docs/'


def test_parser_reads_continuations_placeholders_and_quoted_commands():
  doc = '\n'.join(
    [
      '```bash',
      'mkdir -p out && .venv/bin/python -m mixer_vit.pick_augreg --index=INDEX.csv \\',
      '    --model=B/16 [--top=10] [--json] > out/list.txt',
      'ssh host --command="cd x && python -m mixer_vit.pick_augreg --index=i.csv --model=B/16"',
      '```',
      'Inline: `python -m mixer_vit.pick_augreg --index=I',
      '--model=M`.',
    ]
  )
  found = [(line, list(find_commands(s))) for line, s in code_snippets(doc)]
  found = [(line, c) for line, c in found if c]
  assert found == [
    (
      2,
      [('mixer_vit.pick_augreg', ['--index=INDEX.csv', '--model=B/16', '[--top=10]', '[--json]'])],
    ),
    (4, [('mixer_vit.pick_augreg', ['--index=i.csv', '--model=B/16'])]),
    (6, [('mixer_vit.pick_augreg', ['--index=I', '--model=M'])]),
  ]


def test_a_wrong_flag_key_module_or_link_is_reported_with_file_and_line(tmp_path):
  doc = '\n'.join(
    [
      'See [the models](models.md) and ![a picture](missing.png).',
      '```bash',
      'python -m mixer_vit.pick_augreg --index=index.csv --model=B/16 --best_first',
      'python -m mixer_vit.no_such_command --x=1',
      'python -m mixer_vit.main --config=configs/digits.py:vit --config.no_such_key=3 \\',
      '    --config.model.hidden_size=32 --workdir=WORKDIR',
      '```',
      '[ok](#usage) [bad anchor](#nowhere)',
      '',
      '# Usage',
    ]
  )
  (tmp_path / 'models.md').write_text('# Models\n')
  errors = check_doc(tmp_path / 'page.md', doc)
  assert len(errors) == 5, errors
  assert errors[0].startswith('page.md:1: link missing.png does not resolve')
  assert errors[1] == 'page.md:8: link #nowhere: no heading #nowhere in page.md'
  assert errors[2].startswith('page.md:3: mixer_vit.pick_augreg has no flag --best_first (')
  assert errors[3] == 'page.md:4: no module mixer_vit.no_such_command'
  assert errors[4] == (
    "page.md:5: --config.no_such_key: no key 'no_such_key' in configs/digits.py:vit"
  )


def test_config_specs_load_and_bad_arguments_are_caught():
  assert check_config('configs/pretrain.py:MODEL,DATASET', ['mesh.fsdp', 'model.remat']) == []
  assert check_config('configs/FILE.py[:ARG]', ['anything']) == []
  assert check_config('configs/nowhere.py', []) == [
    '--config=configs/nowhere.py: no file configs/nowhere.py'
  ]
  (error,) = check_config('configs/digits.py:transformer', [])
  assert error.startswith('--config=configs/digits.py:transformer does not load: ValueError')
