"""Options once: verifier.run.options.OPTIONS makes the command line, the matrix keys, the plan and
the reproducer, so they agree by construction; these tests hold them to it."""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

import click
import pytest

from dirtylog.cli import cli
from verifier.matrix.execute import reproducer, verify_options
from verifier.matrix.spec import KEYS, load_matrix
from verifier.run.options import BY_KEY, OPTIONS, VerifyOptions, from_cli, matrix_value, reproducer_args

REPO = Path(__file__).resolve().parent.parent
VERIFY = cli.commands["verify"]


def _parse(args: list[str]) -> VerifyOptions:
    """Arguments through `dirtylog verify`'s own click parser, then the table's from_cli."""
    ctx = VERIFY.make_context("verify", list(args), resilient_parsing=False)
    return from_cli(ctx.params)


def test_every_plan_field_is_an_option_of_the_table():
    assert [f.name for f in dataclasses.fields(VerifyOptions)] == [o.name for o in OPTIONS]


def test_the_command_line_is_the_table():
    params = {p.name: p for p in VERIFY.params}
    for o in OPTIONS:
        if o.flag is None:
            assert o.name not in params
            continue
        p = params[o.name]
        assert o.flag in p.opts and p.help == o.help
        if not o.kind.is_flag and not o.multiple and o.default not in ((), {}):
            assert p.default == o.default, o.name
    assert _parse([]) == VerifyOptions()  # no argument: the table's defaults


def test_the_matrix_keys_are_the_table():
    plan_keys = {k for k in KEYS if k in BY_KEY}
    assert plan_keys == set(BY_KEY)
    assert set(KEYS) - plan_keys == {"name", "artifacts", "expect", "expect_finding", "expect_registers"}
    for key, o in BY_KEY.items():
        assert KEYS[key][1] == o.key_default


@pytest.mark.parametrize("matrix", sorted(p.name for p in (REPO / "matrices").glob("*.toml")))
def test_a_scenarios_reproducer_parses_back_to_its_plan(matrix, tmp_path):
    """The reproducer of every shipped scenario, given to the real command line, is the same plan."""
    for s in load_matrix(REPO / "matrices" / matrix).scenarios:
        plan = verify_options(s, tmp_path / "run")
        argv = shlex.split(reproducer(s, tmp_path / "run"))
        assert argv[:4] == ["dirtylog", "verify", "--artifacts", s.params["artifacts"] or "artifacts"]
        assert _parse(argv[4:]) == plan, s.name


def test_a_plan_with_every_kind_of_value_round_trips():
    plan = VerifyOptions(smp=3, mem_mb=512, max_bandwidth=48 << 20, capture="pmemsave", cpu_state=False,
                         delete_images=True, capabilities={"multifd": True, "xbzrle": False},
                         parameters={"multifd-channels": 4, "compression": "zstd"}, postcopy=True,
                         inject=("corrupt-capture", 3), src_host="local", dst_host="local",
                         migration_timeout_s=90.5, run_dir=Path("r"))
    args = reproducer_args(plan)
    assert "--remote-dir" in args and "--no-cpu-state" in args and "--delete-images" in args
    assert _parse(args) == plan


@pytest.mark.parametrize("key, value, words", [
    ("smp", 9, "out of range 1..8"), ("mem", "x", "expected an integer"), ("capture", "tape", "not one of"),
    ("max_bandwidth", "fast", "byte rate"), ("src_host", "a b", "expected local or"),
    ("migration_timeout", 0, "seconds > 0"), ("cpu_state", "yes", "true or false"),
])
def test_one_value_rule_for_matrix_keys(key, value, words):
    with pytest.raises(ValueError, match=words):
        matrix_value(key, value)


@pytest.mark.parametrize("args, words", [
    (["--smp", "9"], "--smp 9: 9 is out of range 1..8"),
    (["--min-passes", "0"], "--min-passes 0: 0 is out of range 1..1000"),
])
def test_the_command_line_says_a_range_in_the_matrix_words(args, words):
    """The same range and the same words as a matrix key: checked on the plan, for both."""
    from verifier.errors import InputError
    plan = _parse(args)

    class Art:
        min_mem_mb, reserved_mb = 64, 0
    with pytest.raises(InputError, match=words):
        plan.check(Art())


def test_bad_command_line_values_are_usage_errors():
    with pytest.raises(click.BadParameter, match="expected NAME=VALUE"):
        _parse(["--capability", "multifd"])
    with pytest.raises(click.BadParameter, match="not a byte rate"):
        _parse(["--max-bandwidth", "fast"])


def test_every_matrix_key_is_documented():
    """docs/report-schema.md's table of scenario keys names every key the table makes."""
    doc = (REPO / "docs" / "report-schema.md").read_text()
    rows = {k for line in doc.splitlines() if line.startswith("| `") for k in
            __import__("re").findall(r"`([a-z_]+)`", line.split("|")[1])}
    assert set(KEYS) - {"name", "artifacts"} - rows == set()
