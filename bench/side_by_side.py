"""The same benchmark of this checkout and of an earlier revision, back to back on one machine, with their ratios.

A change's effect is measured side by side because two machines of one kind differ (two H100s of the device tool:
26.3 and 33.5 images/s at concurrency 1 on the same code).

    python -m bench.side_by_side --rev 0a35f16 [--out bench/results] -- --models face_fusion --concurrency 1,128 ...
    python -m bench.side_by_side --tree .device/base -- ...      # an extracted revision (no git history needed)
    python -m bench.side_by_side --env FACEFUSE_FUSED_KERNELS=off -- ...  # this checkout with that setting
    python -m bench.side_by_side --args '--max-batch preprocess=16' -- ...  # this checkout with those bench.run args

``--rounds N`` runs both N times, this checkout first in odd rounds and the revision first in even ones, and prints each
round's ratios and their median (session 14: within one call on one H100 every run was faster than the one before, 28.9
-> 40.6 images/s at concurrency 1, so single rounds do not compare). Everything after ``--`` goes to ``bench.run`` for
both; each writes its files under ``--out`` with the machine tag ``<machine>-<label>`` ("new" and "rev-<commit>",
"tree-<folder>", "env-<NAME>-<value>" or "args-<arguments>", with "-r<round>" for several rounds). ``--env
NAME=VALUE`` compares this checkout with itself served under that environment variable (the model processes inherit
it): a switch such as ``FACEFUSE_FUSED_KERNELS=off``, with no second tree; ``--args`` with itself run with more
bench.run arguments (a served setting such as ``--max-batch``). The revision is ``git archive``d into .cache/bench/;
where this checkout serves the fusion model from ONNX (CPU hosts) the revision gets the same file when its network
code is unchanged, else its own export (a ``--tree`` must bring its own, or serve from PyTorch on a GPU). Prints
and writes ``<date>_<machine>_side_by_side.csv``: per round, throughput, p50 and p99 of each (model, concurrency) and
the new/revision ratios.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from bench.run import REPO_ROOT, machine_tag

ONNX = Path("model_repository") / "fusion" / "1" / "model.onnx"
NETWORK_SOURCES = ("facefuse/network.py", "facefuse/alignment.py", "build/export_onnx.py")


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True,
                          check=True).stdout.strip()


def revision_tree(rev: str, folder: Path) -> Path:
    """``rev``'s files in ``folder``/rev-<commit> (made once), with the fusion model's ONNX file where this checkout
    has one: copied when the revision's network code equals this checkout's, else exported there."""
    commit = _git("rev-parse", "--short=10", f"{rev}^{{commit}}")
    tree = folder / f"rev-{commit}"
    if not (tree / "bench" / "run.py").exists():
        shutil.rmtree(tree, ignore_errors=True)
        tree.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    if (REPO_ROOT / ONNX).exists() and not (tree / ONNX).exists():
        unchanged = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", commit, "--", *NETWORK_SOURCES],
                                   check=False).returncode == 0
        if unchanged:
            shutil.copy(REPO_ROOT / ONNX, tree / ONNX)
        else:
            print(f"[side-by-side] exporting {rev}'s fusion network to ONNX", flush=True)
            subprocess.run([sys.executable, "-m", "build.export_onnx", "--out", str(tree / ONNX)], cwd=tree,
                           env=_environment(tree), check=True)
    return tree


def _environment(tree: Path) -> dict[str, str]:
    """This environment with ``tree`` first on PYTHONPATH (the served models import facefuse from there)."""
    env = dict(os.environ)
    rest = [part for part in env.get("PYTHONPATH", "").split(os.pathsep) if part and Path(part) != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *rest])
    return env


def _without(args: list[str], option: str, values: tuple[str, ...] | None = None) -> list[str]:
    """``args`` without ``option``: ``--option=value``, or ``--option`` and the argument after it (when ``values`` is
    given, only if that argument is one of them: an optional value)."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
            if values is None or arg in values:
                continue
        if arg == option:
            skip = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def median_ratios(tables: list[list[dict]]) -> dict[tuple[str, int], float]:
    """Per (model, concurrency): the median of the rounds' throughput ratios (new / revision)."""
    by_level: dict[tuple[str, int], list[float]] = {}
    for table in tables:
        for entry in table:
            by_level.setdefault((entry["model"], entry["concurrency"]), []).append(entry["ratio_throughput_per_s"])
    return {level: float(statistics.median(values)) for level, values in by_level.items()}


def unpaired(new_rows: list[dict], old_rows: list[dict]) -> list[tuple[str, int, str]]:
    """(model, concurrency, "new" or "rev") for each level only one side measured: a run cut short (a time limit,
    a failure at that level) leaves no ratio there, which the report should say rather than leave out."""
    new = {(row["model"], int(row["concurrency"])) for row in new_rows}
    old = {(row["model"], int(row["concurrency"])) for row in old_rows}
    return sorted([(*level, "new") for level in new - old] + [(*level, "rev") for level in old - new])


def ratios(new_rows: list[dict], old_rows: list[dict]) -> list[dict]:
    """Per (model, concurrency) measured by both: each side's throughput, p50 and p99, and new / revision."""
    old = {(row["model"], int(row["concurrency"])): row for row in old_rows}
    table = []
    for row in new_rows:
        before = old.get((row["model"], int(row["concurrency"])))
        if before is None:
            continue
        entry = {"model": row["model"], "concurrency": int(row["concurrency"])}
        for key in ("throughput_per_s", "p50_ms", "p99_ms"):
            entry[f"new_{key}"], entry[f"rev_{key}"] = row[key], before[key]
            entry[f"ratio_{key}"] = round(row[key] / before[key], 3) if before[key] else float("nan")
        table.append(entry)
    return table


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--rev", help="the revision to compare with (a commit, tag or branch)")
    which.add_argument("--tree", type=Path, help="an earlier revision's files, already extracted (where there is no "
                                                 "git history: the device tool's GPU host gets the working tree only; "
                                                 "`git archive REV facefuse model_repository bench client "
                                                 "build ':!bench/results' | tar -x -C .device/base` here, carry "
                                                 ".device)")
    which.add_argument("--env", help="NAME=VALUE: this checkout served with that environment variable (e.g. "
                                     "FACEFUSE_FUSED_KERNELS=off) as the other side")
    which.add_argument("--args", dest="other_args",
                       help="bench.run arguments for the other side only: this checkout with and without them (e.g. "
                            "'--max-batch preprocess=16,postprocess=16')")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    parser.add_argument("--machine", default=None, help="tag for file names (default: GPU name or cpuN)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run both this many times, alternating which goes first (odd rounds: this checkout); "
                             "prints each round's ratios and their median")
    args = parser.parse_args(own)
    # Profiles and file locations are this tool's business; the rest goes to both runs unchanged.
    passed = _without(_without(_without(passed, "--out"), "--machine"), "--profile-stubs", ("busy", "wall"))
    machine = args.machine or machine_tag()
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    setting: dict[str, str] = {}
    extra: list[str] = []
    if args.other_args:
        extra = shlex.split(args.other_args)
        label = "args-" + re.sub(r"[^A-Za-z0-9]+", "-", " ".join(extra)).strip("-")
        tree = REPO_ROOT
    elif args.env:
        name, equals, value = args.env.partition("=")
        if not equals or not name:
            parser.error(f"--env takes NAME=VALUE, got {args.env!r}")
        tree, label, setting = REPO_ROOT, f"env-{name}-{value}", {name: value}
    elif args.rev:
        tree = revision_tree(args.rev, REPO_ROOT / ".cache" / "bench")
        label = tree.name
    else:
        tree = args.tree.resolve()
        label = f"tree-{tree.name}"
    date = datetime.date.today().isoformat()
    tables = []
    for number in range(1, args.rounds + 1):
        sides = [("new", REPO_ROOT), (label, tree)]
        if number % 2 == 0:  # a machine's state can drift within a call: who goes first alternates
            sides.reverse()
        summaries = {}
        for side, folder in sides:
            tag = f"{machine}-{side}" + (f"-r{number}" if args.rounds > 1 else "")
            own_args = extra if side == label else []
            print(f"[side-by-side] {side}{f' (round {number})' if args.rounds > 1 else ''}: python -m bench.run "
                  f"{' '.join(passed + own_args)}", flush=True)
            env = _environment(folder) | (setting if side == label else {})
            subprocess.run([sys.executable, "-m", "bench.run", *passed, *own_args, "--out", str(args.out),
                            "--machine", tag], cwd=folder, env=env, check=True)
            summaries[side] = json.loads((args.out / f"{date}_{tag}_summary.json").read_text())["rows"]
        table = ratios(summaries["new"], summaries[label])
        tables.append(table)
        for entry in table:
            print(f"[side-by-side] {f'round {number}: ' if args.rounds > 1 else ''}{entry['model']} "
                  f"c={entry['concurrency']}: {entry['new_throughput_per_s']:.2f} vs "
                  f"{entry['rev_throughput_per_s']:.2f}/s ({entry['ratio_throughput_per_s']:.2f}x); p50 "
                  f"{entry['new_p50_ms']:.1f} vs {entry['rev_p50_ms']:.1f} ms; p99 {entry['new_p99_ms']:.1f} vs "
                  f"{entry['rev_p99_ms']:.1f} ms", flush=True)
        for model, level, side in unpaired(summaries["new"], summaries[label]):
            print(f"[side-by-side] {f'round {number}: ' if args.rounds > 1 else ''}{model} c={level}: measured by "
                  f"{'new' if side == 'new' else label} only (the other run has no figure there: cut short or "
                  "failed), no ratio", flush=True)
    rows = [{"round": number, **entry} for number, table in enumerate(tables, 1) for entry in table]
    path = args.out / f"{date}_{machine}_side_by_side.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["round", "model", "concurrency"])
        writer.writeheader()
        writer.writerows(rows)
    if args.rounds > 1:
        for (model, level), ratio in median_ratios(tables).items():
            print(f"[side-by-side] {model} c={level}: median over {args.rounds} rounds {ratio:.3f}x", flush=True)
    print(f"[side-by-side] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
