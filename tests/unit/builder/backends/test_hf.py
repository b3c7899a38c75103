"""The real transformers / diffusers backends on tiny random models.

The models are built from configs (tests/tiny_models.py), saved to a folder
and loaded back through each backend's own ``from_pretrained(path)`` code,
by registry name, exactly as a build with ``model = "<folder>"`` does. No
hub is reached (HF_HUB_OFFLINE=1, set in conftest.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DND_ATLAS_PROGRESS", "0")

import builder.backends.builtin  # noqa: F401  (registers the lazy backends)
from builder.backends.interfaces import CaptionItem
from builder.backends.registry import captioners, generators, similarities
from builder.errors import BackendError
from testkit import tiny_models

PROMPTS = ["a red dog", "a striped cat on grass", "a blue car"]


def _images(n: int) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 3 * i, 56, 3), dtype=np.uint8)) for i in range(n)]


def _items(n: int) -> list[CaptionItem]:
    return [CaptionItem(im, f"img{i}.png") for i, im in enumerate(_images(n))]


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    # tiny models on shared 2-core CPUs: one thread is 10-40x faster than two
    # busy-waiting ones (measured: BLIP 5 captions 2.6 s -> 0.1 s)
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_blip(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_blip(tmp_path_factory.mktemp("tiny-blip"))


@pytest.fixture(scope="session")
def tiny_blip2(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_blip2(tmp_path_factory.mktemp("tiny-blip2"))


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    return tiny_models.make_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def blip(tiny_blip):
    return captioners.create("blip", model=str(tiny_blip), device="cpu", batch_size=2, max_new_tokens=8)


@pytest.fixture(scope="module")
def sd(tiny_sd):
    # batch_size 4 with 3 prompts x 2 images: chunks mix prompts
    return generators.create("diffusers", model=str(tiny_sd), device="cpu", steps=2, batch_size=4)


@pytest.fixture(scope="module")
def sd_mixed(sd):
    """3 prompts x 2 images, seed 7, generated in chunks of 4 that mix prompts."""
    return sd.generate(PROMPTS, 2, seed=7)


@pytest.fixture(scope="module")
def clip(tiny_clip):
    return similarities.create("clip", model=str(tiny_clip), device="cpu", batch_size=3)


def test_registry_names():
    assert {"blip", "blip2"} <= set(captioners.names())
    assert "diffusers" in generators.names()
    assert {"clip", "sentence"} <= set(similarities.names())


# --- BLIP / BLIP-2 ---------------------------------------------------------------------------------


def test_blip_captions_are_strings_one_per_item_batched_equals_unbatched(blip):
    items = _items(5)
    batched = blip.caption(items)  # batch_size 2: batches of 2, 2, 1
    assert len(batched) == 5
    assert all(isinstance(c, str) and c.strip() for c in batched)
    assert [blip.caption([it])[0] for it in items] == batched
    assert blip.caption([]) == []


def test_blip_prompt_is_stripped_from_captions(tiny_blip):
    cap = captioners.create("blip", model=str(tiny_blip), device="cpu", prompt="a photo of", max_new_tokens=6)
    raw = cap.processor.batch_decode(
        cap.model.generate(**cap.processor(images=_images(1), text=["a photo of"], return_tensors="pt"),
                           max_new_tokens=6),
        skip_special_tokens=True,
    )[0]
    assert raw.startswith("a photo of")  # BLIP echoes the prefix...
    (caption,) = cap.caption(_items(1))
    assert caption == " ".join(raw.split())[len("a photo of"):].strip()  # ...the backend drops it
    assert cap._clean("A Photo of  a red dog") == "a red dog"


def test_blip_config_key_names_model_and_generation_params(tiny_blip, blip):
    key = blip.config_key()
    assert key["name"] == "blip" and key["model"] == str(tiny_blip)
    assert {"revision", "max_new_tokens", "min_length", "num_beams", "prompt", "dtype"} <= set(key)
    for change in ({"max_new_tokens": 9}, {"num_beams": 2}, {"min_length": 2}, {"prompt": "a picture of"}):
        opts = {"model": str(tiny_blip), "device": "cpu", "max_new_tokens": 8, **change}
        other = captioners.create("blip", **opts)
        assert other.config_key() != key, change
    # batch size and device do not change captions: same key
    same = captioners.create("blip", model=str(tiny_blip), device="cpu", batch_size=7, max_new_tokens=8)
    assert same.config_key() == key


def test_blip2_tiny_model_captions(tiny_blip2):
    cap = captioners.create("blip2", model=str(tiny_blip2), device="cpu", batch_size=2, max_new_tokens=5)
    items = _items(3)
    out = cap.caption(items)
    assert len(out) == 3 and all(isinstance(c, str) and c for c in out)
    assert [cap.caption([it])[0] for it in items] == out
    assert cap.config_key()["name"] == "blip2"
    prompted = captioners.create("blip2", model=str(tiny_blip2), device="cpu", prompt="a photo of",
                                 max_new_tokens=5)
    assert all(isinstance(c, str) and not c.startswith("a photo of") for c in prompted.caption(items))


def test_bad_model_paths_give_clear_backend_errors(tmp_path, tiny_clip):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(BackendError, match="no such local folder"):
        captioners.create("blip", model=str(missing), device="cpu")
    with pytest.raises(BackendError, match="does not hold a loadable BLIP model"):
        captioners.create("blip", model=str(tmp_path), device="cpu")
    # a CLIP folder is not a BLIP model either
    with pytest.raises(BackendError, match="cannot load BLIP model"):
        captioners.create("blip", model=str(tiny_clip), device="cpu")
    with pytest.raises(BackendError, match="HF_HUB_OFFLINE"):
        captioners.create("blip2", model="dnd-atlas-tests/no-such-model", device="cpu")
    with pytest.raises(BackendError, match="no such local folder"):
        similarities.create("clip", model=str(missing), device="cpu")
    with pytest.raises(BackendError, match="diffusers pipeline"):
        generators.create("diffusers", model=str(tmp_path), device="cpu")
    with pytest.raises(BackendError, match="unknown dtype"):
        captioners.create("blip", model=str(missing), device="cpu", dtype="float8")


# --- diffusers -------------------------------------------------------------------------------------


def test_diffusers_images_count_type_and_default_size(sd, sd_mixed):
    out = sd_mixed
    assert [len(x) for x in out] == [2, 2, 2]
    assert all(im.mode == "RGB" and im.size == (32, 32) for ims in out for im in ims)
    assert sd.config_key()["height"] == 32 and sd.config_key()["width"] == 32
    assert type(sd.pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert sd.pipe.scheduler.config.algorithm_type == "dpmsolver++"


def test_diffusers_image_depends_on_prompt_index_seed_not_batch(sd, sd_mixed):
    def px(im):
        return np.asarray(im, dtype=np.int16)

    mixed = sd_mixed  # chunks of 4 (prompt, i) pairs mix the prompts
    alone = sd.generate([PROMPTS[1]], 2, seed=7)[0]
    first = sd.generate([PROMPTS[1]], 1, seed=7)[0][0]
    for a, b in ((mixed[1][0], alone[0]), (mixed[1][1], alone[1]), (mixed[1][0], first)):
        # same noise, same model: equal up to float rounding of batched kernels
        assert np.abs(px(a) - px(b)).max() <= 2
    assert np.abs(px(mixed[1][0]) - px(mixed[1][1])).mean() > 5  # i changes the image
    assert np.abs(px(mixed[0][0]) - px(mixed[1][0])).mean() > 5  # the prompt changes it
    other_seed = sd.generate([PROMPTS[1]], 1, seed=8)[0][0]
    assert np.abs(px(other_seed) - px(first)).mean() > 5  # the seed changes it


def test_diffusers_requested_size_and_output_resize(tiny_sd):
    gen = generators.create("diffusers", model=str(tiny_sd), device="cpu", steps=1, height=48, width=40,
                            scheduler="ddim")
    (ims,) = gen.generate(["a cat"], 1, seed=0)
    assert ims[0].size == (40, 48)
    resized = generators.create("diffusers", model=str(tiny_sd), device="cpu", steps=1, output_size=(20, 24),
                                scheduler="euler")
    (ims,) = resized.generate(["a cat"], 2, seed=0)
    assert [im.size for im in ims] == [(20, 24), (20, 24)]


def test_diffusers_config_key_and_schedulers(tiny_sd, sd):
    key = sd.config_key()
    assert key["model"] == str(tiny_sd) and key["dtype"] == "float32"
    changes = ({"steps": 3}, {"scheduler": "ddim"}, {"guidance_scale": 5.0}, {"height": 48},
               {"negative_prompt": "blurry"}, {"revision": None, "scheduler": "default"})
    for change in changes:
        opts = {"model": str(tiny_sd), "device": "cpu", "steps": 2, **change}
        other = generators.create("diffusers", **opts)
        assert other.config_key() != key, change
    default = generators.create("diffusers", model=str(tiny_sd), device="cpu", scheduler="default")
    assert type(default.pipe.scheduler).__name__ == "DDIMScheduler"  # the pipeline's own
    with pytest.raises(BackendError, match="unknown scheduler"):
        generators.create("diffusers", model=str(tiny_sd), device="cpu", scheduler="lms-karras")


def test_diffusers_negative_prompt_runs(tiny_sd):
    gen = generators.create("diffusers", model=str(tiny_sd), device="cpu", steps=1, negative_prompt="blurry")
    (ims,) = gen.generate(["a dog"], 1, seed=0)
    plain = generators.create("diffusers", model=str(tiny_sd), device="cpu", steps=1)
    (ims2,) = plain.generate(["a dog"], 1, seed=0)
    assert np.abs(np.asarray(ims[0], np.int16) - np.asarray(ims2[0], np.int16)).max() > 0


# --- CLIP --------------------------------------------------------------------------------------------


def test_clip_embeddings_normalized_float32_with_right_dims(clip):
    imgs = clip.embed_images(_images(7))  # batch_size 3: 3, 3, 1
    texts = clip.embed_texts(["a red dog", "a cat " * 40, "sky"])  # the long one is truncated
    assert imgs.shape == (7, 16) and texts.shape == (3, 16)
    assert imgs.dtype == np.float32 and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(imgs, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert clip.embed_images([]).shape == (0, 16)


def test_clip_batching_does_not_change_embeddings(tiny_clip, clip):
    big = similarities.create("clip", model=str(tiny_clip), device="cpu", batch_size=64)
    imgs = _images(7)
    np.testing.assert_allclose(big.embed_images(imgs), clip.embed_images(imgs), atol=1e-5)
    np.testing.assert_allclose(big.embed_texts(PROMPTS), clip.embed_texts(PROMPTS), atol=1e-5)
    assert big.config_key() == clip.config_key()


def test_clip_describe_and_config_key(tiny_clip, clip):
    line = clip.describe()
    assert isinstance(line, str) and "\n" not in line and str(tiny_clip) in line
    key = clip.config_key()
    assert key["name"] == "clip" and key["model"] == str(tiny_clip) and key["text_embedder"] == "clip"


def test_sentence_text_embedder_gives_sentence_vectors_and_clip_images(tiny_clip, minilm):
    sim = similarities.create("sentence", model=str(tiny_clip), device="cpu", text_embedder="minilm")
    texts = sim.embed_texts(["a red dog", "a dog that is red"])
    assert texts.shape == (2, minilm.dim) and texts.dtype == np.float32
    np.testing.assert_allclose(texts, minilm.embed(["a red dog", "a dog that is red"]), atol=1e-5)
    assert sim.embed_images(_images(2)).shape == (2, 16)
    assert "minilm" in sim.describe()
    assert sim.config_key()["name"] == "sentence" and sim.config_key()["text_embedder"] == "minilm"
    via_clip = similarities.create("clip", model=str(tiny_clip), device="cpu", text_embedder="minilm")
    assert via_clip.embed_texts(["sky"]).shape == (1, minilm.dim)
    with pytest.raises(BackendError, match="text_embedder"):
        similarities.create("clip", model=str(tiny_clip), device="cpu", text_embedder="no-such-embedder")


# --- GPU (run with -m gpu on a CUDA machine) ---------------------------------------------------------


@pytest.mark.gpu
def test_gpu_fp16_auto_and_batch_independence(tiny_sd, tiny_blip, tiny_clip):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = generators.create("diffusers", model=str(tiny_sd), steps=2, batch_size=4)
    assert gen.device.type == "cuda" and gen.config_key()["dtype"] == "float16"
    mixed = gen.generate(PROMPTS, 2, seed=3)
    alone = gen.generate([PROMPTS[2]], 2, seed=3)[0]
    for a, b in zip(mixed[2], alone):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 2
    cap = captioners.create("blip", model=str(tiny_blip))
    assert cap.dtype == torch.float16 and all(isinstance(c, str) for c in cap.caption(_items(3)))
    sim = similarities.create("clip", model=str(tiny_clip))
    e = sim.embed_images(_images(3))
    assert e.dtype == np.float32 and np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-3)


# --- the three together in a build -------------------------------------------------------------------


def test_build_with_blip_diffusers_and_clip(tmp_path, tiny_blip, tiny_sd, tiny_clip):
    """A small build selects the real backends by name from the config and
    records them in the atlas meta (about 5 s on one thread)."""
    import duckdb

    from builder.config import BuildConfig
    from builder.pipeline.run import build
    from builder.synthetic.probe import write_probe_set

    probe = write_probe_set(tmp_path / "probe", n=24, seed=3, progress=False)
    cfg = BuildConfig.from_dict({
        "out": str(tmp_path / "atlas"), "chunk_size": 4,
        "models": [{"name": "planted", "target": "planted", "probe": str(probe), "layers": ["detectors"]}],
        "describe": {"captioner": "blip", "captioner_options": {"model": str(tiny_blip), "max_new_tokens": 6}},
        "dissect": {"generator": "diffusers", "generator_options": {"model": str(tiny_sd), "steps": 1},
                    "similarity": "clip", "similarity_options": {"model": str(tiny_clip)}},
    })
    build(cfg)
    con = duckdb.connect(str(tmp_path / "atlas" / "atlas.duckdb"), read_only=True)
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        labels = [r[0] for r in con.execute("SELECT text FROM labels").fetchall()]
        n_ok = con.execute("SELECT count(*) FROM neurons WHERE status = 'ok'").fetchone()[0]
    finally:
        con.close()
    assert "CLIP" in json.loads(meta["similarity"])
    gen = json.loads(meta["generator_config"])
    assert gen["name"] == "diffusers" and gen["model"] == str(tiny_sd) and gen["steps"] == 1
    assert n_ok > 0 and labels and all(isinstance(t, str) and t for t in labels)
