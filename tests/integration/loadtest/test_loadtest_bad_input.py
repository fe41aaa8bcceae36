"""`p2pgrid loadtest` answers bad input with one line naming the option, exit code 2, and no report."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.cli import main
from services.platform.nats_server import free_port


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = main(["loadtest", *args])
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--duration", "0"], "--duration must be greater than 0"),
        (["--duration", "soon"], "--duration 'soon' is not a number"),
        (["--duration", "nan"], "--duration 'nan' is not a finite number"),
        (["--scenario", "lunch-peak"], "--scenario 'lunch-peak' is not one of steady, morning-ramp"),
        (["--prosumers", "0"], "--prosumers must be at least 1"),
        (["--prosumers", "2.5"], "--prosumers '2.5' is not an integer"),
        (["--rate", "-3"], "--rate must be greater than 0"),
        (["--amend-share", "1.5"], "--amend-share must be at most 1"),
        (["--speedup", "0"], "--speedup must be greater than 0"),
        (["--scenario", "meter-flood", "--meters", "0"], "needs at least one push meter"),
        (["--grid", "no/such/grid.yaml"], "--grid no/such/grid.yaml:"),
        (["--order-book", "127.0.0.1:1"], "--nats-url is needed with an external stack"),
        (
            ["--scenario", "meter-flood", "--nats-url", "nats://127.0.0.1:1", "--order-book", "127.0.0.1:1"],
            "needs --meter-ingest",
        ),
        (["--sim-start-s", "1767225600"], "--sim-start-s describes an external stack's clock"),
        (
            ["--nats-url", "nats://127.0.0.1:1", "--order-book", "127.0.0.1:1", "--speedup", "60"],
            "--speedup against an external stack needs --sim-start-s and --sim-anchor-wall-s",
        ),
        (["--interval-s", "600"], "the own stack uses 900 and 300"),
        (["--unknown-option"], "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_naming_the_option_and_exit_code_two(
    args: list[str], names: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report_dir = tmp_path / "report"
    code, err = run([*args, "--report-dir", str(report_dir)], capsys)
    assert code == 2
    assert names in err
    assert err.count("\n") == 1 and err.startswith("p2pgrid"), err
    assert not report_dir.exists()


def test_a_used_work_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "stack").mkdir()
    (tmp_path / "stack" / "meters.yaml").write_text("meters: []\n")
    code, err = run(["--workdir", str(tmp_path / "stack")], capsys)
    assert (code, err) == (
        2,
        f"p2pgrid loadtest: error: --workdir {tmp_path / 'stack'} must be a new or empty folder\n",
    )


def test_an_order_book_that_does_not_answer_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address = f"127.0.0.1:{free_port()}"
    code, err = run(
        [
            "--nats-url",
            f"nats://127.0.0.1:{free_port()}",
            "--order-book",
            address,
            "--report-dir",
            str(tmp_path),
        ],
        capsys,
    )
    assert (code, err) == (
        2,
        f"p2pgrid loadtest: error: --order-book {address}: no gRPC server answered within 3 s\n",
    )


def test_the_meters_file_for_an_external_stack_is_written_on_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import yaml

    from services.meter_ingest.meters import load_meters

    path = tmp_path / "meters.yaml"
    assert main(["loadtest", "--write-meters-file", str(path), "--meters", "12", "--gateways", "3"]) == 0
    assert "wrote 12 push meters on 3 gateways" in capsys.readouterr().out
    meters = load_meters(str(path), None)
    assert len(meters) == 12
    keys = {entry["push"]["public_keys"][0] for entry in yaml.safe_load(path.read_text())["meters"]}
    assert len(keys) == 3
