"""``python -m evaluation.report RESULT.json [...] [--out TABLE]``: evaluation results as the papers' table.

One row per result JSON of ``python -m evaluation.evaluate --out``: model, steps (per stage), NFE
(``50×2`` where CFG runs an unconditional pass), CFG scale (and its interval), the label mode
(balanced / random), the number of samples, then one column per value of every metric that any of
the results computed (titles, scales and digits from the metric registry, ``evaluation.scores``;
empty where a row did not compute it). The Markdown lists each row's provenance under the table
(checkpoint and sha256 prefix, training step, EMA / raw / post-hoc EMA, sampler, seed,
labels, samples, processes, code version, reference and samples sha256 prefixes), taken from the
generate.py record the result carries (``sample_record``; a result without one says so).

Without ``--out`` the Markdown is printed; ``--out TABLE`` writes ``TABLE.md`` and ``TABLE.csv``
(both or neither; a ``.md``/``.csv`` suffix on TABLE is dropped). The CSV has the same rows, the values
of every registered metric unrounded (empty where not computed) and the provenance in columns with
full hashes. A missing file or a JSON that
is not a result is one line (``error: ...``, exit status 2); nothing is written then.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from utils.atomic import atomic_write, reported_write_errors

from .metric_base import Column
from .scores import metric_classes

RESULT_KEYS = ("num_samples", "ref", "samples")
ROW_COLUMNS = ("model", "steps", "NFE", "CFG", "labels", "N")
PROVENANCE_COLUMNS = ("checkpoint", "checkpoint_sha256", "step", "weights", "sampler", "seed", "labels",
                      "num_samples", "num_processes", "code_version", "ref", "ref_sha256", "samples", "samples_sha256")
_WEIGHTS = {"ema": "EMA", "model": "raw", "state_dict": "state dict", None: "plain state dict"}


class ReportError(ValueError):
    """A result file that cannot be read or is not a result; or an output that cannot be written."""


def read_result(path: str) -> dict:
    """A result JSON of ``evaluation.evaluate``; ReportError (one line) otherwise."""
    not_result = f"{path}: not a result of python -m evaluation.evaluate --out"
    from utils.records import RecordError, read_record

    if not os.path.isfile(path):
        raise ReportError(f"{path}: no such file")
    try:  # bounded in size and nesting, a regular file (a result the user names may be a link)
        result = read_record(path, "evaluation result", follow_links=True)
    except RecordError as exc:
        raise ReportError(f"{not_result} ({str(exc).replace(f'evaluation result {path}: ', '')})") from None
    if not isinstance(result, dict):
        raise ReportError(f"{not_result} (a JSON {type(result).__name__}, not an object)")
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise ReportError(f"{not_result} (no {', '.join(missing)})")
    odd = [key for key in metric_keys() if result.get(key) is not None
           and (isinstance(result[key], bool) or not isinstance(result[key], (int, float)))]
    if odd:
        raise ReportError(f"{not_result} ({', '.join(odd)} not a number)")
    if not isinstance(result.get("sample_record"), (dict, type(None))):
        raise ReportError(f"{not_result} (its sample_record is a {type(result['sample_record']).__name__})")
    return result


def metric_columns() -> List[Column]:
    """Every registered metric's columns, in registry order."""
    return [column for cls in metric_classes() for column in cls.columns]


def metric_keys() -> List[str]:
    """Every registered metric's result keys (CSV columns), in registry order."""
    return list(dict.fromkeys(key for cls in metric_classes() for key in cls.result_keys()))


def csv_columns() -> Tuple[str, ...]:
    return ("result", "model", "steps", "nfe", "cfg") + tuple(metric_keys()) + PROVENANCE_COLUMNS


def _get(d, *keys):
    for key in keys:
        d = d.get(key) if isinstance(d, dict) else None
    return d


def _num(x) -> str:
    return "" if x is None else f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _md(text) -> str:
    """Text for a Markdown table cell or list item: a `|` would end the cell, a newline the row, a
    backtick open a code span; they come from records anyone can edit."""
    return (str(text).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")
            .replace("\r", " ").replace("\n", " "))


def _in_code(text) -> str:
    """Text inside a Markdown code span (where backslashes are literal): no backtick, no line break."""
    return str(text).replace("`", "'").replace("\r", " ").replace("\n", " ")


def _csv_cell(value):
    """A CSV value; text that a spreadsheet would run as a formula (=, +, -, @, tab, CR first) is
    defused with a leading apostrophe (numbers stay numbers)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _dict(value) -> dict:
    """A record field that should hold a mapping; anything else (a string where a mapping belongs) is empty."""
    return value if isinstance(value, dict) else {}


def _short(digest) -> str:
    return digest[:12] if isinstance(digest, str) else "?"


def _nfe(sampler: dict) -> str:
    nfe, with_cfg = sampler.get("nfe"), sampler.get("nfe_with_cfg")
    if not isinstance(nfe, int) or isinstance(nfe, bool):
        return _num(nfe)
    return f"{nfe}×2" if with_cfg == 2 * nfe and with_cfg != nfe else str(nfe)


def _cfg(sampler: dict) -> str:
    scale = sampler.get("cfg_scale")
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return _num(scale)
    text = _num(scale)
    low, high = sampler.get("guidance_low", 0.0), sampler.get("guidance_high", 1.0)
    if scale != 1.0 and (low, high) != (0.0, 1.0):
        text += f" [{_num(low)}, {_num(high)}]"
    if scale != 1.0 and sampler.get("unconditional_inference_budget") is not None:
        what = "autoguidance" if sampler.get("autoguidance") else "uncond."
        text += f" ({what} budget {_num(sampler['unconditional_inference_budget'])})"
    return text


def _weights(checkpoint: dict) -> str:
    """EMA / raw / post-hoc EMA std s: weights_info describes a file's ``ema`` group (training.posthoc_ema)."""
    group, info = checkpoint.get("weights"), _dict(checkpoint.get("weights_info"))
    if group == "ema" and info.get("kind") == "posthoc_ema" and "std" in info:
        return f"post-hoc EMA std {_num(info['std'])}"
    label = _WEIGHTS.get(group, str(group))
    return label + (f" ({info['kind']})" if group == "ema" and info.get("kind") else "")


def _sampler(sampler: dict) -> str:
    parts = [str(sampler.get("method_text", sampler.get("method", "?")))]
    if sampler.get("thresholds"):
        parts.append(f"thresholds {sampler['thresholds']}")
    if sampler.get("inference_budget") is not None:
        parts.append(f"budget {_num(sampler['inference_budget'])}")
    parts += [f"path {sampler.get('path_type')}", str(sampler.get("precision")), f"VAE {sampler.get('vae')}"]
    return ", ".join(parts)


def _code(version) -> str:
    if not isinstance(version, str):
        return "unknown"
    commit, dirty = (version[:-len("-dirty")], "-dirty") if version.endswith("-dirty") else (version, "")
    return commit[:12] + dirty


def table_row(path: str, result: dict) -> Dict[str, object]:
    """The :func:`csv_columns` of one result (metrics as numbers, None where not computed; the rest text)."""
    record = _dict(result.get("sample_record"))
    sampler, checkpoint = _dict(record.get("sampler")), _dict(record.get("checkpoint"))
    model = _get(checkpoint, "arch", "name") or _get(record, "config", "model")
    steps = sampler.get("num_steps_per_scale")
    row: Dict[str, object] = {
        "result": path,
        "model": model or (f"{os.path.basename(str(result['samples']))} (no record)" if not record else ""),
        "steps": "+".join(str(n) for n in steps) if isinstance(steps, list) else _num(steps),
        "nfe": _nfe(sampler), "cfg": _cfg(sampler),
        **{key: result.get(key) for key in metric_keys()},
        "checkpoint": checkpoint.get("path", ""), "checkpoint_sha256": checkpoint.get("sha256", ""),
        "step": checkpoint.get("step"), "weights": _weights(checkpoint) if checkpoint else "",
        "sampler": _sampler(sampler) if sampler else "",
        "seed": record.get("seed"), "labels": record.get("labels", ""), "num_samples": result["num_samples"],
        "num_processes": record.get("num_processes"),
        "code_version": record.get("code_version") or "",
        "ref": result["ref"], "ref_sha256": _get(result, "inputs", "ref", "sha256") or "",
        "samples": result["samples"], "samples_sha256": _get(result, "inputs", "samples", "sha256") or "",
    }
    return row


def _provenance(number: int, row: Dict[str, object], has_record: bool) -> str:
    def file(key):
        sha = row[f"{key}_sha256"]
        return f"`{_in_code(os.path.basename(str(row[key])))}`" + (f" (sha256 `{_in_code(_short(sha))}`)" if sha else "")

    where = f"reference {file('ref')}, samples {file('samples')}"
    result = _in_code(row["result"])
    if not has_record:
        return f"{number}. `{result}`: no generate.py record (a foreign .npz or one from before records); {where}"
    step = "step ?" if row["step"] is None else f"step {_md(row['step'])}"
    return (f"{number}. `{result}`: checkpoint `{_in_code(row['checkpoint'])}` (sha256 "
            f"`{_in_code(_short(row['checkpoint_sha256']))}`), {step}, {_md(row['weights'])}; sampler "
            f"{_md(row['sampler'])}; seed {_md(row['seed'])}, labels {_md(row['labels'])}, {_md(row['num_samples'])} "
            f"samples, {_md(row['num_processes'])} process(es); code {_in_code(_code(row['code_version']))}; {where}")


def markdown(rows: Sequence[Dict[str, object]], records: Sequence[bool],
             results: Optional[Sequence[dict]] = None) -> str:
    """The table, then each row's provenance as a numbered list (row i is item i). Metric columns: those
    of the metrics any of ``results`` (default: the rows) holds a value or a null for."""
    results = rows if results is None else results
    columns = [c for cls in metric_classes() if any(k in r for r in results for k in cls.result_keys())
               for c in cls.columns]
    titles = ROW_COLUMNS + tuple(c.title for c in columns)
    lines = ["| # | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for i, (row, result) in enumerate(zip(rows, results), 1):
        cells = [str(i), row["model"], row["steps"], row["nfe"], row["cfg"], row["labels"] or "",
                 _num(row["num_samples"])] + [c.cell(result) for c in columns]
        cells = [_md(cell) for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Provenance:", ""]
    lines += [_provenance(i, row, has) for i, (row, has) in enumerate(zip(rows, records), 1)]
    return "\n".join(lines) + "\n"


def csv_text(rows: Sequence[Dict[str, object]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    columns = csv_columns()
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if row[c] is None else _csv_cell(row[c]) for c in columns])
    return out.getvalue()


def report(paths: Sequence[str]) -> Tuple[str, str]:
    """``(markdown, csv)`` of the results at ``paths``; ReportError for a file that is not a result."""
    results: List[Tuple[str, dict]] = [(path, read_result(path)) for path in paths]
    rows = [table_row(path, result) for path, result in results]
    records = [bool(result.get("sample_record")) for _, result in results]
    return markdown(rows, records, [result for _, result in results]), csv_text(rows)


def output_paths(out: str) -> Tuple[str, str]:
    base = out[:-len(".md")] if out.endswith(".md") else out[:-len(".csv")] if out.endswith(".csv") else out
    return f"{base}.md", f"{base}.csv"


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evaluation.report",
                                     description="The papers' table (model, steps, NFE, CFG, labels, samples, "
                                                 "and the metrics computed) of evaluation.evaluate results, with "
                                                 "each row's provenance.")
    parser.add_argument("results", nargs="+", metavar="RESULT.json", help="--out files of python -m evaluation.evaluate")
    parser.add_argument("--out", default=None, metavar="TABLE.md",
                        help="the file to write: the Markdown table, and the CSV beside it (TABLE.csv); both or "
                             "neither (default: print the Markdown)")
    args = parser.parse_args(argv)
    try:
        md, table = report(args.results)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out is None:
        print(md, end="")
        return 0
    md_path, csv_path = output_paths(args.out)
    try:
        with reported_write_errors(f"{md_path} / {csv_path}", ReportError), \
                atomic_write(md_path, "w") as f_md, atomic_write(csv_path, "w") as f_csv:
            f_md.write(md)
            f_csv.write(table)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {md_path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
