#!/usr/bin/env python
"""Serving many experts: moerge serve against a naive PEFT server and PEFT's mixed batch, same load.

    python bench/serve.py [--hidden 512 --layers 8 | --base smollm2-135m-instruct] [--experts 8]
                          [--clients 32] [--requests 4] [--new-tokens 32] [--soak SECONDS]
    python bench/serve.py --base smollm2-135m-instruct --expert-dirs demo-output/experts/{reverse_words,caps,...}

A base (by default a random Llama, hidden 512, 8 layers, character vocabulary; or a real base by name)
gets E random rank-8 LoRA experts on every linear layer, saved as PEFT folders. Each server runs in its
own process on a localhost port and speaks OpenAI's /v1/completions:

- moerge: ``moerge serve`` (continuous batching over the mixture runtime, one row per request);
- naive: PEFT with every adapter loaded; each request, one at a time under a lock, ``set_adapter`` to
  its expert and ``generate``;
- peft-mixed: PEFT's mixed batch: requests queue, and a worker generates everything queued in one
  ``generate(adapter_names=[...])`` call (static batching: arrivals wait for the running batch to end).

C client threads (the official ``openai`` client) each send R requests in a row, request k of client c
for expert (c + k) mod E, every request generating exactly N tokens (greedy; end-of-sequence ignored).
Prints tokens/s, p50/p99 latency and errors per server, and the ratios. With ``--soak S`` the moerge
server is then kept under the same load for S seconds and its resident memory is sampled every 10 s.
All servers use one torch thread and compute in the dtype moerge serves the base in (bf16 for a bf16
checkpoint on a CPU that multiplies bf16 fast; ``--peft-dtype float32`` keeps the PEFT servers in
float32). ``moerge-noprefix`` is moerge with its prefix cache off. The machine is shared and noisy:
compare ratios from one run.

With ``--expert-dirs`` (trained experts named after their skills, e.g. the real demo's) the requests
are the skills' test prompts as chat messages, answered in their natural length, and every server is
also scored by exact match: moerge routes them itself (``router:centroid``), the PEFT servers are told
each prompt's expert by name (an oracle they need; moerge does not).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def make_world(args, work: Path) -> tuple[Path, list[Path]]:
    if args.expert_dirs:
        from moerge.errors import MoergeError
        from moerge.lm import base as base_model

        dirs = [Path(d) for d in args.expert_dirs.split(",")]
        for d in dirs:  # checked here: a server child that fails to start says less
            if not (d / "adapter_config.json").is_file():
                raise MoergeError(f"--expert-dirs {d}: not a PEFT adapter folder (no adapter_config.json)")
        return base_model.resolve(args.base), dirs
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from moerge.lm.tiny import save_char_tokenizer, tiny_config

    torch.manual_seed(0)
    if args.base:
        from moerge.lm import base as base_model

        base = base_model.resolve(args.base)
    else:
        base = work / "base"
        LlamaForCausalLM(tiny_config(hidden=args.hidden, layers=args.layers, heads=8, intermediate=4 * args.hidden,
                                     tie=True)).save_pretrained(base)
        save_char_tokenizer(base)
    experts = []
    for i in range(args.experts):
        m = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
        with torch.no_grad():  # random factors of a realistic size (PEFT's default init leaves B at zero)
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        m.save_pretrained(work / f"e{i}")
        experts.append(work / f"e{i}")
    return base, experts


# ----------------------------------------------------------------------------- the PEFT servers (child process)

def peft_app(kind: str, base: Path, experts: list[Path], max_batch: int, natural: bool, peft_dtype: str = "same"):
    import concurrent.futures
    import queue

    import torch
    from fastapi import FastAPI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moerge.lm.chat import chat_ids, completion_ids
    from moerge.lm.generate import left_pad
    from moerge.lm.precision import compute_dtype, folder_dtype, model_kwargs

    tok = AutoTokenizer.from_pretrained(base)
    # the dtype moerge serves this base in (bf16 for a bf16 checkpoint on a CPU that multiplies bf16 fast), unless
    # --peft-dtype float32 asks for the PEFT servers as they were first measured
    dtype = torch.float32 if peft_dtype == "float32" else compute_dtype(folder_dtype(base))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype, **model_kwargs(dtype)),
                                      experts[0], adapter_name=experts[0].name)
    for e in experts[1:]:
        model.load_adapter(e, adapter_name=e.name)
    model.eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    app = FastAPI()
    lock = threading.Lock()
    jobs: queue.Queue = queue.Queue()

    def generate(rows: list[tuple[str, list[int], int]]) -> list[list[int]]:
        ids, mask = left_pad([r[1] for r in rows], pad)
        n = max(r[2] for r in rows)
        kw = {"adapter_names": [r[0] for r in rows]} if kind == "peft-mixed" else {}
        if not natural:  # the load asks for exactly n tokens (moerge: ignore_eos)
            kw |= {"min_new_tokens": n}
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=pad, **kw)
        outs = [row[ids.shape[1]: ids.shape[1] + r[2]] for row, r in zip(out.tolist(), rows)]
        return [o[: o.index(tok.eos_token_id)] if natural and tok.eos_token_id in o else o for o in outs]

    def worker() -> None:  # peft-mixed: everything queued goes into one generate call
        torch.set_grad_enabled(False)
        while True:
            batch = [jobs.get()]
            while len(batch) < max_batch and not jobs.empty():
                batch.append(jobs.get())
            try:
                outs = generate([b[0] for b in batch])
                for b, o in zip(batch, outs):
                    b[1].set_result(o)
            except Exception as exc:
                for b in batch:
                    b[1].set_exception(exc)

    if kind == "peft-mixed":
        threading.Thread(target=worker, daemon=True).start()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        ids, _ = chat_ids(tok, body["messages"])
        out = answer((body["model"], ids, int(body["max_tokens"])))
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": tok.decode(out, skip_special_tokens=True)},
                             "finish_reason": "stop", "logprobs": None}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(out), "total_tokens": len(ids) + len(out)}}

    def answer(row) -> list[int]:
        if kind == "naive":
            with lock:
                model.set_adapter(row[0])
                return generate([row])[0]
        fut: concurrent.futures.Future = concurrent.futures.Future()
        jobs.put((row, fut))
        return fut.result()

    @app.post("/v1/completions")
    def complete(body: dict):
        row = (body["model"], completion_ids(tok, body["prompt"]), int(body["max_tokens"]))
        out = answer(row)
        return {"id": "x", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": tok.decode(out, skip_special_tokens=True), "finish_reason": "length",
                             "logprobs": None}],
                "usage": {"prompt_tokens": len(row[1]), "completion_tokens": len(out), "total_tokens": len(row[1]) + len(out)}}

    return app


def run_server(kind: str, port: int, base: Path, experts: list[Path], max_batch: int, natural: bool,
               peft_dtype: str) -> None:
    import torch
    import uvicorn

    torch.set_num_threads(1)
    if kind.startswith("moerge"):
        from moerge.serve import build

        app, _ = build(experts=[str(e) for e in experts], base=str(base), max_batch=max_batch, max_concurrent=4096,
                       prefix_cache=0 if kind == "moerge-noprefix" else 4096)
    else:
        app = peft_app(kind, base, experts, max_batch, natural, peft_dtype)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# ----------------------------------------------------------------------------- the load (parent process)

def start(kind: str, base: Path, experts: list[Path], max_batch: int, natural: bool,
          peft_dtype: str) -> tuple[subprocess.Popen, str]:
    import httpx

    from moerge.serve import free_port

    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, __file__, "--child", kind, "--port", str(port), "--child-spec",
                             json.dumps({"base": str(base), "experts": [str(e) for e in experts], "max_batch": max_batch,
                                         "natural": natural, "peft_dtype": peft_dtype})],
                            env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            time.sleep(0.3)
        if proc.poll() is not None:
            break
    proc.kill()
    raise SystemExit(f"{kind} server did not start")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def load(url: str, jobs: list[dict], args, until: float | None = None) -> dict:
    """C clients × R requests (or until ``until``), client c's k-th request being job (c·R + k) mod len(jobs):
    latencies, tokens, errors, exact matches (jobs with an ``answer``)."""
    from openai import OpenAI

    lat, tokens, errors, right = [], [0], [], [0, 0]
    lock = threading.Lock()

    def client(c: int) -> None:
        api = OpenAI(base_url=url, api_key="bench", max_retries=0, timeout=600)
        k = 0
        while (k < args.requests) if until is None else (time.time() < until):
            job = jobs[(c * args.requests + k) % len(jobs)]
            t0 = time.perf_counter()
            try:
                if "messages" in job:
                    r = api.chat.completions.create(model=job["model"], messages=job["messages"], max_tokens=args.new_tokens,
                                                    temperature=0)
                    text = r.choices[0].message.content
                else:
                    r = api.completions.create(model=job["model"], prompt=job["prompt"], max_tokens=args.new_tokens,
                                               temperature=0, extra_body={"ignore_eos": True})
                    text = r.choices[0].text
                with lock:
                    lat.append(time.perf_counter() - t0)
                    tokens[0] += r.usage.completion_tokens
                    if "answer" in job:
                        right[0] += text.strip() == job["answer"]
                        right[1] += 1
            except Exception as exc:
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
            k += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan"))
    return {"seconds": wall, "requests": len(lat), "errors": errors, "tokens": tokens[0], "tps": tokens[0] / wall,
            "p50": pct(0.50), "p99": pct(0.99), "exact": right[0] / right[1] if right[1] else None}


def jobs_for(kind: str, args, experts: list[Path]) -> list[dict]:
    """Random experts: one prompt per request, the expert named in turn. Trained experts (--expert-dirs):
    their skills' test prompts as chat, routed by moerge, named for the PEFT servers."""
    from moerge.tasks import EXPERTS, mixture
    from moerge.tasks.skills import REAL_EXPERTS

    if not args.expert_dirs:
        prompts = [e.prompt for e in mixture(REAL_EXPERTS if args.base else EXPERTS, "test", 8)]
        return [{"model": experts[i % len(experts)].name, "prompt": prompts[(i * 7) % len(prompts)]}
                for i in range(len(experts) * len(prompts))]
    out = []
    for e in experts:
        for r in mixture([e.name], "test", args.requests * args.clients // len(experts) + 1):
            out.append({"model": "router:centroid" if kind.startswith("moerge") else e.name, "answer": r.completion,
                        "messages": [{"role": "user", "content": r.prompt}]})
    import random

    random.Random(0).shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--base", default=None, help="a real base by name or folder instead of the random Llama")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--servers", default="moerge,peft-mixed,naive",
                    help="moerge, moerge-noprefix (its prefix cache off), peft-mixed, naive")
    ap.add_argument("--peft-dtype", choices=["same", "float32"], default="same",
                    help="the PEFT servers' dtype: the one moerge serves in (default), or float32")
    ap.add_argument("--soak", type=float, default=0, help="seconds of load on the moerge server, memory sampled")
    ap.add_argument("--expert-dirs", default=None, help="trained expert folders named after their skills (comma-separated)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--child-spec", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child_spec)
        run_server(args.child, args.port, Path(spec["base"]), [Path(e) for e in spec["experts"]], spec["max_batch"],
                   spec["natural"], spec["peft_dtype"])
        return

    from moerge.util.progress import quiet_transformers

    quiet_transformers()
    work = Path(tempfile.mkdtemp(prefix="moerge-serve-bench-"))
    base, experts = make_world(args, work)
    natural = bool(args.expert_dirs)
    what = f"{len(experts)} trained experts" if natural else f"{len(experts)} random rank-8 LoRA experts"
    print(f"base {args.base or f'random Llama hidden {args.hidden}, {args.layers} layers'}; {what}; {args.clients} clients x "
          f"{args.requests} requests x {'up to ' if natural else ''}{args.new_tokens} tokens", flush=True)
    results = {}
    for kind in args.servers.split(","):
        proc, url = start(kind, base, experts, args.max_batch, natural, args.peft_dtype)
        jobs = jobs_for(kind, args, experts)
        try:
            load(url, jobs, argparse.Namespace(**{**vars(args), "clients": 2, "requests": 1}))  # warm-up
            results[kind] = res = load(url, jobs, args)
            res["rss_mb"] = rss_mb(proc.pid)
            exact = f", exact match {res['exact']:.0%}" if res["exact"] is not None else ""
            print(f"{kind}: {res['tps']:.1f} tokens/s, p50 {res['p50']:.2f} s, p99 {res['p99']:.2f} s, "
                  f"{len(res['errors'])} errors, {res['rss_mb']:.0f} MB{exact}", flush=True)
            for e in res["errors"][:3]:
                print("   ", e)
            if kind == "moerge" and args.soak:
                samples = [rss_mb(proc.pid)]
                stop_at = time.time() + args.soak
                sampler_done = threading.Event()

                def sample() -> None:
                    while not sampler_done.wait(10):
                        samples.append(rss_mb(proc.pid))

                th = threading.Thread(target=sample)
                th.start()
                soak = load(url, jobs, args, until=stop_at)
                sampler_done.set()
                th.join()
                samples.append(rss_mb(proc.pid))
                res["soak"] = {"seconds": args.soak, "requests": soak["requests"], "errors": len(soak["errors"]),
                               "rss_first_mb": samples[0], "rss_last_mb": samples[-1], "rss_max_mb": max(samples),
                               "tps": soak["tps"]}
                print(f"soak {args.soak:.0f} s: {soak['requests']} requests, {len(soak['errors'])} errors, {soak['tps']:.1f} "
                      f"tokens/s; RSS {samples[0]:.0f} -> {samples[-1]:.0f} MB (max {max(samples):.0f})", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print()
    print("| server | requests | errors | tokens/s | p50 latency | p99 latency | moerge's speed-up |"
          + (" exact match |" if natural else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if natural else ""))
    ours = results.get("moerge", {}).get("tps")
    for kind, r in results.items():
        up = f"{ours / r['tps']:.2f}x" if ours and r["tps"] else "-"
        print(f"| {kind} | {r['requests']} | {len(r['errors'])} | {r['tps']:.1f} | {r['p50']:.2f} s | {r['p99']:.2f} s | {up} |"
              + (f" {r['exact']:.0%} |" if natural else ""))


if __name__ == "__main__":
    from moerge.errors import MoergeError

    try:
        main()
    except MoergeError as e:  # a wrong path or name: one line, as the CLI gives it
        raise SystemExit(f"error: {e}") from None
