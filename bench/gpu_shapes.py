"""Seconds per neuron per stage with full-size models on whatever device runs it.

Compute does not depend on the weights, so the models are random, built
from configs at their real sizes (no download): BLIP-base captioner
(ViT-B/16 at 384 px + BERT-base decoder), Stable Diffusion 1.5 (its UNet at
512 px, VAE and CLIP ViT-L/14 text encoder; DPM-Solver++ 25 steps), CLIP
ViT-B/16 for image similarity, and a ResNet-50 target (a sample of layer4
units). They are saved to a temporary folder and loaded through the same
``from_pretrained`` code real weights go through. The summarizer is the
offline extractive one (no LLM endpoint on a GPU box by default).

    python -m bench.gpu_shapes              # needs CUDA; says so and exits when there is none
    python -m bench.gpu_shapes --smoke      # tiny shapes on the CPU: checks the code path
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("record", "crops", "caption", "summarize", "generate", "gen_record", "embed", "score_write")


def _blip(folder: Path, full: bool) -> Path:
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    from testkit.tiny_models import write_wordpiece_vocab

    folder.mkdir(parents=True, exist_ok=True)
    tok = BertTokenizer(vocab=str(write_wordpiece_vocab(folder)), do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    size = 384 if full else 64
    h, layers, heads, inter = (768, 12, 12, 3072) if full else (32, 2, 2, 64)
    config = BlipConfig(
        text_config={"vocab_size": len(tok), "hidden_size": h, "intermediate_size": inter,
                     "num_attention_heads": heads, "num_hidden_layers": layers, "max_position_embeddings": 512,
                     "encoder_hidden_size": h, "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                     "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id},
        vision_config={"hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads,
                       "num_hidden_layers": layers, "image_size": size, "patch_size": 16},
        projection_dim=256 if full else 32,
    )
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.suppress_tokens = [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id]
    model.save_pretrained(folder)
    BlipProcessor(BlipImageProcessor(size={"height": size, "width": size}), tok).save_pretrained(folder)
    return folder


def _clip(folder: Path, full: bool) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from testkit.tiny_models import clip_tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(folder, max_length=77)
    size = 224 if full else 32
    config = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 512 if full else 32,
                     "intermediate_size": 2048 if full else 64, "num_attention_heads": 8 if full else 2,
                     "num_hidden_layers": 12 if full else 2, "max_position_embeddings": 77,
                     "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                     "pad_token_id": tok.pad_token_id},
        vision_config={"hidden_size": 768 if full else 32, "intermediate_size": 3072 if full else 64,
                       "num_attention_heads": 12 if full else 2, "num_hidden_layers": 12 if full else 2,
                       "image_size": size, "patch_size": 16 if full else 8},
        projection_dim=512 if full else 16,
    )
    torch.manual_seed(0)
    CLIPModel(config).eval().save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": size},
                                                     crop_size={"height": size, "width": size}),
                  tokenizer=tok).save_pretrained(folder)
    return folder


def _sd(folder: Path, full: bool) -> Path:
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from testkit.tiny_models import clip_tokenizer

    (folder / "_tok").mkdir(parents=True, exist_ok=True)
    tok = clip_tokenizer(folder / "_tok", max_length=77)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    torch.manual_seed(0)
    if full:  # Stable Diffusion 1.5 shapes
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
        )
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                              num_hidden_layers=12, max_position_embeddings=77, **ids)
    else:
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
            cross_attention_dim=32, attention_head_dim=8, norm_num_groups=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        )
        vae = AutoencoderKL(block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            norm_num_groups=16, sample_size=32)
        text = CLIPTextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=2,
                              num_hidden_layers=2, max_position_embeddings=77, **ids)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=CLIPTextModel(text), tokenizer=tok, unet=unet,
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    if full:
        pipe = pipe.to(torch.float16)  # halves the temp folder; loaded as fp16 on CUDA anyway
    pipe.save_pretrained(folder)
    return folder


def run(smoke: bool = False, neurons: int = 8, probe_images: int = 300) -> dict[str, str]:
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not smoke and not torch.cuda.is_available():
        return {"gpu_shapes": "no CUDA device present: nothing measured (run it on a GPU box; --smoke checks the code on the CPU)"}
    from builder.config import BuildConfig
    from builder.pipeline.run import build
    from builder.synthetic.probe import write_probe_set

    full = not smoke
    device = "cuda" if full else "cpu"
    out: dict[str, str] = {"gpu_shapes_device": torch.cuda.get_device_name(0) if full else "cpu (smoke shapes)"}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        blip, clip, sd = _blip(root / "blip", full), _clip(root / "clip", full), _sd(root / "sd", full)
        out["gpu_shapes_model_setup_s"] = f"{time.perf_counter() - t:.1f}"
        probe = write_probe_set(root / "probe", n=probe_images, seed=2, progress=False)
        cfg = BuildConfig.from_dict({
            "out": str(root / "atlas"), "device": device, "dtype": "float16" if full else "auto",
            "models": [{"name": "resnet50", "target": "resnet50" if full else "resnet18", "probe": str(probe),
                        "layers": ["layer4"], "units": list(range(neurons))}],
            "describe": {"captioner": "blip", "captioner_options": {"model": str(blip)}},
            "dissect": {
                "generator": "diffusers",
                "generator_options": {"model": str(sd), "steps": 25 if full else 2, "scheduler": "dpm++",
                                      "batch_size": 16 if full else 4},
                "similarity": "clip", "similarity_options": {"model": str(clip), "text_embedder": "minilm"},
            },
        })
        t = time.perf_counter()
        summary = build(cfg)
        wall = time.perf_counter() - t
    m = summary.models[0]
    n = max(1, m.ok)
    out["gpu_shapes_neurons"] = str(m.ok)
    out["gpu_shapes_build_s"] = f"{wall:.1f}"
    for stage in STAGES:
        out[f"gpu_shapes_s_per_neuron_{stage}"] = f"{m.seconds.get(stage, 0.0) / n:.3f}"
    for stage, (calls, cached) in sorted(m.calls.items()):
        out[f"gpu_shapes_calls_per_neuron_{stage}"] = f"{calls / n:.1f}"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_shapes", description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (checks the code path)")
    ap.add_argument("--neurons", type=int, default=8, help="layer4 units to describe (default 8)")
    ap.add_argument("--probe-images", type=int, default=300)
    args = ap.parse_args(argv)
    for k, v in run(args.smoke, args.neurons, args.probe_images).items():
        print(f"{k}: {v}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
