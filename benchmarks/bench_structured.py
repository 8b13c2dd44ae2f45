"""Constrained decoding cost: token-mask computation and application, constrained vs
unconstrained decoding on the default model, and schema compile time (cold vs cached).

    python benchmarks/bench_structured.py              # everything (a few minutes on 2 cores)
    python benchmarks/bench_structured.py --skip-model # mask and compile timings only

Masks: B rows, each with its own llguidance matcher for a JSON schema, part-way through an
object (inside a string value, the largest allowed set), on the default model's vocabulary
(SmolLM2, V = 49152) and on a 128k vocabulary built from it (its tokens plus concatenations of
token pairs, 128256 in all; no download). "compute" fills the ``[B, V/32]`` bitmask (llguidance,
parallel over rows), "apply" writes -inf into ``[B, V]`` float32 logits from it.
Decoding: batch 8, 32 new tokens per row, temperature 1 / top_p 0.95 with and without a
json_schema step first (its schema needs more than 32 tokens, so every row runs to the end),
alternated, medians; tokens/s of the whole generate call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"]}
PREFIX = '{"name": "Ada'             # inside a string: nearly every token is allowed
STRING_VALUE = (" Lovelace was an English mathematician and writer, chiefly known for her work on Charles "
                "Babbage's proposed mechanical general-purpose computer, the Analytical Engine; she was the first "
                "to recognise that the machine had applications beyond pure calculation")


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def big_vocabulary(vocab, tokenizer, size: int = 128256):
    """A TokenVocabulary of ``size`` tokens: the model's token bytes, then pairs of them."""
    from samplerkit.backend import TokenVocabulary

    base = [tokenizer.decode_bytes([i]) for i in range(vocab.vocab_size)]
    special = [i for i in range(vocab.vocab_size) if tokenizer.is_special_token(i)]
    seen = set(base)
    tokens = list(base)
    g = torch.Generator().manual_seed(0)
    while len(tokens) < size:
        a, b = torch.randint(len(special) + 1, vocab.vocab_size, (2,), generator=g).tolist()
        t = base[a] + base[b]
        if t and t not in seen:
            seen.add(t)
            tokens.append(t)
    # The model's own tokenizer is a valid encoder: its ids are the first tokens here.
    return TokenVocabulary(vocab_size=size, eos_token_ids=vocab.eos_token_ids, tokens=tokens,
                           special_token_ids=tuple(special), bos_token_id=vocab.bos_token_id,
                           encode=lambda data: tokenizer.tokenize_bytes(data))


def bench_masks(backend, reps: int) -> None:
    from samplerkit.builtins.structured import engine

    vocab = backend.token_vocabulary()
    small = engine.engine_tokenizer(vocab)
    t = time.perf_counter()
    big = engine.engine_tokenizer(big_vocabulary(vocab, small.llg))
    print(f"(128k vocabulary built in {time.perf_counter() - t:.1f} s)")
    grammar = engine.build_grammar("json_schema", SCHEMA)
    print("| vocabulary | batch | allowed per row | compute (ms) | apply (ms) | total per step (ms) |")
    print("|---|---|---|---|---|---|")
    for name, tok, width in (("SmolLM2 (49152)", small, 49152), ("128k (128256)", big, 128256)):
        prefix = tok.llg.tokenize_str(PREFIX)
        for batch in (1, 8, 64):
            matchers = []
            for _ in range(batch):
                m = engine.new_matcher(tok, grammar)
                assert m.consume_tokens(prefix), m.get_error()
                matchers.append(m)
            pairs = [(m, i) for i, m in enumerate(matchers)]
            bitmask = torch.zeros(batch, (width + 31) // 32, dtype=torch.int32)
            logits = torch.randn(batch, width)
            work = logits.clone()
            # A fresh state each time (the engine may reuse a mask computed for the same state):
            # every row takes the next token of a long string value, then the mask is timed.
            text = iter(tok.llg.tokenize_str(STRING_VALUE))
            times = []
            for _ in range(reps):
                token = next(text)
                for m in matchers:
                    assert m.consume_token(token), m.get_error()
                t = time.perf_counter()
                engine.fill_masks(pairs, bitmask)
                times.append(time.perf_counter() - t)
            compute = statistics.median(times)
            scratch: dict = {}           # reused from call to call, as the step does
            apply = median_time(lambda: engine.apply_bitmask(work.copy_(logits), bitmask, work=scratch), reps)
            allowed = int(torch.isfinite(work[0]).sum())
            print(f"| {name} | {batch} | {allowed} | {compute * 1e3:.2f} | {apply * 1e3:.2f} | {(compute + apply) * 1e3:.2f} |")


def bench_compile(backend) -> None:
    from samplerkit.builtins.structured import engine

    tok = engine.engine_tokenizer(backend.token_vocabulary())
    schema = {"type": "object", "additionalProperties": False, "required": [f"field_{i}" for i in range(0, 50, 2)],
              "properties": {f"field_{i}": [{"type": "string", "maxLength": 20}, {"type": "integer", "minimum": 0},
                                            {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "number"}},
                                            {"type": "boolean"}][i % 5] for i in range(50)}}
    engine.clear_caches()
    t = time.perf_counter()
    grammar = engine.build_grammar("json_schema", schema)
    engine.new_matcher(tok, grammar)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    grammar = engine.build_grammar("json_schema", schema)
    engine.new_matcher(tok, grammar)
    cached = time.perf_counter() - t
    print(f"50-property schema: first use (validate + compile) {cold * 1e3:.1f} ms, cached {cached * 1e3:.2f} ms")


def bench_decoding(backend, rounds: int, tokens: int = 32, batch: int = 8) -> None:
    from samplerkit import Generator

    long_schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 64}
    sampling = [{"temperature": 1.0}, {"top_p": 0.95}]
    runs = {
        "unconstrained": sampling,
        "json_schema": [{"json_schema": {"schema": long_schema, "whitespace_flexible": False}}, *sampling],
    }
    gens = {name: Generator({"backend": "llama", "pipeline": p, "sampler": {"name": "categorical", "seed": 1},
                             "generation": {"max_new_tokens": tokens}}, backend=backend) for name, p in runs.items()}
    prompts = ["List some digits:"] * batch
    for g in gens.values():                 # warm-up (and the first compile of the schema)
        g.generate(prompts, max_new_tokens=2)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, g in gens.items():
            t = time.perf_counter()
            out = g.generate(prompts)
            elapsed = time.perf_counter() - t
            assert all(len(c.token_ids) == tokens for c in out), [c.finish_reason for c in out]
            rates[name].append(batch * tokens / elapsed)
    free, constrained = statistics.median(rates["unconstrained"]), statistics.median(rates["json_schema"])
    print(f"batch {batch}, {tokens} tokens/row, medians of {rounds}: unconstrained {free:.1f} tok/s, "
          f"json_schema {constrained:.1f} tok/s ({constrained / free:.1%})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=20, help="timed repetitions per mask cell (median)")
    ap.add_argument("--rounds", type=int, default=5, help="alternated generate calls per decoding variant")
    ap.add_argument("--skip-model", action="store_true", help="skip the decoding comparison")
    ap.add_argument("--threads", type=int, help="torch threads (1 gives steadier numbers on a shared machine)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from samplerkit.builtins.backends.llama import LlamaBackend

    backend = LlamaBackend()
    print(f"torch threads: {torch.get_num_threads()}")
    bench_compile(backend)
    bench_masks(backend, args.reps)
    if not args.skip_model:
        bench_decoding(backend, args.rounds)


if __name__ == "__main__":
    main()
