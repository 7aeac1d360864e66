"""bench/gpu.sh runs on a lent GPU machine, rarely and against a clock: its benchmark commands must
at least parse here, with cells and shapes that exist, so a run is not lost to a typo."""

import shlex
from pathlib import Path

import pytest

from cachedattention.bench.models import SHAPES
from cachedattention.bench.systems import parse_system_names
from cachedattention.bench.turn import CELLS
from cachedattention.cli import build_parser

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu.sh"


def bench_commands() -> list[list[str]]:
    text = SCRIPT.read_text().replace("\\\n", " ")  # join continued lines
    commands = []
    for line in text.splitlines():
        if "-m cachedattention.cli bench" in line:
            command = line.split("-m cachedattention.cli", 1)[1].split("2>&1")[0]
            commands.append(shlex.split(command))
    return commands


def test_the_script_runs_every_benchmark_mode_it_reports():
    modes = [cmd[cmd.index("--mode") + 1] for cmd in bench_commands()]
    assert {"turn", "throughput", "workload"} <= set(modes)


@pytest.mark.parametrize("argv", bench_commands(), ids=lambda argv: argv[argv.index("--mode") + 1])
def test_each_benchmark_command_parses(argv):
    args = build_parser().parse_args(argv)
    assert args.device == "cuda" and args.random_shape in SHAPES
    names = {c.name for c in CELLS}
    if args.cells:
        assert set(args.cells.split(",")) <= names, f"unknown cells in {args.cells}"
    if args.history:
        assert all(int(h) > 0 for h in args.history.split(","))
    if args.systems:
        parse_system_names(args.systems)  # raises on an unknown system


def test_the_stages_fit_one_device_command():
    """The device tool runs one command for at most 600 s: the stages' own limits must leave room for
    Python's start-up and the archive."""
    limits = [int(word) for line in SCRIPT.read_text().splitlines() if line.startswith("timeout ")
              for word in [line.split()[1]]]
    assert len(limits) == 5 and sum(limits) <= 580, limits
