"""Work split over the processes of `accelerate launch` / `torchrun`, and results gathered back.

Every rank runs the same loop on the same prompts. Sampling is split into chunks, each sampled
from a seed of its own, so the pairs a phase collects do not depend on how many processes
share the work; the annotator runs on the main process alone (an annotation is paid once) and its
answers are broadcast; each rank then trains on its own slice of every batch. With one process
every function here is the identity, and 2 processes give the result of 1 (DESIGN.md, Scale).
"""

from __future__ import annotations

import gc
import pickle
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import torch.distributed as dist

# torch.distributed.nn binds the default process group into its functions' default arguments
# when first imported; DDP imports it after the group exists, and those references would keep
# the group, and gloo's threads, alive past `end_processes`. Imported here, before any group.
import torch.distributed.nn  # noqa: F401
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

T = TypeVar("T")
R = TypeVar("R")


def world() -> tuple[int, int]:
    """(rank, number of processes)."""
    state = PartialState()
    return state.process_index, state.num_processes


def is_main() -> bool:
    return PartialState().is_main_process


def bounds(n: int, parts: int, part: int) -> tuple[int, int]:
    """[lo, hi) of the `part`-th of `parts` contiguous, near-equal slices of n items."""
    base, extra = divmod(n, parts)
    lo = part * base + min(part, extra)
    return lo, lo + base + (part < extra)


def local_slice(items: Sequence[T]) -> Sequence[T]:
    """This rank's contiguous share of `items`."""
    rank, size = world()
    lo, hi = bounds(len(items), size, rank)
    return items[lo:hi]


def shard_map(fn: Callable[[Sequence[T]], list[R]], items: Sequence[T]) -> list[R]:
    """`fn(items)` computed as each rank's `fn(local_slice(items))`, gathered in order."""
    _, size = world()
    if size == 1:
        return fn(items)
    local = fn(local_slice(items)) if len(local_slice(items)) else []
    return gather_object(list(local))


def chunked_map(
    fn: Callable[[Sequence[T], int], list[R]], items: Sequence[T], chunk: int, seed: int
) -> list[R]:
    """`fn(chunk_items, chunk_seed)` over fixed chunks of `items`, chunk c on rank c mod world,
    gathered in order. The chunks and their seeds do not depend on the number of processes, so
    neither does the result."""
    rank, size = world()
    starts = range(0, len(items), chunk)
    mine = {
        c: fn(items[start : start + chunk], draw_seed(seed, c))
        for c, start in enumerate(starts)
        if c % size == rank
    }
    if size > 1:
        mine = {c: out for part in gather_object([mine]) for c, out in part.items()}
    return [x for c in range(len(starts)) for x in mine[c]]


def draw_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed for the draw named by `keys` (e.g. run seed, phase, round)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> 1)


def on_main(fn: Callable[[], T]) -> T:
    """`fn()` on the main process only; every rank gets its result, or raises what it raised
    (a stop for labels, an annotator's failure), so no rank is left waiting for the others."""
    _, size = world()
    if size == 1:
        return fn()
    box: list[tuple[T | None, Exception | None] | None] = [None]
    raised = None
    if is_main():
        try:
            box[0] = (fn(), None)
        except Exception as e:  # every rank raises it below
            raised = e
            box[0] = (None, _portable(e))
    broadcast_object_list(box, from_process=0)
    result, error = box[0]
    if raised is not None:
        raise raised
    if error is not None:
        raise error
    return result


def _portable(error: Exception) -> Exception:
    """`error` if it can be sent to the other ranks, else a RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # whatever does not survive pickling
        return RuntimeError(f"{type(error).__name__} on the main process: {error}")
    return error


def end_processes() -> None:
    """Close the process group of a multi-process launch while the interpreter is still whole.

    Left open, gloo's worker threads outlive the program and can free the last collective's
    work while Python shuts down, which aborts a process whose work is done (SIGABRT). Every
    collective has returned on this rank, so nothing is left in flight.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()  # a run stopped by an exception: its frames, and their DDP models, hold the group
    dist.destroy_process_group()
    PartialState._reset_state()  # it would still report the closed group's processes
