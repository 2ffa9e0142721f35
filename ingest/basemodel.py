"""Base diffusion models for training: the embedded toy-faces model, a local diffusers folder, or a hub id.

The embedded model (`ingest/assets/toy-base`, made by `python -m ingest.train_base`) is a complete
StableDiffusionPipeline folder at toy scale: 32 px images, a VAE with 16 x 16 x 4 latents, a small
UNet with the same block types (and so the same LoRA targets) as SD 1.5, and a CLIP text encoder with a
word-level tokenizer built in code. diffusers loads it like any other model folder.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from w2w.errors import W2WError

TOY_BASE_DIR = Path(__file__).resolve().parent / "assets" / "toy-base"
TOY_BASE_ID = "w2wreg/toy-faces-base"  # how models trained on it name their base model
TOY_SIZE = 32

TOY_VAE_CONFIG: dict = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
    "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
    "block_out_channels": (16, 32),
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": TOY_SIZE,
    "mid_block_add_attention": False,
}
TOY_UNET_CONFIG: dict = {
    "sample_size": TOY_SIZE // 2,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 16,
}
TOY_TEXT_CONFIG: dict = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 64,
}
TOY_SCHEDULER_CONFIG: dict = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",  # the cosine schedule: linear betas destroy 16 x 16 latents too early
    "clip_sample": False,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


class BaseModelError(W2WError):
    """A base model that cannot be loaded."""


def word_tokenizer(words: list[str]):
    """A CLIPTokenizer whose vocabulary holds each word as one token, built in code.

    CLIP's BPE splits a word into characters (the last one suffixed `</w>`) and merges pairs by rank;
    one merge chain per word, left to right, rebuilds each word. Single characters stay in the
    vocabulary so an unknown word becomes letters, not `<|endoftext|>`.
    """
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}

    def token(t: str) -> None:
        vocab.setdefault(t, len(vocab))

    for c in "abcdefghijklmnopqrstuvwxyz0123456789,.-'":
        token(c)
        token(c + "</w>")
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for w in sorted({w.lower() for w in words}):
        pieces = [*w[:-1], w[-1] + "</w>"]
        left = pieces[0]
        for p in pieces[1:]:
            if (left, p) not in seen:
                seen.add((left, p))
                merges.append((left, p))
            left += p
            token(left)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise AssertionError(f"word {w!r} is not one token: {tok.convert_ids_to_tokens(ids)}")
    return tok


def toy_tokenizer():
    from ingest.toyfaces import VOCAB

    return word_tokenizer(list(VOCAB))


def build_toy_pipeline(seed: int = 0):
    """The embedded model's architecture with fresh (untrained) weights."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = toy_tokenizer()
    torch.manual_seed(seed)
    vae = AutoencoderKL(**TOY_VAE_CONFIG)
    unet = UNet2DConditionModel(**TOY_UNET_CONFIG)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **TOY_TEXT_CONFIG,
        )
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDPMScheduler(**TOY_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


@dataclass
class BaseModel:
    """A loaded base model: what training and generation need, frozen, on one device."""

    ref: str  # the id models trained on it record as their base model
    pipe: object  # a diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline: rendering only)
    device: torch.device
    dtype: torch.dtype

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def resolution(self) -> int:
        return int(self.pipe.unet.config.sample_size) * self.pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (n, 4, h, w) of images (n, 3, H, W) in [-1, 1]: the posterior mean, scaled.

        The mean rather than a sample: the diffusion noise dominates at toy scale, and it keeps training a
        deterministic function of its seed.
        """
        vae = self.pipe.vae
        lat = vae.encode(images.to(self.device, self.dtype)).latent_dist.mean
        return lat * vae.config.scaling_factor


def resolve_base(base_model: str | Path | None) -> tuple[str, str]:
    """(what to load, the id to record) for --base-model: None means the embedded toy model."""
    if base_model is None or str(base_model) in ("toy", TOY_BASE_ID):
        if not (TOY_BASE_DIR / "model_index.json").exists():
            raise BaseModelError(
                f"the embedded toy base model is missing from {TOY_BASE_DIR}; rebuild it with "
                "`python -m ingest.train_base`"
            )
        return str(TOY_BASE_DIR), TOY_BASE_ID
    p = Path(base_model).expanduser()
    if p.exists():
        if not (p / "model_index.json").exists():
            raise BaseModelError(f"{p} is not a diffusers model folder (no model_index.json); pass a folder or hub id")
        return str(p.resolve()), str(p.resolve())
    if str(base_model).count("/") != 1:
        raise BaseModelError(f"--base-model {base_model!r} is neither a folder nor a hub id like 'org/name'")
    return str(base_model), str(base_model)


def load_base(base_model: str | Path | None = None, device: str = "cpu", dtype: str = "fp32") -> BaseModel:
    """Load a base model once per process (cached): frozen, in eval mode, on `device`."""
    return _load(*resolve_base(base_model), device, dtype)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# The pipelines whose UNet LoRAs w2wreg reads: SD 1.x/2.x and SDXL (model_index.json's _class_name).
PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def pipeline_class(path: str, ref: str) -> str:
    """The diffusers pipeline class named by a model folder's or hub repo's model_index.json."""
    from diffusers import DiffusionPipeline

    local = Path(path) / "model_index.json"
    try:
        if local.exists():
            config = json.loads(local.read_text())
        else:
            with warnings.catch_warnings():  # diffusers passes huggingface_hub a deprecated argument: not ours to fix
                warnings.simplefilter("ignore", UserWarning)
                config = DiffusionPipeline.load_config(path)
    except OSError as e:
        raise BaseModelError(_cannot_load(ref, e)) from None
    name = config.get("_class_name", "StableDiffusionPipeline")
    if name not in PIPELINES:
        raise BaseModelError(f"base model {ref!r} is a {name}; w2wreg runs {' and '.join(PIPELINES)} models")
    return name


def _cannot_load(ref: str, e: Exception) -> str:
    """One line saying why a base model did not load, and what to pass instead when downloads are off."""
    from huggingface_hub import constants

    first = (str(e).splitlines() or [type(e).__name__])[0]
    if constants.HF_HUB_OFFLINE and not Path(ref).exists():
        return (
            f"cannot load base model {ref!r} offline: it is not in the local Hugging Face cache and HF_HUB_OFFLINE "
            "is set; pass --base-model PATH (a local diffusers folder), or unset HF_HUB_OFFLINE to download it"
        )
    if not Path(ref).exists():  # a hub id: most often no network, or a typo
        return (
            f"cannot load base model {ref!r}: {first} (no network? pass --base-model PATH, a local diffusers folder, "
            "or download it first: huggingface-cli download " + ref + ")"
        )
    return f"cannot load base model {ref!r}: {first}"


def check_device(device: str) -> None:
    """Refuse, in one line, a device torch does not see."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BaseModelError("--device cuda was asked for, but torch sees no CUDA device; use --device cpu")
    if device == "mps" and not torch.backends.mps.is_available():
        raise BaseModelError("--device mps was asked for, but torch sees no MPS device; use --device cpu")


@functools.lru_cache(maxsize=2)
def _load(path: str, ref: str, device: str, dtype: str) -> BaseModel:
    import diffusers

    check_device(device)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    cls_name = pipeline_class(path, ref)
    # SDXL has no safety checker to switch off
    extra = {"safety_checker": None, "requires_safety_checker": False} if cls_name == "StableDiffusionPipeline" else {}
    # their per-component loading bars are noise next to ours (hub downloads keep huggingface_hub's)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        pipe = getattr(diffusers, cls_name).from_pretrained(path, dtype=DTYPES[dtype], **extra)
    except OSError as e:
        raise BaseModelError(_cannot_load(ref, e)) from None
    finally:
        diffusers_logging.enable_progress_bar()
        transformers_logging.enable_progress_bar()
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return BaseModel(ref, pipe, torch.device(device), DTYPES[dtype])
