"""``b4m demo`` before the built-in world exists: the whole B4M recipe on a tiny UNet built in code.

Everything here is real but small: a tiny diffusers UNet with random weights plays the base model, and the
"images" are synthetic latents (a content = a shape, a style = a texture). Each stage trains with the
epsilon-prediction diffusion loss:

1. content run: the content half learns the content latents; the style half learns auxiliary styles (MCP);
2. style run: the mirror image;
3. make: fuse the two runs, fine-tune both learned halves with the Riemannian preconditioner;
4. export a plain diffusers LoRA, load it with diffusers' own loader into a fresh UNet, and check it reproduces the
   fused model.

The report compares denoising losses on held-out noise: the made adapter should fit both the content and the style
better than the base model does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from .adapter_file import adapter_from_model, apply_adapter, fuse, save_adapter
from .lora_io import factors_from_model, load_lora, save_lora
from .optim import create_optimizer
from .plp import PLPConfig, add_plp, plp_layers

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=16,
)


def _latents(kind: str, index: int, n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` synthetic 4×8×8 latents: contents are shapes (masks), styles are textures (channel patterns)."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    if kind == "content":
        masks = [(xx - 3.5).abs() + (yy - 3.5).abs() < 3, ((xx - 3.5) ** 2 + (yy - 3.5) ** 2) < 9, (xx > 1) & (yy < 6)]
        colour = torch.tensor([1.0, -1.0, 0.5, 0.0])[:, None, None]
        base = masks[index % len(masks)].float()[None].repeat(4, 1, 1) * colour
    else:
        freq = 1.0 + index
        waves = [torch.sin(freq * xx), torch.cos(freq * yy), torch.sin(freq * (xx + yy)), torch.zeros(8, 8)]
        base = torch.stack(waves)
    return base[None].repeat(n, 1, 1, 1) + 0.05 * torch.randn(n, 4, 8, 8, generator=g)


class _Task:
    """One (latents, prompt embedding) pair and its diffusion loss."""

    def __init__(self, latents: torch.Tensor, embedding: torch.Tensor) -> None:
        self.latents, self.embedding = latents, embedding

    def loss(self, unet: UNet2DConditionModel, g: torch.Generator, alphas: torch.Tensor) -> torch.Tensor:
        x0 = self.latents
        t = torch.randint(0, len(alphas), (len(x0),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        ctx = self.embedding.expand(len(x0), -1, -1)
        return torch.nn.functional.mse_loss(unet(xt, t, encoder_hidden_states=ctx).sample, noise)


def _train(unet, main: _Task, aux: list[_Task], groups, steps, g, alphas, precondition=False) -> None:
    """Main loss on the owned half, mean auxiliary loss on the other half (clean gradient routing)."""
    params = [p for group in groups for p in group]
    opt = create_optimizer(
        unet,
        torch.optim.AdamW,
        lr=3e-3,
        precondition=precondition,
        weight_decay=0.0,
        param_groups=[{"params": params}],
        max_grad_norm=1.0,
    )
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        main_grads = torch.autograd.grad(main.loss(unet, g, alphas), groups[0])
        aux_loss = sum(task.loss(unet, g, alphas) for task in aux) / len(aux)
        aux_grads = torch.autograd.grad(aux_loss, groups[1]) if groups[1] else []
        for p, grad in zip([*groups[0], *groups[1]], [*main_grads, *aux_grads], strict=True):
            p.grad = grad
        opt.step()


@torch.no_grad()
def _eval(unet, task: _Task, alphas, seed: int = 1234, repeats: int = 8) -> float:
    g = torch.Generator().manual_seed(seed)
    return sum(task.loss(unet, g, alphas).item() for _ in range(repeats)) / repeats


def run_demo(output: Path, steps: int = 60, seed: int = 0, console=None) -> dict:
    """Run the tiny end-to-end example; writes adapters, a plain LoRA and ``report.json`` under ``output``."""

    def say(text: str) -> None:
        if console:
            console.print(text, highlight=False, markup=False, soft_wrap=True)
        else:
            print(text)

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    base = UNet2DConditionModel(**TINY_UNET).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    alphas = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    emb = lambda: torch.randn(1, 7, 32, generator=g)  # noqa: E731 (a made-up "prompt")

    content = _Task(_latents("content", 0, 4, g), emb())
    style = _Task(_latents("style", 0, 4, g), emb())
    aux_styles = [_Task(_latents("style", i, 4, g), emb()) for i in (1, 2, 3)]
    aux_contents = [_Task(_latents("content", i, 4, g), emb()) for i in (1, 2)]
    config = PLPConfig(rank=8, base_model="b4m-demo-tiny-unet")
    tasks = (("content", content), ("style", style))

    def fresh():
        unet = UNet2DConditionModel(**TINY_UNET).eval()
        unet.load_state_dict(base_state)
        return unet

    runs, run_losses = {}, {}
    for role, main, aux in (("content", content, aux_styles), ("style", style, aux_contents)):
        unet = fresh()
        add_plp(unet, config)
        layers = list(plp_layers(unet).values())
        owned, other = config.half_of(role), config.half_of("style" if role == "content" else "content")
        owned_params = [getattr(layer, f"{owned}_learned") for layer in layers]
        other_params = [getattr(layer, f"{other}_learned") for layer in layers]
        say(f"[{role} run] {steps} steps: the {owned} half learns the {role}, the {other} half {len(aux)} partners")
        _train(unet, main, aux, (owned_params, other_params), steps, g, alphas)
        run_losses[f"{role} run alone"] = {n: _eval(unet, t, alphas) for n, t in tasks}
        runs[role] = save_adapter(adapter_from_model(unet, config, role), output / f"{role}.b4m.safetensors")

    from .adapter_file import load_adapter

    fused = fuse(load_adapter(runs["content"]), load_adapter(runs["style"]))
    made = fresh()
    apply_adapter(made, fused)
    zero_step = {name: _eval(made, task, alphas) for name, task in (("content", content), ("style", style))}
    make_steps = max(1, steps // 4)
    say(f"[make] fuse, then {make_steps} steps with the Riemannian preconditioner on content and style")
    layers = plp_layers(made).values()
    halves = [p for l in layers for p in (l.up_learned, l.down_learned)]
    _train(made, content, [style], (halves, []), make_steps, g, alphas, precondition=True)
    save_adapter(adapter_from_model(made, config, "fused"), output / "made.b4m.safetensors")

    lora_path = output / "made_lora.safetensors"
    save_lora(factors_from_model(made), lora_path, format="diffusers", metadata={"b4m_role": "fused"})
    reloaded = fresh()
    factors, _ = load_lora(lora_path)
    reloaded.load_lora_adapter(
        {f"unet.{n}.lora_A.weight": d for n, (_, d) in factors.items()}
        | {f"unet.{n}.lora_B.weight": u for n, (u, _) in factors.items()},
        prefix="unet",
        adapter_name="b4m",
    )
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = content.embedding.expand(2, -1, -1)
    with torch.no_grad():
        diff = reloaded(x, 10, encoder_hidden_states=ctx).sample - made(x, 10, encoder_hidden_states=ctx).sample
    export_diff = diff.abs().max().item()

    base_unet = fresh()
    table = {
        "base model": {n: _eval(base_unet, t, alphas) for n, t in tasks},
        **run_losses,
        "fused, 0 make steps": zero_step,
        f"made ({make_steps} RP steps)": {n: _eval(made, t, alphas) for n, t in tasks},
    }
    passed = all(table[f"made ({make_steps} RP steps)"][k] < table["base model"][k] for k in ("content", "style"))
    passed = passed and export_diff < 1e-4
    report = {
        "what": "denoising loss (lower is better) on the content and the style data, held-out noise",
        "losses": table,
        "exported_lora_max_abs_diff": export_diff,
        "seconds": round(time.perf_counter() - start, 1),
        "passed": passed,
    }
    (output / "report.json").write_text(json.dumps(report, indent=2))
    say(f"{'':<24}{'content loss':>14}{'style loss':>12}")
    for name, row in table.items():
        say(f"{name:<24}{row['content']:>14.4f}{row['style']:>12.4f}")
    say(f"exported diffusers LoRA reloaded with diffusers' loader: max |Δ output| = {export_diff:.2e}")
    say(f"{'PASSED' if passed else 'FAILED'} in {report['seconds']} s")
    return report
