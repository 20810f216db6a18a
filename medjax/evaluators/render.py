"""A report dict (see `reporting`) as Markdown, HTML and CSV text for people and spreadsheets."""

from __future__ import annotations

import csv
import html
import io
from typing import Any, List, Mapping, Sequence

HEADLINE = {
    "classification": ("accuracy", "balanced_accuracy", "auc", "sensitivity", "specificity", "f1"),
    "segmentation": ("dice_mean", "dice_case_mean", "iou_mean", "hd95_mean", "assd_mean", "nsd_mean"),
    "regression": ("mae", "rmse", "pearson_r"),
}
MAX_CASE_ROWS = 40


def _fmt(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:.4f}"
  if isinstance(value, list):
    return "[" + ", ".join(_fmt(v) for v in value) + "]"
  return str(value)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> List[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
  return lines


def _ci_text(entry: Mapping[str, Any]) -> str:
  if entry.get("low") is None or entry.get("high") is None:
    return ""
  return f"[{_fmt(entry['low'])}, {_fmt(entry['high'])}]"


def _sections(report: Mapping[str, Any]):
  """(title, header, rows) tables and the text lines before them, shared by Markdown and HTML."""
  boot = report["bootstrap"]
  level = int(round(100 * (1 - boot["alpha"])))
  metric_rows = [(name, entry["value"], _ci_text(entry)) for name, entry in report["metrics"].items()]
  tables = [("Metrics", ("metric", "value", f"{level}% CI"), metric_rows)]
  headline = [m for m in HEADLINE.get(report["task"], ()) if m in report["metrics"]]
  for column, result in report.get("subgroups", {}).items():
    rows = [(group, values["n"], *(values.get(m) for m in headline)) for group, values in result["groups"].items()]
    rows += [(f"{group} (too small, not scored)", n, *([None] * len(headline)))
             for group, n in result.get("skipped", {}).items()]
    tables.append((f"Subgroups by {column}", ("group", "n", *headline), rows))
  cases = report["cases"]
  if cases:
    keys = [k for k in cases[0] if not k.startswith("prob/")]
    shown = cases[:MAX_CASE_ROWS]
    title = "Per-case values" + (f" (first {MAX_CASE_ROWS} of {len(cases)}; all in cases.csv)"
                                 if len(cases) > MAX_CASE_ROWS else "")
    tables.append((title, keys, [[case.get(k) for k in keys] for case in shown]))
  return tables


def _intro(report: Mapping[str, Any]) -> List[str]:
  boot, ckpt = report["bootstrap"], report.get("checkpoint", {})
  lines = []
  evaluator = report.get("config", {}).get("evaluator")
  if isinstance(evaluator, dict):
    evaluator = ", ".join(f"{k}={v}" for k, v in evaluator.items())
  if "workdir" in report:
    lines.append(f"- run: `{report['workdir']}`, split **{report.get('split')}**, {len(report['cases'])} cases")
  if ckpt:
    lines.append(f"- checkpoint: step {ckpt.get('step')} ({ckpt.get('selected')})")
  config = report.get("config", {})
  if config:
    lines.append(f"- model: {config.get('model_name')}; data: {config.get('data', {}).get('name')}; "
                 f"evaluator: {evaluator}; inference: {config.get('inference') or 'whole image'}")
  env = report.get("env")
  if env:
    commit = env.get("git_commit")
    dirty = " (uncommitted changes)" if env.get("git_dirty") else ""
    code = f"commit {commit[:7]}{dirty}" if commit else "no git commit"
    versions = ", ".join(f"{k} {v}" for k, v in (env.get("versions") or {}).items())
    lines.append(f"- trained with: {code}; {versions}; {env.get('device_count')} x {env.get('device_kind')}")
  lines.append(f"- confidence intervals: percentile bootstrap over {boot['num_units']} {boot['unit']}s, "
               f"{boot['num_samples']} resamples, seed {boot['seed']}")
  explained = report.get("explain")
  if explained:
    lines.append(f"- explanations: {explained['method']} ({explained['description']}) of "
                 f"{len(explained['cases'])} cases, {explained['target']}; explain/explain.md")
  convention = report.get("empty_mask_convention")
  if convention:
    lines.append(f"- empty masks: {convention.get('description')}")
  for column, reason in report.get("subgroups_skipped", {}).items():
    lines.append(f"- metadata column `{column}` not used for subgroups: {reason}")
  return lines


def markdown(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
  """The report as Markdown; `plots` are PNG file names relative to the report."""
  lines = [f"# Evaluation report ({report['task']})", ""] + _intro(report) + [""]
  for i, (title, header, rows) in enumerate(_sections(report)):
    lines += [f"## {title}", ""] + _md_table(header, rows) + [""]
    if i == 0 and plots:
      lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
  return "\n".join(lines)


def html_page(report: Mapping[str, Any], plots: Sequence[str] = ()) -> str:
  """The report as one self-contained HTML page (PNG files referenced by relative name)."""
  esc = lambda v: html.escape(_fmt(v))
  parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
           f"<title>Evaluation report ({esc(report['task'])})</title>",
           "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}</style></head><body>",
           f"<h1>Evaluation report ({esc(report['task'])})</h1><ul>"]
  parts += [f"<li>{html.escape(line[2:])}</li>" for line in _intro(report)]
  parts.append("</ul>")
  for i, (title, header, rows) in enumerate(_sections(report)):
    parts.append(f"<h2>{html.escape(title)}</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header)
                 + "</tr>")
    parts += ["<tr>" + "".join(f"<td>{esc(v)}</td>" for v in row) + "</tr>" for row in rows]
    parts.append("</table>")
    if i == 0 and plots:
      parts.append("<h2>Plots</h2>" + "".join(f"<img src='{html.escape(p)}' alt='{html.escape(p)}'><br>"
                                               for p in plots))
  parts.append("</body></html>")
  return "\n".join(parts)


def cases_csv(report: Mapping[str, Any]) -> str:
  """The per-case table as CSV (list values, e.g. multi-label labels, joined by spaces)."""
  cases = report["cases"]
  out = io.StringIO()
  if not cases:
    return ""
  writer = csv.writer(out)
  keys = list(cases[0])
  writer.writerow(keys)
  for case in cases:
    writer.writerow([" ".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v)
                     for v in (case.get(k) for k in keys)])
  return out.getvalue()
