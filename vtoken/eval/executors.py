"""Run independent jobs in this process, in worker processes, or on a Ray cluster, in job order.

``eval rollout`` and ``eval vqa`` cut their work into jobs (shards of seeds or questions, each a
picklable description that the worker turns into a model, an env, plugins) and hand them to
:func:`run_jobs`. A job must not depend on which worker runs it or on what ran before it, so every
executor returns the same results (the tests compare them seed by seed); each job sets its own
torch thread count, since results in floating point can depend on it.

- ``workers=1`` (default): jobs run one after the other here.
- ``workers=N``: a pool of ``N`` processes started with ``spawn`` (fork is unsafe once torch has
  started threads), one job per process at a time.
- ``ray_address``: the jobs run as Ray tasks (one CPU each) on the cluster at that address (``auto``
  for the one this machine belongs to, ``ray://host:10001`` for a remote head, ``local`` to start a
  private one here); results come back as they finish. The workers import vtoken, so it must be
  installed on every node.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, TypeVar

from tqdm.auto import tqdm

from vtoken.errors import ConfigError

J = TypeVar("J")
R = TypeVar("R")


def run_jobs(
    fn: Callable[[J], R],
    jobs: Sequence[J],
    workers: int = 1,
    ray_address: str | None = None,
    desc: str = "jobs",
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(job) for job in jobs]``, computed by the chosen executor, with a progress bar.

    Args:
        fn: a module-level function (picklable by reference).
        jobs: picklable job descriptions.
        workers: processes on this machine (ignored with ``ray_address``).
        ray_address: a Ray cluster address (see the module docstring); None: no Ray.
        desc: progress-bar label.
        on_result: called here as ``on_result(job_index, result)`` as soon as each job finishes
            (``eval rollout`` stores finished shards with it, so a cut run resumes).

    Raises:
        ConfigError: ``workers < 1``, or Ray asked for but not installed.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    report = on_result or (lambda index, result: None)
    if ray_address:
        return _on_ray(fn, jobs, ray_address, desc, report)
    if workers == 1 or len(jobs) <= 1:
        return [_here(fn, job, i, report) for i, job in enumerate(tqdm(jobs, desc=desc, unit="job"))]
    return _in_processes(fn, jobs, workers, desc, report)


def _here(fn: Callable, job, index: int, report: Callable) -> Any:
    result = fn(job)
    report(index, result)
    return result


def _in_processes(fn: Callable, jobs: Sequence, workers: int, desc: str, report: Callable) -> list:
    results: list[Any] = [None] * len(jobs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = {pool.submit(fn, job): i for i, job in enumerate(jobs)}
        for future in tqdm(as_completed(futures), total=len(jobs), desc=desc, unit="job"):
            results[futures[future]] = future.result()
            report(futures[future], results[futures[future]])
    return results


def _on_ray(fn: Callable, jobs: Sequence, address: str, desc: str, report: Callable) -> list:
    try:
        import ray
    except ImportError as err:
        raise ConfigError("--ray-address needs Ray: pip install 'vtoken[ray]'") from err
    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, log_to_driver=False)
    task = ray.remote(num_cpus=1)(fn)
    pending = {task.remote(job): i for i, job in enumerate(jobs)}
    results: list[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=f"{desc} (ray)", unit="job") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = ray.get(ref)
                report(index, results[index])
                bar.update(1)
    return results
