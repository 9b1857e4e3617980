"""Reading the results table and aggregating it for the report (no plotting, no HTML).

A *configuration* is what one line or bar of the report stands for: ``(series, budget)``, where the series is
the method name, plus any setting that takes several values at the same method and budget (e.g.
``snapkv[window=64]``), so that two variants of one method never get averaged together.

Accuracy aggregates are macro averages: the mean score of each task first, then the mean over tasks, so a task
with many samples does not outweigh the others. ``ppl`` rows (whose score is a perplexity, not a metric in
[0, 1]) never enter an accuracy average.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

from attnkit.eval.store import read_only

FAMILIES = ("retrieval", "multihop", "aggregation", "qa", "passkey", "niah")  # accuracy families, report order
MiB = 2**20

Row = dict[str, Any]
Config = tuple[str, str]  # (series, budget)

_COLUMNS = ("model method settings_json budget budget_tokens task family length depth score kv_bytes_peak prefill_s "
            "decode_s_per_token peak_mem_bytes device dtype attnkit_version git_commit created_at").split()


def load_rows(db_path: str | Path) -> list[Row]:
    """All rows of the results table (``extra_json`` parsed for ppl rows only); [] when the table is absent. A
    ``.gz`` / ``.xz`` database is read as it is (:func:`~attnkit.eval.store.read_only`)."""
    con = read_only(db_path)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='results'").fetchone():
            return []
        cols = ", ".join(_COLUMNS)
        cur = con.execute(f"SELECT {cols}, CASE WHEN family = 'ppl' THEN extra_json END FROM results ORDER BY id")
        rows = []
        for values in cur:
            row = dict(zip(_COLUMNS, values[:-1]))
            try:
                row["extra"] = json.loads(values[-1]) if values[-1] else {}
            except ValueError:
                row["extra"] = {}
            rows.append(row)
    finally:
        con.close()
    _label_series(rows)
    return rows


def _label_series(rows: list[Row]) -> None:
    """Set ``row["series"]`` and ``row["config"]``: settings that vary within one (method, budget) go in the name."""
    settings: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        try:
            r["settings"] = json.loads(r["settings_json"] or "{}")
        except ValueError:
            r["settings"] = {}
        settings[(r["method"], r["budget"])].append(r["settings"])
    varying: dict[str, set[str]] = defaultdict(set)
    for (method, _), dicts in settings.items():
        for key in {k for d in dicts for k in d}:
            if len({json.dumps(d.get(key), sort_keys=True) for d in dicts}) > 1:
                varying[method].add(key)
    for r in rows:
        keys = sorted(varying.get(r["method"], ()))
        extra = ",".join(f"{k}={r['settings'].get(k)}" for k in keys)
        r["series"] = f"{r['method']}[{extra}]" if extra else r["method"]
        r["config"] = (r["series"], r["budget"])


# -- small helpers ----------------------------------------------------------------------------------------------
def mean(values: Iterable[float | None]) -> float | None:
    xs = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(xs) / len(xs) if xs else None


def group(rows: Iterable[Row], key: Callable[[Row], Any]) -> dict[Any, list[Row]]:
    out: dict[Any, list[Row]] = defaultdict(list)
    for r in rows:
        out[key(r)].append(r)
    return dict(out)


def uniq(rows: Iterable[Row], col: str) -> list:
    """Distinct non-empty values of a column, sorted."""
    return sorted({r[col] for r in rows if r[col] not in (None, "")}, key=lambda v: (str(type(v)), v))


def budget_number(budget: str) -> float | None:
    """"256" -> 256.0, "0.25" -> 0.25, "25%" -> 0.25; None for "" or anything else."""
    text = str(budget or "").strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        return None


def is_fraction(budget: str) -> bool:
    """A budget given as a share of the context ("0.25", "25%", "1.0"), not as tokens ("256")."""
    num = budget_number(budget)
    return num is not None and 0 < num <= 1 and ("." in budget or budget.strip().endswith("%"))


def is_full(config: Config) -> bool:
    return config[1] == ""


def config_order(config: Config) -> tuple:
    """full first, then by series name, then by budget (numerically)."""
    series, budget = config
    num = budget_number(budget)
    return (0 if series == "full" else 1, not is_full(config), series, num if num is not None else math.inf, budget)


def configs(rows: Iterable[Row]) -> list[Config]:
    return sorted({r["config"] for r in rows}, key=config_order)


def config_label(config: Config) -> str:
    series, budget = config
    return series if budget == "" else f"{series} @ {budget}"


def accuracy_rows(rows: Iterable[Row]) -> list[Row]:
    return [r for r in rows if r["family"] != "ppl"]


def macro_score(rows: list[Row]) -> float | None:
    """Mean over tasks of the per-task mean score (None without rows)."""
    per_task = [mean(r["score"] for r in rs) for rs in group(rows, lambda r: r["task"]).values()]
    return mean(per_task)


def macro_se(rows: list[Row]) -> float | None:
    """Standard error of ``macro_score``: sqrt(sum over tasks of var/n) / number of tasks."""
    terms = []
    for rs in group(rows, lambda r: r["task"]).values():
        xs = [float(r["score"]) for r in rs if r["score"] is not None]
        if xs:
            m = sum(xs) / len(xs)
            var = sum((x - m) ** 2 for x in xs) / (len(xs) - 1) if len(xs) > 1 else 0.0
            terms.append(var / len(xs))
    return math.sqrt(sum(terms)) / len(terms) if terms else None


def budget_axis(rows: list[Row]) -> tuple[str, Callable[[list[Row]], float | None]]:
    """(axis label, function giving the x of a configuration's rows) for accuracy-vs-budget plots.

    Token budgets ("256") plot at their resolved size in tokens; when every budget is a fraction of the context
    ("0.25") the axis is that fraction; a mix of the two is plotted as the resolved fraction of the context.
    """
    budgets = {r["budget"] for r in rows if r["budget"] != ""}
    if budgets and all(is_fraction(b) for b in budgets):
        return "KV budget (fraction of context)", lambda rs: budget_number(rs[0]["budget"])
    if budgets and not any(is_fraction(b) for b in budgets):
        return "KV budget (tokens)", lambda rs: mean(r["budget_tokens"] for r in rs)
    return "KV budget (fraction of context)", lambda rs: mean(
        r["budget_tokens"] / r["length"] for r in rs if r["budget_tokens"] and r["length"])


def curve(rows: list[Row]):
    """(x label, {series: [(x, score, standard error, budget)...] sorted by x},
    {config: (score, standard error)} of the configurations without a budget)."""
    label, x_of = budget_axis(rows)
    lines: dict[str, list[tuple[float, float, float, str]]] = defaultdict(list)
    flat: dict[Config, tuple[float, float]] = {}
    for config, rs in group(rows, lambda r: r["config"]).items():
        y, se = macro_score(rs), macro_se(rs) or 0.0
        if y is None:
            continue
        x = x_of(rs) if not is_full(config) else None
        if x is None or x <= 0:
            flat[config] = (y, se)
        else:
            lines[config[0]].append((x, y, se, config[1]))
    flat = dict(sorted(flat.items(), key=lambda kv: config_order(kv[0])))
    return label, {s: sorted(p) for s, p in sorted(lines.items())}, flat


def nll_mean_curve(rows: list[Row]) -> list[float]:
    """Mean NLL per position across samples (positions present in fewer samples average fewer values)."""
    sums: list[float] = []
    counts: list[int] = []
    for r in rows:
        nll = r["extra"].get("nll") or []
        if len(nll) > len(sums):
            sums += [0.0] * (len(nll) - len(sums))
            counts += [0] * (len(nll) - len(counts))
        for i, v in enumerate(nll):
            if v is not None:
                sums[i] += float(v)
                counts[i] += 1
    return [s / c if c else math.nan for s, c in zip(sums, counts)]


def perplexity(rows: list[Row]) -> float | None:
    """Geometric mean of the per-sample perplexities, i.e. exp(mean over samples of the mean NLL)."""
    logs = [math.log(r["score"]) for r in rows if r["score"] and r["score"] > 0]
    return math.exp(sum(logs) / len(logs)) if logs else None
