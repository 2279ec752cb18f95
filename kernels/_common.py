"""Helpers shared by the kernels: launching on CUDA or (interpreted) on the CPU, device facts, dtypes."""
from __future__ import annotations

import functools
import os

import torch

try:  # the interpreter is part of every Triton wheel; guard anyway.
    from triton.runtime.interpreter import InterpretedFunction as _InterpretedFunction
except Exception:  # pragma: no cover
    _InterpretedFunction = None

FP8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
FP8_E4M3_MAX = 448.0
LOG2E = 1.4426950408889634

_interpreted: dict[int, object] = {}


def _fix_interpreter_scalar_index() -> None:
    """Compatibility shim for Triton's CPU interpreter under NumPy >= 2.4.

    The interpreter keeps scalars as 1-element arrays and converts them for `range(start, end, step)`
    with `int(array)`, which NumPy 2.4 rejects for arrays of one dimension ("only 0-dimensional arrays can
    be converted to Python scalars"). We re-register `__index__` so it takes the single element. Only the
    interpreter's temporary patching of `tl.tensor` is touched; compiled (CUDA) kernels are unaffected.
    """
    try:
        from triton.runtime import interpreter as interp
    except Exception:  # pragma: no cover
        return
    orig = getattr(interp, "_patch_lang_tensor", None)
    if orig is None or getattr(orig, "_pagedfleet_index_fix", False):
        return

    def _index(self):
        data = self.handle.data
        return int(data.reshape(-1)[0]) if getattr(data, "size", 1) == 1 else int(data)

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", _index)

    patched._pagedfleet_index_fix = True
    interp._patch_lang_tensor = patched


_fix_interpreter_scalar_index()


def kernel_for(kernel, device: torch.device):
    """The launchable form of `kernel` for tensors on `device`: `kernel_for(k, dev)[grid](*args, **kwargs)`.

    On CUDA this is a `_DirectLauncher` (Triton's JIT dispatch done once per specialization, see there). On
    the CPU it is Triton's interpreter: when Triton was imported with TRITON_INTERPRET=1 the decorator
    already returned an interpreted function; otherwise (Triton was imported before the variable was set) we
    interpret the kernel's Python source here, so CPU tensors work whatever the import order was.
    """
    if device.type != "cpu":
        if _InterpretedFunction is not None and isinstance(kernel, _InterpretedFunction):
            return kernel
        launcher = _direct_launchers.get(id(kernel))
        if launcher is None:
            launcher = _direct_launchers[id(kernel)] = _DirectLauncher(kernel)
        return launcher
    if _InterpretedFunction is None or isinstance(kernel, _InterpretedFunction):
        return kernel
    return _CpuLauncher(_interpreted_form(kernel))


def launch_kernel(kernel, device: torch.device, grid, args: tuple, kwargs: dict, kwargs_key=None):
    """`kernel_for(kernel, device)[grid](*args, **kwargs)`, passing `kwargs_key` on to a direct launcher."""
    launcher = kernel_for(kernel, device)
    if isinstance(launcher, _DirectLauncher):
        return launcher.launch(grid, args, kwargs, kwargs_key)
    return launcher[grid](*args, **kwargs)


_direct_launchers: dict[int, "_DirectLauncher"] = {}
DIRECT_LAUNCH = os.environ.get("PAGEDFLEET_TRITON_DIRECT_LAUNCH", "1") != "0"


class _DirectLauncher:
    """`jit_fn[grid](*args, **kwargs)` on CUDA, with Triton's per-call dispatch done once per specialization.

    `JITFunction.run` re-derives on every call what the compiled kernel was specialised on (each argument's
    dtype, 16-byte alignment, integer divisibility) and looks the kernel up by it: ~55 us per launch on the
    H100 machines' host CPU, more than the whole batch-1 decode kernel on the GPU (20 us). Here the first
    call of a specialization goes through the JIT (compiling if needed) and keeps the compiled kernel under
    a key that fixes everything the JIT's key depends on: tensor dtypes and alignment, the exact value of
    each specialised integer (only the 32/64-bit range of `do_not_specialize` ones), and the keyword
    arguments (constexprs and launch options). Later calls launch the compiled kernel directly, as PyTorch
    Inductor's generated launchers do. PAGEDFLEET_TRITON_DIRECT_LAUNCH=0 always goes through the JIT.
    """

    def __init__(self, jit_fn) -> None:
        self.fn = jit_fn
        params = jit_fn.params
        self.names = [p.name for p in params]
        self.defaults = {p.name: p.default for p in params}
        self.dns = [p.do_not_specialize for p in params]
        self.compiled: dict = {}
        self.spec_fns: dict = {}
        self.direct = DIRECT_LAUNCH

    def _make_spec_fn(self, args: tuple):
        """A function of the argument tuple returning what the JIT specialises on, built (like Triton's own
        binder) as one tuple expression, from the kinds of arguments this kernel is called with: a tensor
        gives its dtype and its address modulo 16, an int its value (only its 32/64-bit range when it is
        `do_not_specialize`), a float its class (an int passed there instead changes the key), a Gluon TMA
        descriptor its dtype, block shape, layout and padding; where None was passed, anything but None sends
        that call through the JIT."""
        parts = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                parts += [f"a[{i}].dtype", f"a[{i}].data_ptr() & 15"]
            elif isinstance(a, float):
                parts.append(f"a[{i}].__class__")
            elif isinstance(a, int) and not isinstance(a, bool):
                parts.append(f"-2147483648 <= a[{i}] < 2147483648" if self.dns[i] else f"a[{i}]")
            elif _is_gluon_tensor_descriptor(a):  # the launcher builds the TMA map from it at every launch
                parts.append(f"(a[{i}].base.dtype, tuple(a[{i}].block_shape), a[{i}].layout, a[{i}].padding)")
            elif a is None:  # an optional argument left out; anything else there goes through the JIT
                parts.append(f"a[{i}] is None or _other()")
            else:
                return None
        namespace: dict = {"_other": _other_argument}
        exec("def spec(a):\n    return (" + ", ".join(parts) + ",)\n", namespace)  # noqa: S102
        return namespace["spec"]

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args: tuple, kwargs: dict, kwargs_key=None):
        """`kernel[grid](*args, **kwargs)`; `kwargs_key` (hashable) stands for `kwargs` in the cache key
        when the caller already has one (saves hashing a dozen constexprs per call)."""
        if not self.direct:
            return self.fn[grid](*args, **kwargs)
        spec_fn = self.spec_fns.get(len(args))
        if spec_fn is None:
            spec_fn = self.spec_fns[len(args)] = self._make_spec_fn(args)
            if spec_fn is None:  # an argument of a kind we don't key: the JIT decides every time
                self.direct = False
                return self.fn[grid](*args, **kwargs)
        try:
            spec = spec_fn(args)
        except AttributeError:  # a tensor's place took something else: let the JIT sort it out
            return self.fn[grid](*args, **kwargs)
        active = _triton_driver().active
        device = active.get_current_device()  # compiled kernels are loaded per device
        key = (device, spec, tuple(kwargs.items()) if kwargs_key is None else kwargs_key)
        kernel = self.compiled.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)
            if hasattr(kernel, "result"):
                kernel = kernel.result()
            kernel._init_handles()
            self.compiled[key] = kernel
            return kernel
        full = (*args, *(kwargs.get(n, self.defaults[n]) for n in self.names[len(args):]))
        stream = active.get_current_stream(device)
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        try:
            kernel.run(g0, g1, g2, stream, kernel.function, kernel.packed_metadata,
                       kernel.launch_metadata(grid, stream, *full), _knobs().runtime.launch_enter_hook,
                       _knobs().runtime.launch_exit_hook, *full)
        except TypeError:  # a Triton whose launcher takes other arguments: use the JIT from now on
            self.direct = False
            return self.fn[grid](*args, **kwargs)
        return kernel


def _is_gluon_tensor_descriptor(a) -> bool:
    return type(a).__name__ == "TensorDescriptor" and type(a).__module__.startswith("triton.experimental.gluon")


def _other_argument():
    raise AttributeError("an argument of a kind the direct launcher does not key")


@functools.lru_cache(maxsize=None)
def _triton_driver():
    from triton.runtime import driver

    return driver


@functools.lru_cache(maxsize=None)
def _knobs():
    from triton import knobs

    return knobs


def _interpreted_form(jit_fn):
    fn = _interpreted.get(id(jit_fn))
    if fn is None:
        fn = _InterpretedFunction(jit_fn.fn)
        _interpreted[id(jit_fn)] = fn
    return fn


class _CpuLauncher:
    """`kernel[grid](...)` through the interpreter for a kernel compiled in JIT mode. Triton's own jitted
    helpers (tl.cdiv, tl.sum, ...) are then JIT functions too; while the kernel runs their calls are routed
    to interpreted copies."""

    def __init__(self, interp_fn):
        self.fn = interp_fn

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from triton.runtime.jit import JITFunction

            orig = JITFunction.__call__

            def call(jit_self, *a, **kw):
                return _interpreted_form(jit_self)(*a, **kw)

            JITFunction.__call__ = call
            try:
                return self.fn[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = orig

        return launch


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a host-side property: no sync); 8 on the CPU."""
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    return _num_sms(idx)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def as_float(x) -> float:
    """Scales are per-layer Python floats; a 0-dim CPU tensor is accepted too (no device sync)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise TypeError("k_scale / v_scale must be Python floats (reading a CUDA tensor would sync)")
        return float(x.item())
    return float(x)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int, int]:
    if k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"caches must be [num_blocks, block_size, num_kv_heads, head_dim], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache and v_cache dtypes differ: {k_cache.dtype} vs {v_cache.dtype}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous along head_dim")
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    return block_size, num_kv_heads, head_dim


def kv_scales(cache_dtype: torch.dtype, k_scale, v_scale) -> tuple[float, float]:
    """The dequantisation scales a kernel applies: the given ones for FP8 caches, 1.0 otherwise."""
    if is_fp8(cache_dtype):
        return as_float(k_scale), as_float(v_scale)
    return 1.0, 1.0


def cache_strides(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, ...]:
    """Block, slot and head strides of both caches, in the order every kernel here takes them."""
    return (*k_cache.stride()[:3], *v_cache.stride()[:3])


def prepare_attention_call(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, out: torch.Tensor | None, q_name: str):
    """Checks and normalises what both attention launchers take.

    Returns (q, block_tables, out, block_size, num_kv_heads, head_dim): q contiguous along head_dim,
    block tables int32 with unit last stride, `out` allocated like q if not given.
    """
    block_size, num_kv_heads, head_dim = check_cache(k_cache, v_cache)
    if q.dim() != 3 or q.shape[-1] != head_dim:
        raise ValueError(f"q must be [{q_name}, num_q_heads, {head_dim}], got {tuple(q.shape)}")
    if q.shape[1] % num_kv_heads:
        raise ValueError(f"num_q_heads ({q.shape[1]}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if block_tables.dtype != torch.int32:
        block_tables = block_tables.to(torch.int32)
    if block_tables.stride(-1) != 1:
        block_tables = block_tables.contiguous()
    if q.stride(-1) != 1:
        q = q.contiguous()
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.stride(-1) != 1:
        raise ValueError("out must have q's shape and be contiguous along head_dim")
    return q, block_tables, out, block_size, num_kv_heads, head_dim


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact (IEEE) fp32 products; 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def compute_mode(q_dtype: torch.dtype, cache_dtype: torch.dtype, device: torch.device) -> str:
    """Operand dtype of the attention kernels' matrix products: "fp32" for fp32 inputs and under the CPU
    interpreter (its dot can't take 16-bit floats), "fp16" for FP8 caches (e4m3 -> fp16 is one packed
    conversion per two values; e4m3 -> bf16 goes through fp32), else q's own dtype ("q")."""
    if q_dtype == torch.float32 or device.type == "cpu":
        return "fp32"
    if is_fp8(cache_dtype):
        return "fp16"
    return "q"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gather_context_ref(cache: torch.Tensor, block_table: torch.Tensor, n: int, scale: float,
                       dtype: torch.dtype) -> torch.Tensor:
    """Torch references: the first ``n`` tokens of one sequence's cache ([n, kv_heads, head_dim]), gathered
    through its block-table row and dequantised (times ``scale`` for FP8 caches) in ``dtype``."""
    blocks = block_table[: cdiv(n, cache.shape[1])].long()
    x = cache[blocks].flatten(0, 1)[:n].to(dtype)
    return x * scale if is_fp8(cache.dtype) else x
