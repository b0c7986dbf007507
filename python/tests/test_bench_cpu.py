"""python -m pallas_flash.bench.cpu on tiny shapes: every row is timed, the JSON carries them and the
ratios, and bad flags are refused naming the flag."""

import json

import pytest

from pallas_flash import cpu_kernels
from pallas_flash.bench import cpu


@pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ CPU kernels are not built")
def test_a_tiny_run_times_every_row(tmp_path, capsys):
    out = tmp_path / "cpu.json"
    assert cpu.main(["--seq", "64", "--heads", "2", "--dim", "32", "--small", "1,1,16,32", "--repeats", "1",
                     "--pflash", "", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    names = [row["impl"] for row in data["rows"]]
    assert names == ["pallas_flash (C++ via XLA FFI)", "jax.nn.dot_product_attention (xla)",
                     "pallas_flash (C++ via XLA FFI)", "jax.grad of reference_attention",
                     "jax.grad of dot_product_attention", "pallas_flash (C++ via XLA FFI)",
                     "pallas_flash interpret=True (Pallas)"]
    assert all(row["median_s"] > 0 and row["tflops"] > 0 for row in data["rows"])
    # fwd at 4 * B * H * N^2 * D, fwd+bwd 3.5 times that
    assert data["rows"][0]["tflops"] * data["rows"][0]["median_s"] * 1e12 == pytest.approx(4 * 2 * 64 * 64 * 32)
    assert data["rows"][2]["tflops"] * data["rows"][2]["median_s"] * 1e12 == pytest.approx(3.5 * 4 * 2 * 64 * 64 * 32)
    assert data["summary"]["ffi_over_cli"] is None  # no CLI given
    assert data["summary"]["speedup_vs_xla"] > 0
    assert "no pflash CLI found" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [(["--seq", "0"], "--seq: expected a positive integer, got 0"),
                                           (["--small", "1,2,3"], "--small: expected four positive integers")])
def test_bad_flags_name_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit):
        cpu.parse_args(argv)
    assert message in capsys.readouterr().err
