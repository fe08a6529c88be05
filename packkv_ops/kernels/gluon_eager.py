"""Run a Gluon kernel's Python body eagerly on torch tensors: the CPU check Gluon's missing interpreter cannot do
(``gluon_attention.decode_partials`` runs this way on CPU tensors; ``tests/test_gluon_attention.py``).

Gluon ops are logical tensor ops (layouts decide where values live, not what they are), so executing a kernel's
body with ``gl`` replaced by torch equivalents computes what the compiled kernel should: its index arithmetic, its
reading of PackKV's format, the orientation of its MMA operands, and its mbarrier protocol: the warp partitions run
as threads ordered by the mbarriers alone (phases as the hardware counts them), so a wrong phase or a missing
arrival hangs here too and times out with an error. What this cannot check: the compiler's lowering, the memory
ordering the fences give (a partition's stores are whole before its arrive), and inline asm, which runs as the
torch twin registered here for each asm string used. A ``pack=2`` asm
is modelled as pairing consecutive elements of the last axis (true for the layouts the kernels give it).

    run(kernel, grid, *args, module=kernels_module, **constexprs)   # args: tensors (pointers) and numbers
"""

from __future__ import annotations

import sys
import threading
import types
from typing import Any, Callable

import torch

U32 = "u32"
I32 = "i32"
F16 = "f16"
F32 = "f32"
BOOL = "i1"
_INT = {U32, I32, BOOL}


class Dtype:
    def __init__(self, name: str):
        self.name = name


class T:
    """A Gluon tensor: a torch tensor (int64 for every integer type, float32 / float16 for floats) and its type."""

    def __init__(self, data: torch.Tensor, dtype: str):
        if dtype == U32:
            data = data & 0xFFFFFFFF
        elif dtype == I32:
            data = ((data + 2**31) & 0xFFFFFFFF) - 2**31
        elif dtype == F16:
            data = data.to(torch.float16)
        elif dtype == F32:
            data = data.to(torch.float32)
        self.data, self.dtype = data, dtype

    shape = property(lambda self: list(self.data.shape))

    def _bin(self, other, fn, rev=False, result=None):
        o = other.data if isinstance(other, T) else other
        odt = other.dtype if isinstance(other, T) else None
        dt = result or _promote(self.dtype, odt)
        a, b = (o, self.data) if rev else (self.data, o)
        if dt in _INT or dt == BOOL:
            return T(fn(a, b), dt)
        return T(fn(a.float() if isinstance(a, torch.Tensor) else a, b.float() if isinstance(b, torch.Tensor) else b), dt)

    __add__ = lambda s, o: s._bin(o, lambda a, b: a + b)
    __radd__ = lambda s, o: s._bin(o, lambda a, b: a + b, True)
    __sub__ = lambda s, o: s._bin(o, lambda a, b: a - b)
    __rsub__ = lambda s, o: s._bin(o, lambda a, b: a - b, True)
    __mul__ = lambda s, o: s._bin(o, lambda a, b: a * b)
    __rmul__ = lambda s, o: s._bin(o, lambda a, b: a * b, True)
    __floordiv__ = lambda s, o: s._bin(o, lambda a, b: torch.div(a, b, rounding_mode="trunc"))
    __mod__ = lambda s, o: s._bin(o, lambda a, b: torch.fmod(a, b) if isinstance(a, torch.Tensor) else a % b)
    __rshift__ = lambda s, o: s._bin(o, lambda a, b: a >> b)
    __lshift__ = lambda s, o: s._bin(o, lambda a, b: a << b)
    __rlshift__ = lambda s, o: s._bin(o, lambda a, b: a << b, True)
    __and__ = lambda s, o: s._bin(o, lambda a, b: a & b)
    __or__ = lambda s, o: s._bin(o, lambda a, b: a | b)
    __xor__ = lambda s, o: s._bin(o, lambda a, b: a ^ b)
    __gt__ = lambda s, o: s._bin(o, lambda a, b: a > b, result=BOOL)
    __lt__ = lambda s, o: s._bin(o, lambda a, b: a < b, result=BOOL)
    __ge__ = lambda s, o: s._bin(o, lambda a, b: a >= b, result=BOOL)
    __le__ = lambda s, o: s._bin(o, lambda a, b: a <= b, result=BOOL)
    __eq__ = lambda s, o: s._bin(o, lambda a, b: a == b, result=BOOL)
    __ne__ = lambda s, o: s._bin(o, lambda a, b: a != b, result=BOOL)

    def __truediv__(self, o):
        return self._bin(o, lambda a, b: a / b, result=F32)

    def __neg__(self):
        return T(-self.data, self.dtype)

    def __index__(self) -> int:  # a 0-d integer as a loop bound or an index
        return int(self.data)

    __int__ = __index__

    def __bool__(self) -> bool:  # a 0-d condition of an ``if``
        return bool(self.data)

    def to(self, dtype: Dtype, bitcast: bool = False) -> T:
        name = dtype.name
        if bitcast and self.dtype == F32 and name in (I32, U32):
            return T(self.data.float().view(torch.int32).long(), name)
        if bitcast and self.dtype in (I32, U32) and name == F32:
            return T((((self.data + 2**31) & 0xFFFFFFFF) - 2**31).to(torch.int32).view(torch.float32), F32)
        if name in _INT:
            return T(self.data.long(), name)  # bitcasts between 32-bit ints are the wrap T applies
        if bitcast:
            raise NotImplementedError(f"bitcast {self.dtype} -> {name}")
        return T(self.data.float(), name)


def _promote(a: str, b: str | None) -> str:
    if b is None:
        return a
    if F32 in (a, b):
        return F32
    if F16 in (a, b):
        return F16
    if U32 in (a, b):
        return U32
    return a if a != BOOL else b


class Ptr:
    """A pointer into a flat view of a torch tensor."""

    def __init__(self, base: torch.Tensor, offset: Any = 0):
        self.base, self.offset = base.reshape(-1), offset

    def __add__(self, x):
        return Ptr(self.base, self.offset + x)


def _value_dtype(t: torch.Tensor) -> str:
    if t.dtype in (torch.float16,):
        return F16
    if t.dtype in (torch.float32, torch.bfloat16, torch.float64):
        return F32
    return I32


def _load(ptr: Ptr, mask=None, other=0) -> T:
    off = ptr.offset.data if isinstance(ptr.offset, T) else torch.tensor(ptr.offset)
    ok = torch.ones_like(off, dtype=torch.bool) if mask is None else (mask.data if isinstance(mask, T) else torch.tensor(mask)).expand_as(off).bool()
    safe = torch.where(ok, off, torch.zeros_like(off)).long()
    vals = ptr.base[safe]
    vals = vals.float() if vals.dtype.is_floating_point else vals.long()
    vals = torch.where(ok, vals, torch.full_like(vals, other))
    return T(vals, _value_dtype(ptr.base))


def _store(ptr: Ptr, value: T, mask=None) -> None:
    off = ptr.offset.data if isinstance(ptr.offset, T) else torch.tensor(ptr.offset)
    v = value.data.expand_as(off) if isinstance(value, T) else torch.full_like(off, value)
    ok = torch.ones_like(off, dtype=torch.bool) if mask is None else mask.data.expand_as(off).bool()
    ptr.base[off[ok].long()] = v[ok].to(ptr.base.dtype)


# --- inline asm: a torch twin per asm string -------------------------------------------------------------------


def _f16_bits(x: torch.Tensor) -> torch.Tensor:
    return (x & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16).float()


def _asm_funnel_wrap(lo, hi, sh):
    return ((hi << 32) | lo) >> (sh & 31)


def _asm_funnel_clamp(lo, hi, sh):
    return ((hi << 32) | lo) >> torch.clamp(sh, max=32)


def _asm_lane_join(win, sh):
    return (win & 0xFFFF) | (((win >> sh) & 0xFFFF) << 16)


def _asm_lanes_1024_packed(win, o, m2, mu2):
    r = ((win >> o) & m2) | 0x64006400
    lo = _f16_bits(r).half() + _f16_bits(mu2).half()
    hi = _f16_bits(r >> 16).half() + _f16_bits(mu2 >> 16).half()
    lane = torch.arange(win.shape[-1]) % 2  # pack=2: the pair is two consecutive elements of the last axis
    return torch.where(lane == 0, lo, hi)


# Every L2 prefetch the eager run issued: (tensor, first byte, bytes), for the tests to compare with what the
# kernel then reads. The twin checks what the hardware requires (16-byte alignment and size, inside the tensor).
PREFETCHES: list[tuple[torch.Tensor, int, int]] = []


def _asm_prefetch_l2(ptr: Ptr, on: T, nbytes: T) -> torch.Tensor:
    es = ptr.base.element_size()
    off = ptr.offset.data if isinstance(ptr.offset, T) else torch.tensor(ptr.offset)
    off, on_, n = torch.broadcast_tensors(off, on.data.bool(), nbytes.data if isinstance(nbytes, T) else torch.tensor(nbytes))
    for o, size in zip(off[on_].tolist(), n[on_].tolist()):
        first = o * es
        if first % 16 or size % 16 or size <= 0 or first < 0 or first + size > ptr.base.numel() * es:
            raise AssertionError(f"L2 prefetch of {size} bytes at byte {first} of a {ptr.base.numel() * es}-byte "
                                 "tensor: not 16-byte aligned, or outside it")  # fmt: skip
        PREFETCHES.append((ptr.base, first, size))
    return torch.zeros_like(off)


ASM: dict[str, Callable] = {
    "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }":
        _asm_prefetch_l2,
    "shf.r.wrap.b32 $0, $1, $2, $3;": _asm_funnel_wrap,
    "shf.r.clamp.b32 $0, $1, $2, $3;": _asm_funnel_clamp,
    "{ .reg .b32 t; shr.b32 t, $1, $2; prmt.b32 $0, $1, t, 0x5410; }": _asm_lane_join,
    "{ .reg .b32 r; shr.b32 r, $1, $3; lop3.b32 r, r, $5, 0x64006400, 0xea; add.rn.f16x2 $0, r, $7; }":
        _asm_lanes_1024_packed,
}  # fmt: skip


def _inline_asm(asm, constraints, args, dtype, is_pure, pack):
    fn = ASM[getattr(asm, "value", asm)]  # a KeyError names an asm string without a twin (a constexpr: its string)
    if any(isinstance(a, Ptr) for a in args):  # pointer operands: the twin reads them itself
        return T(fn(*args), dtype.name)
    data = torch.broadcast_tensors(*[a.data if isinstance(a, T) else torch.tensor(a) for a in args])
    return T(fn(*data), dtype.name)


# --- shared memory, barriers, wgmma ------------------------------------------------------------------------------

# How long a partition waits on an mbarrier before the run is declared hung (on the GPU: a hang).
WAIT_S = 60.0


class Smem:
    """A shared buffer; a ring of stages (``[STAGES, ...]``) is indexed per stage. The partitions that write and
    read it run as threads ordered by the mbarriers, as on the GPU."""

    def __init__(self, shape, value: T | None = None):
        self.shape = list(shape)
        self.value = value.data.float() if value is not None else None
        self.stages: dict[int, torch.Tensor] = {}

    def index(self, s):
        return _Stage(self, int(s))

    def store(self, x: T) -> None:
        self.value = x.data.float()

    def permute(self, dims):
        return _View(lambda: self.value.permute(*dims))

    def load(self, layout=None) -> T:
        return T(self.value.clone(), F32)

    def tensor(self) -> torch.Tensor:
        return self.value


class _Stage:
    def __init__(self, buf: Smem, s: int):
        self.buf, self.s = buf, s

    def store(self, x: T) -> None:
        self.buf.stages[self.s] = x.data.float()

    def tensor(self) -> torch.Tensor:
        # A stage nothing was stored in (a product the kernel discards): unwritten memory, here zeros.
        return self.buf.stages.get(self.s, torch.zeros(self.buf.shape[1:]))

    def permute(self, dims):
        return _View(lambda: self.tensor().permute(*dims))


class _View:
    def __init__(self, get):
        self.tensor = get


class _Bar:
    """One mbarrier: ``count`` arrivals complete a phase; ``wait(parity)`` returns once the phase of that parity
    has completed, i.e. while the current (incomplete) phase's parity differs (a fresh barrier: ``wait(1)``
    returns at once, ``wait(0)`` after the first phase)."""

    def __init__(self, run: dict):
        self.run, self.count, self.arrived, self.done = run, 1, 0, 0

    def arrive(self, count: int) -> None:
        with self.run["cv"]:
            self.arrived += count
            if self.arrived >= self.count:
                self.arrived, self.done = 0, self.done + 1
                self.run["cv"].notify_all()

    def wait(self, phase: int) -> None:
        phase = int(phase)
        with self.run["cv"]:
            if not self.run["cv"].wait_for(lambda: (self.done & 1) != phase or self.run["failed"], timeout=WAIT_S):
                raise RuntimeError(f"mbarrier wait for phase {phase} timed out after {WAIT_S} s ({self.done} phases "
                                   f"completed, {self.arrived}/{self.count} arrivals): on the GPU, a hang")  # fmt: skip
            if self.run["failed"]:
                raise RuntimeError("another partition failed")


class _Barriers:
    def __init__(self, n: int, run: dict):
        self.bars = [_Bar(run) for _ in range(n)]

    def index(self, s):
        return self.bars[int(s)]


class _MBarrier:
    @staticmethod
    def MBarrierLayout():
        return None

    expect = invalidate = staticmethod(lambda *a, **k: None)

    @staticmethod
    def init(bar: _Bar, count: int) -> None:
        bar.count = int(count)

    @staticmethod
    def arrive(bar: _Bar, count: int = 1, **_) -> None:
        bar.arrive(int(count))

    @staticmethod
    def wait(bar: _Bar, phase, *_, **__) -> None:
        bar.wait(phase)


def _mma(a, b, acc, use_acc=True, is_async=False, **_):
    a, b = a.tensor(), b.tensor()
    out = a.half().float() @ b.half().float()
    return T(out + acc.data if use_acc else out, F32)


def _mma_v2(a: T, b: T, acc: T, **_) -> T:
    """``mma.sync`` (``ampere.mma_v2``): both operands in registers, fp16 products summed in fp32."""
    return T(a.data.half().float() @ b.data.half().float() + acc.data, F32)


# --- the gl namespace --------------------------------------------------------------------------------------------


class _Layout:
    def __init__(self, *a, **k):
        pass

    @staticmethod
    def get_default_for(*a, **k):
        return None


def _where(c, a, b) -> T:
    cond = c.data.bool() if isinstance(c, T) else torch.tensor(bool(c))
    if all(isinstance(x, int) or (isinstance(x, T) and x.dtype in _INT) for x in (a, b)):  # integer selects stay ints
        return T(torch.where(cond, *(x.data if isinstance(x, T) else torch.tensor(x) for x in (a, b))), I32)
    return T(torch.where(cond, *(x.data.float() if isinstance(x, T) else torch.tensor(float(x)) for x in (a, b))), F32)


def _extreme(fn):
    def pick(a, b) -> T:
        if all(isinstance(x, int) or (isinstance(x, T) and x.dtype in _INT) for x in (a, b)):  # ints stay ints
            return T(fn(*(torch.as_tensor(x.data if isinstance(x, T) else x) for x in (a, b))), I32)
        return T(fn(*(x.data.float() if isinstance(x, T) else torch.tensor(float(x)) for x in (a, b))), F32)

    return pick


_maximum, _minimum = _extreme(torch.maximum), _extreme(torch.minimum)


def _static_assert(cond, msg: str = "") -> None:
    assert bool(cond), msg or "static_assert"


def _build_gl(state: dict) -> types.SimpleNamespace:
    def arange(lo, hi, layout=None):
        return T(torch.arange(lo, hi), I32)

    def full(shape, value, dtype, layout=None):
        return T(torch.full(list(shape), value, dtype=torch.float64 if dtype.name in (F16, F32) else torch.int64), dtype.name)

    def zeros(shape, dtype, layout=None):
        return full(shape, 0, dtype)

    def allocate_shared_memory(dtype, shape, layout=None, value=None):
        if dtype.name == "i64":  # mbarriers, one per stage
            return _Barriers(shape[0], state)
        return Smem(shape, value)

    def reduce_max(x, axis):
        return T(x.data.amax(axis), x.dtype) if x.dtype in _INT else T(x.data.float().amax(axis), F32)

    def reduce_min(x, axis):
        return T(x.data.amin(axis), x.dtype) if x.dtype in _INT else T(x.data.float().amin(axis), F32)

    def reduce_sum(x, axis):
        return T(x.data.sum(axis), x.dtype)

    def warp_specialize(parts, worker_num_warps, worker_num_regs):
        """Every partition in a thread of its own, ordered by the mbarriers alone; the first error (or a wait that
        times out: a hang on the GPU) stops the others' waits and is raised."""
        errors: list[BaseException] = []

        def part(fn, args):
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 (re-raised below, in the caller's thread)
                with state["cv"]:
                    errors.append(e)
                    state["failed"] = True
                    state["cv"].notify_all()

        threads = [threading.Thread(target=part, args=p, daemon=True) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    ns = dict(
        constexpr=object, float16=Dtype(F16), float32=Dtype(F32), uint32=Dtype(U32), int32=Dtype(I32),
        int64=Dtype("i64"), BlockedLayout=_Layout, SliceLayout=_Layout, NVMMADistributedLayout=_Layout,
        DotOperandLayout=_Layout,
        NVMMASharedLayout=_Layout, SwizzledSharedLayout=_Layout, num_warps=lambda: 4, arange=arange, full=full, zeros=zeros,
        expand_dims=lambda x, axis: T(x.data.unsqueeze(axis), x.dtype), convert_layout=lambda x, layout: x,
        join=lambda a, b: T(torch.stack(torch.broadcast_tensors(a.data, b.data), -1), _promote(a.dtype, b.dtype)),
        reshape=lambda x, shape: T(x.data.reshape(list(shape)), x.dtype),
        split=lambda x: (T(x.data[..., 0], x.dtype), T(x.data[..., 1], x.dtype)),
        permute=lambda x, dims: T(x.data.permute(*dims), x.dtype),
        associative_scan=lambda x, axis, fn: T(x.data.cumsum(axis), x.dtype),  # the kernels' combine is an add
        load=_load, store=_store, inline_asm_elementwise=_inline_asm,
        maximum=_maximum,
        minimum=_minimum,
        max=reduce_max, min=reduce_min, sum=reduce_sum, exp2=lambda x: T(torch.exp2(x.data.float()), F32),
        program_id=lambda axis: state["pid"][axis], num_programs=lambda axis: state["grid"][axis],
        cdiv=lambda a, b: (a + b - 1) // b,
        where=_where,
        static_range=range, thread_barrier=lambda: None, allocate_shared_memory=allocate_shared_memory,
        warp_specialize=warp_specialize, static_assert=_static_assert,
    )  # fmt: skip
    return types.SimpleNamespace(**ns)


def _eager(fn, ns: dict) -> Callable:
    return types.FunctionType(fn.__code__, ns, fn.__name__, fn.__defaults__, fn.__closure__)


def _namespace(module: types.ModuleType) -> dict:
    """The module's globals, under those of the modules its imported ``gluon.jit`` functions come from (whose
    bodies call their own module's helpers)."""
    ns: dict = {}
    for value in list(vars(module).values()):
        if hasattr(value, "fn") and hasattr(value.fn, "__code__") and value.fn.__module__ != module.__name__:
            ns.update(vars(sys.modules[value.fn.__module__]))
    ns.update(vars(module))
    return ns


def run(kernel, grid: tuple[int, int], *args, module: types.ModuleType, **constexprs) -> None:
    """Every program of ``kernel`` (a ``gluon.jit`` function of ``module``) in order, eagerly. Tensor arguments
    are pointers (written in place by stores), numbers stay numbers."""
    for pid0 in range(grid[0]):
        for pid1 in range(grid[1]):
            state: dict = {"pid": (pid0, pid1), "grid": grid, "cv": threading.Condition(), "failed": False}
            ns = _namespace(module)
            ns.update(gl=_build_gl(state), mbarrier=_MBarrier, fence_async_shared=lambda: None, mma_v2=_mma_v2,
                      warpgroup_mma=_mma, warpgroup_mma_wait=lambda num_outstanding=0, deps=(): deps[0] if len(deps) == 1 else tuple(deps))  # fmt: skip
            for name, value in list(ns.items()):
                if hasattr(value, "fn") and hasattr(value.fn, "__code__"):  # gluon.jit functions
                    ns[name] = _eager(value.fn, ns)
            call = [Ptr(a) if isinstance(a, torch.Tensor) else a for a in args]
            names = kernel.fn.__code__.co_varnames[: kernel.fn.__code__.co_argcount]
            kw = {n: constexprs[n] for n in names if n in constexprs}
            ns[kernel.fn.__name__](*call, **kw)
