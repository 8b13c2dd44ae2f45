"""New tokens per second: samplerkit's ``llama`` backend vs transformers ``generate``.

Same SmolLM2-135M-Instruct weights (the embedded Q4_1 GGUF; the transformers model is built
by transformers' own GGUF reader, which dequantizes it to float32), same greedy decoding, same
machine, one run. The backend runs in three forms: the default (``weights: auto``: the file's
Q4_1/Q8_0 codes kept packed and multiplied by torch's int4 CPU kernel), ``weights: dequantize``
in float32 (the exact model: the same numbers transformers computes) and in bfloat16. Each configuration is measured ``--repeats`` times, alternating the two
implementations so background load hits both alike; the best run (the least disturbed by
other processes on a shared machine) and the median are reported, ratios from the best runs.

    python benchmarks/bench_generate.py                       # batch 1 and 8, 64 new tokens
    python benchmarks/bench_generate.py --batches 1 8 --new-tokens 128 --repeats 5

``--invariance-cost`` instead measures what batch invariance costs a decode step (default
model, prompts of different lengths so every row is padded differently): the step as it runs
(attention per run of equally padded rows, written-out softmax) against ``batch_invariant:
false`` (one masked ``F.scaled_dot_product_attention`` over the whole batch: torch's fused
kernel, what the backend did before); the runs alternate, best (median) of ``--repeats``:

    python benchmarks/bench_generate.py --invariance-cost --batches 1 8 --repeats 7

``--kernels`` times one product ``x @ W.T`` per kernel (int4, int8 weight-only, float32,
bfloat16) for the default model's matrix shapes, at 1 and 8 rows (and 256 for one shape):

    python benchmarks/bench_generate.py --kernels --threads 1

Also prints load time and peak RSS of each form (each in a fresh subprocess), and how close
batch 1 gets to its memory-bandwidth cap (bytes of weights read per step / copy bandwidth
measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SAMPLERKIT_QUIET", "1")

PROMPT = "The capital of France is"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


#: name -> LlamaParams keyword arguments of each form of the backend measured.
FORMS = {
    "auto (default)": {},
    "packed": {"weights": "packed"},
    "fp32 dequantized": {"weights": "dequantize"},
    "bf16 dequantized": {"weights": "dequantize", "dtype": "bfloat16"},
}


def load_probe(form: str) -> None:
    """Child process: load the backend, run one short generation, print JSON."""
    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

    t = time.perf_counter()
    backend = LlamaBackend(LlamaParams(**FORMS[form]))
    load_s = time.perf_counter() - t
    ids = backend.tokenize(PROMPT)
    nxt = backend.prefill([ids] * 8).last.argmax(-1)
    for _ in range(16):
        nxt = backend.step(nxt).argmax(-1)
    print(json.dumps({"form": form, "load_s": load_s, "peak_rss_mb": peak_rss_mb()}))


def copy_bandwidth_gbs() -> float:
    """Read+write bandwidth of a large copy (bytes read per second), best of a few."""
    src = torch.empty(512 * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best / 1e9


def weight_bytes(model) -> int:
    """Bytes of weights one decode step reads (every matrix once; norms and the embedding row
    are negligible)."""
    return sum(m.nbytes() for m in model.linears())


def time_backend(backend, batch: int, new_tokens: int) -> float:
    """Seconds for prefill + ``new_tokens`` greedy tokens per row (own loop, no sampling pipeline)."""
    ids = backend.tokenize(PROMPT)
    t = time.perf_counter()
    nxt = backend.prefill([ids] * batch).last.argmax(-1)
    for _ in range(new_tokens - 1):
        nxt = backend.step(nxt).argmax(-1)
    return time.perf_counter() - t


def time_prefill(fn, reps: int = 3) -> float:
    """Best of ``reps`` timings of one prefill call (after one warm-up)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_hf(model, tok, batch: int, new_tokens: int) -> float:
    enc = tok([PROMPT] * batch, return_tensors="pt")
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=tok.eos_token_id)
    dt = time.perf_counter() - t
    assert out.shape[1] - enc.input_ids.shape[1] == new_tokens
    return dt


def time_generate_api(backend, batch: int, new_tokens: int) -> float | None:
    """Through ``samplerkit.Generator`` (greedy pipeline), if the package provides it."""
    try:
        import samplerkit

        gen = samplerkit.Generator({"backend": {"name": "llama"}, "pipeline": [], "sampler": "greedy",
                                    "generation": {"max_new_tokens": new_tokens, "ignore_eos": True}},
                                   backend=backend)
        t = time.perf_counter()
        out = gen.generate([PROMPT] * batch)
        dt = time.perf_counter() - t
        assert sum(len(c.token_ids) for c in out) == batch * new_tokens
        return dt
    except Exception as e:  # noqa: BLE001 - the API is optional here; report why it was skipped
        print(f"  (samplerkit.Generator not timed: {type(e).__name__}: {e})")
        return None


def kernels() -> None:
    """Microseconds per ``x @ W.T`` (median of 30 after a warm-up) for each kernel the backend
    could use, on random weights of the default model's shapes."""
    ops = torch.ops.aten
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA {torch.backends.cpu.get_cpu_capability()}")

    def us(f, n: int) -> float:
        f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e6

    for n_out, k, rows in [(3072, 576, (1, 8, 256)), (576, 1536, (1, 8)), (49152, 576, (1, 8))]:
        packed = ops._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n_out, k), dtype=torch.int32), 1)
        scales = (torch.rand(k // 32, n_out, 2) * 0.01).bfloat16()
        w8, s8 = torch.randint(-128, 127, (n_out, k), dtype=torch.int8), torch.rand(n_out).bfloat16()
        wf = torch.randn(k, n_out)
        wb = wf.bfloat16()
        for m in rows:
            x = torch.randn(m, k).bfloat16()
            xf = x.float()
            reps = 30 if m < 256 else 3
            cells = {"int4": us(lambda: ops._weight_int4pack_mm_for_cpu(x, packed, 32, scales), reps),
                     "int8": us(lambda: ops._weight_int8pack_mm(x, w8, s8), reps),
                     "float32": us(lambda: xf @ wf, reps), "bfloat16": us(lambda: x @ wb, min(reps, 3))}
            print(f"{n_out:6d} x {k:5d}, {m:3d} rows: " + "  ".join(f"{name} {v:9.0f} us" for name, v in cells.items()))


def invariance_cost(args) -> None:
    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams

    backend = LlamaBackend(LlamaParams())
    words = backend.tokenize(" ".join(["The quick brown fox jumps over the lazy dog."] * 10))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ISA "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.new_tokens} steps, best (median) of {args.repeats}")

    def run(batch: int, invariant: bool) -> float:
        prompts = [words[: 5 + 3 * b] for b in range(batch)]
        nxt = backend.prefill(prompts).last.argmax(-1)
        backend.model.batch_invariant = invariant   # False: one masked fused attention call (LlamaParams)
        try:
            t = time.perf_counter()
            for _ in range(args.new_tokens):
                nxt = backend.step(nxt).argmax(-1)
            return batch * args.new_tokens / (time.perf_counter() - t)
        finally:
            backend.model.batch_invariant = True

    for batch in args.batches:
        runs = {True: [], False: []}
        run(batch, True), run(batch, False)
        for _ in range(args.repeats):
            for inv in (True, False):
                runs[inv].append(run(batch, inv))
        a, b = max(runs[True]), max(runs[False])
        print(f"batch {batch}: batch-invariant {a:6.1f} ({statistics.median(runs[True]):6.1f}) tok/s, fused masked "
              f"attention {b:6.1f} ({statistics.median(runs[False]):6.1f}) tok/s: invariance costs {1 - a / b:+.1%} "
              f"(median {1 - statistics.median(runs[True]) / statistics.median(runs[False]):+.1%})")


def load_hf(path):
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cfg = transformers.LlamaConfig(**load_gguf_checkpoint(str(path))["config"])
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.load_state_dict(load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"],
                          strict=False)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.padding_side = "left"
    return model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="prompt length of the prefill timing")
    ap.add_argument("--skip-load-probe", action="store_true")
    ap.add_argument("--kernels", action="store_true", help="time one product per kernel and shape")
    ap.add_argument("--invariance-cost", action="store_true", help="time batch invariance's cost per decode step")
    ap.add_argument("--_load-probe", dest="probe", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.probe:
        load_probe(args.probe)
        return
    if args.invariance_cost:
        invariance_cost(args)
        return
    if args.kernels:
        kernels()
        return

    from samplerkit.builtins.backends.llama import LlamaBackend, LlamaParams
    from samplerkit.builtins.backends.llama.default_model import find_default_model

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    if not args.skip_load_probe:
        # Each probe in a fresh process with an empty model cache; the packed form is cached by
        # default, so a second start (same cache) is measured too.
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "SAMPLERKIT_CACHE": cache}
            for form, start in [(f, "first start") for f in FORMS] + [("auto (default)", "second start")]:
                r = subprocess.run([sys.executable, __file__, "--_load-probe", form], capture_output=True,
                                   text=True, check=True, env=env)
                info = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"load {form:17s} {start}: {info['load_s']:.2f} s, peak RSS {info['peak_rss_mb']:.0f} MB "
                      "(load + batch-8 prefill + 16 steps)")

    path = find_default_model()
    backends = {form: LlamaBackend(LlamaParams(**kw)) for form, kw in FORMS.items()}
    if not backends["auto (default)"].model.packed:
        print("  (this torch has no int4 CPU kernel: the default form is the dequantized float32 model)")
    model, tok = load_hf(path)
    bw = copy_bandwidth_gbs()
    caps = {}
    for form, backend in backends.items():
        wbytes = weight_bytes(backend.model)
        caps[form] = bw * 1e9 / wbytes
        print(f"{form:17s}: weights read per step {wbytes / 1e6:4.0f} MB -> batch-1 cap {caps[form]:5.1f} tok/s "
              f"at the {bw:.1f} GB/s copy bandwidth measured here")

    long_ids = backends["auto (default)"].tokenize(" ".join(["The quick brown fox jumps over the lazy dog."] * 80))
    long_ids = long_ids[:args.prefill_tokens]
    with torch.inference_mode():
        hf_s = time_prefill(lambda: model(torch.tensor([long_ids])))
    print(f"prefill of one {len(long_ids)}-token prompt, best of 3: transformers {hf_s * 1e3:.0f} ms", end="")
    for form, backend in backends.items():
        print(f", {form} {time_prefill(lambda b=backend: b.prefill([long_ids])) * 1e3:.0f} ms", end="")
    print()

    n = args.new_tokens
    for batch in args.batches:
        runs: dict[str, list[float]] = {"transformers": [], **{f: [] for f in FORMS}, "Generator (default)": []}
        time_hf(model, tok, batch, 4)     # warm-up (first-call allocations, kernel selection)
        for backend in backends.values():
            time_backend(backend, batch, 4)
        for _ in range(args.repeats):
            runs["transformers"].append(time_hf(model, tok, batch, n))
            for form, backend in backends.items():
                runs[form].append(time_backend(backend, batch, n))
            g = time_generate_api(backends["auto (default)"], batch, n)
            if g is not None:
                runs["Generator (default)"].append(g)
        print(f"batch {batch}, {n} new tokens/row, greedy, best (median) of {args.repeats}:")
        base = batch * n / min(runs["transformers"])
        for name, ts in runs.items():
            if not ts:
                continue
            rate, med = batch * n / min(ts), batch * n / statistics.median(ts)
            extra = f"  ({rate / caps[name]:.0%} of its bandwidth cap)" if batch == 1 and name in caps else ""
            print(f"  {name:19s} {rate:7.1f} ({med:6.1f}) tok/s  {rate / base:5.2f}x transformers{extra}")


if __name__ == "__main__":
    main()
