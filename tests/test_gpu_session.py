"""The GPU session script and its benchmark, rehearsed on the CPU (no GPU needed).

tools/gpu_session.sh --rehearse runs the whole session with its deadline logic; benchmarks/
gpu_quick.py --rehearse runs its device code through the CPU stand-ins of torch.cuda's calls,
so that the code a lent GPU will run has run here first.
"""
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import session_tools  # noqa: E402

FILES = {"env.txt", "build.log", "smoke.log", "tests.log", "tests.xml", "bench.jsonl", "bench.log", "summary.txt"}
OPS = ["posterior_sample", "categorical_log_likelihood", "bernoulli_log_likelihood",
       "linear_categorical_log_likelihood", "pixel_categorical_log_likelihood", "adamax_", "dmol_log_likelihood"]
needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def env():
    e = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHON=sys.executable)
    e.pop("CUDA_VISIBLE_DEVICES", None)
    return e


@pytest.mark.slow
def test_gpu_quick_rehearsal_covers_95_percent(tmp_path):
    """--rehearse alone runs at least 95 % of gpu_quick.py's lines (coverage.py), and writes
    its rows as JSON lines, a measured row for each group and an end line."""
    pytest.importorskip("coverage")
    script = os.path.join(ROOT, "benchmarks", "gpu_quick.py")
    data = str(tmp_path / "cov")
    rows = tmp_path / "rows.jsonl"
    run = subprocess.run([sys.executable, "-m", "coverage", "run", f"--data-file={data}", f"--include={script}",
                          script, "--rehearse", "--out", str(rows)],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "coverage", "report", f"--data-file={data}", "--format=total",
                             "--precision=1"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert float(report.stdout.strip()) >= 95.0, report.stdout
    records = [json.loads(line) for line in rows.read_text().splitlines()]
    assert "meta" in records[0] and records[-1]["end"]["interrupted"] is False
    measured = {r["group"] for r in records if r.get("median_s")}
    assert measured == {"copy", "categorical", "posterior", "bernoulli", "linear_head", "pixel_head", "dmol",
                        "adamax", "train"}
    assert not [r for r in records if "error" in r or r.get("check_ok") is False]


@pytest.mark.slow
@needs_bash
def test_session_rehearsal(tmp_path):
    """The whole session on the CPU within a short deadline: the 8 files, flat, the commit, the
    smoke check's line per op, one JUnit suite per test run, benchmark rows, the summary."""
    out, deadline = tmp_path / "out", 150
    t0 = time.perf_counter()
    run = subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_session.sh"), str(out), "--rehearse",
                          "--deadline", str(deadline), "--commit", "rehearsal-commit-0123"],
                         cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=deadline + 120)
    wall = time.perf_counter() - t0
    summary = (out / "summary.txt").read_text()
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert wall <= deadline + 5, summary
    assert {p.name for p in out.iterdir()} == FILES and all(p.is_file() for p in out.iterdir())
    assert "commit: rehearsal-commit-0123" in (out / "env.txt").read_text()
    assert summary.startswith("commit: rehearsal-commit-0123")
    for op in OPS:
        assert f"smoke: {op}: ok;" in summary
    assert "build: skipped (--rehearse" in summary and "import check: ok" in summary
    suites = ET.parse(out / "tests.xml").getroot().findall("testsuite")
    assert 1 <= len(suites) <= 2 and int(suites[0].get("tests")) > 100  # the CUDA tests, skipped here
    assert "\ntests: ok" in summary
    records = [json.loads(line) for line in (out / "bench.jsonl").read_text().splitlines()]
    assert sum("meta" in r for r in records) >= 1
    assert sum(1 for r in records if r.get("median_s")) >= 10
    assert "| group | case |" in summary and f"of the {deadline} s deadline" in summary
    assert "files: 8 in" in summary


@needs_bash
def test_session_help_and_bad_arguments(tmp_path):
    script = os.path.join(ROOT, "tools", "gpu_session.sh")
    subprocess.run(["bash", "-n", script], check=True)
    assert "--rehearse" in subprocess.run(["bash", script, "--help"], capture_output=True, text=True,
                                          check=True).stdout
    for args in (["--bogus"], [], [str(tmp_path), "--deadline", "soon"]):
        assert subprocess.run(["bash", script, *args], capture_output=True, text=True).returncode == 2


def test_ninja_times(tmp_path):
    log = tmp_path / "build" / "temp.linux" / ".ninja_log"
    log.parent.mkdir(parents=True)
    log.write_text("# ninja log v5\n0\t4000\t1\t/x/a.o\tabc\n100\t90000\t1\t/x/b.cuda.o\tdef\n"
                   "5000\t6000\t1\t/x/a.o\tghi\n")  # a.o rebuilt: the newest entry counts
    lines = session_tools.ninja_times(str(tmp_path))
    assert "2 outputs, 89.9 s" in lines[0]
    assert lines[1].split() == ["89.9", "s", "/x/b.cuda.o"] and lines[2].split() == ["1.0", "s", "/x/a.o"]
    assert "no .ninja_log" in session_tools.ninja_times(str(tmp_path / "none"))[0]


def test_junit_merge_and_counts(tmp_path):
    a, b = tmp_path / "a.xml", tmp_path / "b.xml"
    a.write_text('<testsuites><testsuite name="pytest" tests="3" failures="1" errors="0" skipped="1" time="1.5">'
                 '<testcase classname="t" name="x"/><testcase classname="t" name="y">'
                 '<failure message="boom&#10;more"/></testcase><testcase classname="t" name="z"><skipped/></testcase>'
                 '</testsuite></testsuites>')
    b.write_text('<testsuite name="pytest" tests="2" failures="0" errors="1" skipped="0" time="2">'
                 '<testcase classname="u" name="w"><error message="bad"/></testcase><testcase classname="u" name="v"/>'
                 '</testsuite>')
    session_tools.junit_merge(str(a), str(b))
    lines = session_tools.junit_counts(str(a))
    assert lines[0] == "5 tests in 2 run(s): 2 passed, 1 failed, 1 errors, 1 skipped, 3.5 s"
    assert lines[1:] == ["  FAILED t::y: boom", "  FAILED u::w: bad"]
    fresh = tmp_path / "c.xml"
    session_tools.junit_merge(str(fresh), str(b))  # no first run: the second's suite alone
    assert session_tools.junit_counts(str(fresh))[0].startswith("2 tests in 1 run(s)")
