"""Sparse-autoencoder dictionaries as layers: loading (SAELens folders and
plain state dicts), encoding (ReLU / TopK / JumpReLU), attaching to conv,
linear and ViT-shaped hosts, one-line errors, the planted dictionary and the
shipped demo dictionary."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from builder.backends.sae import (
    DictionaryError,
    EncoderConfig,
    SparseAutoencoder,
    attach_dictionaries,
    attach_dictionary,
    detach_dictionaries,
    load_dictionary,
    load_saelens,
    parse_dictionary_specs,
    save_saelens,
)
from builder.backends.targets import Target, load_target
from builder.config import BuildConfig
from builder.errors import ConfigError, LayerError
from builder.pipeline.record import hooked, record_topk

CPU = torch.device("cpu")

# A 2 -> 3 dictionary whose latents are easy to compute by hand.
W_ENC = [[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]
B_ENC = [0.0, -0.5, 0.25]
B_DEC = [0.5, 0.0]
X = [1.5, 1.0]  # x - b_dec = [1, 1]; h = [1, 1, 0] + b_enc = [1, 0.5, 0.25]


def hand_weights(**extra) -> dict[str, torch.Tensor]:
    w = {"W_enc": torch.tensor(W_ENC), "b_enc": torch.tensor(B_ENC),
         "W_dec": torch.tensor(W_ENC).T.contiguous(), "b_dec": torch.tensor(B_DEC)}
    return {**w, **{k: torch.tensor(v) for k, v in extra.items()}}


def hand_sae(activation="relu", k=0, b_dec=True, **extra) -> SparseAutoencoder:
    return SparseAutoencoder(EncoderConfig(2, 3, activation, k, b_dec), hand_weights(**extra))


def write_saelens(folder, cfg: dict, weights: dict[str, torch.Tensor]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def encode(sae, x=X) -> list[float]:
    return [round(v, 6) for v in sae.encode(torch.tensor([x])).squeeze(0).tolist()]


# -- encoding ------------------------------------------------------------------------


def test_relu_encode_with_and_without_b_dec_on_the_input():
    assert encode(hand_sae("relu")) == [1.0, 0.5, 0.25]
    # x = [1.5, 1]: h = [1.5, 1, -0.5] + b_enc = [1.5, 0.5, -0.25] -> relu
    assert encode(hand_sae("relu", b_dec=False)) == [1.5, 0.5, 0.0]


def test_topk_keeps_the_k_largest_pre_activations():
    assert encode(hand_sae("topk", k=1)) == [1.0, 0.0, 0.0]
    assert encode(hand_sae("topk", k=2)) == [1.0, 0.5, 0.0]
    # the kept values are ReLU'd: x = [-2, 0] gives h = [-2.5, -0.5, 2.75]; k = 2 keeps 2.75 and -0.5 -> 0
    assert encode(hand_sae("topk", k=2), [-2.0, 0.0]) == [0.0, 0.0, 2.75]


def test_jumprelu_zeroes_latents_at_or_below_their_threshold():
    sae = hand_sae("jumprelu", threshold=[0.9, 0.6, 0.1])
    assert encode(sae) == [1.0, 0.0, 0.25]  # h = [1, 0.5, 0.25]
    assert encode(hand_sae("jumprelu", threshold=[1.0, 0.0, 0.0])) == [0.0, 0.5, 0.25]  # h > t, strictly


def test_tanh_relu_and_run_time_normalizations():
    assert encode(hand_sae("tanh-relu")) == [round(math.tanh(v), 6) for v in (1.0, 0.5, 0.25)]
    w = hand_weights()
    rescale = SparseAutoencoder(EncoderConfig(2, 3, "relu", 0, False, "constant_norm_rescale"), w)
    # x = [3, 4] has norm 5: it is scaled to norm sqrt(2) first -> [0.8485, 1.1314]
    s = math.sqrt(2) / 5
    assert encode(rescale, [3.0, 4.0]) == [round(v, 6) for v in (3 * s, 4 * s - 0.5, max(0.0, 4 * s - 3 * s + 0.25))]
    ln = SparseAutoencoder(EncoderConfig(2, 3, "relu", 0, False, "layer_norm"), w)
    # [3, 5]: mean 4, unbiased std sqrt(2) -> [-1, 1] / (sqrt(2) + 1e-5)
    u = 1 / (math.sqrt(2) + 1e-5)
    assert encode(ln, [3.0, 5.0]) == [round(v, 6) for v in (0.0, max(0.0, u - 0.5), u + u + 0.25)]


# -- loading -------------------------------------------------------------------------


@pytest.mark.parametrize("cfg, activation, k", [
    ({"architecture": "standard", "activation_fn_str": "relu"}, "relu", 0),  # SAELens 3-5
    ({"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 2}}, "topk", 2),
    ({"architecture": "topk", "k": 1, "metadata": {"hook_name": "blocks.0", "sae_lens_version": "6.5.0"}},
     "topk", 1),  # SAELens 6
    ({"architecture": "jumprelu"}, "jumprelu", 0),
    ({}, "relu", 0),  # the oldest configs: standard ReLU, b_dec applied
])
def test_saelens_folder(tmp_path, cfg, activation, k):
    extra = {"threshold": torch.tensor([0.9, 0.6, 0.1])} if activation == "jumprelu" else {}
    folder = write_saelens(tmp_path / "sae", {"d_in": 2, "d_sae": 3, "dtype": "float32", **cfg},
                           {**hand_weights(), **extra})
    sae = load_dictionary({"layer": "x", "path": str(folder)})
    assert (sae.config.activation, sae.config.k, sae.config.apply_b_dec_to_input) == (activation, k, True)
    expected = {"relu": [1.0, 0.5, 0.25], "topk": [1.0, 0.5, 0.0][:k] + [0.0] * (3 - k),
                "jumprelu": [1.0, 0.0, 0.25]}[activation]
    assert encode(sae) == expected


def test_saelens_apply_b_dec_false_and_normalization_read_from_cfg(tmp_path):
    folder = write_saelens(tmp_path / "sae", {"d_in": 2, "d_sae": 3, "apply_b_dec_to_input": False,
                                              "normalize_activations": "layer_norm"}, hand_weights())
    sae = load_saelens(folder)
    assert not sae.config.apply_b_dec_to_input and sae.config.normalize_activations == "layer_norm"


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_plain_state_dict(tmp_path, suffix):
    path = tmp_path / f"sae{suffix}"
    w = hand_weights(threshold=[0.9, 0.6, 0.1])
    if suffix == ".pt":
        torch.save({"state_dict": w}, path)  # a checkpoint wrapping the state dict
    else:
        save_file(w, str(path))
    sae = load_dictionary({"layer": "x", "path": str(path)})
    assert sae.config.activation == "jumprelu"  # a stored threshold means JumpReLU
    assert encode(sae) == [1.0, 0.0, 0.25]
    relu = load_dictionary({"layer": "x", "path": str(path), "activation": "relu", "apply_b_dec_to_input": False})
    assert encode(relu) == [1.5, 0.5, 0.0]
    topk = load_dictionary({"layer": "x", "path": str(path), "activation": "topk", "k": 1})
    assert encode(topk) == [1.0, 0.0, 0.0]


def test_log_threshold_of_a_training_checkpoint(tmp_path):
    w = hand_weights()
    w["log_threshold"] = torch.log(torch.tensor([0.9, 0.6, 0.1]))
    torch.save(w, tmp_path / "ckpt.pt")
    assert encode(load_dictionary({"layer": "x", "path": str(tmp_path / "ckpt.pt")})) == [1.0, 0.0, 0.25]


def test_save_saelens_round_trip(tmp_path):
    sae = hand_sae("topk", k=2)
    back = load_saelens(save_saelens(sae, tmp_path / "out"))
    assert back.config == sae.config
    for name, t in sae.state_dict().items():
        assert torch.equal(back.state_dict()[name], t)


# -- attaching -----------------------------------------------------------------------


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.block = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3, padding=1), torch.nn.ReLU())
        self.fc = torch.nn.Linear(2, 2)

    def forward(self, x):
        return self.fc(self.block(x).mean(dim=(2, 3)))


class Tokens(torch.nn.Module):
    """A ViT-shaped host: (B, C, H, W) -> (B, 1 + H*W, C) tokens."""

    def forward(self, x):
        t = x[:, :2].flatten(2).transpose(1, 2)
        return torch.cat([t.mean(dim=1, keepdim=True), t], dim=1)


def reference_latents(out: torch.Tensor) -> torch.Tensor:
    """The hand dictionary's latents at every position / token, computed directly."""
    w, b_enc, b_dec = torch.tensor(W_ENC), torch.tensor(B_ENC), torch.tensor(B_DEC)
    if out.dim() == 4:
        return torch.relu((out.permute(0, 2, 3, 1) - b_dec) @ w + b_enc).permute(0, 3, 1, 2)
    return torch.relu((out - b_dec) @ w + b_enc)


@pytest.mark.parametrize("host, shape", [("block", (4, 3, 5, 5)), ("fc", (4, 3)), ("tokens", (4, 1 + 25, 3))])
def test_attach_to_conv_linear_and_vit_hosts(host, shape):
    model = ConvNet()
    model.tokens = Tokens()  # only reached through hooks below
    x = torch.rand(4, 3, 5, 5)
    host_out = model.tokens(x) if host == "tokens" else None
    before = model(x)
    name = attach_dictionary(model, host, hand_sae())
    assert name == f"sae.{host}" and name in dict(model.named_modules())
    assert any(k.startswith(f"sae.{host}.W_enc") for k in model.state_dict())  # the fingerprint covers it
    got: dict[str, torch.Tensor] = {}
    with hooked(model, [host, name], got.__setitem__), torch.inference_mode():
        out = model(x) if host != "tokens" else None
        if host == "tokens":
            model.tokens(x)
    if out is not None:
        assert torch.equal(out, before)  # the host's output, and so the model's, is unchanged
    assert tuple(got[name].shape) == shape
    host_value = host_out if host == "tokens" else got[host]
    assert torch.allclose(got[name], reference_latents(host_value), atol=1e-6)
    # the recording hooks are gone; the host keeps only the hook feeding its dictionary
    assert not model.get_submodule(name)._forward_hooks and len(model.get_submodule(host)._forward_hooks) == 1
    detach_dictionaries(model)
    assert "sae" not in dict(model.named_modules()) and not model.get_submodule(host)._forward_hooks


def test_a_sequential_root_keeps_its_output_and_latents_cost_nothing_unheard(monkeypatch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 1), torch.nn.ReLU(), torch.nn.Flatten())
    x = torch.rand(2, 3, 4, 4)
    before = model(x)
    sae = hand_sae()
    attach_dictionary(model, "1", sae, name="relu")
    calls = []
    monkeypatch.setattr(sae, "encode", lambda t: calls.append(1) or torch.zeros(*t.shape[:-1], 3))
    assert torch.equal(model(x), before) and not calls  # nothing hooks sae.relu: no latents computed
    with hooked(model, ["sae.relu"], lambda n, o: None):
        model(x)
    assert calls == [1]


def test_record_topk_summarizes_latents_like_channels(tmp_path):
    from builder.probe import ProbeSet

    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 255, (5, 5, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    probe = ProbeSet.scan(tmp_path)
    model = ConvNet().eval()
    attach_dictionary(model, "block", hand_sae())
    pre = lambda im: torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1)
    target = Target("t", model, pre, CPU)
    records, _ = record_topk(target, probe, ["block", "sae.block"], top_m=3, batch_size=4)
    rec = records["sae.block"]
    assert rec.kind == "conv" and rec.has_maps and rec.n_units == 3
    x = torch.stack([pre(probe.open(i)) for i in range(len(probe))])
    with torch.no_grad():
        full = reference_latents(model.block(x)).mean(dim=(2, 3)).numpy()
    for u in range(3):
        order = np.argsort(-full[:, u], kind="stable")[:3]
        np.testing.assert_allclose(rec.top_vals[u], full[order, u], rtol=1e-5, atol=1e-6)


# -- errors (one line each) ----------------------------------------------------------


def one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_missing_host_layer_lists_the_valid_ones():
    with pytest.raises(DictionaryError) as e:
        attach_dictionary(ConvNet(), "conv9", hand_sae())
    assert "no layer 'conv9'" in one_line(e) and "valid layers: block, block.0, block.1, fc" in one_line(e)


def test_d_in_mismatch_is_reported_at_the_first_forward():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    attach_dictionary(model, "0", hand_sae())
    with pytest.raises(DictionaryError) as e, hooked(model, ["sae.0"], lambda n, o: None):
        model(torch.rand(1, 3, 2, 2))
    assert "d_in is 2 but the layer has 4 channels" in one_line(e)


def test_names_must_be_unique_and_attachable():
    model = ConvNet()
    attach_dictionary(model, "fc", hand_sae())
    with pytest.raises(DictionaryError, match="already has a dictionary named 'fc'"):
        attach_dictionary(model, "fc", hand_sae())
    with pytest.raises(DictionaryError, match="cannot be used"):
        attach_dictionary(model, "fc", hand_sae(), name="training")
    with pytest.raises(DictionaryError, match="itself a dictionary"):
        attach_dictionary(model, "sae.fc", hand_sae(), name="again")


@pytest.mark.parametrize("cfg, message", [
    ({"architecture": "gated"}, "architecture 'gated' is not supported"),
    ({"normalize_activations": "expected_average_only_in"}, "needs a dataset scaling factor"),
    ({"normalize_activations": True}, "needs a dataset scaling factor"),
    ({"reshape_activations": "hook_z"}, "per-head SAEs"),
    ({"metadata": {"hook_head_index": 3}}, "hook_head_index = 3"),
    ({"architecture": "topk", "k": 1, "rescale_acts_by_decoder_norm": True}, "rescale_acts_by_decoder_norm"),
    ({"architecture": "topk"}, "needs an integer 'k'"),
    ({"architecture": "topk", "k": 9}, "1 <= k <= d_sae"),
    ({"activation_fn_str": "sigmoid"}, "activation 'sigmoid' is not supported"),
    ({"d_sae": 4}, "W_enc has shape (2, 3), expected (2, 4)"),
    ({"architecture": "jumprelu"}, "no tensor 'threshold'"),
])
def test_unsupported_saelens_options_are_refused_in_one_line(tmp_path, cfg, message):
    folder = write_saelens(tmp_path / "sae", {"d_in": 2, "d_sae": 3, **cfg}, hand_weights())
    with pytest.raises(DictionaryError) as e:
        load_saelens(folder)
    assert message in one_line(e)


def test_bad_files_are_refused_in_one_line(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 20)
    torch.save({"W_enc": torch.zeros(2, 3)}, tmp_path / "partial.pt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "cfg.json").write_text("{not json")
    save_file(hand_weights(), str(tmp_path / "folder" / "sae_weights.safetensors"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.npz").write_bytes(b"")
    cases = {
        "garbage.pt": "not a readable weights file", "garbage.safetensors": "not a readable weights file",
        "partial.pt": "no tensor 'b_enc' (found: W_enc)", "folder": "cfg.json: not valid JSON",
        "empty": "no cfg.json", "weights.npz": "not a SAELens folder nor", "missing": "not found",
    }
    for name, message in cases.items():
        with pytest.raises(DictionaryError) as e:
            load_dictionary({"layer": "x", "path": str(tmp_path / name)})
        assert message in one_line(e), name
    folder = write_saelens(tmp_path / "ok", {"d_in": 2, "d_sae": 3}, hand_weights())
    with pytest.raises(DictionaryError, match="'k' is read from cfg.json"):
        load_dictionary({"layer": "x", "path": str(folder), "k": 3})


@pytest.mark.parametrize("value, message", [
    ({"layer": "conv4"}, "must be a list of tables"),
    ([{"layer": "conv4"}], "'path' is required"),
    ([{"layer": "conv4", "path": "p", "bogus": 1}], "unknown key 'bogus'"),
    ([{"layer": "conv4", "path": "p", "name": "a.b"}], "without dots"),
    ([{"layer": "conv4", "path": "p", "activation": "gelu"}], "activation 'gelu' is unknown"),
    ([{"layer": "conv4", "path": "p", "activation": "topk"}], "needs k >= 1"),
    ([{"layer": "a.b", "path": "p"}, {"layer": "a_b", "path": "q"}], "two dictionaries are named 'a_b'"),
])
def test_config_validates_dictionaries(tmp_path, value, message):
    data = {"models": [{"name": "m", "target": "demo-cnn", "probe": str(tmp_path), "layers": ["conv4"],
                        "target_options": {"dictionaries": value}}]}
    with pytest.raises(ConfigError) as e:
        BuildConfig.from_dict(data)
    assert message in one_line(e) and "target_options.dictionaries" in str(e.value)
    assert parse_dictionary_specs([{"layer": "layer4.1", "path": "p"}])[0].latent_layer == "sae.layer4_1"


# -- targets, plans, the planted and demo dictionaries ---------------------------------


def test_load_target_attaches_dictionaries_and_plans_see_them(tmp_path):
    path = tmp_path / "sae.safetensors"
    save_file({"W_enc": torch.randn(512, 6), "b_enc": torch.zeros(6), "W_dec": torch.randn(6, 512),
               "b_dec": torch.zeros(512)}, str(path))
    options = {"num_classes": 3, "dictionaries": [{"layer": "layer4", "path": str(path), "name": "l4"}]}
    target = load_target("r", "resnet18", options, CPU)
    target.check_layers(["layer4", "sae.l4"])
    small = load_target("p", "planted-mixed", {"dictionaries": [{"layer": "mixed", "path": "planted-mixed"}]}, CPU)
    with pytest.raises(LayerError, match="valid layers: detectors, mixed, pooled, sae, sae.mixed$"):
        small.check_layers(["sae.nope"])  # latent layers are listed with the others
    from builder.config import ModelConfig
    from builder.pipeline.plan import layer_plans

    plans = layer_plans(ModelConfig("r", "resnet18", str(tmp_path), ("layer4", "sae.l4"), options))  # on meta
    assert [(p.layer, p.kind, p.n_units, p.has_maps) for p in plans] == [
        ("layer4", "conv", 512, True), ("sae.l4", "conv", 6, True)]


def planted_batch(n=6, seed=1) -> torch.Tensor:
    from builder.synthetic.world import render_full, sample_scene

    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(render_full(sample_scene(rng, size=64)).image).permute(2, 0, 1).float()
                        / 255 for _ in range(n)])


def test_the_planted_dictionary_recovers_the_detectors_exactly():
    from builder.synthetic.planted_dictionary import LATENT_LAYER, N_DEAD, planted_dictionary

    target = load_target("pd", "planted-mixed", {"dictionaries": [{"layer": "mixed", "path": "planted-mixed"}]}, CPU)
    assert target.ground_truth[LATENT_LAYER]["concepts"][0] == ["red"]
    got: dict[str, torch.Tensor] = {}
    with hooked(target.module, ["detectors", "mixed", LATENT_LAYER], got.__setitem__), torch.inference_mode():
        target.module(planted_batch())
    d, mixed, z = got["detectors"], got["mixed"], got[LATENT_LAYER]
    u = d.shape[1]
    assert z.shape == (6, u + N_DEAD, 64, 64) and d.amax() > 1
    torch.testing.assert_close(z[:, :u], d, rtol=0, atol=1e-5)
    assert torch.equal(z[:, :u] == 0, d == 0)  # off pixels exactly 0
    assert not z[:, u:].any()  # the dead latents never fire
    # the host channels are superpositions: most active pixels mix several concepts
    assert (mixed.abs() > 1e-3).sum(dim=1).float()[d.sum(dim=1) > 0].mean() > 3
    shipped = load_dictionary({"layer": "mixed", "path": "planted-mixed"})
    for name, t in planted_dictionary().state_dict().items():  # the committed files are the generator's
        torch.testing.assert_close(shipped.state_dict()[name], t, rtol=0, atol=1e-7)


def test_the_shipped_demo_dictionary_loads_and_reconstructs_conv4():
    from builder.synthetic.small_cnn import array_input
    from builder.synthetic.train_sae import evaluate_sae

    target = load_target("cnn", "demo-cnn", {"dictionaries": [{"layer": "conv4", "path": "demo-cnn-conv4"}]}, CPU)
    sae = target.module.get_submodule("sae.conv4")
    assert (sae.config.d_in, sae.config.d_sae, sae.config.activation, sae.config.k) == (128, 256, "topk", 8)
    x = torch.stack([array_input(im.permute(1, 2, 0).mul(255).round().byte().numpy()) for im in planted_batch(16, 5)])
    got: dict[str, torch.Tensor] = {}
    with hooked(target.module, ["conv4", "sae.conv4"], got.__setitem__), torch.inference_mode():
        target.module(x)
    assert got["sae.conv4"].shape == (16, 256, 8, 8)
    assert ((got["sae.conv4"] > 0).sum(dim=1) <= 8).all()
    positions = got["conv4"].permute(0, 2, 3, 1).reshape(-1, 128)
    assert evaluate_sae(sae, positions)["explained_variance"] > 0.6


def test_sae_training_is_deterministic_by_seed():
    from builder.synthetic.train_sae import TrainConfig, train_sae

    cfg = TrainConfig(d_sae=16, k=2, n_train=12, n_val=4, epochs=2, batch_size=256, dead_steps=1)
    a, metrics = train_sae(cfg)
    b, _ = train_sae(cfg)
    for name, t in a.state_dict().items():
        assert torch.equal(b.state_dict()[name], t)
    assert metrics["l0"] <= 2 and 0 <= metrics["dead_latents"] <= 16 and metrics["mse"] > 0
    c, _ = train_sae(TrainConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(c.W_enc, a.W_enc)


def test_attach_dictionaries_resolves_relative_paths_against_base(tmp_path):
    write_saelens(tmp_path / "dicts" / "one", {"d_in": 2, "d_sae": 3}, hand_weights())
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert attach_dictionaries(model, [{"layer": "0", "path": "dicts/one"}], base=tmp_path) == ["sae.0"]


def test_synthetic_dictionaries_are_made_once_into_the_cache(tmp_path, monkeypatch):
    from builder.backends.sae import resolve_dictionary_path

    monkeypatch.setenv("DND_ATLAS_CACHE", str(tmp_path))
    folder = resolve_dictionary_path("planted-mixed")
    assert folder.parent == tmp_path / "sae" and (folder / "sae_weights.safetensors").is_file()
    stamp = (folder / "sae_weights.safetensors").stat().st_mtime_ns
    assert resolve_dictionary_path("planted-mixed") == folder  # made once
    assert (folder / "sae_weights.safetensors").stat().st_mtime_ns == stamp
    assert not list((tmp_path / "sae").glob(".*.tmp"))
    with pytest.raises(DictionaryError, match="not found"):
        resolve_dictionary_path("no-such-dictionary")
