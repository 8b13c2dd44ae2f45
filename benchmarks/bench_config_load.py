"""Loading a large YAML config: samplerkit's bounded loader vs PyYAML's pure-Python SafeLoader.

The document is a ``logit_bias`` over ``--entries`` token ids (about 1.5 MB at the default),
close to the largest config the loader accepts (``MAX_CONFIG_BYTES``). samplerkit's loader is
libyaml's C parser (when PyYAML has it) plus a pass over the parse events that enforces the
size, alias-expansion and nesting bounds and a duplicate-key check. Each loader runs
``--repeats`` times, alternating, best and median reported; the ratio is of the best runs.

    python benchmarks/bench_config_load.py
    python benchmarks/bench_config_load.py --entries 50000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import yaml

from samplerkit.config import parse_yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--entries", type=int, default=80_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    text = "backend: bigram\npipeline:\n  - logit_bias:\n      bias:\n" + "".join(
        f"        {i}: {(i % 97) / 97 - 0.5:.4f}\n" for i in range(args.entries))
    loaders = {"samplerkit parse_yaml": lambda: parse_yaml(text),
               "yaml.SafeLoader (pure Python)": lambda: yaml.load(text, Loader=yaml.SafeLoader)}
    times: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(args.repeats):
        for name, load in loaders.items():
            start = time.perf_counter()
            load()
            times[name].append(time.perf_counter() - start)
    print(f"{len(text) / 1e6:.2f} MB, {args.entries} entries, libyaml: {getattr(yaml, '__with_libyaml__', False)}")
    for name, ts in times.items():
        print(f"  {name:32s} best {min(ts):7.3f} s  median {statistics.median(ts):7.3f} s")
    ours, pure = (min(times[name]) for name in loaders)
    print(f"  pure-Python / samplerkit: {pure / ours:.1f}x")


if __name__ == "__main__":
    main()
