"""benchmarks/accelerator.py end to end at its tiny shape, on the simulated CPU devices."""

import math
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks import accelerator  # noqa: E402


@pytest.mark.slow
def test_the_accelerator_benchmark_reports_every_figure(capsys):
    result = accelerator.main(["--small", "--skip-hf"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    jz = result["jaxzero"]
    assert jz["rows"] == 8 and jz["generated_tokens"] == 8 * 8  # every rollout full length
    for key in ("rollout_tokens_per_s", "decode_roofline", "update_tflops", "update_mfu",
                "plan_peak_gib", "decode_streamed_gib"):
        assert math.isfinite(jz[key]) and jz[key] > 0, key
    # The copy (tiny, bf16) is streamed once per decode step: 7 steps after the first token.
    assert jz["decode_streamed_gib"] * 2 ** 30 >= 7 * accelerator.model_config(
        accelerator.parse_args(["--small"])).num_params() * 2
    assert jz["peak_memory_gib"] is None and jz["plan_vs_peak"] is None  # CPUs report none
    assert jz["decode_layout"] == "replicated"
    assert result["transformers"] == {"skipped": "--skip-hf"}
    assert result["hardware"]["copy_gbps"] > 0 and result["hardware"]["matmul_tflops_bf16"] > 0
