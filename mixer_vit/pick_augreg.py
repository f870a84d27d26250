"""Picks a released AugReg checkpoint from the release's index.csv (read locally, no network).

  python -m mixer_vit.pick_augreg --index=index.csv --model=B/16 [--dataset=imagenet2012] \
      [--resolution=384] [--pretrain=i21k] [--top=10] [--json]

Download the index first: `gsutil cp gs://vit_models/augreg/index.csv .` (or
https://storage.googleapis.com/vit_models/augreg/index.csv). Each row of the index is one
fine-tuned file (`adapt_filename`) with the pretraining file it came from (`filename`) and their
published accuracies. The command lists the files of `--model` fine-tuned on `--dataset` (at
`--resolution`, from `--pretrain`), best first by the fine-tuning validation accuracy
(`adapt_final_val`: for imagenet2012 a minival split held out from the training set, so the
choice does not look at the test figures; `adapt_final_test` is the ImageNet validation set, the
published accuracy), and prints the best one with its gs:// path and download commands. As the
AugReg paper (section 4.5) recommends for fine-tuning on your own data, it also names the
pretraining file with the best upstream validation accuracy (`final_val`) among the ImageNet-21k,
300-epoch runs. Models: `B/16`, `B_16` or `ViT-B_16` (any spelling of `models.augreg.MODELS`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import csv
import dataclasses
import json
import math
import os
import sys
from typing import Any

from mixer_vit.models import augreg

# The columns of the released index.csv this command reads.
COLUMNS = ('ds', 'filename', 'adapt_filename', 'final_val', 'adapt_final_val', 'adapt_final_test')
INDEX_URL = f'{augreg.URL}/index.csv'


@dataclasses.dataclass(frozen=True)
class Entry:
  """One row of the index: a fine-tuned file and the accuracies published for it."""

  info: augreg.AugRegName  # Of `adapt_filename`.
  ds: str  # Pretraining data set as the index writes it: 'i1k', 'i21k', 'i21k_30'.
  final_val: float | None  # Upstream (pretraining) validation accuracy.
  val: float | None  # adapt_final_val: validation accuracy after fine-tuning.
  test: float | None  # adapt_final_test: test accuracy after fine-tuning.
  line: int  # Line in the CSV file.


def _number(value: str | None, path: str, line: int, column: str) -> float | None:
  if value is None or value.strip().lower() in ('', 'nan'):
    return None
  try:
    number = float(value)
  except ValueError:
    raise ValueError(f'{path} line {line}: column {column} is {value!r}, not a number.') from None
  return None if math.isnan(number) else number


def read_index(path: str) -> tuple[list[Entry], list[str]]:
  """The index's rows, and a message for each row whose file name does not parse (skipped)."""
  if os.path.isdir(path):
    raise ValueError(f'--index={path} is a folder; pass the index.csv file ({INDEX_URL})')
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f'index {path} not found. Download the released one: gsutil cp '
      f'{augreg.BUCKET}/index.csv . (or {INDEX_URL})'
    )
  try:
    with open(path, encoding='utf-8', newline='') as f:
      return _read_rows(path, f)
  except (UnicodeDecodeError, csv.Error) as e:
    raise ValueError(
      f'--index={path} is not a CSV text file ({type(e).__name__}); pass the released index.csv '
      f'({INDEX_URL})'
    ) from None


def _read_rows(path: str, f: Any) -> tuple[list[Entry], list[str]]:
  """The rows of an open index file (see ``read_index``)."""
  reader = csv.DictReader(f)
  header = reader.fieldnames or []
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise ValueError(
      f'{path} lacks the column(s) {", ".join(missing)} of the released AugReg index.csv '
      f'(it has: {", ".join(header) or "no header"}); pass the file from {INDEX_URL}.'
    )
  entries, skipped = [], []
  for row in reader:
    line = reader.line_num
    try:
      info = augreg.parse(row['adapt_filename'] or '')
    except ValueError as e:
      skipped.append(f'{path} line {line}: {e}')
      continue
    entries.append(
      Entry(
        info=info,
        ds=row['ds'],
        final_val=_number(row['final_val'], path, line, 'final_val'),
        val=_number(row['adapt_final_val'], path, line, 'adapt_final_val'),
        test=_number(row['adapt_final_test'], path, line, 'adapt_final_test'),
        line=line,
      )
    )
  return entries, skipped


def _ranked(entries: list[Entry], score) -> list[Entry]:
  # Best first; rows without a figure last; the file name breaks ties (a stable choice).
  return sorted(entries, key=lambda e: (score(e) is None, -(score(e) or 0.0), e.info.filename))


def select(
  entries: list[Entry],
  model: str,
  dataset: str = 'imagenet2012',
  resolution: int | None = None,
  pretrain: str | None = None,
) -> list[Entry]:
  """The fine-tuned files of `model` matching the filters, best validation accuracy first."""
  prefix = augreg.model_prefix(model)
  found = [
    e
    for e in entries
    if e.info.prefix == prefix
    and e.info.target_dataset == dataset
    and (resolution is None or e.info.resolution == resolution)
    and (pretrain is None or e.ds == pretrain)
  ]
  if not found:
    of_model = [e for e in entries if e.info.prefix == prefix]
    raise ValueError(
      f'No file of {augreg.MODELS[prefix][1]} ({prefix}) fine-tuned on {dataset}'
      + (f' at resolution {resolution}' if resolution else '')
      + (f' from {pretrain}' if pretrain else '')
      + ' in the index. It has for this model: data sets '
      + (', '.join(sorted({e.info.target_dataset for e in of_model})) or 'none')
      + '; resolutions '
      + (', '.join(str(r) for r in sorted({e.info.resolution for e in of_model})) or 'none')
      + '; pretraining '
      + (', '.join(sorted({e.ds for e in of_model})) or 'none')
      + '.'
    )
  return _ranked(found, lambda e: e.val)


def best_pretrained(entries: list[Entry], model: str) -> Entry | None:
  """The row whose pretraining file has the best upstream validation among i21k 300-epoch runs."""
  prefix = augreg.model_prefix(model)
  found = [e for e in entries if e.info.prefix == prefix and e.ds == 'i21k']
  ranked = _ranked(found, lambda e: e.final_val)
  return ranked[0] if ranked and ranked[0].final_val is not None else None


def describe(entry: Entry) -> dict[str, Any]:
  """A JSON-ready summary of a fine-tuned file."""
  i = entry.info
  return {
    'file': i.filename,
    'model': i.model,
    'name': i.paper_name,
    'pretrain': entry.ds,
    'aug': i.aug,
    'wd': i.wd,
    'dropout': i.dropout,
    'stochastic_depth': i.stochastic_depth,
    'dataset': i.target_dataset,
    'resolution': i.resolution,
    'lr': i.target_lr,
    'steps_k': i.target_steps_k,
    'val': entry.val,
    'test': entry.test,
    'path': i.gs_path,
    'url': i.url,
    'line': entry.line,
  }


def _download(info: augreg.AugRegName) -> dict[str, str]:
  return {
    'path': info.gs_path,
    'url': info.url,
    'gsutil': f'gsutil cp {info.gs_path} .',
    'curl': f'curl -O {info.url}',
  }


def report(
  index: str,
  model: str,
  dataset: str = 'imagenet2012',
  resolution: int | None = None,
  pretrain: str | None = None,
  top: int = 10,
) -> dict[str, Any]:
  """What the command prints, as a dict (the `--json` output)."""
  entries, skipped = read_index(index)
  ranked = select(entries, model, dataset, resolution, pretrain)
  best = ranked[0]
  out: dict[str, Any] = {
    'index': index,
    'model': best.info.paper_name,
    'registry_name': best.info.model,
    'dataset': dataset,
    'resolution': resolution,
    'pretrain': pretrain,
    'ranked_by': 'adapt_final_val',
    'matches': len(ranked),
    'files': [describe(e) for e in (ranked[:top] if top > 0 else ranked)],
    'recommended': {**describe(best), **_download(best.info)},
    'skipped_rows': len(skipped),
    'skipped_first': skipped[0] if skipped else None,
  }
  upstream = best_pretrained(entries, model)
  if upstream is not None:
    pre = augreg.parse(upstream.info.upstream)
    out['recommended_pretrained'] = {
      'file': pre.filename,
      'final_val': upstream.final_val,
      **_download(pre),
    }
  return out


def _figure(value: float | None) -> str:
  return '-' if value is None else f'{value:.4f}'


def format_report(r: dict[str, Any]) -> str:
  where = f' at {r["resolution"]}' if r['resolution'] else ''
  source = f' from {r["pretrain"]}' if r['pretrain'] else ''
  lines = [
    f'{r["matches"]} file(s) of {r["model"]} ({r["registry_name"]}) fine-tuned on '
    f'{r["dataset"]}{where}{source} in {r["index"]}, best validation accuracy first '
    f'(adapt_final_val; test = adapt_final_test):',
    f'  {"val":>6}  {"test":>6}  {"pretrain":<8}  {"aug":<7}  {"wd":>4}  {"do":>3}  {"sd":>3}  '
    f'{"lr":>5}  {"res":>3}  file',
  ]
  for f in r['files']:
    lines.append(
      f'  {_figure(f["val"]):>6}  {_figure(f["test"]):>6}  {f["pretrain"]:<8}  {f["aug"]:<7}  '
      f'{f["wd"]:>4g}  {f["dropout"]:>3g}  {f["stochastic_depth"]:>3g}  {f["lr"]:>5g}  '
      f'{f["resolution"]:>3}  {f["file"]}'
    )
  if len(r['files']) < r['matches']:
    lines.append(f'  ... {r["matches"] - len(r["files"])} more (--top=0 lists all)')
  best = r['recommended']
  lines += [
    '',
    f'Recommended: {best["file"]}',
    f'  validation {_figure(best["val"])}, test {_figure(best["test"])}',
    f'  path:     {best["path"]}',
    f'  download: {best["gsutil"]}',
    f'        or: {best["curl"]}',
    f'  use:      python -m mixer_vit.infer --model={best["file"]} '
    f'--checkpoint={best["file"]}.npz IMAGE',
  ]
  pre = r.get('recommended_pretrained')
  if pre:
    lines += [
      '',
      'To fine-tune on your own data, the pretraining file with the best upstream validation '
      f'(i21k, final_val {_figure(pre["final_val"])}):',
      f'  {pre["file"]}',
      f'  download: {pre["gsutil"]}',
      f'        or: {pre["curl"]}',
    ]
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog='python -m mixer_vit.pick_augreg',
    description=__doc__.split('\n\n')[0].strip(),
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument('--index', required=True, help=f'the release index.csv ({INDEX_URL})')
  parser.add_argument('--model', required=True, help='e.g. B/16, R26+S/32, B_16 or ViT-B_16')
  parser.add_argument('--dataset', default='imagenet2012', help='fine-tuning data set (tfds)')
  parser.add_argument('--resolution', type=int, help='fine-tuning resolution (224 or 384)')
  parser.add_argument('--pretrain', help='pretraining data set as in the index: i1k, i21k, i21k_30')
  parser.add_argument('--top', type=int, default=10, help='files listed (0: all)')
  parser.add_argument('--json', action='store_true', help='one JSON object')
  args = parser.parse_args(argv)
  try:
    r = report(args.index, args.model, args.dataset, args.resolution, args.pretrain, args.top)
  except (ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if r['skipped_rows']:
    print(
      f'warning: skipped {r["skipped_rows"]} row(s) whose adapt_filename is no AugReg file name; '
      f'first: {r["skipped_first"]}',
      file=sys.stderr,
    )
  print(json.dumps(r, indent=1) if args.json else format_report(r))
  return 0


if __name__ == '__main__':
  sys.exit(main())
