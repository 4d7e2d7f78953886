"""Train-step benchmark: jlora LoRA vs jlora full fine-tuning vs qwix LoRA vs PEFT, one run.

Every contender trains the same Llama-shaped decoder (random weights, fp32 on a CPU) on the
same token batch with AdamW, each in its own process (started once, kept warm). Each round
runs every contender's step once, in a new random order, with a pause between them; the
first rounds are warm-up; the table gives medians over the timed rounds:

* **jlora LoRA**: jlora's default path, ``jlora.train.init`` + ``make_train_step`` over
  ``jlora.train.causal_lm_loss`` of jlora's Llama (``jlora.lora`` inside), rank 8 on all
  seven projections.
* **jlora QLoRA**: the same, on the same model with its linear kernels in NF4
  (``jlora.quantize``, double quantization): the step's time and its argument and
  temporary bytes against jlora LoRA on the full-precision base (the ``vs jlora LoRA``
  column and the bytes table).
* **jlora full fine-tuning**: the same model and loss, every param trained, one jitted
  step with params and optimizer state donated.
* **qwix LoRA**: the same Flax model through ``qwix.apply_lora_to_model`` (same rank, alpha
  and targets), grads w.r.t. qwix's LoRA params only, optax's cross-entropy on the logits
  (what a qwix user writes), state donated.
* **PEFT LoRA**: transformers' ``LlamaForCausalLM`` + ``peft.get_peft_model`` in PyTorch
  eager, ``torch.optim.AdamW``, the same thread count as XLA (every core); and the same
  again with the glibc settings the JAX contenders run with (``reuse_host_memory``), so
  that neither side pays page faults the other does not.

Also measured: each JAX step's compiled FLOPs, bytes accessed and temporary bytes, compile
time; the machine's fp32 matmul rate on the step's own matmul shapes (the ceiling), in JAX
and in PyTorch; a ``jax.profiler`` breakdown of the jlora LoRA step by part
(:mod:`experiments.profile_step`).

  python -m experiments.bench --preset cpu       # the issue's config, ~6 minutes on 2 cores
  python -m experiments.bench --preset gpu-1b    # a ~1B bf16 model on one GPU

Writes ``experiments/results/bench_<preset>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

PRESETS = {
    # the config of issue 8: a ~58M-param Llama, 2048 tokens a step
    "cpu": dict(vocab=32000, hidden=512, inter=1376, layers=8, heads=8, kv=8, batch=8,
                seq=256, rank=8, dtype="float32"),
    "gpu-1b": dict(vocab=32000, hidden=2048, inter=5632, layers=16, heads=32, kv=8, batch=8,
                   seq=1024, rank=16, dtype="bfloat16"),
    # seconds, for smoke tests of this script
    "tiny": dict(vocab=512, hidden=64, inter=160, layers=2, heads=4, kv=2, batch=2, seq=32,
                 rank=4, dtype="float32"),
}
# "PEFT LoRA, memory kept": PEFT with the glibc settings jlora's command uses
# (jlora.train.reuse_host_memory); PyTorch's CPU allocator returns freed blocks to the OS,
# and their page faults cost PEFT 0.5-1.6 s of system time per step here, varying run to
# run: with the same settings as jlora, that cost is gone and the comparison is like for like.
CONTENDERS = ("jlora LoRA", "jlora QLoRA", "jlora full FT", "qwix LoRA", "PEFT LoRA",
              "PEFT LoRA, memory kept")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def hf_config(p: dict) -> dict:
    return dict(model_type="llama", vocab_size=p["vocab"], hidden_size=p["hidden"],
                intermediate_size=p["inter"], num_hidden_layers=p["layers"],
                num_attention_heads=p["heads"], num_key_value_heads=p["kv"],
                rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=p["seq"],
                tie_word_embeddings=False, hidden_act="silu")


def token_ids(p: dict):
    import numpy as np

    return np.random.default_rng(0).integers(0, p["vocab"], (p["batch"], p["seq"]),
                                             dtype=np.int32)


# --------------------------------------------------------------------------- contenders
# Each builder returns (step, info): step() runs one train step to completion.


def _jax_model(p: dict):
    import jax.numpy as jnp

    from jlora.models.llama import DecoderConfig, LlamaForCausalLM

    dtype = jnp.dtype(p["dtype"])
    return LlamaForCausalLM(DecoderConfig.from_hf(hf_config(p)), dtype=dtype, param_dtype=dtype)


def _compiled_info(lowered, t0: float) -> tuple:
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    mem = compiled.memory_analysis()
    info = dict(flops=float(cost.get("flops", float("nan"))),
                bytes_accessed=float(cost.get("bytes accessed", float("nan"))),
                temp_bytes=int(mem.temp_size_in_bytes),
                argument_bytes=int(mem.argument_size_in_bytes),
                trace_lower_s=t1 - t0, compile_s=t2 - t1)
    return compiled, info


def jlora_lora(p: dict, quantize: bool = False):
    import jax
    import optax

    import jlora

    model = _jax_model(p)
    ids = token_ids(p)
    variables = jax.jit(model.init)(jax.random.key(1), ids[:1])
    if quantize:  # QLoRA: NF4 with double quantization, all linear kernels but the head
        variables = jlora.quantize(variables)
    cfg = jlora.LoraConfig(rank=p["rank"], alpha=2 * p["rank"], targets=list(TARGETS))
    params = jlora.inject(variables, cfg, jax.random.key(2))
    precision = jlora.train.Precision(p["dtype"], p["dtype"])
    tx = optax.adamw(1e-4)
    state, frozen, sh = jlora.train.init(params, tx, jax.random.key(3), precision=precision)
    step = jlora.train.make_train_step(jlora.train.causal_lm_loss(model.apply), tx, sh,
                                       precision=precision)
    batch = jlora.train.shard_batch({"input_ids": ids}, sh.batch)
    t0 = time.perf_counter()
    compiled, info = _compiled_info(step.lower(state, frozen, batch), t0)
    info["trainable_params"] = jlora.summary(params).trainable
    box = [state]

    def run():
        box[0], metrics = step(box[0], frozen, batch)
        metrics["loss"].block_until_ready()

    return run, info, compiled


def jlora_full(p: dict):
    import jax
    import optax

    import jlora

    model = _jax_model(p)
    ids = token_ids(p)
    params = jax.jit(model.init)(jax.random.key(1), ids[:1])
    loss_fn = jlora.train.causal_lm_loss(model.apply)
    tx = optax.adamw(1e-4)

    def full_step(params, opt_state, batch):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, None)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    jitted = jax.jit(full_step, donate_argnums=(0, 1))
    batch = {"input_ids": jax.numpy.asarray(ids)}
    box = [params, tx.init(params)]
    t0 = time.perf_counter()
    compiled, info = _compiled_info(jitted.lower(*box, batch), t0)

    def run():
        box[0], box[1], loss = compiled(box[0], box[1], batch)
        loss.block_until_ready()

    return run, info, compiled


def qwix_lora(p: dict):
    import jax
    import jax.numpy as jnp
    import optax
    import qwix

    model = _jax_model(p)
    ids = jnp.asarray(token_ids(p))
    provider = qwix.LoraProvider(module_path=".*(" + "|".join(TARGETS) + ")", rank=p["rank"],
                                 alpha=float(2 * p["rank"]))
    qmodel = qwix.apply_lora_to_model(model, provider)
    variables = jax.jit(qmodel.init)(jax.random.key(1), ids[:1])
    is_lora = lambda kp, _: "lora" in jax.tree_util.keystr(kp)  # noqa: E731
    mask = jax.tree_util.tree_map_with_path(is_lora, variables)
    trainable = jax.tree.map(lambda x, m: x if m else None, variables, mask)
    frozen = jax.tree.map(lambda x, m: None if m else x, variables, mask)
    n_lora = sum(x.size for x in jax.tree.leaves(trainable))
    merge = lambda t, f: jax.tree.map(lambda a, b: b if a is None else a, t, f,  # noqa: E731
                                      is_leaf=lambda x: x is None)
    tx = optax.adamw(1e-4)

    def loss_fn(t, f, ids):
        logits = qmodel.apply(merge(t, f), ids)
        return optax.softmax_cross_entropy_with_integer_labels(
            logits[:, :-1].astype(jnp.float32), ids[:, 1:]).mean()

    def step(t, opt_state, f, ids):
        loss, g = jax.value_and_grad(loss_fn)(t, f, ids)
        updates, opt_state = tx.update(g, opt_state, t)
        return optax.apply_updates(t, updates), opt_state, loss

    jitted = jax.jit(step, donate_argnums=(0, 1))
    box = [trainable, tx.init(trainable)]
    t0 = time.perf_counter()
    compiled, info = _compiled_info(jitted.lower(*box, frozen, ids), t0)
    info["trainable_params"] = int(n_lora)

    def run():
        box[0], box[1], loss = compiled(box[0], box[1], frozen, ids)
        loss.block_until_ready()

    return run, info, compiled


def peft_lora(p: dict):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, p["dtype"])
    hf = hf_config(p)
    hf.pop("model_type")
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).to(dev, dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=p["rank"], lora_alpha=2 * p["rank"],
                                                       target_modules=list(TARGETS)))
    model.train()
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
    ids = torch.as_tensor(token_ids(p), dtype=torch.long, device=dev)

    def run():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()

    info = dict(threads=torch.get_num_threads(), device=dev,
                trainable_params=sum(q.numel() for q in model.parameters() if q.requires_grad))
    return run, info, None


def jlora_qlora(p: dict):
    """jlora's LoRA step on the same model with its linear kernels in NF4 (QLoRA)."""
    return jlora_lora(p, quantize=True)


BUILDERS = {"jlora LoRA": jlora_lora, "jlora QLoRA": jlora_qlora, "jlora full FT": jlora_full,
            "qwix LoRA": qwix_lora, "PEFT LoRA": peft_lora, "PEFT LoRA, memory kept": peft_lora}


# --------------------------------------------------------------------------- matmul ceiling


def matmul_shapes(p: dict) -> list[tuple[str, int, int, int, int, str]]:
    """The big matmuls of one LoRA step: ``(what, count, m, k, n, layout)``.

    ``NN``: x @ W (forward), ``NT``: g @ W.T (input gradient); attention as batched matmuls
    (``B``) over batch x heads. The adapters' thin matmuls are left out (memory-bound, <3%
    of the FLOPs).
    """
    t, d, f, v = p["batch"] * p["seq"], p["hidden"], p["inter"], p["vocab"]
    hd = d // p["heads"]
    kv = hd * p["kv"]
    L, s = p["layers"], p["seq"]
    out = []
    for name, k, n, c in (("q/o", d, d, 2), ("k/v", d, kv, 2), ("gate/up", d, f, 2),
                          ("down", f, d, 1)):
        out.append((f"{name} forward", c * L, t, k, n, "NN"))
        out.append((f"{name} input grad", c * L, t, n, k, "NT"))
    out.append(("lm_head forward", 1, t, d, v, "NN"))
    out.append(("lm_head input grad", 1, t, v, d, "NT"))
    out.append(("attention q@k (fwd), dP (bwd)", 2 * L, s, hd, s, "B"))
    out.append(("attention p@v (fwd), dV, dQ, dK (bwd)", 4 * L, s, s, hd, "B"))
    return out


def ceiling(p: dict, reps: int = 5) -> dict:
    """Times each matmul of :func:`matmul_shapes` alone in JAX and PyTorch (median of
    ``reps``); the ceiling is the step's matmul FLOPs over their summed isolated time."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    dtype = jnp.dtype(p["dtype"])
    bh = p["batch"] * p["heads"]
    rows = []
    for what, count, m, k, n, lay in matmul_shapes(p):
        rng = np.random.default_rng(0)
        if lay == "B":
            a, b = rng.standard_normal((bh, m, k)), rng.standard_normal((bh, k, n))
            f = jax.jit(lambda a, b: jnp.einsum("bmk,bkn->bmn", a, b))
            tf = lambda a, b: torch.bmm(a, b)  # noqa: E731
            flops = 2 * bh * m * k * n
        elif lay == "NN":
            a, b = rng.standard_normal((m, k)), rng.standard_normal((k, n))
            f = jax.jit(lambda a, b: a @ b)
            tf = lambda a, b: a @ b  # noqa: E731
            flops = 2 * m * k * n
        else:  # NT: b is stored (n, k), as a kernel (in, out) used for the input gradient
            a, b = rng.standard_normal((m, k)), rng.standard_normal((n, k))
            f = jax.jit(lambda a, b: a @ b.T)
            tf = lambda a, b: a @ b.T  # noqa: E731
            flops = 2 * m * k * n
        ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
        ta, tb = (torch.as_tensor(x, dtype=getattr(torch, p["dtype"]), device=dev)
                  for x in (a, b))
        f(ja, jb).block_until_ready()
        tf(ta, tb)
        sync()
        jt, tt = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            f(ja, jb).block_until_ready()
            jt.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            tf(ta, tb)
            sync()
            tt.append(time.perf_counter() - t0)
        rows.append(dict(what=what, count=count, shape=[m, k, n], layout=lay, flops=flops,
                         jax_s=statistics.median(jt), torch_s=statistics.median(tt)))
    total = sum(r["flops"] * r["count"] for r in rows)
    for r in rows:
        r["jax_gflops"] = r["flops"] / r["jax_s"] / 1e9
        r["torch_gflops"] = r["flops"] / r["torch_s"] / 1e9
    return dict(rows=rows, matmul_flops=total,
                jax_gflops=total / sum(r["jax_s"] * r["count"] for r in rows) / 1e9,
                torch_gflops=total / sum(r["torch_s"] * r["count"] for r in rows) / 1e9)


# --------------------------------------------------------------------------- worker process


def worker(name: str, preset: str) -> None:
    """Builds one contender, then serves ``step`` / ``profile`` / ``quit`` on stdin."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr
    sys.stdout = sys.stderr
    if name != "PEFT LoRA":
        from jlora.train import reuse_host_memory

        reuse_host_memory()  # the library's default for its own command
    p = PRESETS[preset]
    if name == "ceiling":
        proto.write(json.dumps(ceiling(p)) + "\n")
        return
    t0 = time.perf_counter()
    try:
        run, info, compiled = BUILDERS[name](p)
    except Exception as e:  # e.g. qwix not installed: reported in the table
        proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        raise
    run()  # the first step (may finish compiling, allocate)
    info["setup_s"] = time.perf_counter() - t0
    proto.write(json.dumps(info) + "\n")
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), os.times(), time.perf_counter()
            run()
            t1, c1, r1 = time.perf_counter(), os.times(), resource.getrusage(resource.RUSAGE_SELF)
            proto.write(json.dumps(dict(wall=t1 - t0, user=c1.user - c0.user,
                                        sys=c1.system - c0.system,
                                        faults=r1.ru_minflt - r0.ru_minflt)) + "\n")
        elif cmd == "profile":
            from experiments.profile_step import profile

            proto.write(json.dumps(profile(compiled, run, rank=p["rank"])) + "\n")
        else:
            return


class Worker:
    def __init__(self, name: str, preset: str):
        self.name = name
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "experiments.bench", "--worker", name, "--preset", preset],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
            cwd=Path(__file__).parent.parent,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.name!r} exited (code {self.proc.wait()}); "
                               "see its stderr above")
        return json.loads(line)

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


# --------------------------------------------------------------------------- driver


def _busy() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, wall clock) from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    ticks = [int(x) for x in fields]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), time.perf_counter()


def wait_quiet(max_wait: float, threshold: float = 0.25) -> float:
    """Waits (up to ``max_wait`` s) until the machine's other work uses under ``threshold``
    cores over half a second; returns the cores busy in the last sample."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = _busy()
        time.sleep(0.5)
        b1, t1 = _busy()
        cores = (b1 - b0) / (t1 - t0)
        if cores < threshold or time.perf_counter() > deadline:
            return cores



def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for n in ("jax", "jaxlib", "flax", "optax", "qwix", "torch", "transformers", "peft",
              "numpy"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = "not installed"
    return out


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(x.split()[1]) for x in Path("/proc/meminfo").read_text().splitlines()
                   if x.startswith("MemTotal"))
        mem_gb = round(mem / 2**20, 1)
    except (OSError, StopIteration):
        mem_gb = None
    return dict(cpu=cpu, cores=os.cpu_count(), memory_gb=mem_gb, platform=platform.platform(),
                load_at_start=os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds (medians over them)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--pause", type=float, default=0.5, help="seconds between two steps")
    ap.add_argument("--quiet-wait", type=float, default=20.0,
                    help="before each step wait up to this many seconds for other processes "
                    "to leave the CPU (0: do not wait)")
    ap.add_argument("--only", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    ap.add_argument("--no-profile", action="store_true", help="skip the LoRA step's profile")
    ap.add_argument("--seed", type=int, default=None, help="seed of the orders (default: time)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--tag", default="", help="suffix of the result files")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker, a.preset)
        return {}
    p = PRESETS[a.preset]
    t_start = time.perf_counter()
    report: dict = dict(preset=a.preset, params=p, versions=_versions(), machine=_machine(),
                        date=time.strftime("%Y-%m-%d %H:%M"), rounds=a.rounds,
                        warmup=a.warmup, pause_s=a.pause, contenders={}, errors={})
    print("measuring the matmul ceiling ...", flush=True)
    if a.quiet_wait:
        wait_quiet(a.quiet_wait)
    report["ceiling"] = Worker("ceiling", a.preset).read()
    workers = {}
    for name in a.only:  # one at a time: compile timings are not disturbed
        print(f"starting {name} ...", flush=True)
        w = Worker(name, a.preset)
        try:
            info = w.read()
            if "error" in info:
                raise RuntimeError(info["error"])
            report["contenders"][name] = dict(info=info, steps=[])
            workers[name] = w
        except (RuntimeError, json.JSONDecodeError) as e:
            report["errors"][name] = str(e)
            print(f"{name} failed: {e}", flush=True)
    rng = random.Random(a.seed)
    report["orders"] = []
    try:
        for r in range(a.warmup + a.rounds):
            order = list(workers)
            rng.shuffle(order)
            report["orders"].append(order)
            for name in order:
                time.sleep(a.pause)
                if a.quiet_wait:
                    wait_quiet(a.quiet_wait)
                b0, _ = _busy()
                res = workers[name].ask("step")
                res["foreign_cpu"] = max(0.0, _busy()[0] - b0 - res["user"] - res["sys"])
                res["round"], res["warmup"] = r, r < a.warmup
                report["contenders"][name]["steps"].append(res)
            print(f"round {r + 1}/{a.warmup + a.rounds}: " + ", ".join(
                f"{n} {report['contenders'][n]['steps'][-1]['wall']:.2f}s" for n in order),
                flush=True)
        if "jlora LoRA" in workers and not a.no_profile:
            time.sleep(a.pause)
            report["profile"] = workers["jlora LoRA"].ask("profile")
    finally:
        for w in workers.values():
            w.close()
    for c in report["contenders"].values():
        timed = [s for s in c["steps"] if not s["warmup"]]
        for k in ("wall", "user", "sys", "faults", "foreign_cpu"):
            c[k] = statistics.median(s[k] for s in timed) if timed else float("nan")
    report["bench_seconds"] = time.perf_counter() - t_start
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench_{a.preset}{a.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    stem.with_suffix(".md").write_text(text)
    print(text)
    return report


def markdown(report: dict) -> str:
    p, cs = report["params"], report["contenders"]
    ceil = report["ceiling"]["jax_gflops"]
    ref = lambda name: cs[name]["wall"] if name in cs else float("nan")  # noqa: E731
    lines = [f"# Train step, preset `{report['preset']}`", "",
             f"Llama: vocab {p['vocab']}, hidden {p['hidden']}, intermediate {p['inter']}, "
             f"{p['layers']} layers, {p['heads']} heads ({p['kv']} kv), batch {p['batch']} x "
             f"seq {p['seq']}, LoRA rank {p['rank']} (alpha {2 * p['rank']}) on all seven "
             f"projections, AdamW, {p['dtype']}. Each contender in its own process; "
             f"{report['warmup']} warm-up + {report['rounds']} timed rounds, every round in a "
             f"new random order with {report['pause_s']} s between steps; medians.", "",
             "| contender | s/step | vs PEFT | vs PEFT, memory kept | vs qwix | "
             "vs jlora full FT | vs jlora LoRA | GFLOP/step | GFLOP/s | % of matmul ceiling | "
             "user+sys CPU s | sys s | page faults | others' CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in cs.items():
        fl = c["info"].get("flops")
        has = fl is not None and fl == fl
        gf = f"{fl / 1e9:.0f}" if has else "–"
        rate = fl / c["wall"] / 1e9 if has else None
        lines.append(
            f"| {name} | {c['wall']:.3f} | {c['wall'] / ref('PEFT LoRA'):.2f} | "
            f"{c['wall'] / ref('PEFT LoRA, memory kept'):.2f} | "
            f"{c['wall'] / ref('qwix LoRA'):.2f} | {c['wall'] / ref('jlora full FT'):.2f} | "
            f"{c['wall'] / ref('jlora LoRA'):.2f} | {gf} | {f'{rate:.0f}' if rate else '–'} | "
            f"{f'{100 * rate / ceil:.0f}%' if rate else '–'} | {c['user'] + c['sys']:.2f} | "
            f"{c['sys']:.2f} | {c['faults']:.0f} | {c['foreign_cpu']:.2f} |")
    for name, err in report["errors"].items():
        lines.append(f"| {name} | failed: {err.splitlines()[-1][:100]} |" + " |" * 13)
    lines += ["", f"Matmul ceiling (the step's matmul shapes, each timed alone, FLOP-weighted): "
              f"JAX {ceil:.0f} GFLOP/s, PyTorch {report['ceiling']['torch_gflops']:.0f} "
              "GFLOP/s.", "",
              "| contender | compiled GFLOP | GB accessed | argument GB | temp GB | "
              "trace+lower s | compile s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, c in cs.items():
        i = c["info"]
        if "flops" in i:
            lines.append(f"| {name} | {i['flops'] / 1e9:.1f} | {i['bytes_accessed'] / 1e9:.2f}"
                         f" | {i.get('argument_bytes', float('nan')) / 1e9:.3f}"
                         f" | {i['temp_bytes'] / 1e9:.2f} | {i['trace_lower_s']:.1f} | "
                         f"{i['compile_s']:.1f} |")
    lines += ["", "| matmul | count | m x k x n | JAX GFLOP/s | PyTorch GFLOP/s |",
              "|---|---:|---|---:|---:|"]
    for r in report["ceiling"]["rows"]:
        lines.append(f"| {r['what']} ({r['layout']}) | {r['count']} | "
                     f"{' x '.join(map(str, r['shape']))} | {r['jax_gflops']:.0f} | "
                     f"{r['torch_gflops']:.0f} |")
    if "profile" in report:
        from experiments.profile_step import markdown as prof_md

        lines += ["", "## Where the jlora LoRA step's time goes", "", *prof_md(report["profile"])]
    v, m = report["versions"], report["machine"]
    lines += ["", f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, "
              f"{m['platform']}; load at start {m['load_at_start'][0]:.2f}. Versions: "
              + ", ".join(f"{k} {x}" for k, x in v.items())
              + f". {report['date']}; the whole benchmark took {report['bench_seconds']:.0f} s.",
              ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
