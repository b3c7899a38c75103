"""Tiny random models built from configs and saved to a folder, no downloads.

Each ``make_tiny_*`` function writes a complete Hugging Face folder (config,
weights, tokenizer, processor) that loads back with the same
``from_pretrained(path)`` call a hub id goes through, so tests exercise the
real loading code of the backends. Weights are random (seeded): outputs are
meaningless but have the right types and shapes. Tokenizers are built from
small vocab files written here.

Other tests may use them; cache them per session (they take ~0.1-2 s each).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

# A small word list for the tokenizers: enough to tokenize test prompts and
# to give generated captions several distinct tokens.
WORDS = (
    "a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image", "red",
    "green", "blue", "yellow", "black", "white", "dog", "cat", "car", "tree", "house", "circle",
    "square", "triangle", "striped", "dotted", "plain", "background", "face", "faces", "small",
    "large", "stripes", "sky", "grass", "water",
)


def write_wordpiece_vocab(folder: Path) -> Path:
    """A BERT WordPiece vocab: specials, letters (so any word tokenizes), WORDS."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [f"##{c}" for c in letters]
    punct = list(".,!?'-:;")
    tokens = specials + letters + pieces + punct + [w for w in WORDS if w not in letters]
    path = folder / "vocab.txt"
    path.write_text("\n".join(dict.fromkeys(tokens)) + "\n", encoding="utf-8")
    return path


def _write_bpe_files(folder: Path) -> tuple[Path, Path]:
    """A byte-level-free BPE vocab in CLIP's format: characters, their
    end-of-word forms, a few merges building the words in WORDS."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?'-:;0123456789")
    vocab: dict[str, int] = {}
    for tok in ["<|startoftext|>", "<|endoftext|>"]:
        vocab[tok] = len(vocab)
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    # merge each short word left to right, the last merge producing "word</w>"
    for w in WORDS:
        if len(w) < 2 or len(w) > 6:
            continue
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            a, b = parts[0], parts[1]
            merged = a + b
            merge = f"{a} {b}"
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(merged, len(vocab))
            parts = [merged] + parts[2:]
    vpath = folder / "vocab.json"
    mpath = folder / "merges.txt"
    vpath.write_text(json.dumps(vocab), encoding="utf-8")
    mpath.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vpath, mpath


def clip_tokenizer(folder: Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    vpath, mpath = _write_bpe_files(folder)
    return CLIPTokenizer(
        vocab=str(vpath), merges=str(mpath), model_max_length=max_length,
        unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )


def make_tiny_blip(folder: str | Path, image_size: int = 64, seed: int = 0) -> Path:
    """Save a tiny random BLIP captioner (model + BlipProcessor) to ``folder``."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as vocab_dir:
        tok = BertTokenizer(vocab=str(write_wordpiece_vocab(Path(vocab_dir))), do_lower_case=True)
    # BLIP's text decoder starts every caption with [DEC]
    tok.add_special_tokens({"bos_token": "[DEC]"})
    processor = BlipProcessor(
        BlipImageProcessor(size={"height": image_size, "width": image_size}), tok
    )
    config = BlipConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 64, "encoder_hidden_size": 32,
            "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
            "sep_token_id": tok.sep_token_id, "eos_token_id": tok.sep_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "image_size": image_size, "patch_size": 16,
        },
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    # random weights like to emit specials, which decode to "": keep captions wordy
    model.generation_config.suppress_tokens = [
        tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.mask_token_id
    ]
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_clip(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random CLIP (model + CLIPProcessor, 16-d projections) to ``folder``."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as vocab_dir:
        tok = clip_tokenizer(Path(vocab_dir), max_length=16)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "max_position_embeddings": 16,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "image_size": image_size, "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    CLIPModel(config).eval().save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def make_tiny_sd(folder: str | Path, sample_size: int = 16, seed: int = 0) -> Path:
    """Save a tiny random Stable Diffusion pipeline to ``folder``.

    The VAE downsamples by 2 (two blocks), so default images are
    ``2 * sample_size`` pixels square (32x32)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as vocab_dir:
        tok = clip_tokenizer(Path(vocab_dir), max_length=16)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size,
        in_channels=4, out_channels=4, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=16,
    )
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=16,
        sample_size=2 * sample_size,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_attention_heads=2,
        num_hidden_layers=2, max_position_embeddings=16,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def make_tiny_blip2(folder: str | Path, image_size: int = 32, seed: int = 0) -> Path:
    """Save a tiny random BLIP-2 (ViT, 2-layer Q-Former with 4 queries, a
    2-layer OPT decoder, Blip2Processor) to ``folder``."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_query_tokens = 4
    with tempfile.TemporaryDirectory() as vocab_dir:
        tok = clip_tokenizer(Path(vocab_dir), max_length=32)
    # the processor adds "<image>" to the tokenizer: build it first, then size the vocab
    processor = Blip2Processor(
        BlipImageProcessor(size={"height": image_size, "width": image_size}), tok,
        num_query_tokens=num_query_tokens,
    )
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = Blip2Config(
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2,
            "image_size": image_size, "patch_size": 8,
        },
        qformer_config={
            "vocab_size": len(tok), "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
            "num_hidden_layers": 2, "encoder_hidden_size": 32, "max_position_embeddings": 64,
        },
        text_config={
            "model_type": "opt", "vocab_size": len(tok), "hidden_size": 32, "ffn_dim": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2, "word_embed_proj_dim": 32, "max_position_embeddings": 64,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
        },
        num_query_tokens=num_query_tokens,
        image_token_index=image_token_id,
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    # random weights like to emit specials, which decode to "": zero their
    # (tied) output rows so any word beats them. BLIP-2 hands generation to
    # its language model, which ignores the top-level suppress_tokens.
    with torch.no_grad():
        emb = model.get_output_embeddings().weight
        emb[[tok.bos_token_id, image_token_id]] = 0.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
