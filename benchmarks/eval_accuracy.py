"""Accuracy of TidalDecode on SmolLM2-135M-Instruct: pass-key retrieval, perplexity, re-selection layer.

    python benchmarks/eval_accuracy.py --device cuda --out $OUT/accuracy.json --plot $OUT/accuracy.png

* Pass key: a 5-digit key hidden at several depths of license text (/usr/share/common-licenses),
  prompts of exactly the context's token count (the largest is the model's context length minus
  room for the answer), --cases prompts per (context, depth) cell in one batch through generate()
  (greedy). The assistant turn is started with "The pass key is ", so the answer is the next few
  tokens; a case counts when the first 5-digit number of the answer is the key. Methods: full
  attention (sdpa), TidalDecode head and group mode with select layers (2, R) at each budget k, the
  same with a window ("tidal_window": the first 4 and the last k/4 tokens always kept), and a
  StreamingLLM-style baseline at the same k (every layer attends to the first 4 and the last k-4
  cached tokens at decode). The prefill (full attention for every method) predicts the first digit;
  the others come from decode steps.
* Perplexity: windows of license text, a prefix of --ppl-prefix tokens prefilled in one call (full
  attention for every method), then --ppl-tokens 1-token decode steps fed the true tokens; the
  perplexity is over the tokens those decode steps predict.
* Calibration: tidal_ext.calibrate.best_reselection_layer picks R on license-text samples; the
  pass-key grid then also runs (head mode, --calib-budgets) for two other re-selection layers (13,
  the paper's choice for 32 layers, and the worst-scoring candidate) to show best vs others.

Output: a JSON file (--out), a figure (--plot, needs matplotlib) and markdown tables on stdout.
--model random runs the same pipeline on a random-weight Llama (a smoke test, answers are noise).
"""
from __future__ import annotations

import argparse
import bisect
import datetime
import json
import os
import platform
import random
import re
import sys
import time
from typing import List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

import tidal_ext
import tidal_ext.hf
from tidal_ext import calibrate
from tidal_ext.hf import _attention_modules, _positions, compact_prefill, decode_lengths

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
from generate_demo import haystack_text, random_model  # noqa: E402

NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "What is the pass key mentioned in the text above? Answer with the number only."
# Starts the assistant turn; the trailing space makes the next tokens the key's digits (" 12345"
# tokenizes as the space, then the digits, as in the needle). Without it SmolLM2 often goes on with
# "... mentioned in the text as" and needs ~16 tokens to reach the number.
ANSWER_PREFIX = "The pass key is "
ANSWER_ROOM = 64   # the largest prompt is the context length minus this
SINK = 4           # StreamingLLM's attention sinks
PAPER_LAYER = 13   # the paper's re-selection layer (Llama-3-8B, 32 layers)
STREAMING = "tidal_streaming"
LICENSES = "/usr/share/common-licenses"  # haystack_text()'s source; without it a repeated filler


# ---------------------------------------------------------------- StreamingLLM-style baseline

def streaming_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Prefill: full attention (sdpa), then the compact cache layout of tidal_ext.hf (left padding
    moved to the back). Decode: every layer attends to the first SINK and the last top_k - SINK
    valid tokens (sparse_attention with indices built on the device from seq_lens, -1 where a
    sequence is shorter). The cache layout and seq_lens are tidal_ext.hf's (the same helpers)."""
    top_k = module.streaming_top_k
    batch, _, q_len, _ = query.shape
    if q_len > 1:
        out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                        **kwargs)
        compact_prefill(key, value, attention_mask, q_len)
        return out, None
    seq_lens = decode_lengths(key, value, attention_mask, _positions(kwargs.get("position_ids"), batch, 1, query.device))
    j = torch.arange(top_k, device=key.device)[None, :]
    n = seq_lens[:, None]
    idx = torch.where(n > top_k, torch.where(j < SINK, j, n - top_k + j), torch.where(j < n, j, -1))
    idx = idx.to(torch.int32)[:, None, :].expand(batch, key.shape[1], top_k).contiguous()  # a row per KV head
    out = torch.ops.tidal.sparse_attention(query[:, :, 0], key, value, idx, seq_lens, scaling)
    return out[:, None], None


AttentionInterface.register(STREAMING, streaming_attention_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(STREAMING, sdpa_mask)


# Table / plot rows of the tidal variants: "+ window" also keeps the first SINK and the last k / 4
# tokens (TidalConfig sink / recent), the rest of the budget still chosen by the select layers.
METHOD_NAMES = (("tidal head", "tidal", "head"), ("tidal group", "tidal", "group"),
                ("tidal head + window", "tidal_window", "head"), ("tidal group + window", "tidal_window", "group"))


class Method(NamedTuple):
    method: str                     # "full", "tidal", "tidal_window" (tidal + WINDOW) or "streaming"
    mode: Optional[str] = None      # tidal: "head" or "group"
    top_k: Optional[int] = None
    layers: Optional[Tuple[int, ...]] = None  # tidal: select layers

    def row(self) -> dict:
        return {"method": self.method, "mode": self.mode, "top_k": self.top_k,
                "select_layers": list(self.layers) if self.layers else None}


def configure(model, m: Method) -> None:
    """Switches the one model to a method (set_attn_implementation; enable() replaces the tidal state)."""
    if m.method == "full":
        model.set_attn_implementation("sdpa")
    elif m.method in ("tidal", "tidal_window"):
        window = dict(sink=SINK, recent=m.top_k // 4) if m.method == "tidal_window" else {}
        tidal_ext.hf.enable(model, tidal_ext.TidalConfig(top_k=m.top_k, select_layers=m.layers, mode=m.mode, **window))
    else:
        for module in _attention_modules(model):
            module.streaming_top_k = m.top_k
        model.set_attn_implementation(STREAMING)


# ---------------------------------------------------------------- prompts

class Haystack:
    """The license text tokenized word by word (" word" each, as in " ".join(words)), so prompts can
    be cut to an exact token count while the filler starts and the needle sits at word boundaries."""

    def __init__(self, tokenizer):
        words = haystack_text().split()
        pieces = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
        self.tokens = [t for p in pieces for t in p]
        self.starts, n = [], 0  # token index of each word's first token
        for p in pieces:
            self.starts.append(n)
            n += len(p)


def prompt_parts(tokenizer) -> Tuple[List[int], List[int]]:
    """Token ids before and after the haystack: the chat template (user turn = haystack + question,
    the assistant turn started with ANSWER_PREFIX), or a plain "Answer:" prompt without one."""
    mark = "\x00"
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark + "\n\n" + QUESTION}], tokenize=False,
                                             add_generation_prompt=True) + ANSWER_PREFIX
    else:
        text = mark + "\n\n" + QUESTION + "\nAnswer: " + ANSWER_PREFIX
    head, tail = text.split(mark)
    return [tokenizer(s, add_special_tokens=False)["input_ids"] for s in (head, tail)]


def build_cell(tokenizer, hay: Haystack, parts, length: int, depth: float, cases: int, seed: int):
    """`cases` prompts of exactly `length` tokens (different keys and filler offsets) and their keys."""
    rng = random.Random(f"{seed}:{length}:{depth}")
    head, tail = parts
    prompts, keys = [], []
    for _ in range(cases):
        key = rng.randint(10000, 99999)
        needle = tokenizer(NEEDLE.format(key=key), add_special_tokens=False)["input_ids"]
        n = length - len(head) - len(tail) - len(needle)
        if n < 0:
            raise ValueError(f"context {length}: shorter than the prompt without filler ({length - n} tokens)")
        off = hay.starts[rng.randrange(bisect.bisect_right(hay.starts, len(hay.tokens) - n))]
        filler = hay.tokens[off:off + n]
        cut = hay.starts[bisect.bisect_right(hay.starts, off + round(depth * n)) - 1] - off
        prompts.append(head + filler[:cut] + needle + filler[cut:] + tail)
        keys.append(key)
    return prompts, keys


def first_key(text: str) -> Optional[str]:
    m = re.search(r"(?<!\d)\d{5}(?!\d)", text)
    return m.group(0) if m else None


# ---------------------------------------------------------------- the three studies

class Deadline:
    def __init__(self, seconds: Optional[float]):
        self.end = time.perf_counter() + seconds if seconds else None
        self.hit = False

    def over(self) -> bool:
        self.hit = self.hit or (self.end is not None and time.perf_counter() > self.end)
        return self.hit


def progress(items: list, desc: str):
    """tqdm over the items, or a printed line per item without it."""
    try:
        from tqdm import tqdm
        return tqdm(items, desc=desc, file=sys.stderr)
    except ImportError:
        return (print(f"{desc} {i + 1}/{len(items)}: {x}", file=sys.stderr, flush=True) or x
                for i, x in enumerate(items))


def passkey_grid(model, tokenizer, contexts, depths, methods: List[Method], args, deadline: Deadline):
    """Every method on every (context, depth) cell; the cell's prompts are one left-padded batch."""
    hay, parts = Haystack(tokenizer), prompt_parts(tokenizer)
    device = next(model.parameters()).device
    rows, prompts = [], []
    for context, length, depth in progress([(c, n, d) for c, n in contexts for d in depths], "pass key cells"):
        if deadline.over():
            break
        ids, keys = build_cell(tokenizer, hay, parts, length, depth, args.cases, args.seed)
        batch = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(device)
        prompt_len = batch["input_ids"].shape[1]
        prompts.append({"context": context, "depth": depth, "prompt_tokens": prompt_len, "keys": keys})
        for m in methods:
            if deadline.over():
                break
            configure(model, m)
            out = model.generate(**batch, max_new_tokens=args.new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers = [a.strip() for a in tokenizer.batch_decode(out[:, prompt_len:], skip_special_tokens=True)]
            correct = sum(first_key(a) == str(k) for a, k in zip(answers, keys))
            rows.append({**m.row(), "context": context, "depth": depth, "correct": correct, "total": len(keys),
                         "rate": correct / len(keys), "answers": answers})
    return rows, prompts


def corpus_ids(tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer(haystack_text(), add_special_tokens=False)["input_ids"])


def windows(ids: torch.Tensor, count: int, length: int) -> torch.Tensor:
    """`count` windows of `length` tokens spread evenly over the corpus, [count, length]."""
    if length > len(ids):
        raise ValueError(f"a window of {length} tokens is longer than the text ({len(ids)} tokens)")
    starts = torch.linspace(0, len(ids) - length, count).long()
    return torch.stack([ids[s:s + length] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, prefix: int) -> float:
    """exp(mean NLL) of tokens prefix+1 .. end, each predicted by a 1-token decode step fed the true
    previous token after one prefill call of the first `prefix` tokens."""
    cache = DynamicCache(config=model.config)
    model(input_ids=ids[:, :prefix], past_key_values=cache, use_cache=True, logits_to_keep=1)
    nll = []
    for t in range(prefix, ids.shape[1] - 1):
        logits = model(input_ids=ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits[:, -1].float()
        nll.append(F.cross_entropy(logits, ids[:, t + 1], reduction="none"))
    return torch.stack(nll).mean().exp().item()


def ppl_study(model, tokenizer, methods: List[Method], args, deadline: Deadline):
    device = next(model.parameters()).device
    ids = windows(corpus_ids(tokenizer), args.ppl_windows, args.ppl_prefix + args.ppl_tokens + 1).to(device)
    rows = []
    for m in methods:
        if deadline.over():
            break
        configure(model, m)
        rows.append({**m.row(), "prefix": args.ppl_prefix, "tokens": args.ppl_tokens, "windows": args.ppl_windows,
                     "ppl": perplexity(model, ids, args.ppl_prefix)})
        print(f"perplexity {m.method} {m.mode or ''} {m.top_k or ''}: {rows[-1]['ppl']:.3f}", file=sys.stderr)
    return rows


def calibration(model, tokenizer, args) -> dict:
    configure(model, Method("full"))
    samples = windows(corpus_ids(tokenizer), args.calib_samples, args.calib_tokens)
    cal = calibrate.best_reselection_layer(model, list(samples[:, None]), top_k=args.calib_top_k, mode="head")
    scores = sorted(cal.scores.items())
    worst = min(cal.scores, key=cal.scores.get)
    compared = list(dict.fromkeys([cal.best_layer] + [x for x in (PAPER_LAYER, worst) if x in cal.scores]))
    return {"samples": args.calib_samples, "sample_tokens": args.calib_tokens, "top_k": args.calib_top_k,
            "mode": "head", "first_select": 2, "scores": {str(r): s for r, s in scores}, "best_layer": cal.best_layer,
            "worst_layer": worst, "compared_layers": compared}


# ---------------------------------------------------------------- report

def matching(rows, **match) -> list:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def overall(rows, **match) -> Optional[float]:
    """Exact-match rate over all cells of the rows that match."""
    sel = matching(rows, **match)
    return sum(r["correct"] for r in sel) / sum(r["total"] for r in sel) if sel else None


def fmt(x, digits=2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def markdown(result: dict) -> str:
    pk, budgets, layers = result["passkey"], result["budgets"], result["select_layers"]
    rows = pk["cells"]
    head = "| method | " + " | ".join(f"k={k}" for k in budgets) + " |\n|---|" + "---|" * len(budgets)
    full = fmt(overall(rows, method="full"))
    lines = [f"Pass-key exact match over {len(pk['contexts'])} contexts x {len(pk['depths'])} depths x "
             f"{pk['cases_per_cell']} cases (select layers {tuple(layers)}):\n", head,
             "| full attention | " + " | ".join(full for _ in budgets) + " |"]
    for name, method, mode in METHOD_NAMES + ((f"streaming (sink {SINK} + recent)", "streaming", None),):
        extra = {"select_layers": list(layers)} if method != "streaming" else {}
        lines.append(f"| {name} | " + " | ".join(fmt(overall(rows, method=method, mode=mode, top_k=k, **extra))
                                                  for k in budgets) + " |")
    cal = result.get("calibration")
    if cal and cal.get("passkey"):
        ks = sorted({c["top_k"] for c in cal["passkey"]})
        lines += ["", f"Re-selection layer (head mode, calibration top_k {cal['top_k']}):\n",
                  "| layer | recall score | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for layer in cal["compared_layers"]:
            tag = {cal["best_layer"]: " (best)", cal["worst_layer"]: " (worst)"}.get(layer, "")
            rates = {c["top_k"]: c["rate"] for c in cal["passkey"] if c["layer"] == layer}
            lines.append(f"| {layer}{tag} | {cal['scores'][str(layer)]:.3f} | "
                         + " | ".join(fmt(rates.get(k)) for k in ks) + " |")
    if result.get("perplexity"):
        ppl = result["perplexity"]
        ks = sorted({r["top_k"] for r in ppl if r["top_k"]})
        p0 = ppl[0]
        lines += ["", f"Perplexity ({p0['windows']} windows, prefix {p0['prefix']}, {p0['tokens']} decoded tokens):\n",
                  "| method | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for name, method, mode in (("full attention", "full", None),) + METHOD_NAMES:
            val = {r["top_k"]: r["ppl"] for r in ppl if r["method"] == method and r["mode"] == mode}
            lines.append(f"| {name} | " + " | ".join(fmt(val.get(k, val.get(None)), 3) for k in ks) + " |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    pk, budgets, layers = result["passkey"], result["budgets"], result["select_layers"]
    rows, contexts, depths = pk["cells"], pk["contexts"], pk["depths"]
    shown = sorted({budgets[(len(budgets) - 1) // 4], budgets[-1]})  # a small and the largest budget
    fig = plt.figure(figsize=(16, 3.6 * len(shown) + 4))
    grid = fig.add_gridspec(len(shown) + 1, 4)
    for i, k in enumerate(shown):
        for j, (name, match) in enumerate([
                ("full attention", dict(method="full")),
                (f"tidal head k={k}", dict(method="tidal", mode="head", top_k=k, select_layers=list(layers))),
                (f"tidal group k={k}", dict(method="tidal", mode="group", top_k=k, select_layers=list(layers))),
                (f"streaming k={k}", dict(method="streaming", top_k=k))]):
            rate = torch.full((len(depths), len(contexts)), float("nan"))
            for r in matching(rows, **match):
                rate[depths.index(r["depth"]), contexts.index(r["context"])] = r["rate"]
            ax = fig.add_subplot(grid[i, j])
            ax.imshow(rate.numpy(), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
            for y in range(len(depths)):
                for x in range(len(contexts)):
                    if not rate[y, x].isnan():
                        ax.text(x, y, f"{rate[y, x]:.2f}", ha="center", va="center", fontsize=8)
            ax.set_xticks(range(len(contexts)), [str(c) for c in contexts])
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("context (tokens)")
            if j == 0:
                ax.set_ylabel("pass key depth")
    ax = fig.add_subplot(grid[-1, 0:2])
    full = overall(rows, method="full")
    if full is not None:
        ax.axhline(full, color="k", ls="--", label="full attention")
    for name, method, mode in METHOD_NAMES + (("streaming", "streaming", None),):
        extra = {"select_layers": list(layers)} if method != "streaming" else {}
        pts = [(k, overall(rows, method=method, mode=mode, top_k=k, **extra)) for k in budgets]
        pts = [(k, v) for k, v in pts if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("token budget k")
    ax.set_ylabel("pass-key exact match")
    ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title(f"pass key, all contexts and depths (select layers {tuple(layers)})", fontsize=10)
    if result.get("perplexity"):
        ax = fig.add_subplot(grid[-1, 2:4])
        for name, method, mode in METHOD_NAMES:
            pts = [(r["top_k"], r["ppl"]) for r in result["perplexity"] if r["method"] == method and r["mode"] == mode]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        for r in result["perplexity"]:
            if r["method"] == "full":
                ax.axhline(r["ppl"], color="k", ls="--", label="full attention")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("token budget k")
        ax.set_ylabel("perplexity")
        ax.legend()
        ax.set_title(f"perplexity, prefix {result['perplexity'][0]['prefix']} tokens", fontsize=10)
    fig.suptitle(f"TidalDecode accuracy, {result['model']} ({result['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}", file=sys.stderr)


# ---------------------------------------------------------------- main

def ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "random"), default="smollm2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--contexts", default="1024,2048,4096,max",
                   help="prompt lengths in tokens; max = the model's context length; prompts are capped at "
                        "max_position_embeddings - %d (room for the answer)" % ANSWER_ROOM)
    p.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    p.add_argument("--cases", type=int, default=20, help="prompts per (context, depth) cell")
    p.add_argument("--budgets", default="32,64,128,256,512", help="pass-key top_k values")
    p.add_argument("--select-layers", default=None, help="e.g. 2,13 (default: 2 and the calibrated layer)")
    p.add_argument("--new-tokens", type=int, default=7,
                   help="generated tokens per answer (SmolLM2: 5 digits, '.', end of turn)")
    p.add_argument("--ppl-budgets", default="256,1024,2048")
    p.add_argument("--ppl-prefix", type=int, default=4096)
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--skip-ppl", action="store_true")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--calib-samples", type=int, default=3)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--calib-top-k", type=int, default=256)
    p.add_argument("--calib-budgets", default="64,128", help="pass-key top_k values of the layer comparison")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no new generate()/perplexity run after this many seconds (load included); "
                        "the JSON then has complete: false")
    p.add_argument("--out", default="accuracy.json")
    p.add_argument("--plot", default=None)
    return p.parse_args(argv)


def load(args, device, dtype):
    """(model, tokenizer, model name, context length, where it was read)."""
    if args.model == "random":
        model, tokenizer = random_model(device, dtype)
        return model, tokenizer, "random-weight Llama (30 layers)", model.config.max_position_embeddings, "config"
    from tidal_ext import smollm2
    model, tokenizer = smollm2.load(device, dtype)
    return (model, tokenizer, smollm2.NAME) + smollm2.context_length()


def run(args) -> dict:
    t_start = time.perf_counter()
    deadline = Deadline(args.max_seconds)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)
    model, tokenizer, name, ctx_len, ctx_source = load(args, device, dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.generation_config.pad_token_id
                                                              or model.generation_config.eos_token_id)
    tokenizer.padding_side = "left"
    timing = {"load": time.perf_counter() - t_start}
    if not os.path.isdir(LICENSES):
        print(f"WARNING: no {LICENSES}: prompts and perplexity use a repeated filler text", file=sys.stderr)
    max_pos = model.config.max_position_embeddings
    contexts = [(ctx_len if c == "max" else int(c)) for c in args.contexts.split(",")]
    contexts = [(c, min(c, max_pos - ANSWER_ROOM)) for c in contexts]  # (nominal, prompt tokens)
    depths = [float(d) for d in args.depths.split(",")]
    budgets, calib_budgets = ints(args.budgets), ints(args.calib_budgets)

    t = time.perf_counter()
    cal = None if args.skip_calibration else calibration(model, tokenizer, args)
    timing["calibration"] = time.perf_counter() - t
    layers = tuple(ints(args.select_layers)) if args.select_layers else (2, cal["best_layer"] if cal else PAPER_LAYER)

    methods = [Method("full")]
    for method in ("tidal", "tidal_window"):
        methods += [Method(method, mode, k, layers) for mode in ("head", "group") for k in budgets]
    methods += [Method("streaming", None, k) for k in budgets]
    compare = [Method("tidal", "head", k, (2, r)) for r in (cal["compared_layers"] if cal else [])
               for k in calib_budgets]
    methods += [m for m in compare if m not in methods]

    t = time.perf_counter()
    rows, prompts = passkey_grid(model, tokenizer, contexts, depths, methods, args, deadline)
    timing["passkey"] = time.perf_counter() - t
    if cal:
        cal["passkey"] = []
        for m in compare:
            sel = matching(rows, **m.row())
            if sel:
                cal["passkey"].append({"layer": m.layers[1], "top_k": m.top_k, "correct": sum(r["correct"] for r in sel),
                                       "total": sum(r["total"] for r in sel), "rate": overall(sel)})

    ppl = []
    if not args.skip_ppl:
        t = time.perf_counter()
        ppl_methods = [Method("full")] + [Method(method, mode, k, layers) for method in ("tidal", "tidal_window")
                                          for mode in ("head", "group") for k in ints(args.ppl_budgets)]
        ppl = ppl_study(model, tokenizer, ppl_methods, args, deadline)
        timing["perplexity"] = time.perf_counter() - t
    timing["total"] = time.perf_counter() - t_start

    card = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"cpu {platform.machine()} ({torch.get_num_threads()} threads)")
    return {"model": name, "gguf_context_length": ctx_len, "context_length_source": ctx_source,
            "max_position_embeddings": max_pos, "device": card, "dtype": str(dtype).replace("torch.", ""),
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
            "complete": not deadline.hit, "text": LICENSES if os.path.isdir(LICENSES) else "repeated filler",
            "select_layers": list(layers), "budgets": budgets,
            "passkey": {"contexts": [c for c, _ in contexts], "depths": depths, "cases_per_cell": args.cases,
                        "new_tokens": args.new_tokens, "needle": NEEDLE, "question": QUESTION,
                        "answer_prefix": ANSWER_PREFIX, "streaming_sink": SINK, "prompts": prompts, "cells": rows},
            "perplexity": ppl, "calibration": cal, "timing_s": timing}


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    if not result["complete"]:
        print(f"STOPPED at --max-seconds {args.max_seconds}: the results are partial", file=sys.stderr)
    print(markdown(result))
    print(f"\n{result['device']}, {result['dtype']}; times (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["timing_s"].items()) + f"; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
