"""Count the timm architecture families that CGC works on out of the box.

A family is one module of ``timm.models`` (``resnet``, ``vision_transformer``, ``swin_transformer``
...). For each, the registered model with the fewest parameters is built at random init
(``pretrained=False``, so nothing is downloaded), wrapped with ``CGCModel.from_backbone`` (which
resolves the Grad-CAM target layer by itself), trained for one step at the model's own input
size with a batch of 2, and explained. A family "works" when all of that runs and gives a finite
loss and a finite heatmap.

Run it niced and single-threaded; it takes a while (parameter counting alone builds every timm
model once on the meta device, ~4 minutes here):

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 nice python recipes/count_timm_families.py \\
        --timeout-per-model 180 --max-memory-gb 8 --picks timm_picks.json --json timm_families.json
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing
import os
import resource
import signal
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection

import timm
import torch

from cgc_hf import CGCModel


@dataclass
class Result:
    """What happened to one family's representative model."""

    family: str
    model: str
    params: int
    target: str = ""
    layout: str = ""
    grid: str = ""
    status: str = "ok"
    seconds: float = 0.0


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise ``TimeoutError`` in the block after ``seconds`` (main thread, Unix only)."""

    def on_alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def count_params(name: str) -> int | None:
    """Parameters of ``name``, built on the meta device (no memory, no init cost)."""
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:  # noqa: BLE001 - an unbuildable variant is simply not a candidate
        return None


def smallest_per_family(families: list[str]) -> list[tuple[str, str, int]]:
    """``(family, model, params)`` for the smallest buildable model of each family."""
    picks = []
    for family in families:
        sizes = [(count_params(n), n) for n in timm.list_models(module=family)]
        sizes = [(p, n) for p, n in sizes if p is not None]
        if sizes:
            params, name = min(sizes)  # fewest parameters, then alphabetical
            picks.append((family, name, params))
        else:
            picks.append((family, "", 0))
    return picks


def try_family(family: str, name: str, params: int, timeout: float) -> Result:
    """Build, train one step and explain ``name``; never raises."""
    result = Result(family, name, params)
    if not name:
        result.status = "error: no model of this family builds"
        return result
    start = time.perf_counter()
    try:
        with time_limit(timeout):
            torch.manual_seed(0)
            model = CGCModel.from_backbone(name, num_labels=10, pretrained=False)
            result.target = model.target.name
            result.layout = model.target.layout
            if model.target.num_prefix_tokens:
                result.layout += f"+{model.target.num_prefix_tokens}"
            size = tuple(model.config.data_config["input_size"][-2:])
            x = torch.randn(2, 3, *size)  # the model's own input size, batch 2

            # One training step: CE on both views + the CGC term, one backward.
            model.train()
            out = model(x, labels=torch.tensor([0, 1]))
            if not bool(torch.isfinite(out["loss"])):
                raise FloatingPointError(f"loss is {float(out['loss'].detach())}")
            out["loss"].backward()

            # Heatmaps for the predicted class at the target layer's own grid.
            model.eval()
            heatmaps = model.explain(x)  # (2, h, w)
            if not bool(torch.isfinite(heatmaps).all()):
                raise FloatingPointError("heatmap is not finite")
            result.grid = "x".join(str(s) for s in heatmaps.shape[-2:])
    except Exception as err:  # noqa: BLE001 - the table reports every failure
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        result.status = f"error: {type(err).__name__}: {first_line[:160]}"
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
    return result


def _worker(
    conn: Connection, family: str, name: str, params: int, timeout: float, gb: float
) -> None:
    # Cap this process's heap so one huge model fails alone instead of exhausting the machine
    # (some families' smallest model still wants tens of GB at its native resolution).
    limit = int(gb * 2**30)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    conn.send(asdict(try_family(family, name, params, timeout)))
    conn.close()


def try_family_isolated(family: str, name: str, params: int, timeout: float, gb: float) -> Result:
    """:func:`try_family` in a forked process with a memory cap; a crash is reported, not fatal."""
    ctx = multiprocessing.get_context("fork")  # the child inherits the imports: no start-up cost
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, family, name, params, timeout, gb))
    start = time.perf_counter()
    proc.start()
    send.close()
    result = None
    if receive.poll(timeout + 30):  # the child enforces `timeout` itself; this is a backstop
        try:
            result = Result(**receive.recv())
        except EOFError:
            pass
    proc.join(10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = Result(family, name, params, seconds=time.perf_counter() - start)
        result.status = f"error: worker died (exit code {proc.exitcode}, memory cap {gb:g} GB?)"
    return result


def load_or_pick(families: list[str], path: str | None) -> list[tuple[str, str, int]]:
    """Smallest model per family, cached in ``path`` (counting builds every model once)."""
    cached: dict[str, list] = {}
    if path and os.path.exists(path):
        with open(path) as f:
            cached = json.load(f)
    missing = [fam for fam in families if fam not in cached]
    if missing:
        print(f"choosing the smallest model of {len(missing)} timm families...", flush=True)
        for family, name, params in smallest_per_family(missing):
            cached[family] = [name, params]
        if path:
            with open(path, "w") as f:
                json.dump(cached, f, indent=2)
    return [(fam, *cached[fam]) for fam in families]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="Try only the first N families.")
    parser.add_argument(
        "--families", default=None, help="Comma-separated timm modules to try (default: all)."
    )
    parser.add_argument(
        "--timeout-per-model", type=float, default=300.0, help="Seconds allowed per family."
    )
    parser.add_argument(
        "--max-memory-gb", type=float, default=8.0, help="Heap cap of each model's process."
    )
    parser.add_argument(
        "--picks", default=None, help="JSON cache of the smallest model per family (reruns)."
    )
    parser.add_argument("--json", default=None, help="Also write the results to this file.")
    args = parser.parse_args()

    warnings.filterwarnings("ignore")  # timm deprecation chatter would drown the table
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)

    families = args.families.split(",") if args.families else sorted(timm.list_modules())
    families = families[: args.limit] if args.limit else families
    picks = load_or_pick(families, args.picks)

    header = f"{'family':<22} {'model':<40} {'params':>8} {'target layer':<28} layout  grid"
    print(header + "  status", flush=True)
    results = []
    for family, name, params in picks:
        r = try_family_isolated(family, name, params, args.timeout_per_model, args.max_memory_gb)
        results.append(r)
        print(
            f"{r.family:<22} {r.model:<40} {r.params / 1e6:>7.2f}M {r.target:<28} "
            f"{r.layout:<7} {r.grid:<5} {r.status} ({r.seconds:.1f}s)",
            flush=True,
        )

    ok = sum(r.status == "ok" for r in results)
    print(f"\n{ok} of {len(results)} families work", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)


if __name__ == "__main__":
    main()
