"""A ViT target end to end: block outputs are neurons summarized over the
cls token or the patch tokens, and attention crops come from the patch map."""

import duckdb
import pytest

from builder.config import BuildConfig
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set


@pytest.mark.parametrize("tokens", ["cls", "patches"])
def test_vit_blocks_are_dissected(tmp_path, tokens, monkeypatch):
    probe = write_probe_set(tmp_path / "probe", n=60, seed=5, progress=False)
    cfg = BuildConfig.from_dict({
        "out": str(tmp_path / "atlas"),
        "models": [{"name": "vit", "target": "testkit.vit_factory:tiny_vit", "probe": str(probe),
                    "layers": ["encoder.layers.encoder_layer_1", "heads.head"], "vit_tokens": tokens}],
        "record": {"top_k": 5},
        "describe": {"n_candidates": 3},
        "dissect": {"images_per_concept": 4, "beta": 2, "similarity_options": {"target": "demo-cnn"}},
    })
    summary = build(cfg)
    assert summary.models[0].ok + summary.models[0].dead == 16 + 5
    con = duckdb.connect(str(tmp_path / "atlas" / "atlas.duckdb"), read_only=True)
    kinds = dict(con.execute("SELECT layer, kind FROM layers").fetchall())
    assert kinds == {"encoder.layers.encoder_layer_1": "vit", "heads.head": "linear"}
    crops = con.execute(
        "SELECT count(*) FROM evidence WHERE layer = 'encoder.layers.encoder_layer_1' AND x0 IS NOT NULL"
    ).fetchone()[0]
    head_crops = con.execute("SELECT count(*) FROM evidence WHERE layer = 'heads.head' AND x0 IS NOT NULL").fetchone()[0]
    con.close()
    assert crops > 0, "crops come from the patch-token map"
    assert head_crops == 0, "a linear layer has no map to crop from"
