"""Each output's build time from a ninja log (.ninja_log, format 5+), slowest first.

  python tools/ninja_times.py BUILD_TEMP/.ninja_log
"""
import os
import sys


def times(log_path):
    """{output: seconds} of the last build of each output the log records."""
    with open(log_path) as f:
        lines = f.read().splitlines()
    if not lines or not lines[0].startswith("# ninja log v"):
        sys.exit(f"{log_path}: not a ninja log")
    out = {}
    for line in lines[1:]:
        start_ms, end_ms, _mtime, target, *_ = line.split("\t")
        out[target] = (int(end_ms) - int(start_ms)) / 1000
    return out


def short(target):
    """The object's path from the source tree's csrc/ or build/ on."""
    for mark in ("/csrc/", "/build/"):
        if mark in target:
            return target[target.rindex(mark) + 1:]
    return os.path.basename(target)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    rows = sorted(times(sys.argv[1]).items(), key=lambda kv: -kv[1])
    for target, seconds in rows:
        print(f"  {seconds:7.1f} s  {short(target)}")


if __name__ == "__main__":
    main()
