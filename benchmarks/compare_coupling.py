"""How strongly samplerkit's race couples two configs' draws when their kept sets differ.

On real next-token logits of the default model (SmolLM2-135M-Instruct, ``--positions``
positions of a paragraph), each pair of pipelines draws with the same seeds (``--draws`` seeds
per position, counter 0): both configs race with the same noise per token. Reported per pair,
averaged over the positions:

- ``TV``: total-variation distance between the two processed distributions;
- ``1 - TV``: ``P(same token)`` under the maximal coupling, the most any coupling can give;
- ``(1 - TV) / (1 + TV)``: the guarantee of a one-stage Gumbel-max race;
- ``race (closed form)``: :func:`samplerkit.compare.race_coupling` with samplerkit's two-stage
  race (blocks of 256 ids);
- ``measured``: the fraction of seeds where both pipelines drew the same token (standard error
  at most ``0.5 / sqrt(draws * positions)``);
- ``independent``: ``sum_i p_i q_i``, what two unrelated seeds would give.

    python benchmarks/compare_coupling.py
    python benchmarks/compare_coupling.py --draws 4000 --positions 12
"""

from __future__ import annotations

import argparse

import torch

from samplerkit.builtins.backends.llama import LlamaBackend
from samplerkit.compare import race_coupling, total_variation
from samplerkit.pipeline import Pipeline
from samplerkit.registry import default_registry

TEXT = ("The old lighthouse keeper climbed the stairs every evening to light the lamp. Ships passing "
        "in the night relied on its beam to find their way home, and he never missed a single night.")

PAIRS = [
    ("top_k 40", [("top_k", {"top_k": 40})], "top_k 10", [("top_k", {"top_k": 10})]),
    ("top_p 0.95", [("top_p", {"top_p": 0.95})], "top_p 0.6", [("top_p", {"top_p": 0.6})]),
    ("temp 0.7, top_p 0.9", [("temperature", {"temperature": 0.7}), ("top_p", {"top_p": 0.9})],
     "min_p 0.1", [("min_p", {"min_p": 0.1})]),
    ("temp 1.0", [("temperature", {"temperature": 1.0})], "temp 0.7", [("temperature", {"temperature": 0.7})]),
    ("top_k 50, temp 1.2", [("top_k", {"top_k": 50}), ("temperature", {"temperature": 1.2})],
     "top_k 3", [("top_k", {"top_k": 3})]),
]


def pipeline(registry, steps) -> Pipeline:
    return Pipeline([registry.get("processor", name).spec(**params) for name, params in steps],
                    registry.get("sampler", "categorical").spec())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--draws", type=int, default=2000, help="seeds per position")
    parser.add_argument("--positions", type=int, default=10, help="positions of the paragraph")
    parser.add_argument("--chunk", type=int, default=500, help="rows per sample call")
    args = parser.parse_args()
    registry = default_registry()
    backend = LlamaBackend()
    ids = backend.tokenize(TEXT, add_special=True)
    every = backend.prefill([ids], keep_all_logits=True).all[0].float()
    step = max(1, (len(ids) - 2) // args.positions)
    rows = every[1:len(ids) - 1:step][:args.positions]
    print(f"{len(rows)} positions of a {len(ids)}-token paragraph, {args.draws} seeds each, V = {every.shape[-1]}")
    print()
    print("| A | B | TV | 1 - TV | (1 - TV) / (1 + TV) | race (closed form) | measured | independent |")
    print("|---|---|---|---|---|---|---|---|")
    for name_a, steps_a, name_b, steps_b in PAIRS:
        pa, pb = pipeline(registry, steps_a), pipeline(registry, steps_b)
        tv = bound = exact = same = indep = 0.0
        for x in rows:
            row = x.unsqueeze(0)
            p = torch.softmax(pa.process(row)[0].double(), -1)
            q = torch.softmax(pb.process(row)[0].double(), -1)
            d = total_variation(p, q)
            tv += d
            bound += (1 - d) / (1 + d)
            exact += race_coupling(p, q, block=256)
            indep += float((p * q).sum())
            hits = 0
            for start in range(0, args.draws, args.chunk):
                seeds = list(range(start, min(start + args.chunk, args.draws)))
                batch = row.expand(len(seeds), -1)
                hits += int((pa.sample(batch, seeds) == pb.sample(batch, seeds)).sum())
            same += hits / args.draws
        n = len(rows)
        print(f"| {name_a} | {name_b} | {tv / n:.3f} | {1 - tv / n:.3f} | {bound / n:.3f} | {exact / n:.3f} | "
              f"{same / n:.3f} | {indep / n:.3f} |")


if __name__ == "__main__":
    main()
