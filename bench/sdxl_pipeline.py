"""The four b4m commands at full SDXL size with random weights (values do not change cost), on one GPU.

Builds an SDXL-architecture pipeline (UNet from tests/data/sdxl-unet-config.json, CLIP ViT-L and OpenCLIP bigG text
encoders, SDXL's VAE; a byte-level stand-in tokenizer, since no vocabulary can be downloaded), saves it as a diffusers
folder, then runs `b4m content`, `b4m style`, `b4m make` and `b4m generate` as a user would, and collects seconds per
step and peak GPU memory per stage from each run's run.json.

    python bench/sdxl_pipeline.py --out runs/sdxl-bench --resolution 512 --steps 20
    python bench/sdxl_pipeline.py --tiny ...   # the same flow on a tiny model, to check the script on a CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build_sdxl(path: Path) -> Path:
    """Save a random-weight SDXL pipeline (fp16 files) at ``path``."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from tiny_pipelines import BETAS, make_tokenizer

    if (path / "model_index.json").exists():
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok, tok2 = make_tokenizer(), make_tokenizer(pad_token="!")

    def text_config(t, hidden, inter, layers, heads, act):
        return CLIPTextConfig(
            vocab_size=len(t),
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=77,
            hidden_act=act,
            projection_dim=hidden,
            bos_token_id=t.bos_token_id,
            eos_token_id=t.eos_token_id,
            pad_token_id=t.pad_token_id,
        )

    unet_config = json.loads((ROOT / "tests" / "data" / "sdxl-unet-config.json").read_text())
    unet_config = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device(device):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**unet_config).half()
        te1 = CLIPTextModel(text_config(tok, 768, 3072, 12, 12, "quick_gelu")).half()
        te2 = CLIPTextModelWithProjection(text_config(tok2, 1280, 5120, 32, 20, "gelu")).half()
        vae = AutoencoderKL(
            down_block_types=["DownEncoderBlock2D"] * 4,
            up_block_types=["UpDecoderBlock2D"] * 4,
            block_out_channels=[128, 256, 512, 512],
            layers_per_block=2,
            latent_channels=4,
            sample_size=1024,
            scaling_factor=0.13025,
            force_upcast=True,
        ).half()
    scheduler = EulerDiscreteScheduler(**BETAS, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=tok,
        tokenizer_2=tok2,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny(path: Path) -> Path:
    from tiny_pipelines import save_tiny_sdxl

    return path if (path / "model_index.json").exists() else save_tiny_sdxl(path)


def images(folder: Path, n: int, size: int, seed: int, prompt: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        colour = rng.integers(0, 255, 3)
        a = np.full((size, size, 3), 255, np.uint8)
        a[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = colour
        Image.fromarray(a).save(folder / f"{i}.png")
    if prompt:
        (folder / "prompt.txt").write_text(prompt)
    return folder


def b4m(*args) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "b4m.cli", *map(str, args)], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/sdxl-bench"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--make-steps", type=int, default=10)
    parser.add_argument("--stages", default="content,style,make,generate")
    parser.add_argument("--tiny", action="store_true", help="a tiny SDXL-layout model (checks the script on a CPU)")
    args = parser.parse_args()
    out = args.out
    model = build_tiny(out / "model-tiny") if args.tiny else build_sdxl(out / "model")
    size = 1024 if not args.tiny else 64
    data = out / "data"
    images(data / "dog", 4, size, 0)
    images(data / "yarn", 4, size, 1)
    for i in range(3):
        images(data / "aux_styles" / f"s{i}", 2, size, 10 + i, f"a cat in style{i} style")
        images(data / "aux_contents" / f"c{i}", 2, size, 20 + i, f"a photo of obj{i}")
    res, tag = args.resolution, f"{args.resolution}px"
    precision = "bf16" if torch.cuda.is_available() else "no"
    common = ["--model", model, "--resolution", res, "--steps", args.steps, "--mixed-precision", precision]
    wall = {}
    stages = args.stages.split(",")
    if "content" in stages:
        wall["content"] = b4m(
            "content",
            "--images",
            data / "dog",
            "--prompt",
            "a photo of sks dog",
            "--aux",
            data / "aux_styles",
            "-o",
            out / f"dog-{tag}",
            *common,
        )
    if "style" in stages:
        wall["style"] = b4m(
            "style",
            "--images",
            data / "yarn",
            "--prompt",
            "a cat in sks style",
            "--aux",
            data / "aux_contents",
            "-o",
            out / f"yarn-{tag}",
            *common,
        )
    if "make" in stages:
        wall["make"] = b4m(
            "make",
            "--content",
            out / f"dog-{tag}",
            "--style",
            out / f"yarn-{tag}",
            "-o",
            out / f"made-{tag}",
            "--steps",
            args.make_steps,
            "--mixed-precision",
            precision,
        )
    if "generate" in stages:
        for merge in ("--no-merge", "--merge"):
            wall[f"generate {merge}"] = b4m(
                "generate",
                out / f"made-{tag}",
                "a sks dog in sks style",
                "-n",
                1,
                "--steps",
                25,
                "--resolution",
                size,
                merge,
                "-o",
                out / f"gen{merge}",
            )
    report = {
        "resolution": res,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
        "runs": {},
    }
    for name in ("dog", "yarn", "made"):
        run = out / f"{name}-{tag}" / "run.json"
        if run.exists():
            info = json.loads(run.read_text())
            report["runs"][info["stage"]] = {
                k: info.get(k) for k in ("timings_s", "process_age_at_start_s", "peak_memory_gib", "train")
            }
    text = json.dumps(report, indent=2)
    print(text)
    (out / f"report-{tag}.json").write_text(text)


if __name__ == "__main__":
    main()
