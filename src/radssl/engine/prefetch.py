"""Build the next step's views while the current step computes.

Why here (``engine``) and not in ``views``: a view policy is a pure function of (rows, images, generator); *when*
it runs relative to the model step — one step ahead, on which thread and which CUDA stream — is a property of the
training loop, as are the thread budget and the stream synchronisation.

How: one background thread calls ``make(step + 1)`` while the caller trains on step ``step`` (one batch in flight,
so memory is two batches at most). Torch ops release the GIL, so on CPU the gather/augment kernels really run beside
the model's. On CUDA the thread issues its work on a side stream; the consumer's stream waits on an event recorded
after that step's views (not on the whole side stream, which is already building the next step), and every tensor
of the batch is marked as used by the consumer's stream so the caching allocator does not hand its memory back to
the side stream too early.

Nothing random depends on the thread: ``make`` must be a function of the step alone (``radssl.engine.feed.StepViews``
reseeds its generator from ``(seed, step, rank)``), and it is called for steps in order, one at a time — so the
batches are the very bytes the loop would have built itself.

Threads (CPU): the model keeps its intra-op threads (``train.threads``, torch's default: one per core); the prefetch
thread runs its kernels with ``threads`` intra-op threads (default 1; OpenMP thread counts are per calling thread, so
this does not change the model's). On a machine with ``c`` cores that is ``c + 1`` busy threads during the overlap —
one more than cores, by design: view building is a small share of a step and a core taken from the model would cost
more than it gives. Set ``train.threads`` to ``cores - 1`` where the views are the larger share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor inside a (nested) dataclass, mapping, list or tuple."""
    if torch.is_tensor(value):
        yield value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            yield from tensors_in(getattr(value, item.name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from tensors_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from tensors_in(item)


class Prefetcher(Generic[T]):
    """Iterate ``(step, make(step))`` for ``steps``, with ``make(step + 1)`` computed in the background.

    Use as a context manager (the thread is joined on exit, also when the loop raises). ``enabled=False`` calls
    ``make`` in the caller's thread: the direct path, same results.
    """

    def __init__(self, make: Callable[[int], T], steps: range, device: torch.device, enabled: bool = True,
                 threads: int = 1) -> None:
        self.make, self.steps, self.enabled, self.threads = make, steps, enabled, threads
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if enabled and self.device.type == "cuda" else None
        self._pool: ThreadPoolExecutor | None = None

    def __enter__(self) -> "Prefetcher[T]":
        if self.stream is not None:
            # the side stream starts after everything queued so far (e.g. the resident copy of the images)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if self.enabled:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="radssl-prefetch",
                                            initializer=self._init_thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _init_thread(self) -> None:
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)  # this thread's OpenMP team only (see the module docstring)

    def _produce(self, step: int) -> tuple[T, Any]:
        if self.stream is None:
            return self.make(step), None
        with torch.cuda.stream(self.stream):
            value = self.make(step)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return value, ready

    def _receive(self, future: Future) -> T:
        value, ready = future.result()
        if ready is not None:
            consumer = torch.cuda.current_stream(self.device)
            consumer.wait_event(ready)
            for tensor in tensors_in(value):
                if tensor.device.type == "cuda":
                    tensor.record_stream(consumer)
        return value

    def __iter__(self) -> Iterator[tuple[int, T]]:
        if not self.enabled:
            for step in self.steps:
                yield step, self.make(step)
            return
        if self._pool is None:
            raise RuntimeError("use the Prefetcher as a context manager: `with Prefetcher(...) as batches:`")
        steps = iter(self.steps)
        step = next(steps, None)
        pending = None if step is None else self._pool.submit(self._produce, step)
        while pending is not None:
            value = self._receive(pending)
            following = next(steps, None)
            pending = None if following is None else self._pool.submit(self._produce, following)
            yield step, value
            step = following
