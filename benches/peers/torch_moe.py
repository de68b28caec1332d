#!/usr/bin/env python3
"""What a user would run instead: PyTorch + transformers on the workloads route_bench times.

Times, with the same shapes as `route_bench` and the main job:
  - `layer`: transformers' `MixtralSparseMoeBlock` forward (no grad) at (hidden, ffn, E, k) and T
    tokens, with the experts implementation `--impl` (eager | grouped_mm | batched_mm);
  - `layer_train`: the same block's forward + backward (loss = sum of the output);
  - `lm_step`: one AdamW training step of a `MixtralForCausalLM` of the main job's size
    (vocab 1024, width 128, 4 layers, 4 heads, 8 experts of width 128, top-2, batch 16 x 128,
    aux-loss coefficient 0.05, z-loss 0.001 is not in transformers' Mixtral and is left out).

Prints one JSON object per line: workload, shape, median seconds, tokens/s and GFLOP/s of the
active expert matmuls (layer rows; 3 matmuls of 2·h·f FLOPs per (token, expert) pair, ×3 for
forward + backward). Outside CI, in a venv with torch and transformers:

    python3 benches/peers/torch_moe.py --threads 2 --workload layer --tokens 128,512,2048
    python3 benches/peers/torch_moe.py --threads 2 --workload lm_step

`benches/peers/compare.sh` alternates these runs with route_bench's.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import (
    MixtralForCausalLM,
    MixtralSparseMoeBlock,
)


def timed(fn, reps, sync):
    for _ in range(2):
        fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), min(ts), max(ts)


def layer_config(h, f, e, k, impl):
    cfg = MixtralConfig(
        hidden_size=h,
        intermediate_size=f,
        num_local_experts=e,
        num_experts_per_tok=k,
        router_jitter_noise=0.0,
    )
    cfg._experts_implementation = impl
    return cfg


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workload", choices=["layer", "layer_train", "lm_step"], default="layer")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", default="512")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--impl", default="grouped_mm")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    dev = torch.device(a.device)
    dt = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    peak = (lambda: torch.cuda.max_memory_allocated()) if dev.type == "cuda" else (lambda: None)

    if a.workload == "lm_step":
        cfg = MixtralConfig(
            vocab_size=1024,
            hidden_size=128,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=128,
            output_router_logits=True,
            router_aux_loss_coef=0.05,
            tie_word_embeddings=True,
        )
        cfg._experts_implementation = a.impl
        model = MixtralForCausalLM(cfg).to(dev, dt).train()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
        ids = torch.randint(0, 1024, (16, 128), device=dev)

        def step():
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        med, lo, hi = timed(step, a.reps, sync)
        print(json.dumps({
            "workload": "lm_step", "impl": a.impl, "threads": a.threads,
            "median_s": med, "min_s": lo, "max_s": hi, "tokens_per_s": 16 * 128 / med,
        }))
        return

    block = MixtralSparseMoeBlock(
        layer_config(a.hidden, a.ffn, a.experts, a.top_k, a.impl)
    ).to(dev, dt)
    for prm in block.parameters():
        torch.nn.init.normal_(prm, std=0.02)
    for t in [int(x) for x in a.tokens.split(",")]:
        x = torch.randn(1, t, a.hidden, device=dev, dtype=dt)
        flops = 3 * 2 * a.hidden * a.ffn * t * a.top_k
        if a.workload == "layer":
            block.eval()

            def fwd():
                with torch.no_grad():
                    block(x)

            fn = fwd
        else:
            block.train()
            xg = x.clone().requires_grad_(True)
            flops *= 3

            def fwd_bwd():
                block(xg).sum().backward()
                block.zero_grad(set_to_none=True)

            fn = fwd_bwd
        med, lo, hi = timed(fn, a.reps, sync)
        print(json.dumps({
            "workload": a.workload, "impl": a.impl, "threads": a.threads,
            "shape": [a.hidden, a.ffn, a.experts, a.top_k], "tokens": t, "dtype": a.dtype,
            "median_s": med, "min_s": lo, "max_s": hi, "tokens_per_s": t / med,
            "expert_gflops": flops / med / 1e9, "peak_bytes": peak(),
        }))


if __name__ == "__main__":
    main()
