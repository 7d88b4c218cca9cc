"""The numeric-tolerance comparison that the notebook tests use (tests/nbval_numeric.py)."""
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from tests.nbval_numeric import Tolerance, compare_text

ROOT = Path(__file__).resolve().parents[1]
T = Tolerance(rtol=0.0, atol=0.005)


def test_last_digit_passes_under_atol():
    assert compare_text("micro-F1 0.503", "micro-F1 0.504", T) is None


def test_a_real_change_fails():
    assert "0.50 printed, 0.45 stored" in compare_text("micro-F1 0.45", "micro-F1 0.50", T)


def test_a_changed_word_fails():
    assert "text differs" in compare_text("BCE wins 0.503", "MCE wins 0.503", T)


def test_a_missing_line_fails():
    ref = "seed 0: 0.503\nseed 1: 0.511\n"
    assert compare_text(ref, "seed 0: 0.503\n", T) is not None


def test_an_extra_number_fails():
    assert "1 numbers stored, 2 printed" in compare_text("F1 0.503", "F1 0.503 0.1", T)


def test_without_tolerance_comparison_is_exact():
    assert compare_text("0.503", "0.503", None) is None
    assert compare_text("0.503", "0.504", None) is not None


def test_integers_are_exact_unless_declared():
    assert "integer" in compare_text("steps 200, F1 0.503", "steps 201, F1 0.503", T)
    loose = Tolerance(atol=2, integers=True)
    assert compare_text("count 200", "count 201", loose) is None
    assert compare_text("count 200", "count 203", loose) is not None


def test_relative_tolerance_and_exponents():
    tol = Tolerance(rtol=0.2)
    assert compare_text("error 2.2e-16", "error 1.9e-16", tol) is None
    assert compare_text("error 2.2e-16", "error 2.2e-12", tol) is not None
    assert compare_text("x 1000.0", "x 1150.0", tol) is None
    assert compare_text("x 1000.0", "x 1250.0", tol) is not None


def test_signs_and_negative_zero():
    assert compare_text("delta -0.000", "delta 0.000", T) is None
    assert compare_text("delta -0.30", "delta 0.30", T) is not None
    assert compare_text("delta \u22120.301", "delta \u22120.300", T) is None


def test_numbers_inside_words_are_text():
    # float32 / bf16 are words, compared exactly even when a tolerance allows integers to move
    loose = Tolerance(atol=100, integers=True)
    assert compare_text("dtype float32", "dtype float64", loose) is not None
    assert compare_text("d_k4", "d_k8", loose) is not None


def test_inf_and_nan_match_only_in_kind():
    assert compare_text("loss nan", "loss nan", T) is None
    assert compare_text("loss inf", "loss 1.0", T) is not None
    assert compare_text("loss 1.0", "loss nan", T) is not None


def test_metadata_parsing_and_bad_metadata():
    assert Tolerance.from_metadata({}) is None
    assert Tolerance.from_metadata({"companion": {"rtol": 0.02, "atol": 0.005}}) == Tolerance(0.02, 0.005)
    with pytest.raises(ValueError, match="unknown keys"):
        Tolerance.from_metadata({"companion": {"rtool": 0.1}})
    with pytest.raises(ValueError, match="atol"):
        Tolerance.from_metadata({"companion": {"atol": -1}})
    with pytest.raises(ValueError, match="integers"):
        Tolerance.from_metadata({"companion": {"integers": "yes"}})


def _notebook(tmp_path: Path, stored: str, printed: str, metadata: dict) -> Path:
    cell = nbformat.v4.new_code_cell(f"print({printed!r})", metadata=metadata)
    cell.execution_count = 1
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=stored + "\n")]
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "probe.ipynb"
    nbformat.write(nb, path)
    return path


@pytest.mark.parametrize("printed, metadata, passes", [
    ("micro-F1 0.504", {"companion": {"atol": 0.005}}, True),
    ("micro-F1 0.504", {}, False),
    ("micro-F1 0.450", {"companion": {"atol": 0.005}}, False),
    ("macro-F1 0.503", {"companion": {"atol": 0.005}}, False),
])
def test_plugin_under_nbval(tmp_path, printed, metadata, passes):
    """The plugin inside a real nbval run: a stored 0.503 against a fresh print."""
    path = _notebook(tmp_path, "micro-F1 0.503", printed, metadata)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(path), "--nbval", "--nbval-current-env",
         "-p", "tests.nbval_numeric", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (proc.returncode == 0) == passes, proc.stdout[-3000:]
    if not passes and metadata:
        assert "numeric comparison" in proc.stdout
