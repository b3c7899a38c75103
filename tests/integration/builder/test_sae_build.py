"""Dictionary latents through the whole build: the planted dictionary's
latents are labelled with their concepts, its dead latents are marked, latent
maps give crops, and shards of a latent layer merge into the single build."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from builder.config import BuildConfig
from builder.evaluation.synthetic import evaluate_synthetic
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set
from query import Atlas
from query.merge import merge_atlases
from testkit.atlas_tables import tables

N_PROBE = 160
PLANTED_DICTIONARY = {
    "name": "planted-dictionary", "target": "planted-mixed", "layers": ["sae.mixed"],
    "target_options": {"dictionaries": [{"layer": "mixed", "path": "planted-mixed"}]},
}
CNN_LATENTS = {  # a sample of the demo dictionary's latents keeps the build short
    "name": "cnn", "target": "demo-cnn", "layers": ["sae.conv4"], "units": [0, 1, 2, 3],
    "target_options": {"dictionaries": [{"layer": "conv4", "path": "demo-cnn-conv4"}]},
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Path:
    return Path(write_probe_set(tmp_path_factory.mktemp("probe"), n=N_PROBE, seed=3, progress=False))


def config(probe: Path, out: Path, **extra) -> BuildConfig:
    data = {
        "out": str(out),
        "chunk_size": 8,
        "models": [{**m, "probe": str(probe)} for m in (PLANTED_DICTIONARY, CNN_LATENTS)],
        "dissect": {"similarity_options": {"target": "demo-cnn"}},
        **extra,
    }
    return BuildConfig.from_dict(data)


@pytest.fixture(scope="module")
def reference(probe, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "atlas"
    build(config(probe, out))
    return out


def test_planted_dictionary_latents_are_labelled_with_their_concepts(reference):
    result = evaluate_synthetic(reference, mpnet=False)
    units = [u for u in result["units"] if u["layer"] == "sae.mixed"]
    assert len(units) == 18  # the two dead latents have no concept
    rate = sum(u["match"] for u in units) / len(units)
    assert rate >= 0.9, [u for u in units if not u["match"]]


def test_dead_latents_are_marked_and_latent_maps_give_crops(reference):
    with Atlas.open(reference) as atlas:
        layers = {(lay.model, lay.layer): lay for lay in atlas.layers()}
        latents = layers[("planted-dictionary", "sae.mixed")]
        assert (latents.n_units, latents.kind) == (20, "conv")
        assert (latents.n_dead, latents.n_ok) == (2, 18)
        assert atlas.neuron("planted-dictionary", "sae.mixed", 19).status == "dead"
        red = atlas.neuron("planted-dictionary", "sae.mixed", 0)
        assert "red" in red.labels[0].text
        assert any(e.box is not None for e in red.evidence), "crops come from the latent's own map"
        cnn = layers[("cnn", "sae.conv4")]
        assert cnn.n_units == 256 and cnn.n_ok + cnn.n_dead + cnn.n_failed == 4
        assert atlas.search("red", k=3, model="planted-dictionary")[0].layer == "sae.mixed"
    con = duckdb.connect(str(reference / "atlas.duckdb"), read_only=True)
    try:
        (stored,) = con.execute("SELECT config FROM models WHERE model = 'planted-dictionary'").fetchone()
    finally:
        con.close()
    assert "planted-mixed" in stored  # classify and cosy reload the target with its dictionary


@pytest.mark.slow
def test_shards_of_latent_layers_merge_into_the_single_build(probe, reference, tmp_path):
    shards = [tmp_path / f"shard-{i}" for i in range(2)]
    for i, out in enumerate(shards):
        build(config(probe, out, shard=f"{i}/2"))
    merged = tmp_path / "merged"
    merge_atlases(merged, shards)
    assert tables(merged) == tables(reference)
