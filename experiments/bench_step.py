"""Train-step benchmark: jlora LoRA vs full fine-tuning (JAX) vs PEFT LoRA (PyTorch), one run.

Every contender trains the same Llama-shaped decoder (random weights) on the same token
batch with AdamW. Reported per contender: median step time, tokens/s, the ratio to the
JAX full fine-tuning step measured in the same run, and, for the JAX steps, the compiled
FLOPs and bytes (``cost_analysis`` / ``memory_analysis``) with the achieved TFLOP/s.

  python experiments/bench_step.py --preset cpu-tiny          # any machine, seconds
  XLA_PYTHON_CLIENT_PREALLOCATE=false python experiments/bench_step.py --preset gpu-1b --peft
                                                              # a GPU, ~1B params, bf16

Writes ``experiments/results/bench_step_<preset>_<backend>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import jlora
from jlora.models.llama import DecoderConfig, LlamaForCausalLM

PRESETS = {
    "cpu-tiny": dict(hidden=128, inter=344, layers=2, heads=4, kv=2, vocab=512, batch=4,
                     seq=64, rank=8, dtype="float32"),
    "gpu-1b": dict(hidden=2048, inter=5632, layers=16, heads=32, kv=8, vocab=32000, batch=8,
                   seq=1024, rank=16, dtype="bfloat16"),
}


def _hf_config(p):
    return dict(model_type="llama", vocab_size=p["vocab"], hidden_size=p["hidden"],
                intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=p["seq"],
                tie_word_embeddings=False, hidden_act="silu")


def _time(fn, steps, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _loss(logits, ids):
    logits = logits[:, :-1].astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def _measure(fn, args, steps, tokens):
    """Compiles ``fn`` (state donated), reads its cost and memory, times it."""
    compiled = jax.jit(fn, donate_argnums=(0, 1)).lower(*args).compile()
    cost, mem = compiled.cost_analysis(), compiled.memory_analysis()
    state = list(args)

    def run():
        state[0], state[1], loss = compiled(*state)
        loss.block_until_ready()

    sec = _time(run, steps)
    flops = float(cost.get("flops", float("nan")))
    return dict(seconds=sec, tokens_per_s=tokens / sec, flops=flops,
                tflops_per_s=flops / sec / 1e12,
                persistent_bytes=mem.argument_size_in_bytes + mem.output_size_in_bytes
                - mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes)


def model_flops(p, adapter_params: int) -> dict[str, float]:
    """Analytic matmul FLOPs per step (XLA's GPU cost_analysis misses cuBLAS custom calls).

    Full fine-tuning: 3 x (2 P + 4 T d L) per token (forward, input and weight grads).
    LoRA: the frozen weights need no weight grad: 4 P + 6 P_adapter + 12 T d L per token.
    """
    d, f, L, T = p["hidden"], p["inter"], p["layers"], p["seq"]
    kv = d // p["heads"] * p["kv"]
    linear = L * (2 * d * d + 2 * d * kv + 3 * d * f) + d * p["vocab"]
    tokens = p["batch"] * T
    attn = 4 * T * d * L
    return {"full fine-tuning (JAX)": tokens * 3 * (2 * linear + attn),
            "jlora LoRA (JAX)": tokens * (4 * linear + 6 * adapter_params + 3 * attn)}


def bench_jax(p, steps, remat):
    dtype = jnp.dtype(p["dtype"])
    hf = _hf_config(p)
    model = LlamaForCausalLM(DecoderConfig.from_hf(hf), dtype=dtype, param_dtype=dtype,
                             remat=remat)
    ids = jax.random.randint(jax.random.key(0), (p["batch"], p["seq"]), 0, p["vocab"])
    variables = jax.jit(model.init)(jax.random.key(1), ids)
    cfg = jlora.LoraConfig(rank=p["rank"], alpha=2 * p["rank"], targets="all-linear")
    params = jlora.inject(variables, cfg, jax.random.key(2))
    trainable, frozen = jlora.split(params)
    fwd = jlora.lora(model.apply)
    tx = optax.adamw(1e-4)
    ltx = jlora.optimizer(tx, trainable)

    def lora_step(t, st, frozen, ids):
        loss, g = jax.value_and_grad(lambda t: _loss(fwd(jlora.combine(t, frozen), ids), ids))(t)
        u, st = ltx.update(g, st, t)
        return optax.apply_updates(t, u), st, loss

    def full_step(q, st, ids):
        loss, g = jax.value_and_grad(lambda q: _loss(model.apply(q, ids), ids))(q)
        u, st = tx.update(g, st, q)
        return optax.apply_updates(q, u), st, loss

    out = {}
    runs = {"jlora LoRA (JAX)": (lora_step, [trainable, ltx.init(trainable), frozen, ids]),
            "full fine-tuning (JAX)": (full_step, [variables, tx.init(variables), ids])}
    for name, (fn, args) in runs.items():
        out[name] = _measure(fn, args, steps, p["batch"] * p["seq"])
    del runs
    analytic = model_flops(p, jlora.summary(params).trainable)
    for name, r in out.items():
        r["model_flops"] = analytic[name]
        r["model_tflops_per_s"] = analytic[name] / r["seconds"] / 1e12
    out["_summary"] = str(jlora.summary(params))
    return out


def bench_peft(p, steps):
    import peft
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, p["dtype"])
    hf = _hf_config(p)
    hf.pop("model_type")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).to(dev, dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=p["rank"], lora_alpha=2 * p["rank"],
                                                       target_modules="all-linear"))
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.randint(0, p["vocab"], (p["batch"], p["seq"]), device=dev)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    sec = _time(run, steps)
    return {"PEFT LoRA (PyTorch eager)": dict(seconds=sec,
                                              tokens_per_s=p["batch"] * p["seq"] / sec)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peft", action="store_true", help="also time PEFT + PyTorch")
    ap.add_argument("--remat", action="store_true", help="rematerialise decoder blocks")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    backend = jax.default_backend()
    device = jax.devices()[0].device_kind
    res = bench_jax(p, args.steps, args.remat)
    summary = res.pop("_summary")
    print(json.dumps(res, indent=1, default=float), flush=True)
    if args.peft:
        jax.clear_caches()  # free the JAX side before PyTorch allocates
        res.update(bench_peft(p, args.steps))
    ref = res["full fine-tuning (JAX)"]["seconds"]
    lines = [f"# Train step, preset `{args.preset}` on {device} ({backend})", "",
             f"{p} — {summary}", "",
             "| contender | ms/step | tokens/s | time vs full FT (JAX) | model TFLOP/step "
             "| model TFLOP/s | XLA-counted TFLOP/step |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res.items():
        mf = f"{r['model_flops'] / 1e12:,.2f}" if "model_flops" in r else "–"
        mfs = f"{r['model_tflops_per_s']:.1f}" if "model_flops" in r else "–"
        xf = f"{r['flops'] / 1e12:,.2f}" if "flops" in r else "–"
        lines.append(f"| {name} | {1e3 * r['seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['seconds'] / ref:.2f} | {mf} | {mfs} | {xf} |")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_step_{args.preset}_{backend}"
    stem.with_suffix(".md").write_text(text + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        dict(preset=args.preset, params=p, device=device, backend=backend, results=res),
        indent=2, default=float))
    return res


if __name__ == "__main__":
    main()
