#!/usr/bin/env python3
"""The PyTorch side of the GPU benchmark (runtime/gpu/bench.sh runs it).

Measures, on the GPU and in the same run as `moec bench --backend cuda`:

- the device's yardsticks: the dense bf16 GEMM rate (one 8192^3 matmul) and
  the device-to-device copy bandwidth (a 1 GiB copy; read + write bytes);
- the benchmark's layers (runtime/gpu/layers/*.moe) written in PyTorch, two
  ways: a loop over experts as Hugging Face's MixtralSparseMoeBlock writes it
  (gather an expert's tokens, its three projections, a weighted
  index_add_), and the same layer on `torch._grouped_mm` (tokens sorted by
  expert, one grouped GEMM per projection), where this PyTorch has it.

Both PyTorch versions compute the same layer as the .moe file (router
included: softmax top-2 for Mixtral; sigmoid scores, selection bias, the
best 4 of 8 groups, top-8, renormalised, times 2.5, plus the shared expert
for DeepSeek-V3), with the same sizes; the eight DeepSeek-V3 ranks' tokens
are one batch of 32768 on the one GPU. Their outputs are checked against
each other. Weights are random (the timings do not depend on them beyond the
routing's balance, which random router weights keep near uniform).

Then it reads moec's JSON reports (`--moec FILE`) and writes the
comparison: a Markdown section for BENCHMARKS.md and one JSON object.

`--device cpu --small` runs the whole script on the CPU at toy sizes: a
check of the script itself, not a benchmark.
"""

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# The layers of runtime/gpu/layers/*.moe, keyed by moec's layer names.
LAYERS = {
    "mixtral_1gpu": dict(
        title="Mixtral-8x7B size, 1 rank",
        hidden=4096, ffn=14336, experts=8, top_k=2, tokens=16384, ranks=1,
        router="softmax", shared=0,
    ),
    "deepseek_v3_8ranks": dict(
        title="DeepSeek-V3 size, 8 virtual ranks",
        hidden=7168, ffn=2048, experts=256, top_k=8, tokens=4096, ranks=8,
        router="deepseek", groups=8, groups_kept=4, scale=2.5, shared=2048,
    ),
}

GOAL = 0.70  # GEMMs and memory-bound kernels: at least 70% of the yardstick


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def shrink(cfg):
    """Toy sizes for --small (a check of the script, not a benchmark)."""
    c = dict(cfg)
    c.update(hidden=128, ffn=64, tokens=256 // c["ranks"] or 32)
    if c["shared"]:
        c["shared"] = 64
    return c


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, iters, warmup):
        """Seconds of each of `iters` calls of fn, after `warmup` calls."""
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            if self.cuda:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return times


def summary(times):
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3}


def dense_rate(device, timer, n, iters):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    times = timer(lambda: a @ b, iters, 3)
    t = statistics.median(times)
    return {"n": n, "median_ms": t * 1e3, "tflops": 2 * n**3 / t / 1e12}


def copy_bandwidth(device, timer, nbytes, iters):
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = timer(lambda: dst.copy_(src), iters, 3)
    t = statistics.median(times)
    return {"bytes": nbytes, "median_ms": t * 1e3, "gbps": 2 * nbytes / t / 1e9}


class Layer:
    """One MoE layer's weights and its two PyTorch forwards."""

    def __init__(self, cfg, device, dtype, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        h, f, e = cfg["hidden"], cfg["ffn"], cfg["experts"]
        self.cfg, self.dtype = cfg, dtype

        def init(*shape, fan_in):
            w = torch.empty(*shape, device=device, dtype=dtype)
            return w.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in), generator=g)

        self.router = init(e, h, fan_in=h)
        # [gate; up] per expert, as the experts' first grouped GEMM reads it.
        self.w13 = init(e, 2 * f, h, fan_in=h)
        self.w2 = init(e, h, f, fan_in=f)
        self.bias = None
        if cfg["router"] == "deepseek":
            self.bias = torch.empty(e, device=device, dtype=torch.float32)
            # As moec draws it: half the spread of sigmoid scores (1/24).
            self.bias.uniform_(-1 / 24, 1 / 24, generator=g)
        self.shared = None
        if cfg["shared"]:
            s = cfg["shared"]
            self.shared = (init(2 * s, h, fan_in=h), init(h, s, fan_in=s))

    def route(self, x):
        """(top-k expert ids [T, k], their weights [T, k] in f32)."""
        c = self.cfg
        logits = (x @ self.router.t()).float()
        k = c["top_k"]
        if c["router"] == "softmax":
            probs = torch.softmax(logits, dim=-1)
            w, idx = torch.topk(probs, k, dim=-1)
            return idx, w / w.sum(dim=-1, keepdim=True)
        scores = torch.sigmoid(logits)
        biased = scores + self.bias
        t, e = biased.shape
        groups = biased.view(t, c["groups"], e // c["groups"])
        group_score = groups.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_score.topk(c["groups_kept"], dim=-1).indices
        mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, kept, True)
        mask = mask.unsqueeze(-1).expand_as(groups).reshape(t, e)
        idx = biased.masked_fill(~mask, float("-inf")).topk(k, dim=-1).indices
        w = scores.gather(1, idx)
        return idx, w / w.sum(dim=-1, keepdim=True) * c["scale"]

    def shared_out(self, x):
        w13, w2 = self.shared
        gate, up = (x @ w13.t()).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ w2.t()

    def forward_loop(self, x):
        """Hugging Face's MixtralSparseMoeBlock: a loop over the experts hit."""
        idx, w = self.route(x)
        out = torch.zeros_like(x)
        f = self.cfg["ffn"]
        mask = F.one_hot(idx, num_classes=self.cfg["experts"]).permute(2, 1, 0)
        hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit.flatten().tolist():
            slot, tok = torch.where(mask[e])
            cur = x[tok]
            w13 = self.w13[e]
            h = F.silu(cur @ w13[:f].t()) * (cur @ w13[f:].t())
            y = (h @ self.w2[e].t()) * w[tok, slot, None].to(x.dtype)
            out.index_add_(0, tok, y)
        if self.shared is not None:
            out += self.shared_out(x)
        return out

    def forward_grouped(self, x):
        """Tokens sorted by expert, one torch._grouped_mm per projection."""
        idx, w = self.route(x)
        k = self.cfg["top_k"]
        flat = idx.flatten()
        order = torch.argsort(flat, stable=True)
        tok = order // k
        counts = torch.bincount(flat, minlength=self.cfg["experts"])
        offs = torch.cumsum(counts, dim=0, dtype=torch.int32)
        xs = x[tok]
        # mat_b as [E, K, N] views of the [E, N, K] weights (column-major B).
        h13 = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)
        gate, up = h13.chunk(2, dim=-1)
        h = F.silu(gate) * up
        y = torch._grouped_mm(h, self.w2.transpose(1, 2), offs=offs)
        y = y * w.flatten()[order, None].to(x.dtype)
        out = torch.zeros_like(x).index_add_(0, tok, y)
        if self.shared is not None:
            out += self.shared_out(x)
        return out


def relative_error(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_layer(name, cfg, device, timer, iters, warmup, seed):
    t_all = cfg["tokens"] * cfg["ranks"]
    log(f"{name}: {t_all} tokens, hidden {cfg['hidden']}, {cfg['experts']} experts x "
        f"{cfg['ffn']}, top-{cfg['top_k']}")
    dtype = torch.bfloat16
    layer = Layer(cfg, device, dtype, seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    x = torch.empty(t_all, cfg["hidden"], device=device, dtype=dtype).uniform_(-1, 1, generator=g)
    result = {"layer": name, "title": cfg["title"], "tokens": t_all}
    with torch.no_grad():
        ref = layer.forward_loop(x)
        times = timer(lambda: layer.forward_loop(x), iters, warmup)
        result["loop"] = summary(times)
        log(f"  loop over experts: {result['loop']['median_ms']:.3f} ms")
        try:
            got = layer.forward_grouped(x)
            err = relative_error(got, ref)
            if not err < 2e-2:
                raise RuntimeError(f"disagrees with the loop: relative error {err:.3e}")
            times = timer(lambda: layer.forward_grouped(x), iters, warmup)
            result["grouped_mm"] = summary(times)
            result["grouped_mm"]["relative_error_vs_loop"] = err
            log(f"  torch._grouped_mm: {result['grouped_mm']['median_ms']:.3f} ms "
                f"(relative error vs the loop {err:.2e})")
        except Exception as e:  # noqa: BLE001 - any failure is reported, not fatal
            result["grouped_mm"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  torch._grouped_mm: not measured: {result['grouped_mm']['error']}")
    del layer, x, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def pct(a, b):
    return 100.0 * a / b if b else 0.0


def verdict(ok):
    return "met" if ok else "**not met**"


def markdown(report):
    d = report["device"]
    lines = [
        f"### {report['date']}, {d['name']} (`runtime/gpu/bench.sh`)",
        "",
        f"Yardsticks measured in the same run: dense bf16 GEMM ({d['dense']['n']}^3) "
        f"**{d['dense']['tflops']:.0f} TFLOP/s**; device-to-device copy of "
        f"{d['copy']['bytes'] >> 20} MiB **{d['copy']['gbps']:.0f} GB/s** (read + write). "
        f"PyTorch {report['torch']}.",
        "",
        "| layer | moec ms | PyTorch loop ms | PyTorch `_grouped_mm` ms | moec vs loop | moec vs grouped |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    details = []
    for r in report["layers"]:
        m = r.get("moec")
        loop = r["loop"]["median_ms"]
        grouped = r["grouped_mm"].get("median_ms")
        moec_ms = m["total_ms"]["median"] if m else None
        cell = lambda v: f"{v:.3f}" if v is not None else "n/a"  # noqa: E731
        ratio = lambda b: f"{b / moec_ms:.2f}x" if (b and moec_ms) else "n/a"  # noqa: E731
        lines.append(
            f"| {r['title']} | {cell(moec_ms)} | {cell(loop)} | {cell(grouped)} | "
            f"{ratio(loop)} | {ratio(grouped)} |"
        )
        if not m:
            details.append(f"- {r['title']}: no moec report.")
            continue
        gemm = m["expert_gemm"]["tflops"]
        dense = d["dense"]["tflops"]
        items = [
            f"- {r['title']}: expert GEMMs {gemm:.0f} TFLOP/s = {pct(gemm, dense):.0f}% of dense "
            f"({m['expert_gemm']['calls']} cuBLAS calls; goal 70%: {verdict(gemm >= GOAL * dense)})"
        ]
        for mb in m["memory_bound"]:
            bw = mb["rate"]
            items.append(
                f"  {mb['what']} {bw:.0f} GB/s = {pct(bw, d['copy']['gbps']):.0f}% of copy "
                f"(goal 70%: {verdict(bw >= GOAL * d['copy']['gbps'])})"
            )
        faster = moec_ms < loop and (grouped is None or moec_ms < grouped)
        items.append(f"  faster than both PyTorch versions: {verdict(faster)}")
        phases = ", ".join(f"{p['phase']} {p['busy_ms']:.3f}" for p in m["phases"])
        items.append(f"  moec phases (busy ms, profiled pass): {phases}")
        if "error" in r["grouped_mm"]:
            items.append(f"  `_grouped_mm`: {r['grouped_mm']['error']}")
        details.append("\n".join(items))
    graphs = [
        m for m in report.get("moec_only", []) + [r.get("moec") for r in report["layers"]]
        if m and m.get("graph_total_ms")
    ]
    if graphs:
        details.append("")
        details.append("CUDA graphs (capacity plans; moec only):")
        for m in graphs:
            eager, graph = m["total_ms"]["median"], m["graph_total_ms"]["median"]
            details.append(
                f"- {m['layer']} ({m['ranks']} rank(s) x {m['tokens_per_rank']} tokens, "
                f"{m['experts']} experts, top-{m['top_k']}): eager {eager:.3f} ms, "
                f"as a graph {graph:.3f} ms ({eager / graph:.2f}x)"
            )
    return "\n".join(lines + [""] + details) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--moec", action="append", default=[], metavar="FILE",
                    help="a `moec bench --backend cuda --json` report (keyed by its layer)")
    ap.add_argument("--layers", default=",".join(LAYERS), help="comma-separated layer names")
    ap.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench.md/json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="toy sizes: check the script only")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: PyTorch sees no GPU (use --device cpu --small to check the script)")
    timer = Timer(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    log(f"device: {name}; PyTorch {torch.__version__}")
    small = a.small or device.type != "cuda"
    dense = dense_rate(device, timer, 256 if small else 8192, 3 if small else 20)
    log(f"dense bf16 GEMM: {dense['tflops']:.1f} TFLOP/s")
    copy = copy_bandwidth(device, timer, (1 << 20) if small else (1 << 30), 3 if small else 20)
    log(f"device-to-device copy: {copy['gbps']:.0f} GB/s")

    moec = {}
    for path in a.moec:
        try:
            with open(path) as f:
                r = json.load(f)
            moec[r["layer"]] = r
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            log(f"warning: moec report {path}: {e}")

    layers = []
    for key in [k for k in a.layers.split(",") if k]:
        if key not in LAYERS:
            sys.exit(f"error: unknown layer {key!r} (known: {', '.join(LAYERS)})")
        cfg = shrink(LAYERS[key]) if small else LAYERS[key]
        r = bench_layer(key, cfg, device, timer, a.iters, a.warmup, a.seed)
        r["moec"] = moec.get(key)
        layers.append(r)

    known = set(LAYERS)
    report = {
        "moec_only": [m for key, m in moec.items() if key not in known],
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "small": small,
        "device": {"name": name, "dense": dense, "copy": copy},
        "layers": layers,
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench.json"), "w") as f:
        json.dump(report, f, indent=2)
    text = markdown(report)
    with open(os.path.join(a.out, "bench.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
