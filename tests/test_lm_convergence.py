"""benchmarks/lm_convergence.py: the --smoke protocol end to end (both optimizers train, the
table and plot come out, a rerun resumes from the cache), and its parts against plain oracles."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


lm = _load("_lm")
bench = _load("lm_convergence")


def test_split_is_by_name_fixed_and_disjoint() -> None:
    names = [f"pkg/mod{i}.py" for i in range(50)]
    train, val = lm._split(names)
    assert lm._split(list(reversed(names))) == (train, val)  # file-system order does not matter
    assert set(train) | set(val) == set(names) and not set(train) & set(val)
    assert len(val) == 5


def test_corpus_windows_are_next_byte_targets() -> None:
    corpus = lm.topics_corpus()
    assert len(corpus["train"]) > 300_000 and len(corpus["val"]) > 10_000
    data = torch.arange(100, dtype=torch.uint8)
    x, y = lm.windows(data, torch.tensor([3, 40]), 8)
    assert x.tolist() == [list(range(3, 11)), list(range(40, 48))]
    assert y.tolist() == [list(range(4, 12)), list(range(41, 49))]


def test_validation_bpb_of_a_uniform_model_is_8_bits() -> None:
    class Uniform(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(*x.shape, 256)

    val = torch.randint(0, 256, (5000,), dtype=torch.uint8)
    starts = torch.arange(0, 4000, 37)
    assert bench.validation_bpb(Uniform(), val, starts, 16, "cpu") == pytest.approx(
        8.0, abs=1e-5
    )  # float32 logits


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    f = bench.schedule(100)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(99) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(9, 99))


def test_model_groups_decay_matrices_only() -> None:
    model = lm.ByteLM(layers=1, d=16, heads=2, context=8)
    decay, no_decay = lm.param_groups(model, 0.1)
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == sum(
        p.numel() for p in model.parameters()
    )
    assert all(p.dim() == 2 for p in decay["params"]) and all(
        p.dim() == 1 for p in no_decay["params"]
    )
    assert no_decay["weight_decay"] == 0.0
    assert model(torch.zeros(3, 8, dtype=torch.long)).shape == (3, 8, 256)


def test_smoke_protocol_end_to_end_and_resume(tmp_path, capsys) -> None:
    out = tmp_path / "out"
    assert bench.main(["--smoke", "--no-progress", "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert (
        "AdamW" in printed and "Shampoo (Adam grafting)" in printed and "final val bpb" in printed
    )
    runs = json.loads((out / "runs.json").read_text())
    assert sorted(r["optimizer"] for r in runs.values()) == ["AdamW", "Shampoo (Adam grafting)"]
    a, s = (
        next(r for r in runs.values() if r["optimizer"] == n)
        for n in ("AdamW", "Shampoo (Adam grafting)")
    )
    # same seed: the same initial model for both optimizers, so the same step-0 validation loss
    assert a["curve"][0][2] == s["curve"][0][2]
    assert a["curve"][0][2] == pytest.approx(8.0, abs=0.1)  # an untrained model is near uniform
    for r in (a, s):
        assert [p[0] for p in r["curve"]] == [0, 10, 20, 30, 40] and not r["diverged"]
        assert all(math.isfinite(p[2]) for p in r["curve"])
        assert r["curve"][-1][2] < 6.5  # both learned something in 40 steps
        assert r["optimizer_ms"] > 0 and r["forward_backward_ms"] > 0
    pytest.importorskip("matplotlib")
    assert (out / "lm_convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun trains nothing: the cached runs are reported unchanged
    before = (out / "runs.json").read_text()
    assert bench.main(["--smoke", "--no-progress", "--out-dir", str(out), "--report-only"]) == 0
    assert (out / "runs.json").read_text() == before
    assert capsys.readouterr().out.count("Shampoo (Adam grafting)") == 1
