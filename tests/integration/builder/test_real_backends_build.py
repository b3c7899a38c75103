"""The wiring of the real backends, end to end on the CPU: a build of the
synthetic world's planted model with a tiny BLIP captioner, the `openai`
summarizer over real HTTP against an OpenAI-compatible server on 127.0.0.1,
a tiny Stable Diffusion pipeline generating the candidates' images and a
tiny CLIP for image similarity. Tiny models are built from configs and
loaded through the same from_pretrained(path) code as hub ids."""

from __future__ import annotations

import json

import duckdb
import pytest

from builder.config import BuildConfig
from builder.pipeline.run import build
from builder.synthetic.probe import write_probe_set
from testkit.openai_server import Reply, ScriptedServer
from testkit.tiny_models import make_tiny_blip, make_tiny_clip, make_tiny_sd

CONCEPTS = ["red", "blue circle", "striped", "grass", "star"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {
        "blip": make_tiny_blip(root / "blip"),
        "clip": make_tiny_clip(root / "clip"),
        "sd": make_tiny_sd(root / "sd"),
        "probe": write_probe_set(root / "probe", n=40, seed=11, progress=False),
    }


def test_build_with_blip_openai_diffusers_clip(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with ScriptedServer(default=Reply(json.dumps(CONCEPTS))) as srv:
        cfg = BuildConfig.from_dict({
            "out": str(tmp_path / "atlas"),
            "device": "cpu",
            "models": [{"name": "planted", "target": "planted", "probe": str(tiny["probe"]),
                        "layers": ["detectors"]}],
            "record": {"top_k": 4},
            "describe": {
                "captioner": "blip", "captioner_options": {"model": str(tiny["blip"]), "max_new_tokens": 8},
                "summarizer": "openai",
                "summarizer_options": {"model": "stub-model", "base_url": srv.base_url, "max_retries": 0},
            },
            "dissect": {
                "generator": "diffusers",
                "generator_options": {"model": str(tiny["sd"]), "steps": 2, "scheduler": "ddim"},
                "images_per_concept": 3, "beta": 2,
                "similarity": "clip", "similarity_options": {"model": str(tiny["clip"]), "text_embedder": "minilm"},
            },
        })
        summary = build(cfg)
        n_requests = len(srv.chat_requests)
        auth = srv.chat_requests[0].headers.get("authorization")
    m = summary.models[0]
    assert m.ok == 18 and m.failed == 0
    assert auth == "Bearer test-key"
    con = duckdb.connect(str(tmp_path / "atlas" / "atlas.duckdb"), read_only=True)
    try:
        # every neuron got the LLM's five candidates, scored with generated images
        rows = con.execute("SELECT unit, list(concept ORDER BY position), count(score) FROM candidates GROUP BY unit").fetchall()
        assert len(rows) == 18
        assert all(r[1] == CONCEPTS and r[2] == 5 for r in rows)
        # one LLM request per distinct set of captions; none made twice
        calls = dict(con.execute(
            "SELECT stage, sum(calls) FROM call_counts GROUP BY stage").fetchall())
        assert calls["summarizer_requests"] == n_requests <= 18
        # the same five prompts serve all 18 neurons: 5 x Q images generated once
        assert calls["generated_images"] == 5 * 3
        samples = [s for (s,) in con.execute("SELECT samples FROM candidates").fetchall()]
        assert all(len(json.loads(s)) == 3 for s in samples)
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        assert "clip" in json.loads(meta["similarity"]).lower()
        caps = con.execute("SELECT DISTINCT captioner FROM captions").fetchall()
        assert caps == [("blip",)]
    finally:
        con.close()
    for s in samples[:3]:
        for p in json.loads(s):
            assert (tmp_path / "atlas" / p).is_file()
