"""The benchmarks' code paths, at smoke size (slow: `make test-all`)."""

import pytest


@pytest.mark.slow
def test_gpu_shapes_smoke_runs_the_whole_pipeline():
    from bench.gpu_shapes import run

    out = run(smoke=True, neurons=2, probe_images=30)
    assert out["gpu_shapes_neurons"] == "2"
    assert float(out["gpu_shapes_s_per_neuron_generate"]) > 0


def test_gpu_shapes_says_when_there_is_no_gpu():
    import torch

    from bench.gpu_shapes import run

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert "no CUDA device" in run()["gpu_shapes"]
