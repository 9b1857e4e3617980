"""`attnkit report`: content of report.html / summary.md on a synthetic results DB, edge cases (empty, partial,
hostile names), and a real render in headless Chromium (skipped where Debian's `chromium` is not installed).

The browser test writes its screenshot to its tmp folder; it refreshes docs/img/report.png only when that file is
missing or ATTNKIT_UPDATE_SCREENSHOT=1 is set, so a test run does not rewrite a tracked file.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import struct
import subprocess
from pathlib import Path

import pytest
from report_fixture import make_db

from attnkit.eval.report import main, write_report
from attnkit.eval.schema import SCHEMA

ROOT = Path(__file__).resolve().parents[1]
DOCS_SHOT = ROOT / "docs" / "img" / "report.png"
DOCS_SHOT_HEIGHT = 4000
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
EXPECTED_PLOTS = ["overall-smollm2-135m", "latency-smollm2-135m", "family-retrieval", "family-multihop", "family-qa",
                  "family-passkey", "family-niah", "niah-smollm2-135m-niah_grid", "niah-smollm2-135m-passkey",
                  "ppl-smollm2-135m"]
FIGURE = re.compile(r'<figure class="plot" data-plot="([^"]+)">(.*?)</figure>', re.S)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("report")
    db = make_db(folder / "results.db")
    html_path, md_path = write_report(db, folder / "out")
    return db, html_path, md_path


def figures(page: str) -> list[tuple[str, str]]:
    return FIGURE.findall(page)


def test_writes_html_and_markdown_with_every_plot(report):
    _, html_path, md_path = report
    assert (html_path.name, md_path.name) == ("report.html", "summary.md")
    page = html_path.read_text(encoding="utf-8")
    figs = figures(page)
    assert [name for name, _ in figs] == EXPECTED_PLOTS
    for name, body in figs:
        assert body.count("<svg") == 1 and "</svg>" in body and "<figcaption>" in body, name
    for anchor in ("overall", "latency", "families", "niah", "ppl", "tables"):
        assert f'id="{anchor}"' in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "element ids must be unique across the inline SVGs"
    assert ">KV budget (tokens)</text>" in page  # plot text stays text: crisp and searchable
    assert 'data-errors' in page and "data-rendered" in page  # the render check is in the page


def test_is_self_contained(report):
    page = report[1].read_text(encoding="utf-8")
    assert not re.search(r'\b(?:src|href)\s*=\s*"(?:https?:)?//', page), "no external resources"
    assert not re.search(r"url\(\s*['\"]?(?:https?:)?//|@import|<link\b|<script\s+src", page)
    assert "family-aggregation" not in page  # absent families get no plot
    assert ">20–40%</text>" in page  # passkey's random depths are binned by fifths


def test_markdown_has_the_tables_and_numbers_match_the_db(report):
    db, _, md_path = report
    md = md_path.read_text(encoding="utf-8")
    assert "[report.html](report.html)" in md
    assert "| method @ budget | KV tokens | n per length | 4k | 8k | all lengths |" in md
    assert "| family | task | n | full | snapkv @ 256 | snapkv @ 512 | snapkv @ 1024 | streaming_llm @ 256 |" in md
    assert ("| model | method @ budget | length | n | prefill s | decode ms/token | KV MiB (peak) "
            "| peak memory MiB |") in md
    assert "| method @ budget | 4k | 8k |" in md  # perplexity
    assert md.count("Plot: [") == len(EXPECTED_PLOTS)

    con = sqlite3.connect(db)
    macro = con.execute("SELECT AVG(t) FROM (SELECT AVG(score) t FROM results WHERE method = 'full' "
                        "AND family != 'ppl' GROUP BY task)").fetchone()[0]
    task = con.execute("SELECT AVG(score), COUNT(*) FROM results WHERE method = 'snapkv' AND budget = '512' "
                       "AND task = 'vt' AND length = 8192").fetchone()
    ms = con.execute("SELECT AVG(decode_s_per_token) * 1000 FROM results WHERE method = 'streaming_llm' "
                     "AND budget = '256' AND length = 4096 AND decode_s_per_token IS NOT NULL").fetchone()[0]
    con.close()
    assert re.search(rf"^\| full \| full \| 160 \| [\d.]+ \| [\d.]+ \| {100 * macro:.1f} \|$", md, re.M)
    vt_8k = md.split("score per task, 8k context**")[1]
    assert re.search(rf"^\| multihop \| vt \| {task[1]} \| [\d.]+ \| [\d.]+ \| {100 * task[0]:.1f} \|", vt_8k, re.M)
    assert re.search(rf"^\| smollm2-135m \| streaming_llm @ 256 \| 4k \| \d+ \| [\d.]+ \| {ms:.2f} \|", md, re.M)


def _db(path: Path, sql: str = "") -> Path:
    make_db(path)
    if sql:
        con = sqlite3.connect(path)
        with con:
            con.executescript(sql)
        con.close()
    return path


def test_empty_database_and_missing_table(tmp_path):
    empty = tmp_path / "empty.db"
    con = sqlite3.connect(empty)
    con.executescript(SCHEMA)
    con.close()
    no_table = tmp_path / "no_table.db"
    sqlite3.connect(no_table).close()
    for db in (empty, no_table):
        html_path, md_path = write_report(db, tmp_path / db.stem)
        page = html_path.read_text(encoding="utf-8")
        assert figures(page) == []
        assert "no results yet" in page and page.count('class="empty"') >= 6
        assert "no results yet" in md_path.read_text(encoding="utf-8")
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "missing.db", tmp_path / "x")
    assert main([str(tmp_path / "missing.db"), "-o", str(tmp_path / "x")]) == 2


def test_partial_databases(tmp_path):
    only_ppl = _db(tmp_path / "ppl.db", "DELETE FROM results WHERE family != 'ppl';")
    page = write_report(only_ppl, tmp_path / "ppl")[0].read_text(encoding="utf-8")
    assert [n for n, _ in figures(page)] == ["ppl-smollm2-135m"]
    assert "No accuracy rows" in page and "No rows with a needle depth" in page

    only_full = _db(tmp_path / "full.db", "DELETE FROM results WHERE method != 'full' OR family = 'ppl';")
    page = write_report(only_full, tmp_path / "full")[0].read_text(encoding="utf-8")
    assert "overall-smollm2-135m" in page and "No perplexity rows" in page

    # budgets given as fractions of the context ("0.0625", "12.5%", "0.25"): the x-axis becomes the fraction
    fractions = _db(tmp_path / "frac.db", "UPDATE results SET budget = CASE budget WHEN '256' THEN '0.0625' "
                                          "WHEN '512' THEN '12.5%' ELSE '0.25' END WHERE budget != '';")
    page, md = (p.read_text(encoding="utf-8") for p in write_report(fractions, tmp_path / "frac"))
    assert "KV budget (fraction of context)" in page and len(figures(page)) == len(EXPECTED_PLOTS)
    assert ">0.0625</text>" in page and ">0.125</text>" in page  # ticks at the fractions
    assert md.index("snapkv @ 0.0625") < md.index("snapkv @ 12.5%") < md.index("snapkv @ 0.25")


def test_settings_variants_are_not_averaged_together(tmp_path):
    db = _db(tmp_path / "var.db", "UPDATE results SET settings_json = '{\"budget\": 256, \"pool\": 7, \"window\": 64}' "
                                  "WHERE method = 'snapkv' AND budget = '256' AND sample_index % 2 = 1;")
    md = write_report(db, tmp_path / "var")[1].read_text(encoding="utf-8")
    assert "snapkv\\[window=32\\] @ 256" in md and "snapkv\\[window=64\\] @ 256" in md


def test_text_is_escaped(tmp_path):
    evil = "<script>alert(1)</script>$x$|"
    db = _db(tmp_path / "evil.db", f"UPDATE results SET model = '{evil}', device = '<b>gpu</b>';")
    html_path, md_path = write_report(db, tmp_path / "evil")
    page, md = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert "<script>alert(1)" not in page and "&lt;script&gt;alert(1)" in page
    assert "<b>gpu" not in page and "<script>alert" not in md and "<b>" not in md
    assert len(figures(page)) == len(EXPECTED_PLOTS)


def test_cli_entry_point(report, tmp_path, capsys):
    assert main([str(report[0]), "-o", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "report.html").is_file() and (tmp_path / "cli" / "summary.md").is_file()
    assert "report.html" in capsys.readouterr().out


# -- the browser ------------------------------------------------------------------------------------------------
def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", head[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "the headless render check needs /usr/bin/chromium")
def test_renders_in_headless_chromium(report, tmp_path):
    html_path = report[1]
    url = html_path.resolve().as_uri()
    dom = chromium("--window-size=1400,1000", "--enable-logging=stderr", "--v=0", "--dump-dom", url,
                   profile=tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout)
    assert body, dom.stdout[:2000]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body.group(0)))
    n = len(EXPECTED_PLOTS)
    assert attrs.get("data-rendered") == f"{n}/{n}", f"plots rendered: {attrs.get('data-rendered')}"
    assert attrs.get("data-errors") == "", f"page errors: {attrs.get('data-errors')}"
    assert dom.stdout.count('data-ok="1"') == n and 'data-ok="0"' not in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, "console output from the page:\n" + "\n".join(console)

    height = min(int(attrs.get("data-height") or 4000), 16000)
    shot = tmp_path / "report.png"
    run = chromium(f"--window-size=1400,{height}", f"--screenshot={shot}", url, profile=tmp_path / "profile-shot")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert png_size(shot) == (1400, height)
    assert shot.stat().st_size > 100_000, "screenshot looks blank"
    print(f"screenshot: {shot}")
    if os.environ.get("ATTNKIT_UPDATE_SCREENSHOT") == "1" or not DOCS_SHOT.exists():
        DOCS_SHOT.parent.mkdir(parents=True, exist_ok=True)
        try:  # the top of the page (header, overall, latency, first families), in a 256-colour palette: small
            from PIL import Image

            image = Image.open(shot).convert("RGB")
            image = image.crop((0, 0, image.width, min(image.height, DOCS_SHOT_HEIGHT)))
            image.quantize(256, method=Image.Quantize.MEDIANCUT).save(DOCS_SHOT, optimize=True)
        except ImportError:
            shutil.copyfile(shot, DOCS_SHOT)
