"""The benchmark runs on CPU with tiny configs and writes the agreed fields (no timing asserted)."""

import json

import pytest
import torch

from gpsr.benchmark import run_benchmark
from gpsr.inference import GPSR
from tests.helpers import compose_cfg

TINY = [
    "model/flow=small",
    "model/unet=small",
    "size=32",
    "repeats=1",
    "warmup=0",
    "batches.flow_train=[2]",
    "batches.ddpm_train=[2]",
    "batches.flow_inverse=[2]",
    "batches.sample_7=[2]",
    "batches.sample_100=[1]",
]


def test_benchmark_rows_and_trust_columns(tmp_path, ddpm_ckpt):
    cfg = compose_cfg(
        [*TINY, f"trust.ckpt={ddpm_ckpt}", "trust.images=4", f"demo.ckpt={ddpm_ckpt}",
         "demo.sides=[8]", "demo.rounds=2"],
        name="benchmark", output_dir=tmp_path,
    )  # fmt: skip
    run_benchmark(cfg)
    data = json.loads((tmp_path / "benchmark.json").read_text())
    rows = data["rows"]
    names = {"flow_train", "ddpm_train", "flow_inverse", "sample_7", "sample_100", "matmul_2048"}
    demo = [r for r in rows if r["name"] == "demo_sample_7_lr8"]
    rows = [r for r in rows if r not in demo]
    assert {(r["name"], r["mode"]) for r in rows} == {
        (n, m) for n in names for m in ("reference", "optimized")
    }
    for r in rows:
        if r["name"] == "matmul_2048":  # 2 n^3 FLOPs in the row's seconds
            assert r["tflops"] == pytest.approx(2 * 2048**3 / r["seconds"] / 1e12)
    # The trained model's rows: fp32 and auto, seconds per output megapixel of 8 * scale
    # pixels a side, the consistency of each sample.
    assert [r["mode"] for r in demo] == ["reference", "optimized"]
    assert demo[0]["precision"] == "fp32" and demo[1]["precision"] in ("fp32", "bf16")
    megapixels = (8 * GPSR.load(ddpm_ckpt).scale) ** 2 / 1e6
    for r in demo:
        assert r["seconds_per_mp"] == pytest.approx(r["seconds"] / megapixels)
        assert r["consistency_x1e5"] > 0  # random LR images: not reachable exactly
    assert "s / output MP" in (tmp_path / "benchmark.md").read_text()
    for r in rows:
        assert set(r) >= {"name", "mode", "batch", "img_per_s", "tflops", "peak_gib", "device"}
        assert r["img_per_s"] > 0 and r["tflops"] > 0 and r["device"].startswith("CPU")
    trust = {t["mode"]: t for t in data["trust"]}
    assert trust["reference"]["invertibility_max_abs"] < 1e-5  # fp32 inverts to float precision
    assert trust["optimized"]["invertibility_max_abs"] < 1e-2
    assert "speed-up" in (tmp_path / "benchmark.md").read_text()
    # On a CPU the sampling rows and the trained model's rows time both modes in interleaved
    # rounds: the optimized row carries each round's ratio (repeats=1, demo.rounds=2) and
    # their median; rows timed one mode after the other carry none.
    for r in data["rows"]:
        rounds = r.get("speedup_rounds")
        if r["mode"] == "optimized" and r["name"] in ("sample_7", "sample_100"):
            assert len(rounds) == 1 and r["speedup"] == rounds[0]
        elif r["mode"] == "optimized" and r["name"].startswith("demo_"):
            assert len(rounds) == 2 and r["speedup"] == pytest.approx(sum(rounds) / 2)
        else:
            assert rounds is None
    assert "interleaved rounds" in (tmp_path / "benchmark.md").read_text()


def test_interleaved_rounds_cancel_a_drift_that_sequential_timing_does_not():
    """`interleaved_seconds` against a simulated machine that slows down 3x halfway through:
    B costs exactly twice A at any moment, so each round's ratio must be exactly 2, while
    medians of A's calls and then B's calls (one after the other) would give 6."""
    from gpsr.utils.timing import interleaved_seconds, median_seconds, paired_ratios

    now, calls = [0.0], []

    def work(name, units):
        def run():
            calls.append(name)
            slow = 3.0 if now[0] >= 12 else 1.0
            now[0] += units * slow

        return run

    cpu = torch.device("cpu")
    seconds = interleaved_seconds(
        {"a": work("a", 1.0), "b": work("b", 2.0)}, cpu, warmup=1, rounds=6, clock=lambda: now[0]
    )
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] * 3  # warm-up, then A B, B A, ...
    assert paired_ratios(seconds["b"], seconds["a"]) == [2.0] * 6
    assert seconds["a"] == [1, 1, 1, 3, 3, 3] and seconds["b"] == [2, 2, 2, 6, 6, 6]
    # The same drift timed one function after the other: what the interleaving avoids.
    import time

    with pytest.MonkeyPatch.context() as mp:
        now[0] = 7.0  # A's 5 calls end at 12, when the machine slows down
        mp.setattr(time, "perf_counter", lambda: now[0])
        a = median_seconds(work("a", 1.0), cpu, 0, 5)
        b = median_seconds(work("b", 2.0), cpu, 0, 5)
    assert b / a == 6.0
    with pytest.raises(ValueError, match="equal, non-empty"):
        paired_ratios([1.0], [])


def test_flop_model_matches_flops_counted_on_the_real_operations(tmp_path):
    """The benchmark's TFLOP/s use a model (training = 3 x forward, 7+1 sampling = 7 UNet
    calls + 1 flow pass); torch's FLOP counter on the real operations must agree with it."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from gpsr.benchmark import Setup, _flop_counts

    cfg = compose_cfg(TINY, name="benchmark", output_dir=tmp_path)
    cpu = torch.device("cpu")
    model = _flop_counts(cfg, cpu)
    setup = Setup(cfg, "reference", cpu)
    x = setup.images(2, cfg.size)
    for name, run in (
        ("flow_train", lambda: setup.flow_train(x)),
        ("ddpm_train", lambda: setup.ddpm_train(x)),
        ("sample_7", lambda: setup.sample(x, 7)),
        ("flow_inverse", lambda: setup.flow_inverse(x)),
    ):
        counter = FlopCounterMode(display=False)
        with counter:
            run()
        counted = counter.get_total_flops()
        assert abs(counted / model[name](2) - 1) < 0.1, (name, counted, model[name](2))
