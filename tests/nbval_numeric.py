"""Numbers compared within a tolerance, everything else exactly: a small extension of nbval.

nbval compares a notebook's stored outputs with a fresh run as strings. Printed experiment figures
differ in the last digit from one CPU (or BLAS build, or thread count) to another, so this plugin
lets a cell declare how far its printed numbers may move, in the cell's metadata::

    {"companion": {"rtol": 0.02, "atol": 0.005}}          # floats: |new - old| <= atol + rtol*|old|
    {"companion": {"atol": 0.01, "integers": true}}        # integers too (default: exact)

The text around the numbers must match exactly, the two outputs must hold the same numbers in the
same places (a missing line or an extra number fails), and a cell without the key is compared
exactly, as plain nbval does. Integers (sizes, counts, seeds) are exact unless ``integers`` is
true. Numbers glued to a word (``float32``, ``d_k4``) belong to the word. Images are not compared
(nbval skips them unless nbdime is on). Used with ``pytest --nbval -p tests.nbval_numeric``; the
comparison itself is ``compare_text`` below, unit-tested in ``tests/test_nbval_numeric.py``.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass

# A number: optional sign, digits with an optional fraction (or a bare fraction), optional
# exponent; not preceded by a letter, digit, underscore or dot (so `float32` and `v1.2.3`'s tail
# stay text), and not followed by a letter, digit or underscore.
NUMBER = re.compile(
    r"(?<![\w.])[-+\u2212]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![\w])|(?<![\w.])[-+]?(?:inf|nan)\b"
)
META_KEY = "companion"


@dataclass(frozen=True)
class Tolerance:
    rtol: float = 0.0
    atol: float = 0.0
    integers: bool = False

    @classmethod
    def from_metadata(cls, metadata) -> "Tolerance | None":
        spec = (metadata or {}).get(META_KEY)
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ValueError(f"cell metadata {META_KEY!r}: expected a dict, got {spec!r}")
        unknown = set(spec) - {"rtol", "atol", "integers"}
        if unknown:
            raise ValueError(f"cell metadata {META_KEY!r}: unknown keys {sorted(unknown)}")
        rtol, atol = spec.get("rtol", 0.0), spec.get("atol", 0.0)
        for name, v in (("rtol", rtol), ("atol", atol)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"cell metadata {META_KEY}.{name}: expected a number >= 0, got {v!r}")
        integers = spec.get("integers", False)
        if not isinstance(integers, bool):
            raise ValueError(f"cell metadata {META_KEY}.integers: expected true/false, got {integers!r}")
        return cls(float(rtol), float(atol), integers)


def _split(text: str) -> tuple[list[str], list[str]]:
    """The text between numbers, and the numbers (len(texts) == len(numbers) + 1)."""
    texts, numbers, pos = [], [], 0
    for m in NUMBER.finditer(text):
        texts.append(text[pos:m.start()])
        numbers.append(m.group())
        pos = m.end()
    texts.append(text[pos:])
    return texts, numbers


def _is_integer(token: str) -> bool:
    return re.fullmatch(r"[-+\u2212]?\d+", token) is not None


def _value(token: str) -> float:
    return float(token.replace("\u2212", "-"))


def compare_text(ref: str, new: str, tol: Tolerance | None) -> str | None:
    """None when ``new`` matches ``ref`` under ``tol``, else a one-line reason.

    ``tol=None`` means exact. Otherwise the text between numbers must be identical and the
    numbers pairwise close: floats within ``atol + rtol * |ref|``, integers exactly unless
    ``tol.integers``; inf and nan must match in kind."""
    if ref == new:
        return None
    if tol is None:
        return "the text differs (no tolerance declared: exact comparison)"
    ref_texts, ref_nums = _split(ref)
    new_texts, new_nums = _split(new)
    if len(ref_nums) != len(new_nums):
        return f"{len(ref_nums)} numbers stored, {len(new_nums)} printed"
    for i, (a, b) in enumerate(zip(ref_texts, new_texts)):
        if a != b:
            return f"the text differs around number {i + 1}: {a!r} != {b!r}"
    for r, n in zip(ref_nums, new_nums):
        if r == n:
            continue
        if (_is_integer(r) and _is_integer(n)) and not tol.integers:
            return f"integer {n} printed, {r} stored (integers are exact unless 'integers': true)"
        a, b = _value(r), _value(n)
        if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
            if not (a == b or (math.isnan(a) and math.isnan(b))):
                return f"{n} printed, {r} stored"
            continue
        if abs(b - a) > tol.atol + tol.rtol * abs(a):
            return (f"{n} printed, {r} stored: |difference| {abs(b - a):.3g} > "
                    f"atol {tol.atol:g} + rtol {tol.rtol:g} * |stored|")
    return None


# ------------------------------------------------------------------------------------------
# The pytest plugin: wraps nbval's IPyNbCell.compare_outputs. Before nbval's exact comparison,
# each text field of the new outputs that matches its stored counterpart under the cell's
# tolerance is replaced by the stored text, so nbval then sees them equal; any field that does
# not match is left as it is and nbval reports it as usual, with the reason added.
# ------------------------------------------------------------------------------------------
def _fields(outputs, skip) -> dict[str, list[tuple[dict, str]]]:
    """{key: [(container, field), ...]} in nbval's flattening: a stream's key is its name, a
    display/result's keys are its MIME types; only string-valued fields."""
    found: dict[str, list[tuple[dict, str]]] = {}
    for out in outputs:
        if out.get("output_type") == "stream":
            found.setdefault(out.get("name", "stdout"), []).append((out, "text"))
            continue
        for key, value in out.items():
            if key in skip:
                continue
            if key == "data":
                for mime, v in value.items():
                    if mime not in skip and isinstance(v, str):
                        found.setdefault(mime, []).append((value, mime))
            elif isinstance(value, str):
                found.setdefault(key, []).append((out, key))
    return found


def _install():
    from nbval.plugin import IPyNbCell

    if getattr(IPyNbCell, "_companion_numeric", False):
        return
    original = IPyNbCell.compare_outputs

    def compare_outputs(self, test, ref, skip_compare=None):
        tol = Tolerance.from_metadata(self.cell.get("metadata", {}))
        if tol is None:
            return original(self, test, ref, skip_compare)
        skip = skip_compare or self.parent.skip_compare
        test = copy.deepcopy(test)
        reasons = []
        new_fields, ref_fields = _fields(test, skip), _fields(ref, skip)
        for key, pairs in new_fields.items():
            stored = ref_fields.get(key, [])
            if len(stored) != len(pairs):
                continue  # nbval reports the differing number of outputs
            for (n_box, n_key), (r_box, r_key) in zip(pairs, stored):
                n_text, r_text = self.sanitize(n_box[n_key]), self.sanitize(r_box[r_key])
                reason = compare_text(r_text, n_text, tol)
                if reason is None:
                    n_box[n_key] = r_box[r_key]
                else:
                    reasons.append(f"{key}: {reason}")
        ok = original(self, test, ref, skip_compare)
        if not ok and reasons:
            self.comparison_traceback.insert(
                0, f"numeric comparison ({tol}): " + "; ".join(reasons))
        return ok

    IPyNbCell.compare_outputs = compare_outputs
    IPyNbCell._companion_numeric = True


def pytest_configure(config):
    if getattr(config.option, "nbval", False) or getattr(config.option, "nbval_lax", False):
        _install()


# ------------------------------------------------------------------------------------------
# Time per notebook on the test path, summed over its cells and printed at the end of the run
# (a report, not a test: timings belong in benchmarks, and this one is read off every CI run).
# ------------------------------------------------------------------------------------------
NOTEBOOK_BUDGET_S = 60.0
_notebook_seconds: dict[str, float] = {}


def pytest_runtest_logreport(report):
    path = report.nodeid.split("::", 1)[0]
    if path.endswith(".ipynb"):
        _notebook_seconds[path] = _notebook_seconds.get(path, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter):
    if not _notebook_seconds:
        return
    tr = terminalreporter
    tr.section("time per notebook on this test path (budget 60 s)")
    for path, seconds in sorted(_notebook_seconds.items(), key=lambda kv: -kv[1]):
        flag = "  OVER BUDGET" if seconds > NOTEBOOK_BUDGET_S else ""
        tr.write_line(f"{seconds:7.1f} s  {path}{flag}")
