"""Where a compiled JAX step spends its time, part by part (used by :mod:`experiments.bench`).

``profile(compiled, run, steps)`` traces ``steps`` calls of ``run`` with ``jax.profiler``
(a perfetto trace: XLA:CPU records one event per executed thunk, named after its HLO
instruction), maps every instruction of the optimized HLO to a part of the model (from the
name stack in its metadata: module path, forward ``jvp(...)`` or backward
``transpose(jvp(...))``, and the shapes of the matmuls it fuses) and sums the thunks' time per
part. The op time can exceed the wall time when XLA runs independent thunks concurrently;
the table reports both.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from collections.abc import Callable

import jax

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+?)(?:\{[^}]*\})? ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_SHAPE = re.compile(r"^[a-z]+\d*\[([\d,]*)\]")
_OPNAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OPERANDS = re.compile(r"%([\w.\-]+)")


def _dims(shape: str) -> tuple[int, ...]:
    m = _SHAPE.match(shape)
    if not m or not m.group(1):
        return ()
    return tuple(int(d) for d in m.group(1).split(","))


def parse_hlo(text: str) -> dict[str, dict]:
    """Every instruction of an optimized HLO module: ``name -> {opcode, shape, op_name,
    computation, dots}``; ``dots`` lists ``(lhs dims, rhs dims, out dims)`` of the dots the
    instruction is or fuses (resolved through called computations)."""
    instrs: dict[str, dict] = {}
    comps: dict[str, list[str]] = collections.defaultdict(list)
    comp = None
    for line in text.splitlines():
        m = _COMP.match(line)
        if m:
            comp = m.group(1)
            continue
        m = _INSTR.match(line)
        if not m or comp is None:
            continue
        name, shape, opcode, rest = m.groups()
        args = rest.split(")", 1)[0]
        op = _OPNAME.search(rest)
        calls = _CALLS.findall(rest)
        instrs[name] = dict(opcode=opcode, shape=_dims(shape), op_name=op.group(1) if op else "",
                            computation=comp, operands=_OPERANDS.findall(args), calls=calls)
        comps[comp].append(name)

    def dots_of(name: str, seen: set) -> list:
        ins = instrs[name]
        out = []
        if ins["opcode"] == "dot":
            shapes = [instrs[o]["shape"] if o in instrs else () for o in ins["operands"][:2]]
            out.append((*shapes, ins["shape"]))
        for c in ins["calls"]:
            if c in seen:
                continue
            seen.add(c)
            for n in comps.get(c, ()):
                out.extend(dots_of(n, seen))
        return out

    for name, ins in instrs.items():
        ins["dots"] = dots_of(name, set())
    return instrs


def classify(ins: dict, rank: int) -> str:
    """The part of a decoder train step an HLO instruction belongs to."""
    op = ins["op_name"]
    back = "transpose(jvp" in op
    where = "backward" if back else "forward"
    module = op.split(")/", 1)[-1] if ")/" in op else op
    if ins["opcode"] in ("while", "conditional", "call"):
        return "control flow (the op time of its body is counted in its parts)"
    if ins["dots"]:
        if any(len(x) == 2 and rank in x for dot in ins["dots"] for x in dot):
            return "adapter matmuls (x@A, @B and their grads)"
        if "lm_head" in module or "attend" in module or "embed_tokens" in module \
                or "head" in module.rsplit("/", 2)[-2:][0] or "cross_entropy" in module:
            return f"vocabulary projection ({where})"
        if "_proj" in module or "dense" in module.lower():
            return f"frozen projections ({where})"
        if "attn" in module or "attention" in module:
            return f"attention matmuls ({where})"
        return f"other matmuls ({where})"
    if ins["opcode"] in ("copy", "transpose") or ins["opcode"] == "fusion" and (
            "/transpose" in op and not ins["dots"]):
        return "copies and transposes"
    if "jvp(" not in op:
        return "optimizer, gradient norm, state update"
    if "layernorm" in module or "/norm/" in module or module.endswith("norm"):
        return "RMSNorm"
    if "attn" in module:
        return "attention: RoPE, mask, softmax"
    if "mlp" in module:
        return "MLP activation"
    if "embed" in module:
        return "embedding"
    return "loss (log-softmax, gather) and other"


def profile(compiled, run: Callable[[], None], steps: int = 2, rank: int = 8) -> dict:
    """Traces ``steps`` calls of ``run`` and sums op time per part of the step.

    Returns ``{"wall_s": per step, "op_s": per step, "parts": {part: seconds per step},
    "top": [(instruction, part, seconds per step, op_name)]}``.
    """
    instrs = parse_hlo(compiled.as_text())
    d = tempfile.mkdtemp(prefix="jlora-trace-")
    run()
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        run()
    wall = (time.perf_counter() - t0) / steps
    jax.profiler.stop_trace()
    path = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(path))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op: dict[str, float] = collections.Counter()
    for e in events:
        if e.get("ph") != "X":
            continue
        name = e.get("args", {}).get("hlo_op")
        if name in instrs:
            per_op[name] += e["dur"] * 1e-6 / steps
    parts: dict[str, float] = collections.Counter()
    for name, s in per_op.items():
        part = classify(instrs[name], rank)
        if not part.startswith("control flow"):
            parts[part] += s
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:25]
    return {"wall_s": wall, "op_s": sum(parts.values()),
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
            "top": [(n, classify(instrs[n], rank), s, instrs[n]["op_name"][-120:])
                    for n, s in top]}


def markdown(prof: dict) -> list[str]:
    """The breakdown as markdown lines."""
    lines = [f"Wall {prof['wall_s']:.3f} s/step; summed op time {prof['op_s']:.3f} s/step.", "",
             "| part | s/step | share of op time |", "|---|---:|---:|"]
    for part, s in prof["parts"].items():
        lines.append(f"| {part} | {s:.3f} | {100 * s / prof['op_s']:.1f}% |")
    lines += ["", "Slowest instructions:", "",
              "| instruction | part | ms/step | op_name |", "|---|---|---:|---|"]
    for n, part, s, op in prof["top"][:12]:
        lines.append(f"| `{n}` | {part} | {1e3 * s:.1f} | `{op}` |")
    return lines
