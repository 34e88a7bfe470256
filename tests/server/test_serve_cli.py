"""`ruyi-trt serve`'s options: run's runtime options are shared, bad values stop it before anything starts."""

from __future__ import annotations

from click.testing import CliRunner

from ruyi_trt.cli import main


def test_serve_takes_runs_runtime_options() -> None:
    result = CliRunner().invoke(main, ["serve", "--help"])
    assert result.exit_code == 0
    for option in ("--data-dir", "--max-queue", "--token-file", "--workers-per-gpu", "--ray", "--backend", "--dtype",
                   "--memory-mode", "--fp8", "--teacache", "--lora", "--parallel", "--compute", "--attention"):  # fmt: skip
        assert option in result.output, option


def test_bad_settings_stop_serve_before_it_starts(tmp_path) -> None:
    runner = CliRunner()
    short = tmp_path / "token.txt"
    short.write_text("abc\n")
    cases = {
        ("--token-file", str(short)): "shorter than 16 characters",
        ("--token-file", str(tmp_path / "missing.txt")): "does not exist",
        ("--backend", "ort", "--dtype", "bf16"): "bf16 is not supported by backend ort",
        ("--workers-per-gpu", "0"): "workers-per-gpu: 0 must be at least 1",
        ("--model", str(tmp_path / "nowhere")): "does not exist",
    }
    for args, message in cases.items():
        result = runner.invoke(main, ["serve", "--data-dir", str(tmp_path / "data"), *args])
        assert result.exit_code != 0 and message in result.output, (args, result.output)
    assert not (tmp_path / "data").exists()
