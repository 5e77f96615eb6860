"""Counting what one call does, on the CPU: memory traffic of every Triton program, FLOPs, launches,
host syncs, torch ops on vocabulary-wide tensors and peak extra memory.

Three recorders, each a context manager, used together by ``fused-canon bench --count`` (bench/count.py):

* ``InterpreterTraffic`` instruments Triton's CPU interpreter (``TRITON_INTERPRET=1``) at the builder
  calls every ``tl.load`` / ``tl.store`` / ``tl.dot`` / atomic goes through
  (``InterpreterBuilder.create_masked_load``, ``create_masked_store``, ``create_dot``,
  ``create_atomic_rmw``, ``create_atomic_cas``; plain and block-pointer loads and stores reach the
  masked ones) and at each launch (``GridExecutor.__call__``). Every access is an array of addresses
  and a mask: the bytes a program *requests* are the unmasked elements times their size, attributed to
  the tensor (storage) the addresses fall in. Each element remembers the launch and program that last
  touched it, so a read is classified as a first touch, or a re-read (or a read of data written before)
  in the same program (an L1/L2 hit on a GPU), by another program of the same launch (L2 at best),
  or in a later launch (DRAM unless the whole tensor stays in L2). ``tl.dot`` adds 2·M·N·K FLOPs.
  The hooks are checked against the installed Triton before anything runs: a version outside
  3.6-3.9, or an interpreter whose builder lacks one of them, is an error, and so is a launch during
  which no access was seen (counts that silently stayed 0).
* ``TorchOps`` is a ``TorchDispatchMode``: host syncs (the aten ops that, on a CUDA tensor, make the
  host wait for the device: ``SYNC_OPS``, boolean indexing, and ``Tensor.tolist``), each with its call
  site; and the torch ops that read or write a vocabulary-wide tensor (a dimension equal to V, at least
  two rows of it), with those bytes. Ops the interpreter itself issues while launching are not counted.
* ``peak_extra_memory`` runs a call under ``torch.profiler`` with ``profile_memory=True``: the CPU
  allocator's own allocation and free events, whose running sum peaks at the call's peak extra memory
  (what it allocates beyond what existed before; gradients it leaves behind are included).
"""

from __future__ import annotations

import inspect
import os
import traceback
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["InterpreterTraffic", "TorchOps", "peak_extra_memory", "SUPPORTED_TRITON", "READ_KINDS",
           "check_interpreter_hooks"]

SUPPORTED_TRITON = ((3, 6), (3, 9))  # the range whose interpreter these hooks were written against
OUTSIDE, OUTSIDE_NAME = -1, "(outside every tensor argument)"
# How a read relates to the last access of the same element in this call.
READ_KINDS = ("first", "same_program", "same_launch", "later_launch")

# The builder methods instrumented and the leading parameters each must have (after self).
_HOOKS = {
    "create_masked_load": ("ptrs", "mask", "other"),
    "create_masked_store": ("ptrs", "value", "mask"),
    "create_dot": ("a", "b", "d"),
    "create_atomic_rmw": ("rmwOp", "ptr", "val", "mask"),
    "create_atomic_cas": ("ptr", "cmp", "val"),
}


def _triton_version() -> Tuple[int, int]:
    import triton

    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def check_interpreter_hooks():
    """The interpreter module, after checking that this Triton can be instrumented; else a RuntimeError
    that says why (counts from unhooked builder calls would silently read 0)."""
    import triton

    version = _triton_version()
    low, high = SUPPORTED_TRITON
    if not low <= version <= high:
        raise RuntimeError(f"fused-canon bench --count instruments Triton's interpreter of triton "
                           f"{low[0]}.{low[1]}-{high[0]}.{high[1]}; triton {triton.__version__} is installed")
    from fused_canon.kernels import triton_interpreter_enabled

    if not triton_interpreter_enabled():
        raise RuntimeError("fused-canon bench --count runs the kernels in Triton's interpreter: set "
                           "TRITON_INTERPRET=1 before triton is imported")
    from triton.runtime import interpreter

    problems = []
    builder_class = getattr(interpreter, "InterpreterBuilder", None)
    for name, params in _HOOKS.items():
        method = getattr(builder_class, name, None)
        if method is None:
            problems.append(f"InterpreterBuilder.{name} is missing")
            continue
        found = tuple(inspect.signature(method).parameters)[1:1 + len(params)]
        if found != params:
            problems.append(f"InterpreterBuilder.{name}{found} does not start with {params}")
    if not callable(getattr(getattr(interpreter, "GridExecutor", None), "__call__", None)):
        problems.append("GridExecutor.__call__ is missing")
    builder = getattr(interpreter, "interpreter_builder", None)
    if builder is None or not hasattr(builder, "set_grid_idx"):
        problems.append("the module-level interpreter_builder (with set_grid_idx) is missing")
    if problems:
        raise RuntimeError(f"fused-canon bench --count cannot instrument triton {triton.__version__}'s interpreter: "
                           + "; ".join(problems))
    return interpreter


# ---------------------------------------------------------------------------------------------------------------
# Interpreter traffic
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RegionTraffic:
    """Bytes requested from one tensor during one launch."""

    read: Dict[str, int] = field(default_factory=lambda: dict.fromkeys(READ_KINDS, 0))
    written: int = 0

    def add(self, other: "RegionTraffic") -> None:
        for kind in READ_KINDS:
            self.read[kind] += other.read[kind]
        self.written += other.written

    @property
    def read_total(self) -> int:
        return sum(self.read.values())


class _Region:
    """A tensor's storage as the kernels address it, with the last launch and program that touched each element."""

    def __init__(self, name: str, start: int, nbytes: int, itemsize: int):
        self.name, self.start, self.nbytes, self.itemsize = name, start, nbytes, max(1, itemsize)
        count = -(-nbytes // self.itemsize)
        self.last_launch = np.full(count, -1, dtype=np.int32)
        self.last_program = np.full(count, -1, dtype=np.int32)

    def touch(self, offsets: np.ndarray, nbytes_each: int, write: bool, launch: int, program: int,
              traffic: RegionTraffic) -> None:
        index = (offsets // self.itemsize).astype(np.int64)
        if write:
            traffic.written += index.size * nbytes_each
        else:
            previous = self.last_launch[index]
            in_this_launch = previous == launch
            same_program = in_this_launch & (self.last_program[index] == program)
            counts = {"first": int((previous < 0).sum()), "same_program": int(same_program.sum()),
                      "same_launch": int((in_this_launch & ~same_program).sum()),
                      "later_launch": int(((previous >= 0) & (previous < launch)).sum())}
            for kind, n in counts.items():
                traffic.read[kind] += n * nbytes_each
        self.last_launch[index] = launch
        self.last_program[index] = program

    @property
    def touched_bytes(self) -> int:
        return int((self.last_launch >= 0).sum()) * self.itemsize


@dataclass
class Launch:
    """One kernel launch: its grid, the traffic per tensor, FLOPs, dot shapes and atomics."""

    index: int
    kernel: str
    grid: Tuple[int, int, int]
    phase: str
    traffic: Dict[int, RegionTraffic] = field(default_factory=lambda: defaultdict(RegionTraffic))  # by region start
    flops: int = 0
    dots: Counter = field(default_factory=Counter)  # (M, N, K, a dtype, b dtype) -> calls
    atomics: int = 0  # atomic elements (unmasked)
    accesses: int = 0  # load/store instructions seen

    @property
    def programs(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    @property
    def read_bytes(self) -> int:
        return sum(t.read_total for t in self.traffic.values())

    @property
    def written_bytes(self) -> int:
        return sum(t.written for t in self.traffic.values())


def _element_bytes(handle) -> int:
    return max(1, handle.get_element_ty().primitive_bitwidth // 8)


class InterpreterTraffic:
    """Instruments Triton's interpreter while active. ``names`` maps tensors the caller knows to names;
    other tensors are named after the kernel argument they were first passed as (``dlogits_ptr`` ->
    ``dlogits``). Tensors passed to a kernel are kept alive until the end, so a freed storage's address
    is never taken for another tensor's. ``phase`` labels the launches that follow ("forward", ...)."""

    def __init__(self, names: Optional[Dict[str, torch.Tensor]] = None):
        self._interpreter = check_interpreter_hooks()
        self._named = {t.untyped_storage().data_ptr(): name for name, t in (names or {}).items()}
        self.regions: Dict[int, _Region] = {}  # storage start -> region
        self.launches: List[Launch] = []
        self.phase = "call"
        self._keep_alive: List[torch.Tensor] = []
        self._starts = np.zeros(0, dtype=np.uint64)
        self._ends = np.zeros(0, dtype=np.uint64)
        self._order: List[_Region] = []
        self._current: Optional[Launch] = None
        self._originals: Dict[Tuple[object, str], object] = {}
        self.inside_launch = False  # TorchOps ignores the interpreter's own torch ops

    # -- regions ------------------------------------------------------------------------------------------
    def _register(self, arg_name: str, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
        region = self.regions.get(start)
        if region is not None and region.nbytes == nbytes:
            return
        name = self._named.get(start) or (arg_name[:-4] if arg_name.endswith("_ptr") else arg_name)
        taken = {r.name for r in self.regions.values()}
        base, k = name, 2
        while name in taken:
            name, k = f"{base}#{k}", k + 1
        self.regions[start] = _Region(name, start, nbytes, tensor.element_size())
        self._keep_alive.append(tensor)
        self._order = sorted(self.regions.values(), key=lambda r: r.start)
        self._starts = np.array([r.start for r in self._order], dtype=np.uint64)
        self._ends = np.array([r.start + r.nbytes for r in self._order], dtype=np.uint64)

    # -- hooks --------------------------------------------------------------------------------------------
    def _access(self, ptrs, mask, write: bool) -> None:
        launch = self._current
        if launch is None:
            return
        launch.accesses += 1
        addresses = np.asarray(ptrs.data)
        live = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        addresses = addresses[live].astype(np.uint64).ravel()
        if addresses.size == 0:
            return
        nbytes_each = _element_bytes(ptrs)
        builder = self._interpreter.interpreter_builder
        x, y, z = builder.grid_idx
        program = int(x + launch.grid[0] * (y + launch.grid[1] * z))
        slot = np.searchsorted(self._starts, addresses, side="right").astype(np.int64) - 1
        inside = (slot >= 0) & (addresses < self._ends[np.maximum(slot, 0)])
        if not inside.all():
            outside = int((~inside).sum()) * nbytes_each
            if write:
                launch.traffic[OUTSIDE].written += outside
            else:
                launch.traffic[OUTSIDE].read["first"] += outside
        for s in np.unique(slot[inside]):
            region = self._order[int(s)]
            picked = slot == s
            region.touch(addresses[picked] - np.uint64(region.start), nbytes_each, write, launch.index, program,
                         launch.traffic[region.start])

    def _install(self) -> None:
        interp = self._interpreter
        builder_class, executor_class = interp.InterpreterBuilder, interp.GridExecutor
        counter = self

        def patch(owner, name, make):
            original = getattr(owner, name)
            self._originals[(owner, name)] = original
            setattr(owner, name, make(original))

        def masked_load(original):
            def hooked(builder, ptrs, mask, other, *args, **kwargs):
                counter._access(ptrs, mask, write=False)
                return original(builder, ptrs, mask, other, *args, **kwargs)
            return hooked

        def masked_store(original):
            def hooked(builder, ptrs, value, mask, *args, **kwargs):
                counter._access(ptrs, mask, write=True)
                return original(builder, ptrs, value, mask, *args, **kwargs)
            return hooked

        def dot(original):
            def hooked(builder, a, b, d, *args, **kwargs):
                if counter._current is not None:
                    *_, m, k = a.data.shape
                    n = b.data.shape[-1]
                    counter._current.flops += 2 * m * n * k * int(np.prod(a.data.shape[:-2], dtype=np.int64))
                    counter._current.dots[(m, n, k, str(a.dtype.scalar), str(b.dtype.scalar))] += 1
                return original(builder, a, b, d, *args, **kwargs)
            return hooked

        def atomic_rmw(original):
            def hooked(builder, op, ptr, val, mask, *args, **kwargs):
                if counter._current is not None:
                    counter._current.atomics += int(np.broadcast_to(mask.data, ptr.data.shape).sum())
                    counter._access(ptr, mask, write=False)
                    counter._access(ptr, mask, write=True)
                return original(builder, op, ptr, val, mask, *args, **kwargs)
            return hooked

        def atomic_cas(original):
            def hooked(builder, ptr, cmp, val, *args, **kwargs):
                if counter._current is not None:
                    counter._current.atomics += int(np.asarray(ptr.data).size)
                return original(builder, ptr, cmp, val, *args, **kwargs)
            return hooked

        def launch(original):
            def hooked(executor, *args, **kwargs):
                names = list(executor.arg_names)
                bound = dict(zip(names, args))
                bound.update({k: v for k, v in kwargs.items() if k in names})
                for arg_name, value in bound.items():
                    if isinstance(value, torch.Tensor):
                        counter._register(arg_name, value)
                grid = executor.grid(bound) if callable(executor.grid) else executor.grid
                grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
                record = Launch(len(counter.launches), executor.fn.__name__, grid, counter.phase)
                counter.launches.append(record)
                counter._current, counter.inside_launch = record, True
                try:
                    return original(executor, *args, **kwargs)
                finally:
                    counter._current, counter.inside_launch = None, False
                    if record.programs > 0 and record.accesses == 0:
                        raise RuntimeError(f"fused-canon bench --count saw launch {record.kernel}{record.grid} but no "
                                           "load or store: the interpreter hooks did not fire on this triton")
            return hooked

        patch(builder_class, "create_masked_load", masked_load)
        patch(builder_class, "create_masked_store", masked_store)
        patch(builder_class, "create_dot", dot)
        patch(builder_class, "create_atomic_rmw", atomic_rmw)
        patch(builder_class, "create_atomic_cas", atomic_cas)
        patch(executor_class, "__call__", launch)

    def __enter__(self) -> "InterpreterTraffic":
        self._install()
        return self

    def __exit__(self, *exc) -> None:
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals.clear()

    # -- results ------------------------------------------------------------------------------------------
    def per_tensor(self) -> Dict[str, Dict[str, object]]:
        """{tensor name: {bytes, touched_bytes, read: {kind: bytes}, written}} over the whole call (addresses
        outside every tensor argument, which a correct kernel never makes, under OUTSIDE_NAME)."""
        total: Dict[int, RegionTraffic] = defaultdict(RegionTraffic)
        for launch in self.launches:
            for start, traffic in launch.traffic.items():
                total[start].add(traffic)
        out = {}
        for start, t in total.items():
            region = self.regions.get(start)
            name, size, touched = (region.name, region.nbytes, region.touched_bytes) if region else (OUTSIDE_NAME, 0, 0)
            out[name] = {"bytes": size, "touched_bytes": touched, "read": dict(t.read), "written": t.written}
        return out


# ---------------------------------------------------------------------------------------------------------------
# Torch ops: host syncs and vocabulary-wide tensors
# ---------------------------------------------------------------------------------------------------------------

# aten ops that, on CUDA tensors, copy device data to the host and wait for it (a data-dependent output
# size or a Python scalar). Boolean-mask indexing (index.Tensor / index_put_ with a bool index) is one
# too (it runs nonzero). H2D copies of CPU-made tensors are not seen on a CPU machine.
SYNC_OPS = {"aten._local_scalar_dense", "aten.nonzero", "aten._unique", "aten._unique2", "aten.unique_dim",
            "aten.unique_consecutive", "aten.bincount", "aten.masked_select", "aten.equal", "aten.is_nonzero",
            "aten.item"}
# Ops that write their first argument without reading it.
_OVERWRITING = {"aten.copy_", "aten.fill_", "aten.zero_"}
_ALLOCATING = {"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided"}
_TORCH_DIR = os.path.dirname(torch.__file__)
_THIS_FILE = os.path.abspath(__file__)


def _site_path(filename: str) -> str:
    marker = "site-packages" + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    import fused_canon

    root = os.path.dirname(os.path.dirname(os.path.abspath(fused_canon.__file__)))
    return os.path.relpath(filename, root) if filename.startswith(root) else filename


def _caller() -> Optional[traceback.FrameSummary]:
    """The innermost frame outside torch and this module: where an op was asked for."""
    for frame in reversed(traceback.extract_stack()):
        name = os.path.abspath(frame.filename)
        if not (name.startswith(_TORCH_DIR) or name == _THIS_FILE or name.endswith("/contextlib.py")):
            return frame
    return None


def call_site() -> str:
    frame = _caller()
    return "?" if frame is None else f"{_site_path(os.path.abspath(frame.filename))}:{frame.lineno} ({frame.name})"


def _is_bool_index(func_name: str, args) -> bool:
    if func_name not in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _is_sync(func, args, kwargs) -> bool:
    name = str(func.overloadpacket)
    if name in SYNC_OPS or _is_bool_index(name, args):
        return True
    if name == "aten.repeat_interleave" and isinstance(args[0], torch.Tensor) and len(args) < 2:
        return kwargs.get("output_size") is None
    return False


class TorchOps(TorchDispatchMode):
    """Host syncs with their call sites, and torch ops on vocabulary-wide tensors (a dim equal to
    ``vocab`` and at least two rows of it) with the bytes of those tensors read and written.
    ``traffic`` (an ``InterpreterTraffic``) marks the interpreter's own torch ops, which are skipped;
    so are the ops called from ``harness_file`` itself (e.g. autograd's gradient accumulation at its
    ``.backward()`` line, which clones instead of stealing the gradient while a dispatch mode is active)."""

    def __init__(self, vocab: int, traffic: Optional[InterpreterTraffic] = None, harness_file: Optional[str] = None):
        super().__init__()
        self.vocab, self._traffic = vocab, traffic
        self._harness_file = os.path.abspath(harness_file) if harness_file else None
        self.syncs: Counter = Counter()  # (what, call site) -> count
        self.vocab_ops: Counter = Counter()  # (op name, call site) -> count
        self.vocab_read = self.vocab_written = 0
        self.ops = 0
        self._tolist = None

    def _vocab_wide(self, t) -> bool:
        return isinstance(t, torch.Tensor) and self.vocab in t.shape and t.numel() >= 2 * self.vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self._traffic is not None and self._traffic.inside_launch:
            return out
        self.ops += 1
        if _is_sync(func, args, kwargs):
            self.syncs[(str(func.overloadpacket), call_site())] += 1
        if func.is_view:
            return out
        inputs = [t for t in torch.utils._pytree.tree_leaves((args, kwargs)) if self._vocab_wide(t)]
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if self._vocab_wide(t)]
        caller = _caller() if inputs or outputs else None
        if caller is not None and os.path.abspath(caller.filename) == self._harness_file:
            return out
        if inputs or outputs:
            name = str(func.overloadpacket)
            self.vocab_ops[(name, call_site())] += 1
            written_args = {i for i, a in enumerate(func._schema.arguments) if a.alias_info and a.alias_info.is_write}
            mutated = [args[i] for i in written_args if i < len(args) and self._vocab_wide(args[i])]
            input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
            fresh = [t for t in outputs if t.untyped_storage().data_ptr() not in input_ptrs]
            if name not in _ALLOCATING:
                read = [t for t in inputs if not (name in _OVERWRITING and t is args[0])]
                self.vocab_read += sum(t.numel() * t.element_size() for t in read)
                self.vocab_written += sum(t.numel() * t.element_size() for t in fresh + mutated)
        return out

    def __enter__(self):
        original = torch.Tensor.tolist
        ops = self

        def tolist(tensor):
            if ops._traffic is None or not ops._traffic.inside_launch:
                ops.syncs[("Tensor.tolist", call_site())] += 1
            return original(tensor)

        self._tolist = original
        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)

    @property
    def host_syncs(self) -> int:
        return sum(self.syncs.values())

    def sync_sites(self) -> List[Dict[str, object]]:
        return [{"op": op, "site": site, "count": n} for (op, site), n in self.syncs.items()]

    def vocab_op_sites(self) -> List[Dict[str, object]]:
        return [{"op": op, "site": site, "count": n} for (op, site), n in self.vocab_ops.items()]


# ---------------------------------------------------------------------------------------------------------------
# Peak extra memory
# ---------------------------------------------------------------------------------------------------------------


def peak_extra_memory(fn: Callable[[], object]) -> Dict[str, int]:
    """Run ``fn`` once under the profiler's memory recording: ``peak_bytes`` (the running sum of the CPU
    allocator's allocation / free events at its highest) and ``retained_bytes`` (still allocated at the
    end, e.g. gradients; the result of ``fn`` is dropped first)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch._C._autograd.DeviceType.CPU)
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    if not events:
        raise RuntimeError("the profiler recorded no allocator event: peak memory cannot be measured here")
    return {"peak_bytes": peak, "retained_bytes": running}
