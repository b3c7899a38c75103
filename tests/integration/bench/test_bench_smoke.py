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


def test_site_bench_smoke_has_photographic_thumbnails():
    from bench.site import run_one
    from bench.site_atlas import BenchAtlas

    out = run_one("tiny", BenchAtlas(n_layers=2, units=300, n_probe=200, n_concepts=40,
                                     photo=True, dim=16))
    assert out["site_pages_tiny"] == "7"   # home, model, 2 layers, neuron, search, 404
    assert 3.0 <= float(out["site_image_kb_mean_tiny"]) <= 6.0   # the weight of real photos
    assert int(out["site_images_tiny"]) <= 200 + 40 * 3          # each image once
    assert float(out["site_build_s_tiny"]) > 0


@pytest.mark.slow
def test_search_bench_times_both_query_embedders():
    from bench.search import run

    out = run(n_labels=3000, n_queries=5)
    assert out["search_labels"] == "3000"
    for key in ("search_p50_ms", "search_p95_ms", "search_p50_ms_onnx", "search_p95_ms_onnx"):
        assert float(out[key]) > 0, key
    assert float(out["search_p50_ratio_st_vs_onnx"]) > 0


@pytest.mark.slow
def test_cold_search_bench_starts_the_onnx_path_without_torch():
    from bench.cold_search import run

    out = run(rounds=1)
    assert 0 < float(out["cold_search_cpu_s_onnx"]) < float(out["cold_search_cpu_s_st"])
    assert float(out["cold_search_rss_mb_onnx"]) < float(out["cold_search_rss_mb_st"])


@pytest.mark.slow
def test_large_search_bench_searches_through_the_embedder_the_merged_atlas_carries():
    from bench.search import run_large

    out = run_large(n_labels=3000, n_queries=5)
    assert out["search_labels_1m"] == "3000"
    assert out["search_embed_ms_1m"].endswith("(OnnxEmbedder)")  # merge kept the shards' embedder
    assert float(out["search_recall_at_10_1m"]) == 1.0  # 3,000 labels: an exact index
    for key in ("search_p50_ms_1m", "search_p50_ms_1m_no_embed", "search_p50_ms_1m_st_embedder"):
        assert float(out[key]) > 0, key
