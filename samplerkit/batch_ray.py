"""The scale-out path of ``samplerkit batch --ray``: the same batches, run by Ray Data actors.

Reading, validation, grouping, resume and writing stay on the driver (:mod:`samplerkit.batch`);
only the ``generate`` calls move. Each planned batch becomes one item of a Ray dataset
(``ray.data.from_items``); ``map_batches`` runs them through a pool of :class:`BatchWorker`
actors, each of which loads the backend once and runs its batches with a
:class:`~samplerkit.Generator`. Results stream back to the driver, which appends them to the
output exactly as the local run does, so the file format and the resume rules are the same,
and seeded rows give the same rows (seeded rows don't depend on their batch).

Ray is imported only here, and only by ``--ray``. Workers need samplerkit, its plugins and
the model files the config names (a cluster's ``runtime_env`` or image provides them).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from samplerkit.batch import Executor, Job, jobs_from_json, jobs_to_json, plan_batches, run_jobs
from samplerkit.config import RunConfig
from samplerkit.errors import SamplerkitError


class BatchWorker:
    """A Ray Data callable class: one Generator per actor, built from the raw config mapping."""

    def __init__(self, raw_config: Mapping[str, Any]):
        self.fatal: str | None = None
        try:
            from samplerkit.generate import Generator

            self.generator = Generator(dict(raw_config))
        except SamplerkitError as exc:      # e.g. a model file missing on this node
            self.fatal = str(exc)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        out = []
        for text in batch["batch"]:
            if self.fatal is not None:
                out.append(json.dumps({"fatal": self.fatal}))
                continue
            rows, errors = run_jobs(self.generator, jobs_from_json(str(text)))
            out.append(json.dumps({"rows": rows, "errors": errors}, ensure_ascii=False))
        return {"result": np.array(out, dtype=object)}


def ray_executor(config: RunConfig, *, address: str | None = None, workers: int | None = None,
                 quiet: bool | None = None) -> Executor:
    """An executor for :func:`samplerkit.batch.run_batch` that runs batches on a Ray cluster.

    ``address``: a Ray address (``auto``, ``ray://host:10001``, ...); None connects to
    ``RAY_ADDRESS`` or starts a local Ray. If Ray is already initialised (a test, a notebook)
    it is used as is and left running. ``workers``: most actors (each loads the model once);
    default one per CPU of the cluster.
    """
    try:
        import ray
        import ray.data
    except ImportError:
        raise SamplerkitError("--ray needs Ray Data, which is not installed: pip install 'samplerkit[ray]'") from None
    if workers is not None and workers < 1:
        raise SamplerkitError(f"--ray-workers must be >= 1, got {workers}")
    if quiet is None:
        quiet = not sys.stderr.isatty() or os.environ.get("SAMPLERKIT_QUIET") == "1"

    def run(jobs: list[Job], batch_size: int):
        batches = plan_batches(jobs, batch_size)
        if not batches:
            return
        started_here = not ray.is_initialized()
        if started_here:
            try:
                ray.init(address=address or None, include_dashboard=False,
                         logging_level=logging.WARNING if quiet else logging.INFO, log_to_driver=not quiet)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise SamplerkitError(f"cannot start or reach Ray{f' at {address}' if address else ''}: {exc}") from None
        try:
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = not quiet
            if quiet:
                logging.getLogger("ray.data").setLevel(logging.WARNING)
            size = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
            dataset = ray.data.from_items([{"batch": jobs_to_json(b)} for b in batches],
                                          override_num_blocks=min(len(batches), 200))
            dataset = dataset.map_batches(
                BatchWorker, fn_constructor_args=(dict(config.raw),), batch_size=1, num_cpus=1,
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=min(size, len(batches))))
            for item in dataset.iter_rows():
                result = json.loads(item["result"])
                if "fatal" in result:
                    raise SamplerkitError(result["fatal"])
                yield result["rows"], result["errors"]
        finally:
            if started_here:
                ray.shutdown()
    return run


__all__ = ["BatchWorker", "ray_executor"]
