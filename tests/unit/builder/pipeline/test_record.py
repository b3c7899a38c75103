"""Recording: hooks never leak, layer names are checked, and the streaming
top-K equals the top-K of the full images x neurons matrix."""

import numpy as np
import pytest
import torch
from PIL import Image

from builder.backends.layers import activation_maps, hooked, summarize
from builder.backends.targets import Target
from builder.errors import LayerError
from builder.pipeline.record import TopK, record_topk
from builder.probe import ProbeSet


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 6, 3, padding=1)
        self.fc = torch.nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def to_tensor(im):
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.fixture()
def probe(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(37):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "sub" / "x.jpg")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    return ProbeSet.scan(tmp_path)


def test_streaming_top_k_equals_full_matrix(probe):
    model = Tiny().eval()
    target = Target("tiny", model, to_tensor, torch.device("cpu"))
    records, stats = record_topk(target, probe, ["conv", "fc"], top_m=5, batch_size=4)
    assert stats.images == 38 and stats.skipped == 1
    # the full matrix, computed directly
    good = [i for i, f in enumerate(probe.files) if f != "bad.png"]
    x = torch.stack([to_tensor(probe.open(i)) for i in good])
    with torch.no_grad():
        conv = model.conv(x).mean(dim=(2, 3)).numpy()
        fc = model(x).numpy()
    for name, full in [("conv", conv), ("fc", fc)]:
        rec = records[name]
        for unit in range(full.shape[1]):
            order = np.argsort(-full[:, unit], kind="stable")[:5]
            assert rec.top_idx[unit].tolist() == [good[j] for j in order]
            np.testing.assert_allclose(rec.top_vals[unit], full[order, unit], rtol=1e-5, atol=1e-6)
            assert rec.max_act[unit] == pytest.approx(full[:, unit].max(), rel=1e-5)
    assert records["conv"].kind == "conv" and records["conv"].has_maps
    assert records["fc"].kind == "linear" and not records["fc"].has_maps
    assert stats.peak_state_bytes < len(good) * 10 * 4 * 4  # O(neurons x M), not images x neurons


def test_hooks_are_removed_even_when_the_forward_fails():
    model = Tiny()

    def sink(name, out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        with hooked(model, ["conv"], sink):
            model(torch.zeros(1, 3, 8, 8))
    assert not model.conv._forward_hooks


def test_unknown_layer_lists_the_valid_ones(probe):
    target = Target("tiny", Tiny(), to_tensor, torch.device("cpu"))
    with pytest.raises(LayerError, match="valid layers: conv, fc"):
        record_topk(target, probe, ["conv", "layer9"], top_m=3)


def test_topk_state_is_bounded():
    tk = TopK(3)
    for start in range(0, 100, 10):
        tk.update(torch.arange(start, start + 10, dtype=torch.float32).view(10, 1).repeat(1, 2), torch.arange(start, start + 10))
    assert tk.vals.shape == (2, 3)
    assert tk.idx[0].tolist() == [99, 98, 97]


def test_vit_tokens_summaries_and_maps():
    out = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # cls + 2x2 patches, 3 channels
    assert torch.equal(summarize(out, "mean", "cls"), out[:, 0, :])
    assert torch.allclose(summarize(out, "mean", "patches"), out[:, 1:, :].mean(dim=1))
    maps = activation_maps(out)
    assert maps.shape == (2, 3, 2, 2)
    assert maps[0, 1, 0, 0] == out[0, 1, 1]


# -- hostile probe folders: odd sizes never abort a batch, skips are counted ---------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", ["planted", "demo-cnn"])
def test_recording_a_hostile_folder_counts_every_skip(tmp_path, spec):
    from builder.backends.targets import fit_to_probe, load_target
    from testkit.hostile import add_hostile_entries

    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    entries = add_hostile_entries(tmp_path / "wild")
    probe = ProbeSet.scan(tmp_path)
    target = fit_to_probe(load_target(spec, spec, {}, torch.device("cpu")), probe)
    layer = "detectors" if spec == "planted" else "fc"
    records, stats = record_topk(target, probe, [layer], top_m=5, batch_size=4)
    n_read = sum(e.outcome == "read" for e in entries)
    assert stats.images == 6 + n_read  # the 1 x 1, CMYK, 16-bit, palette, GIF and rotated images are recorded
    assert stats.skipped == sum(e.outcome in ("rejected", "skipped") for e in entries)
    assert records[layer].top_idx.max() < len(probe)


def test_changed_sources_fails_only_the_neurons_showing_the_file(probe):
    from builder.pipeline.record import changed_sources

    target = Target("tiny", Tiny().eval(), to_tensor, torch.device("cpu"))
    records, _ = record_topk(target, probe, ["fc"], top_m=6)
    rec = records["fc"]
    victim = int(rec.top_idx[0, 0])
    (probe.root / probe.files[victim]).unlink()
    gone = changed_sources(probe, records, [("fc", u) for u in range(4)], top_k=2)
    users = {u for u in range(4) if victim in rec.top_idx[u, :2]}
    assert set(gone) == {("fc", u) for u in users} and ("fc", 0) in gone
    assert gone[("fc", 0)] == f"probe file {probe.files[victim]!r} vanished after recording"
