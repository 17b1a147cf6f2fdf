"""Small helpers of tools/gpu_session.sh.

    python tools/session_tools.py pytest ARGS...         pytest.main(ARGS), stoppable by SIGINT
    python tools/session_tools.py ninja-times DIR        per-file compile times from DIR's .ninja_log files
    python tools/session_tools.py junit-merge DEST SRC   SRC's test suites appended to DEST's
    python tools/session_tools.py junit-counts FILE      one line of counts, then the failed tests
"""
import glob
import os
import signal
import sys
import xml.etree.ElementTree as ET


def run_pytest(args):
    """pytest with Python's SIGINT handler put back: a shell that starts a program in the
    background without job control makes it ignore SIGINT, and pytest then would not stop at the
    session's cap with its summary and JUnit file written."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import pytest
    return pytest.main(args)


def ninja_times(root):
    """Lines: each output's compile time (ninja's log: start and end in ms, then the output), the
    slowest first, per .ninja_log under root; the newest entry of each output counts."""
    lines = []
    for log in sorted(glob.glob(os.path.join(root, "**", ".ninja_log"), recursive=True)):
        last = {}
        with open(log) as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4 and parts[0].isdigit() and parts[1].isdigit():
                    last[parts[3]] = (int(parts[0]), int(parts[1]))
        if not last:
            continue
        wall = (max(e for _, e in last.values()) - min(s for s, _ in last.values())) / 1e3
        lines.append(f"ninja times from {log}: {len(last)} outputs, {wall:.1f} s from the first start to the last end")
        for out, (s, e) in sorted(last.items(), key=lambda kv: kv[1][0] - kv[1][1]):
            lines.append(f"  {(e - s) / 1e3:7.1f} s  {out.removeprefix(os.path.dirname(os.path.abspath(log)) + os.sep)}")
    return lines or [f"ninja times: no .ninja_log under {root}"]


def _suites(root):
    return [root] if root.tag == "testsuite" else list(root.iter("testsuite"))


def junit_merge(dest, src):
    """Appends src's test suites to dest's (a <testsuites> root); dest is src's copy if absent."""
    new = ET.parse(src).getroot()
    if not os.path.exists(dest):
        base = ET.Element("testsuites")
    else:
        base = ET.parse(dest).getroot()
        if base.tag == "testsuite":
            root = ET.Element("testsuites")
            root.append(base)
            base = root
    for suite in _suites(new):
        base.append(suite)
    ET.ElementTree(base).write(dest, encoding="utf-8", xml_declaration=True)


def junit_counts(path, failed_max=20):
    """A line of counts over every suite of a JUnit file, then one line per failed test."""
    root = ET.parse(path).getroot()
    n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    t, failed = 0.0, []
    for suite in _suites(root):
        for k in n:
            n[k] += int(suite.get(k, 0))
        t += float(suite.get("time", 0))
        for case in suite.iter("testcase"):
            bad = case.find("failure")
            bad = bad if bad is not None else case.find("error")
            if bad is not None:
                failed.append(f"  FAILED {case.get('classname')}::{case.get('name')}: "
                              f"{(bad.get('message') or '').splitlines()[0][:160] if bad.get('message') else ''}")
    passed = n["tests"] - n["failures"] - n["errors"] - n["skipped"]
    head = (f"{n['tests']} tests in {len(_suites(root))} run(s): {passed} passed, {n['failures']} failed, "
            f"{n['errors']} errors, {n['skipped']} skipped, {t:.1f} s")
    return [head] + failed[:failed_max] + ([f"  ... {len(failed) - failed_max} more"] if len(failed) > failed_max else [])


def main(argv):
    cmd, args = argv[0], argv[1:]
    if cmd == "pytest":
        return run_pytest(args)
    if cmd == "ninja-times":
        print("\n".join(ninja_times(args[0])))
    elif cmd == "junit-merge":
        junit_merge(*args)
    elif cmd == "junit-counts":
        print("\n".join(junit_counts(args[0])))
    else:
        sys.exit(f"session_tools.py: unknown command {cmd} (see its docstring)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
