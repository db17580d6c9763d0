"""Diagnostics of the torch fast path: host-device synchronisations (`SyncCounter`) and operators
dispatched (`op_counter`) in a training step; used by tests and ``benchmarks/torch_*.py``."""

from __future__ import annotations

import contextlib
import functools


class SyncCounter:
    """Counts the torch calls that make the host wait for a GPU, made on this thread inside `counting`.

    Two kinds: tensors made from host data directly on a device (``torch.as_tensor`` / ``torch.tensor``
    with a ``device``: a blocking copy) and device values read back by Python (``item``, ``tolist``,
    ``int(t)``, ``bool(t)``, ``numpy`` ...). On a CPU nothing waits, so the count is what would
    synchronise on a GPU. Used as ``with SyncCounter() as c:`` (wraps those torch functions until the
    block ends), counting inside ``with c.counting():`` blocks; ``c.copies`` and ``c.reads`` name each.
    """

    READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "numpy")

    def __init__(self):
        import threading

        self.copies, self.reads, self._on, self._saved = [], [], 0, []
        self._thread = threading.get_ident

    def __enter__(self):
        import torch

        thread = self._thread()

        def creating(fn):
            def make(data, *args, **kwargs):
                if self._on and self._thread() == thread and not isinstance(data, torch.Tensor) \
                        and kwargs.get("device") is not None:
                    self.copies.append(type(data).__name__)
                return fn(data, *args, **kwargs)
            return make

        def reading(name, fn):
            def read(t, *args, **kwargs):
                if self._on and self._thread() == thread:
                    self.reads.append(name)
                return fn(t, *args, **kwargs)
            return read

        for owner, name, wrap in [(torch, "as_tensor", creating), (torch, "tensor", creating),
                                  *((torch.Tensor, n, functools.partial(reading, n)) for n in self.READS)]:
            self._saved.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrap(getattr(owner, name)))
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    @contextlib.contextmanager
    def counting(self):
        self._on += 1
        try:
            yield self
        finally:
            self._on -= 1

    def reset(self):
        self.copies.clear()
        self.reads.clear()


def op_counter():
    """A context manager (torch only) whose ``counts``, a ``collections.Counter``, receives the name of every
    torch operator dispatched inside it (backward passes included) that is not a view: on a GPU each is
    a kernel launch, and host work in an eager step. Views (``permute``, ``detach`` ...) make no kernel.
    Its ``bytes`` Counter receives, per operator name, the bytes of the tensors each call reads and
    writes (inputs and outputs): the memory traffic of the operators that are bound by it, as most of a
    step's elementwise and normalisation kernels are on a GPU. A diagnostic, like `SyncCounter`;
    ``benchmarks/torch_ops.py`` counts a training step with it."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = collections.Counter()
            self.bytes = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if not func.is_view:
                name = func.overloadpacket.__name__
                self.counts[name] += 1
                self.bytes[name] += sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs, out))
                                        if isinstance(t, torch.Tensor))
            return out

    return OpCounter()

