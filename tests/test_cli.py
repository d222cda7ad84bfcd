"""Bad input through the CLI: one clear line on stderr, a non-zero exit, and no partial output."""

import os
import subprocess
import sys

import pytest

from gptq_plugin.cli import main


def run_cli(*args):
    """Run ``gptq-plugin ARGS`` in a subprocess; return (exit code, stdout, stderr)."""
    p = subprocess.run([sys.executable, "-m", "gptq_plugin.cli", *map(str, args)], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, *needles):
    assert rc == 2, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_model_dir(tmp_path):
    rc, _, err = run_cli("quantize", tmp_path / "nope", tmp_path / "out")
    assert_one_line_error(rc, err, "nope", "does not exist")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("opt, needle", [(["--bits", "5"], "bits=5"), (["--group-size", "0"], "group_size=0"),
                                         (["--group-size", "-3"], "group_size=-3"),
                                         (["--damp-percent", "2"], "damp_percent")])
def test_impossible_config(tmp_path, opt, needle):
    (tmp_path / "m").mkdir()
    rc, _, err = run_cli("quantize", tmp_path / "m", tmp_path / "out", *opt)
    assert_one_line_error(rc, err, needle)
    assert not (tmp_path / "out").exists()


def test_output_inside_source_is_refused(demo_model_dir, tmp_path):
    rc, _, err = run_cli("quantize", demo_model_dir, demo_model_dir / "q")
    assert_one_line_error(rc, err, "inside the source model folder")
    assert not (demo_model_dir / "q").exists()


def test_existing_output_needs_overwrite(demo_model_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    rc, _, err = run_cli("quantize", demo_model_dir, tmp_path / "out")
    assert_one_line_error(rc, err, "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_calibration_shorter_than_one_window(demo_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    rc, _, err = run_cli("quantize", demo_model_dir, tmp_path / "out", "--dataset", short, "--seqlen", "512")
    assert_one_line_error(rc, err, "fewer than one window", "short.txt")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary leftovers


def test_missing_calibration_file(demo_model_dir, tmp_path):
    rc, _, err = run_cli("quantize", demo_model_dir, tmp_path / "out", "--dataset", tmp_path / "missing.txt")
    assert_one_line_error(rc, err, "missing.txt")


def test_eval_and_inspect_bad_paths(tmp_path):
    rc, _, err = run_cli("eval", tmp_path / "nope")
    assert_one_line_error(rc, err, "nope")
    rc, _, err = run_cli("inspect", tmp_path)
    assert_one_line_error(rc, err, "not a GPTQ checkpoint")


@pytest.mark.parametrize("args, needle", [(["benchmark"], "No such command 'benchmark'"),
                                          (["quantize", "m", "out", "--bits", "x"], "Invalid value for '--bits'")])
def test_usage_errors_are_the_usage_message(args, needle):
    """Unknown commands and unparsable options end with click's usage message and status 2, not a traceback (the
    kernel benchmark is `python benchmarks/kernel_bench.py`, not a command)."""
    rc, out, err = run_cli(*args)
    assert rc == 2 and "Traceback" not in err, err
    assert err.startswith("Usage: ") and needle in err, err


def test_bench_points_at_the_benchmark_script():
    """`gptq-plugin bench` (a command until the kernel benchmark moved to benchmarks/) names the script to run."""
    assert_one_line_error(*run_cli("bench", "--quick")[::2], "python benchmarks/kernel_bench.py --quick")


def test_quantize_rtn_end_to_end_and_inspect(demo_model_dir, tmp_path, capsys):
    out = tmp_path / "rtn"
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(demo_model_dir), str(out), "--method", "rtn", "--bits", "3", "--group-size", "64"])
    assert e.value.code == 0
    assert (out / "model.safetensors").is_file() and (out / "quantize_config.json").is_file()
    rc, text, err = run_cli("inspect", out)
    assert rc == 0, err
    assert "bits: 3" in text and "n_quantized_layers: 210" in text
    assert "desc_act: False" in text and "static_groups: False" in text  # RTN is input order whatever the flags
    rc, text, err = run_cli("plugins")
    assert rc == 0 and "reference" in text and "generic-causal-lm" in text, err
