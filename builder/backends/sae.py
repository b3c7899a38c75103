"""Sparse-autoencoder dictionaries as layers: their latents are units.

A dictionary (an SAE trained on one layer of a model) is attached to the
loaded target so its latents look like an ordinary layer to every stage:

* the SAEs live in one child of the model's root, ``sae`` (a
  :class:`DictionaryBank`), so the latent layer of a dictionary named NAME is
  ``sae.NAME`` in ``named_modules()``, ``check_layers``, ``hooked`` and the
  atlas (NAME defaults to the host layer with dots turned into underscores:
  ``conv4`` -> ``sae.conv4``, ``layer4.1.conv2`` -> ``sae.layer4_1_conv2``);
* a permanent forward hook on the host layer calls the SAE on the host's
  output, so a forward hook on ``sae.NAME`` receives the latents, shaped like
  the host's output with ``d_sae`` channels: (B, d_sae, H, W) for a conv map
  (one latent vector per spatial position), (B, T, d_sae) for ViT tokens,
  (B, d_sae) for a linear layer. The host's own output is never changed, and
  the latents are only computed while something hooks the latent layer;
* the SAE's weights are part of the model's ``state_dict``, so the target
  fingerprint (and with it every cached recording) covers them.

Nothing is added under the host layer itself: a host that is an
``nn.Sequential`` (or any module whose forward runs its children) keeps its
forward. The bank's own forward is the identity, so a root that is an
``nn.Sequential`` still computes the same output.

Dictionaries load from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)
or a plain state dict (``.safetensors``, ``.pt``, ``.pth``) holding ``W_enc``
(d_in, d_sae), ``b_enc``, ``W_dec`` (d_sae, d_in), ``b_dec`` and, for JumpReLU,
``threshold`` (or ``log_threshold``). Only the encoder matters for latents:
decoder-side options (finetuning scaling factors) are read and ignored.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from builder.errors import BuildError, ConfigError

log = logging.getLogger(__name__)

BANK = "sae"  # the root child holding every dictionary; latent layers are "sae.NAME"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
ACTIVATIONS = ("relu", "topk", "jumprelu", "tanh-relu")
NORMALIZATIONS = ("none", "constant_norm_rescale", "layer_norm")
STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth")
SPEC_KEYS = ("layer", "path", "name", "activation", "k", "apply_b_dec_to_input", "normalize_activations")
_PLAIN_ONLY = ("activation", "k", "apply_b_dec_to_input", "normalize_activations")
# JSON cfg.json values that mean "no normalization" across SAELens versions
_NO_NORM = (None, False, "none", "null", "None")


class DictionaryError(BuildError):
    """A dictionary (SAE) cannot be loaded, attached or run on its host layer."""


# -- specs (what a config names) ---------------------------------------------------


@dataclass(frozen=True)
class DictionarySpec:
    """One dictionary of a model, as a config names it (a table of
    ``target_options.dictionaries``)."""

    layer: str  # the host layer whose output the SAE encodes
    path: str  # SAELens folder, state-dict file, or the name of a folder in data/sae/
    name: str = ""  # "" = the host layer with dots replaced by underscores
    # plain state dicts only (a SAELens folder's cfg.json decides these):
    activation: str = ""  # relu | topk | jumprelu | tanh-relu; "" = jumprelu if a threshold is stored, else relu
    k: int = 0  # topk: latents kept per position
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (SAELens' default)
    normalize_activations: str = "none"  # none | constant_norm_rescale | layer_norm

    @property
    def key(self) -> str:
        """The dictionary's name inside the bank."""
        return self.name or self.layer.replace(".", "_")

    @property
    def latent_layer(self) -> str:
        """The layer name its latents get (``sae.NAME``)."""
        return f"{BANK}.{self.key}"


def parse_dictionary_specs(value: Any, where: str = "dictionaries") -> tuple[DictionarySpec, ...]:
    """Validate the ``dictionaries`` option of a model (a list of tables with
    ``layer`` and ``path``) into specs; one-line ConfigError otherwise."""
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where} must be a list of tables like {{layer = \"conv4\", path = \"...\"}}")
    specs = [_parse_spec(item, f"{where}[{i}]") for i, item in enumerate(value)]
    names = [s.key for s in specs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{where}: two dictionaries are named {dup!r}; give each its own 'name'")
    return tuple(specs)


def _parse_spec(item: Any, where: str) -> DictionarySpec:
    if isinstance(item, DictionarySpec):
        return item
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where} must be a table with 'layer' and 'path'")
    unknown = sorted(set(item) - set(SPEC_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (valid keys: {', '.join(SPEC_KEYS)})")
    for key in ("layer", "path"):
        if not isinstance(item.get(key), str) or not item[key]:
            raise ConfigError(f"{where}: {key!r} is required (a non-empty string)")
    spec = DictionarySpec(**dict(item))
    if not isinstance(spec.name, str) or "." in spec.key or not spec.key.strip():
        raise ConfigError(f"{where}: name {spec.name!r} must be a non-empty string without dots")
    if spec.activation and spec.activation not in ACTIVATIONS:
        raise ConfigError(f"{where}: activation {spec.activation!r} is unknown; choose {', '.join(ACTIVATIONS)}")
    if not isinstance(spec.k, int) or isinstance(spec.k, bool) or spec.k < 0:
        raise ConfigError(f"{where}: k must be a non-negative integer")
    if spec.activation == "topk" and spec.k < 1:
        raise ConfigError(f"{where}: a topk dictionary needs k >= 1")
    if not isinstance(spec.apply_b_dec_to_input, bool):
        raise ConfigError(f"{where}: apply_b_dec_to_input must be true or false")
    if spec.normalize_activations not in NORMALIZATIONS:
        raise ConfigError(
            f"{where}: normalize_activations {spec.normalize_activations!r} is unsupported; "
            f"choose {', '.join(NORMALIZATIONS)}"
        )
    return spec


# -- the encoder ---------------------------------------------------------------------


@dataclass(frozen=True)
class EncoderConfig:
    """What computing latents needs to know about an SAE."""

    d_in: int
    d_sae: int
    activation: str = "relu"  # relu | topk | jumprelu | tanh-relu
    k: int = 0  # topk
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"  # none | constant_norm_rescale | layer_norm

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise DictionaryError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")
        if self.activation not in ACTIVATIONS:
            raise DictionaryError(f"activation {self.activation!r} is unsupported; choose {', '.join(ACTIVATIONS)}")
        if self.activation == "topk" and not 1 <= self.k <= self.d_sae:
            raise DictionaryError(f"topk needs 1 <= k <= d_sae ({self.d_sae}), got k = {self.k}")
        if self.normalize_activations not in NORMALIZATIONS:
            raise DictionaryError(f"normalize_activations {self.normalize_activations!r} is unsupported")


class SparseAutoencoder(nn.Module):
    """An SAE's encoder applied to a host layer's output.

    ``encode(x)`` maps (..., d_in) to (..., d_sae) as SAELens does: optional
    run-time normalization, ``x - b_dec`` when ``apply_b_dec_to_input``, then
    ``act(x @ W_enc + b_enc)`` with ReLU, TopK (the k largest pre-activations,
    ReLU'd; the rest 0), JumpReLU (``relu(h) * (h > threshold)``) or
    tanh-ReLU. ``forward(host_output)`` does this at every spatial position of
    a (B, C, H, W) map or every token of a (B, T, C) output and returns the
    latents in the host's layout with d_sae channels."""

    def __init__(self, config: EncoderConfig, weights: Mapping[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self.where = "dictionary"  # set by attach_dictionary: "sae.NAME (on HOST)"
        shapes = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
                  "W_dec": (config.d_sae, config.d_in), "b_dec": (config.d_in,)}
        if config.activation == "jumprelu":
            shapes["threshold"] = (config.d_sae,)
        for name, shape in shapes.items():
            t = torch.as_tensor(weights[name]).detach().float()
            self.register_parameter(name, nn.Parameter(t.reshape(shape).clone(), requires_grad=False))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents (..., d_sae) of activations (..., d_in)."""
        cfg = self.config
        x = x.to(self.W_enc.dtype)
        if cfg.normalize_activations == "constant_norm_rescale":
            x = x * (math.sqrt(cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
        elif cfg.normalize_activations == "layer_norm":
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        if cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        h = x @ self.W_enc + self.b_enc
        if cfg.activation == "relu":
            return torch.relu(h)
        if cfg.activation == "tanh-relu":
            return torch.tanh(torch.relu(h))
        if cfg.activation == "jumprelu":
            return torch.relu(h) * (h > self.threshold).to(h.dtype)
        top = torch.topk(h, cfg.k, dim=-1)
        return torch.zeros_like(h).scatter_(-1, top.indices, torch.relu(top.values))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction (..., d_in) of latents (..., d_sae) (no run-time
        normalization undone: for SAEs without one, and for tests)."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        d_in = self.config.d_in
        if out.dim() not in (2, 3, 4):
            raise DictionaryError(f"{self.where}: cannot encode a layer output of shape {tuple(out.shape)}")
        channels = out.shape[1] if out.dim() == 4 else out.shape[-1]
        if channels != d_in:
            raise DictionaryError(
                f"{self.where}: the dictionary's d_in is {d_in} but the layer has {channels} channels "
                f"(output shape {tuple(out.shape)})"
            )
        if out.dim() == 4:  # one latent vector per spatial position, back in (B, d_sae, H, W)
            return self.encode(out.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.encode(out)

    def listened(self) -> bool:
        """Whether anything hooks this module (else its latents are not computed)."""
        global_hooks = getattr(torch.nn.modules.module, "_global_forward_hooks", None)
        return bool(self._forward_hooks or self._forward_pre_hooks or global_hooks is None or global_hooks)

    def extra_repr(self) -> str:
        c = self.config
        return f"d_in={c.d_in}, d_sae={c.d_sae}, activation={c.activation}" + (f", k={c.k}" if c.k else "")


class DictionaryBank(nn.Module):
    """The root child holding a model's dictionaries (``sae``). Its forward
    is the identity: a root ``nn.Sequential`` runs it last and is unchanged."""

    def __init__(self) -> None:
        super().__init__()
        self.handles: dict[str, Any] = {}  # name -> the host hook's RemovableHandle

    def forward(self, x: Any, *args: Any, **kwargs: Any) -> Any:
        return x


class _FeedLatents:
    """Forward hook on a host layer: run its SAE on the output (so hooks on
    the latent layer fire) and leave the output as it is. A callable object,
    not a closure, so a deep copy of the model feeds the copied SAE."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        self.sae = sae

    def __call__(self, _module: nn.Module, _inputs: Any, output: Any) -> None:
        if self.sae.listened():
            self.sae(_first_tensor(output, self.sae.where))


def _first_tensor(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(getattr(out, "last_hidden_state", None), torch.Tensor):
        return out.last_hidden_state
    raise DictionaryError(f"{where}: the host layer returned {type(out).__name__}, not a tensor")


# -- attaching -----------------------------------------------------------------------


def attach_dictionary(module: nn.Module, layer: str, sae: SparseAutoencoder, name: str = "") -> str:
    """Attach ``sae`` to the host ``layer`` of ``module`` and return the name
    of its latent layer (``sae.NAME``; NAME defaults to ``layer`` with dots
    turned into underscores)."""
    key = name or layer.replace(".", "_")
    modules = dict(module.named_modules())
    if layer not in modules or not layer:
        names = [n for n in modules if n and n != BANK and not n.startswith(BANK + ".")]
        shown = ", ".join(names[:60]) + (f", ... ({len(names)} in all)" if len(names) > 60 else "")
        raise DictionaryError(f"no layer {layer!r} to attach dictionary {key!r} to; valid layers: {shown}")
    if layer == BANK or layer.startswith(BANK + "."):
        raise DictionaryError(f"dictionary {key!r}: cannot attach a dictionary to {layer!r}, itself a dictionary")
    bank = _bank(module)
    if key in bank._modules:
        raise DictionaryError(f"the model already has a dictionary named {key!r}; give this one another 'name'")
    try:
        bank.add_module(key, sae)
    except KeyError as exc:  # a name the bank cannot hold ("training", "forward", ...)
        raise DictionaryError(f"dictionary name {key!r} cannot be used: {exc.args[0]}") from exc
    sae.where = f"dictionary {BANK}.{key} (on {layer})"
    _follow(sae, module)
    handle = modules[layer].register_forward_hook(_FeedLatents(sae))
    bank.handles[key] = handle
    return f"{BANK}.{key}"


def _follow(sae: SparseAutoencoder, module: nn.Module) -> None:
    """Put the SAE on the device and floating dtype of the model's first
    floating weight, so attaching to a model already moved (to CUDA, to a
    lower precision, to meta) just works."""
    ref = next((t for t in [*module.parameters(), *module.buffers()] if t.is_floating_point()), None)
    if ref is not None:
        sae.to(device=ref.device, dtype=ref.dtype)


def _bank(module: nn.Module) -> DictionaryBank:
    existing = module._modules.get(BANK)
    if isinstance(existing, DictionaryBank):
        return existing
    if existing is not None or hasattr(module, BANK):
        raise DictionaryError(f"the model already has an attribute {BANK!r}; dictionaries cannot be attached")
    bank = DictionaryBank()
    try:
        module.add_module(BANK, bank)
    except (KeyError, AttributeError, RuntimeError) as exc:  # e.g. a TorchScript module
        raise DictionaryError(f"dictionaries cannot be attached to a {type(module).__name__}: {exc}") from exc
    return bank


def attach_dictionaries(module: nn.Module, specs: Any, base: str | Path | None = None) -> list[str]:
    """Load every dictionary of ``specs`` (DictionarySpecs or the config's
    tables) and attach it to its host layer of ``module``; return the latent
    layer names, in order. Relative paths resolve against ``base`` (default:
    the working directory), then against the shipped ``data/sae/``."""
    names = []
    for spec in parse_dictionary_specs(specs):
        sae = load_dictionary(spec, base)
        names.append(attach_dictionary(module, spec.layer, sae, spec.key))
        log.info("dictionary %s: %d latents on %s", names[-1], sae.config.d_sae, spec.layer)
    return names


def detach_dictionaries(module: nn.Module) -> None:
    """Remove every dictionary of ``module`` and the hooks feeding them."""
    bank = module._modules.get(BANK)
    if not isinstance(bank, DictionaryBank):
        return
    for handle in bank.handles.values():
        handle.remove()
    del module._modules[BANK]


# -- loading -------------------------------------------------------------------------


def resolve_dictionary_path(path: str, base: str | Path | None = None) -> Path:
    """The file or folder ``path`` names: as given (relative to ``base`` or
    the working directory), else a folder shipped in ``data/sae/`` (the
    installed data package's, then the repository's), else one of the
    synthetic world's dictionaries (``builder.synthetic.dictionaries``,
    made on first use)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(base) / p
    if p.exists():
        return p
    if "/" not in path and path not in ("", ".", ".."):
        from builder.data_files import data_path

        for shipped in (data_path("sae", path), Path(__file__).resolve().parents[1] / "data" / "sae" / path):
            if shipped.exists():
                return shipped
        from builder.backends.builtin import GENERATED_DICTIONARIES
        from builder.backends.registry import load_callable

        if path in GENERATED_DICTIONARIES:  # the synthetic world's, made on first use
            return load_callable(GENERATED_DICTIONARIES[path])(path)
    raise DictionaryError(
        f"dictionary {path!r} not found (a SAELens folder, a state-dict file, or a name in data/sae/)"
    )


def load_dictionary(spec: DictionarySpec | Mapping[str, Any], base: str | Path | None = None) -> SparseAutoencoder:
    """The SAE a spec names, from a SAELens folder or a plain state dict."""
    spec = _parse_spec(spec, "dictionary")
    path = resolve_dictionary_path(spec.path, base)
    if path.is_dir():
        given = [k for k in _PLAIN_ONLY if getattr(spec, k) != getattr(DictionarySpec, k)]
        if given:
            raise DictionaryError(f"{path}: {given[0]!r} is read from cfg.json for a SAELens folder; remove it")
        return load_saelens(path)
    if path.suffix not in STATE_DICT_SUFFIXES:
        raise DictionaryError(f"{path}: not a SAELens folder nor a {'/'.join(STATE_DICT_SUFFIXES)} state dict")
    weights = _read_weights(path)
    config = EncoderConfig(
        d_in=_dim(weights, "W_enc", 0, path), d_sae=_dim(weights, "W_enc", 1, path),
        activation=spec.activation or ("jumprelu" if "threshold" in weights else "relu"),
        k=spec.k, apply_b_dec_to_input=spec.apply_b_dec_to_input,
        normalize_activations=spec.normalize_activations,
    )
    return _build(config, weights, path)


def load_saelens(folder: str | Path) -> SparseAutoencoder:
    """An SAE from a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``)."""
    folder = Path(folder)
    cfg_path, weights_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise DictionaryError(f"{folder}: no {p.name} (a SAELens folder holds {SAELENS_CFG} and {SAELENS_WEIGHTS})")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DictionaryError(f"{cfg_path}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise DictionaryError(f"{cfg_path}: must hold a JSON object")
    return _build(saelens_encoder_config(cfg, str(cfg_path)), _read_weights(weights_path), weights_path)


def saelens_encoder_config(cfg: Mapping[str, Any], where: str = SAELENS_CFG) -> EncoderConfig:
    """The encoder settings of a SAELens ``cfg.json`` (v3 to v6 keys);
    options this loader cannot honour are refused in one line."""
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), Mapping) else {}
    for key in ("d_in", "d_sae"):
        if not isinstance(cfg.get(key), int) or isinstance(cfg.get(key), bool):
            raise DictionaryError(f"{where}: {key!r} must be an integer, got {cfg.get(key)!r}")
    arch = cfg.get("architecture", "standard")
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu"
    kwargs = cfg.get("activation_fn_kwargs") or {}
    k = cfg.get("k", kwargs.get("k", 0) if isinstance(kwargs, Mapping) else 0)
    if arch == "standard":
        activation = {"relu": "relu", "topk": "topk", "tanh-relu": "tanh-relu"}.get(fn)
    elif arch == "topk":
        activation = "topk" if fn in ("relu", "topk") else None
        if cfg.get("rescale_acts_by_decoder_norm"):
            raise DictionaryError(f"{where}: rescale_acts_by_decoder_norm = true is not supported")
    elif arch == "jumprelu":
        activation = "jumprelu" if fn == "relu" else None
    else:
        raise DictionaryError(
            f"{where}: architecture {arch!r} is not supported (standard, topk and jumprelu are)"
        )
    if activation is None:
        raise DictionaryError(f"{where}: activation {fn!r} is not supported for architecture {arch!r}")
    if activation == "topk" and (not isinstance(k, (int, float)) or isinstance(k, bool) or int(k) != k or k < 1):
        raise DictionaryError(f"{where}: a topk SAE needs an integer 'k' >= 1 (or activation_fn_kwargs.k)")
    norm = cfg.get("normalize_activations", "none")
    if norm in _NO_NORM:
        norm = "none"
    elif norm is True or norm == "expected_average_only_in":
        raise DictionaryError(
            f"{where}: normalize_activations = expected_average_only_in needs a dataset scaling factor; "
            "fold it into W_enc and b_dec first"
        )
    elif norm not in NORMALIZATIONS:
        raise DictionaryError(f"{where}: normalize_activations {norm!r} is not supported")
    if cfg.get("reshape_activations", "none") not in (None, "none"):
        raise DictionaryError(f"{where}: reshape_activations {cfg['reshape_activations']!r} (per-head SAEs) is not supported")
    head = cfg.get("hook_head_index", meta.get("hook_head_index"))
    if head is not None:
        raise DictionaryError(f"{where}: per-head SAEs (hook_head_index = {head}) are not supported")
    return EncoderConfig(
        d_in=cfg["d_in"], d_sae=cfg["d_sae"], activation=activation,
        k=int(k) if activation == "topk" else 0,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
    )


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated files, pickles of classes, not a tensor file at all
        msg = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DictionaryError(f"{path}: not a readable weights file: {msg}") from exc
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise DictionaryError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = {str(k).removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if "log_threshold" in state and "threshold" not in state:  # a JumpReLU training checkpoint
        state["threshold"] = state.pop("log_threshold").float().exp()
    if "b_gate" in state or "r_mag" in state:
        raise DictionaryError(f"{path}: a gated SAE (b_gate, r_mag) is not supported")
    return state


def _dim(weights: Mapping[str, torch.Tensor], key: str, axis: int, path: Path) -> int:
    t = weights.get(key)
    if t is None or t.dim() != 2:
        found = ", ".join(sorted(weights)[:12]) or "nothing"
        raise DictionaryError(f"{path}: no 2-d tensor {key!r} (found: {found})")
    return int(t.shape[axis])


def _build(config: EncoderConfig, weights: Mapping[str, torch.Tensor], path: Path) -> SparseAutoencoder:
    expected = {"W_enc": (config.d_in, config.d_sae), "b_enc": (config.d_sae,),
                "W_dec": (config.d_sae, config.d_in), "b_dec": (config.d_in,)}
    if config.activation == "jumprelu":
        expected["threshold"] = (config.d_sae,)
    for key, shape in expected.items():
        if key not in weights:
            found = ", ".join(sorted(weights)[:12]) or "nothing"
            raise DictionaryError(f"{path}: no tensor {key!r} (found: {found})")
        got = tuple(weights[key].shape)
        if got != shape:
            raise DictionaryError(
                f"{path}: {key} has shape {got}, expected {shape} (d_in = {config.d_in}, d_sae = {config.d_sae})"
            )
        if not torch.isfinite(weights[key].float()).all():
            raise DictionaryError(f"{path}: {key} holds NaN or infinite values")
    return SparseAutoencoder(config, weights)


def save_saelens(sae: SparseAutoencoder, folder: str | Path, extra: Mapping[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> Path:
    """Write ``sae`` as a SAELens folder (cfg.json + sae_weights.safetensors),
    each file through a temp name and a rename; ``extra`` keys (hook name,
    model name, training notes) go into cfg.json."""
    import os

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    c = sae.config
    arch = {"relu": "standard", "tanh-relu": "standard", "topk": "topk", "jumprelu": "jumprelu"}[c.activation]
    cfg: dict[str, Any] = {
        "architecture": arch, "d_in": c.d_in, "d_sae": c.d_sae,
        "dtype": str(dtype).removeprefix("torch."), "device": "cpu",
        "activation_fn": "tanh-relu" if c.activation == "tanh-relu" else "relu",
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations, "reshape_activations": "none",
        **({"k": c.k} if c.activation == "topk" else {}),
        **dict(extra or {}),
    }
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in sae.state_dict().items()}
    tmp = folder / f".{SAELENS_WEIGHTS}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors creates it owner-only
    os.replace(tmp, folder / SAELENS_WEIGHTS)
    tmp = folder / f".{SAELENS_CFG}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / SAELENS_CFG)
    return folder

