"""`ediffi generate --seed S --n N`: image k uses S + k, so S + N - 1 must stay
within the documented range [0, MAX_SEED], the rule the HTTP API applies
(ediffi.spec.check_seed); refused with one line before the model loads."""

from __future__ import annotations

import pytest

from cli.main import main
from ediffi.spec import MAX_SEED
from tests.e2e.test_cli import _clean_env  # noqa: F401  (autouse: the caller's EDIFFI_* must not leak in)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: the cores are shared


def _generate(model_dir, out, seed: int, n: int) -> list[str]:
    return ["generate", "a red circle", "--model-dir", str(model_dir), "--steps", "1", "--sampler", "euler",
            "--seed", str(seed), "--n", str(n), "--out", str(out)]


@pytest.mark.parametrize(("seed", "n"), [(MAX_SEED, 2), (MAX_SEED - 1, 3), (-2, 1)])
def test_seed_out_of_range_for_its_last_image_is_refused(tiny_model_dir, tmp_path, capsys, seed, n):
    out = tmp_path / "x.png"
    assert main(_generate(tiny_model_dir, out, seed, n)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --seed: ") and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())  # nothing sampled


def test_seed_whose_last_image_is_max_seed_is_accepted(tiny_model_dir, tmp_path):
    out = tmp_path / "x.png"
    assert main(_generate(tiny_model_dir, out, MAX_SEED - 1, 2)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x-0.png", "x-1.png"]
