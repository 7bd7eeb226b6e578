"""Kolors at full size, random weights: diffstudio vs diffusers (KolorsPipeline's components), same tensors.

1. ChatGLM3-6B (28 layers, 4096 wide, 2 KV groups): a CFG batch of two prompts (one Chinese), 256 tokens,
   left-padded; agreement of the context (penultimate hidden states) and the pooled vector; encode time.
2. The Kolors UNet (SDXL + encoder_hid_proj 4096 -> 2048, y 5632): one forward at 1024x1024 (128x128
   latents), batch 2; agreement and time.
3. The whole pipeline (--pipeline): 1024x1024, a few Euler steps, ours vs diffusers' KolorsPipeline on the
   same components and noise; agreement of the final latents and of the decoded image.

Our modules hold the diffusers tensors (renamed, not copied). Timings are medians of alternating runs after
one warm-up each; ratio = ours / diffusers (< 1 = faster).

    python benchmarks/bench_kolors.py --dtypes fp32 fp16 --pipeline      # on a GPU (about 30 GB free)
    python benchmarks/bench_kolors.py --tiny --device cpu                # seconds-long smoke run
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from common import DTYPES, arguments, race, rel_err, same_weights, start

from diffstudio.conditioning.chatglm_tokenizer import load_chatglm_tokenizer
from diffstudio.conditioning.tokenizers import PACKAGED
from diffstudio.convert.chatglm import canonical_chatglm_keys
from diffstudio.convert.unet import unet_from_diffusers
from diffstudio.detect.chatglm import config_from_json
from diffstudio.detect.unet import config_from_diffusers
from diffstudio.families.kolors import KOLORS, encode_chatglm, size_embedding_width, size_embeddings
from diffstudio.models.chatglm import ChatGLMEncoder
from diffstudio.models.unet import UNetModel
from diffstudio.release_configs import CHATGLM3_6B, KOLORS_UNET, SDXL_VAE

# Small widths with the same structure (--tiny).
TINY_CHATGLM = {**CHATGLM3_6B, "num_layers": 2, "hidden_size": 64, "ffn_hidden_size": 48, "kv_channels": 16,
                "num_attention_heads": 4, "seq_length": 512}
TINY_UNET = {**KOLORS_UNET, "block_out_channels": (64, 128, 128), "attention_head_dim": (1, 2, 2),
             "transformer_layers_per_block": (1, 1, 2), "cross_attention_dim": 32, "encoder_hid_dim": 64,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64 + 48}
TINY_VAE = {**SDXL_VAE, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
PROMPTS = ["一张瓢虫的照片，微距，变焦，高质量，电影，拿着一个牌子，写着\"可图\"", ""]


def randomise_(module: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Weights N(0, std), norm weights 1 + N(0, 0.1): keeps a 28-layer random ChatGLM finite in fp16."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g, device=p.device, dtype=torch.float32)
            p.copy_(1 + 0.1 * noise if (p.ndim == 1 and "norm" in name) else std * noise)


def build_chatglm(config: dict, dtype, device):
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, ChatGLMModel

    ref = ChatGLMModel(ChatGLMConfig(**config), device=device, empty_init=True).to(device=device, dtype=dtype)
    randomise_(ref, 0)
    with torch.device("meta"):
        ours = ChatGLMEncoder(config_from_json(config))
    ours.load_state_dict(canonical_chatglm_keys(ref.state_dict()), assign=True)
    return ours.eval().requires_grad_(False), ref.eval().requires_grad_(False)


def build_unet(config: dict, dtype, device):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    return same_weights(ref, lambda c: UNetModel(config_from_diffusers(c)), unet_from_diffusers), ref


def bench_chatglm(config, dtype, device, repeats, sync) -> dict:
    ours, ref = build_chatglm(config, dtype, device)
    tokenizer = load_chatglm_tokenizer(PACKAGED / "chatglm")
    tokens = {k: v.to(device) for k, v in tokenizer(PROMPTS).items()}
    with torch.inference_mode():
        context, pooled = encode_chatglm(ours, tokenizer, PROMPTS)
        out = ref(**tokens, output_hidden_states=True)
        ref_context, ref_pooled = out.hidden_states[-2].permute(1, 0, 2), out.hidden_states[-1][-1]
        result = {"context_rel_err": rel_err(context, ref_context), "pooled_rel_err": rel_err(pooled, ref_pooled),
                  "finite": bool(torch.isfinite(context).all())}
    r = race(lambda: encode_chatglm(ours, tokenizer, PROMPTS)[0],
             lambda: ref(**tokens, output_hidden_states=True).hidden_states[-2].permute(1, 0, 2), repeats, sync)
    return {**result, "ours_s": r.ours_wall, "diffusers_s": r.ref_wall, "ratio": r.ratio}


def bench_unet(config, dtype, device, repeats, sync, side: int) -> dict:
    ours, ref = build_unet(config, dtype, device)
    g = torch.Generator().manual_seed(1)
    text_width = config["encoder_hid_dim"]
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    t = torch.tensor([999.0, 500.0], device=device)
    text = torch.randn(2, 256, text_width, generator=g).to(device, dtype)
    pooled = torch.randn(2, text_width, generator=g).to(device, dtype)
    h = w = side * 8
    time_ids = torch.tensor([[h, w, 0, 0, h, w]] * 2, dtype=dtype, device=device)
    y = torch.cat([pooled, size_embeddings(w, h, 2, size_embedding_width(ours.config)).to(device, dtype)], dim=-1)
    r = race(lambda: ours(x, t, text, y),
             lambda: ref(x, t, encoder_hidden_states=text,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample, repeats, sync)
    return {"rel_err": r.rel_err, "ours_s": r.ours_wall, "diffusers_s": r.ref_wall, "ratio": r.ratio}


def bench_pipeline(chatglm, unet, vae_config, dtype, device, steps: int, side: int, sync) -> dict:
    """Whole txt2img: same components, noise and sigmas in both pipelines."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline
    from diffusers.pipelines.kolors.tokenizer import ChatGLMTokenizer

    import diffstudio
    from diffstudio.convert.vae import vae_from_diffusers
    from diffstudio.detect.vae import config_from_diffusers as vae_config_from_diffusers
    from diffstudio.loader import Models
    from diffstudio.models.vae import AutoencoderKL as OurVAE
    from diffstudio.sampling.noise import SeededNoise

    text_ours, text_ref = build_chatglm(chatglm, dtype, device)
    unet_ours, unet_ref = build_unet(unet, dtype, device)
    torch.manual_seed(2)
    vae_ref = AutoencoderKL(**vae_config).to(device=device, dtype=dtype).eval()
    with torch.device("meta"):
        vae_ours = OurVAE(vae_config_from_diffusers(vae_config))
    vae_ours.load_state_dict(vae_from_diffusers(vae_ref.state_dict()), assign=True)
    tokenizer = load_chatglm_tokenizer(PACKAGED / "chatglm")
    models = Models(KOLORS, {"unet": unet_ours, "vae": vae_ours.eval(), "text_encoder": text_ours,
                             "tokenizer": tokenizer},
                    {"unet": unet_ours.config, "vae": vae_ours.config, "text_encoder": text_ours.config})
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear",
                                       num_train_timesteps=1100, timestep_spacing="trailing")
    ref = KolorsPipeline(vae=vae_ref, text_encoder=text_ref, unet=unet_ref, scheduler=scheduler,
                         tokenizer=ChatGLMTokenizer(str(PACKAGED / "chatglm" / "tokenizer.model")),
                         force_zeros_for_empty_prompt=False)
    ref.set_progress_bar_config(disable=True)
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.tolist()
    noise = SeededNoise([5], (4, side // 8, side // 8), dtype=torch.float32, device="cpu").initial()
    kwargs = dict(prompt=PROMPTS[0], negative_prompt="", num_inference_steps=steps, guidance_scale=5.0,
                  height=side, width=side)
    finals = []

    def run_ours():
        finals.clear()
        return diffstudio.Pipeline(models)(PROMPTS[0], "", width=side, height=side, seed=5, sigmas=sigmas,
                                           cfg_scale=5.0, progress=False, tiled_vae=False,
                                           callback=lambda i, n, x, d: finals.append(d))

    def run_ref(output_type="np"):
        return ref(**kwargs, latents=noise.clone().to(device, dtype), output_type=output_type).images

    with torch.inference_mode():
        ref_latents = run_ref("latent")  # also the reference's warm-up
    run_ours()  # warm-up
    t0 = time.perf_counter()
    images = run_ours()
    sync()
    t_ours = time.perf_counter() - t0
    with torch.inference_mode():
        t0 = time.perf_counter()
        ref_image = run_ref()[0]
        sync()
        t_ref = time.perf_counter() - t0
    import numpy as np

    diff = np.abs(np.asarray(images[0]).astype(np.float64) - np.round(ref_image * 255))
    return {"latent_rel_err": rel_err(finals[-1].float().cpu(), ref_latents.float().cpu()),
            "image_max_abs_diff": float(diff.max()), "image_mean_abs_diff": float(diff.mean()),
            "ours_s": t_ours, "diffusers_s": t_ref,
            "steps": steps, "side": side}


def main() -> None:
    parser = arguments(__doc__, dtypes=("fp32", "fp16"), repeats=3, tiny="small widths (smoke test)")
    parser.add_argument("--pipeline", action="store_true", help="also the whole txt2img (in the last dtype)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    sync = start(args)
    chatglm, unet, vae = (TINY_CHATGLM, TINY_UNET, TINY_VAE) if args.tiny else (CHATGLM3_6B, KOLORS_UNET, SDXL_VAE)
    side = 64 if args.tiny else 1024
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": name, "torch": torch.__version__}
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for part, fn in (("chatglm", lambda d=dtype: bench_chatglm(chatglm, d, args.device, args.repeats, sync)),
                         ("unet", lambda d=dtype: bench_unet(unet, d, args.device, args.repeats, sync, side // 8))):
            try:
                results[f"{part}_{dname}"] = r = fn()
            except Exception as err:  # report and go on: one part's failure must not hide the others
                results[f"{part}_{dname}"] = r = {"error": repr(err)}
            print(part, dname, json.dumps(r), flush=True)
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    if args.pipeline:
        dname = args.dtypes[-1]
        try:
            r = bench_pipeline(chatglm, unet, vae, DTYPES[dname], args.device, args.steps, side, sync)
        except Exception as err:
            r = {"error": repr(err)}
        results[f"pipeline_{dname}"] = r
        print("pipeline", dname, json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
