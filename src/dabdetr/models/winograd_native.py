"""The Winograd transforms of models/winograd.py as compiled C kernels, for the CPU training step.

Each transform is a small two-sided matrix product, L t L^T, on every tile of a tensor. In torch
it costs a gather, one dense [p, q] x [q, tiles * C] product with mostly zero or +-1 entries, and
a copy back: several passes over memory. Here one loop per tile does the gathering (with the
zero padding), the product in its separable form (rows, then columns, zeros skipped) on 16
channels at a time in registers, and the scatter. In the R50 training step the Winograd
convolutions' forward and backward took 35 instead of 64 ms for layer2's shape, 31 instead of
52 for layer3's and 46 instead of 61 for layer4's (2-core AMD EPYC; benchmarks/RESULTS.md,
session 22). The GEMMs between the transforms stay torch's (MKL).

The C source is generated from the same matrices (winograd._B_T, _G, _A_T), compiled once per
machine with the system C compiler (`$CC`, else `cc`, `gcc` or `clang`; `-O3 -march=native
-fopenmp`) into `$XDG_CACHE_HOME/dabdetr/kernels` (default `~/.cache/dabdetr/kernels`), named by
a hash of the source, the compiler and the CPU's flags, and loaded with ctypes. The kernels
split their work over torch's intra-op threads with OpenMP: with torch's Linux wheels the
library links the libgomp torch ships, so both share one thread pool (where a second OpenMP
runtime gets loaded instead, the kernels run single-threaded, with a warning). After loading,
a small convolution through every kernel (forward and both gradients) is checked against torch's
direct one; if that, the compiler or the load fails, a warning says so once and the torch path
runs instead (the same results to float32 rounding, ~1.2x-1.8x slower for these convolutions).
`DABDETR_NATIVE_KERNELS=0` turns the kernels off.

Only float32 CPU tensors with channel counts divisible by 16 take this path (every R50 shape).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

LANES = 16  # channels per inner loop: two AVX2 (or one AVX-512) float32 vectors
STAGE = 2048  # floats per tile point staged in one block (keeps the 16-36 streams sequential)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "DABDETR_NATIVE_KERNELS"


def tiles_shape(shape: Sequence[int], m: int) -> tuple[int, int, int]:
    """(tile rows, tile columns, tiles) covering a tensor of shape (N, C, H, W) with m x m
    output blocks."""
    n, _, h, w = shape
    th, tw = -(-h // m), -(-w // m)
    return th, tw, n * th * tw


# ---------------------------------------------------------------------------------------------
# C source generation
# ---------------------------------------------------------------------------------------------


def _sum(coefs: list[float], terms: list[str]) -> str:
    """A C expression for sum(coef * term), zeros skipped and +-1 as additions."""
    parts = []
    for coef, term in zip(coefs, terms, strict=True):
        coef = float(coef)
        if coef == 0:
            continue
        if abs(coef) == 1:
            parts.append(("+" if coef > 0 else "-") + term)
        else:
            parts.append(("+" if coef > 0 else "-") + f"{abs(coef)!r}f*{term}")
    text = "".join(parts) or "0.0f"
    return text[1:] if text[0] == "+" else text


def _two_sided(mat: list[list[float]]) -> str:
    """C statements for o = L d L^T on every lane: d [s][s][LANES] -> o [r][r][LANES], through
    u [r][s][LANES] (rows first, then columns)."""
    r, s = len(mat), len(mat[0])
    lines = [f"for (int b = 0; b < {s}; b++) for (int k = 0; k < {LANES}; k++) {{"]
    lines += [f"  u[{a}][b][k] = {_sum(mat[a], [f'd[{q}][b][k]' for q in range(s)])};"
              for a in range(r)]
    lines += ["}", f"for (int a = 0; a < {r}; a++) for (int k = 0; k < {LANES}; k++) {{"]
    lines += [f"  o[a][{b}][k] = {_sum(mat[b], [f'u[a][{q}][k]' for q in range(s)])};"
              for b in range(r)]
    lines.append("}")
    return "\n    ".join(lines)


def _locals(mat: list[list[float]]) -> str:
    r, s = len(mat), len(mat[0])
    return f"float d[{s}][{s}][{LANES}], u[{r}][{s}][{LANES}], o[{r}][{r}][{LANES}];"


def _tiles_to_points(name: str, mat, m: int, offset: int, scaled: bool) -> str:
    """x [N, H, W, C] -> out [r*r, tiles, C]: the s x s window at (i*m + offset, j*m + offset)
    of tile (n, i, j), zero outside the image, times sc[c] if scaled, transformed by L (r x s).
    Points are staged per block of tiles and copied out as one run per point."""
    r, s = len(mat), len(mat[0])
    load = "sc[c0 + k] * q[k]" if scaled else "q[k]"
    return f"""
static int {name}(const long *A, void **P, long t0, long t1) {{
  long N = A[0], H = A[1], W = A[2], C = A[3], th = A[4], tw = A[5], tiles = N * th * tw;
  const float *restrict x = P[0]; float *restrict out = P[1]; const float *restrict sc = P[2];
  long BT = {STAGE} / C > 0 ? {STAGE} / C : 1, tb = t0;
  float *stage = malloc(sizeof(float) * {r * r} * BT * C);
  if (!stage) return 1;
  {_locals(mat)}
  for (long t = t0; t < t1; t++) {{
    long n = t / (th * tw), i = t / tw % th, j = t % tw;
    for (long c0 = 0; c0 < C; c0 += {LANES}) {{
    for (int a = 0; a < {s}; a++) for (int b = 0; b < {s}; b++) {{
      long y = i * {m} + ({offset}) + a, z = j * {m} + ({offset}) + b;
      if (y >= 0 && y < H && z >= 0 && z < W) {{
        const float *q = x + ((n * H + y) * W + z) * C + c0;
        for (int k = 0; k < {LANES}; k++) d[a][b][k] = {load};
      }} else for (int k = 0; k < {LANES}; k++) d[a][b][k] = 0.0f;
    }}
    {_two_sided(mat)}
    for (int p = 0; p < {r * r}; p++) {{
      float *restrict q = stage + (p * BT + t - tb) * C + c0;
      for (int k = 0; k < {LANES}; k++) q[k] = o[p / {r}][p % {r}][k];
    }}
    }}
    if (t + 1 == t1 || t + 1 - tb == BT) {{
      for (int p = 0; p < {r * r}; p++)
        memcpy(out + (p * tiles + tb) * C, stage + p * BT * C, sizeof(float) * (t + 1 - tb) * C);
      tb = t + 1;
    }}
  }}
  free(stage);
  return 0;
}}"""


def _points_to_tiles(name: str, mat, m: int, offset: int, affine: bool) -> str:
    """in [s*s, tiles, C] -> y [N, H, W, C]: tile (n, i, j)'s points transformed by L (r x s)
    land on the r x r window at (i*m + offset, j*m + offset), clipped to the image; stored as
    sh[c] + sc[c] * value if affine, else added (overlapping windows; see _rows)."""
    r, s = len(mat), len(mat[0])
    store = ("q[k] = sh[c0 + k] + sc[c0 + k] * o[a][b][k];" if affine else "q[k] += o[a][b][k];")
    return f"""
static int {name}(const long *A, void **P, long t0, long t1) {{
  long N = A[0], H = A[1], W = A[2], C = A[3], th = A[4], tw = A[5], tiles = N * th * tw;
  const float *restrict in = P[0]; float *restrict y = P[1];
  const float *restrict sc = P[2], *restrict sh = P[3];
  long BT = {STAGE} / C > 0 ? {STAGE} / C : 1;
  float *stage = malloc(sizeof(float) * {s * s} * BT * C);
  if (!stage) return 1;
  {_locals(mat)}
  for (long tb = t0; tb < t1; tb += BT) {{
    long nb = t1 - tb < BT ? t1 - tb : BT;
    for (int p = 0; p < {s * s}; p++)
      memcpy(stage + p * BT * C, in + (p * tiles + tb) * C, sizeof(float) * nb * C);
    for (long t = tb; t < tb + nb; t++) {{
      long n = t / (th * tw), i = t / tw % th, j = t % tw;
      for (long c0 = 0; c0 < C; c0 += {LANES}) {{
      for (int p = 0; p < {s * s}; p++) {{
        const float *q = stage + (p * BT + t - tb) * C + c0;
        for (int k = 0; k < {LANES}; k++) d[p / {s}][p % {s}][k] = q[k];
      }}
      {_two_sided(mat)}
      for (int a = 0; a < {r}; a++) for (int b = 0; b < {r}; b++) {{
        long yy = i * {m} + ({offset}) + a, zz = j * {m} + ({offset}) + b;
        if (yy < 0 || yy >= H || zz < 0 || zz >= W) continue;
        float *restrict q = y + ((n * H + yy) * W + zz) * C + c0;
        for (int k = 0; k < {LANES}; k++) {store}
      }}
      }}
    }}
  }}
  free(stage);
  return 0;
}}"""


def _rows(name: str, inner: str) -> str:
    """Runs `inner` over whole rows of tiles of one parity: the windows of two tiles overlap
    only within a row or between adjacent rows, so the threads of one parity never add into
    the same pixels. A[6] is the parity; units are rows (n, i) with i of that parity."""
    return f"""
static int {name}(const long *A, void **P, long u0, long u1) {{
  long th = A[4], tw = A[5], parity = A[6], per_image = (th - parity + 1) / 2;
  for (long u = u0; u < u1; u++) {{
    long row = u / per_image * th + parity + 2 * (u % per_image);
    if ({inner}(A, P, row * tw, (row + 1) * tw)) return 1;
  }}
  return 0;
}}"""


def _kernel_pass(name: str, mat, to_points: bool) -> str:
    """Every 3x3 kernel (or kernel point set) transformed by L (r x s), LANES kernels at a time:
    to_points: w [KC, s*s] -> out [r*r, KC], the r*r output rows staged per block of kernels;
    else: g [s*s, KC] -> w [KC, r*r], the s*s input rows staged per block."""
    r, s = len(mat), len(mat[0])
    points = r * r if to_points else s * s  # the [points, KC] side, staged
    if to_points:
        stage_in, stage_out = "", (
            f"for (int p = 0; p < {points}; p++)\n"
            f"      memcpy(out + p * KC + kb, stage + p * {STAGE}, sizeof(float) * (ke - kb));")
        load = (f"for (int q = 0; q < {s * s}; q++) for (int k = 0; k < {LANES}; k++)\n"
                f"      d[q / {s}][q % {s}][k] = in[(k0 + k) * {s * s} + q];")
        store = (f"for (int p = 0; p < {r * r}; p++) for (int k = 0; k < {LANES}; k++)\n"
                 f"      stage[p * {STAGE} + k0 - kb + k] = o[p / {r}][p % {r}][k];")
    else:
        stage_in, stage_out = (
            f"for (int p = 0; p < {points}; p++)\n"
            f"      memcpy(stage + p * {STAGE}, in + p * KC + kb, sizeof(float) * (ke - kb));"), ""
        load = (f"for (int p = 0; p < {s * s}; p++) for (int k = 0; k < {LANES}; k++)\n"
                f"      d[p / {s}][p % {s}][k] = stage[p * {STAGE} + k0 - kb + k];")
        store = (f"for (int k = 0; k < {LANES}; k++) for (int q = 0; q < {r * r}; q++)\n"
                 f"      out[(k0 + k) * {r * r} + q] = o[q / {r}][q % {r}][k];")
    return f"""
static int {name}(const long *A, void **P, long u0, long u1) {{
  long KC = A[0]; const float *restrict in = P[0]; float *restrict out = P[1];
  float *stage = malloc(sizeof(float) * {points} * {STAGE});
  if (!stage) return 1;
  {_locals(mat)}
  for (long kb = u0 * {LANES}; kb < u1 * {LANES}; kb += {STAGE}) {{
    long ke = kb + {STAGE} < u1 * {LANES} ? kb + {STAGE} : u1 * {LANES};
    {stage_in}
    for (long k0 = kb; k0 < ke; k0 += {LANES}) {{
    {load}
    {_two_sided(mat)}
    {store}
    }}
    {stage_out}
  }}
  free(stage);
  return 0;
}}"""


_PRELUDE = """\
#include <omp.h>
#include <stdlib.h>
#include <string.h>

typedef int (*work_fn)(const long *, void **, long, long);

/* units [0, units) split evenly over nt OpenMP threads; nonzero if any part failed */
static int parallel(work_fn f, const long *A, void **P, long units, int nt) {
  int failed = 0;
  if (units <= 0) return 0;
  if (nt > units) nt = (int)units;
  if (nt <= 1) return f(A, P, 0, units);
  #pragma omp parallel num_threads(nt) reduction(|:failed)
  {
    long i = omp_get_thread_num(), n = omp_get_num_threads();
    long b = units * i / n, e = units * (i + 1) / n;
    if (e > b) failed |= f(A, P, b, e);
  }
  return failed;
}
"""


def _transpose(mat) -> list[list[float]]:
    return [list(col) for col in zip(*mat, strict=True)]


def source() -> str:
    """The C source of every kernel, for F(2x2) and F(4x4). Entry points (all `int f(const long
    *A, void **P, long units, int threads)`, 0 on success):
      in_tr{m}   x [N,H,W,C] -> [t^2, tiles, C]       B^T d B
      out_tr{m}  [t^2, tiles, K] -> y [N,H,W,K]        shift + scale * A^T P A
      out_adj{m} g [N,H,W,K] -> [t^2, tiles, K]        A (scale * g) A^T
      in_adj{m}  [t^2, tiles, C] -> gx [N,H,W,C]      overlap-add of B G B^T (gx zeroed first)
      k_tr{m}    w [KC, 9] -> [t^2, KC]                 G g G^T
      k_adj{m}   [t^2, KC] -> gw [KC, 9]                G^T V G
    with A = {N, H, W, C, tile rows, tile columns} for the tile kernels, {K*C} for the kernel
    ones (units: tiles, or groups of LANES kernels)."""
    from .winograd import _A_T, _B_T, _G

    parts = [_PRELUDE]
    for m in (2, 4):
        b_t, g, a_t = _B_T[m], _G[m], _A_T[m]
        parts += [
            _tiles_to_points(f"in_tr{m}_part", b_t, m, -1, scaled=False),
            _tiles_to_points(f"out_adj{m}_part", _transpose(a_t), m, 0, scaled=True),
            _points_to_tiles(f"out_tr{m}_part", a_t, m, 0, affine=True),
            _points_to_tiles(f"in_adj{m}_tiles", _transpose(b_t), m, -1, affine=False),
            _rows(f"in_adj{m}_part", f"in_adj{m}_tiles"),
            _kernel_pass(f"k_tr{m}_part", g, to_points=True),
            _kernel_pass(f"k_adj{m}_part", _transpose(g), to_points=False),
        ]
        for entry in ("in_tr", "out_adj", "out_tr", "k_tr", "k_adj"):
            parts.append(f"int {entry}{m}(const long *A, void **P, long units, int nt) "
                         f"{{ return parallel({entry}{m}_part, A, P, units, nt); }}")
        parts.append(f"""
int in_adj{m}(const long *A, void **P, long units, int nt) {{
  long B[7];
  memcpy(B, A, 6 * sizeof(long));
  for (int parity = 0; parity < 2; parity++) {{
    B[6] = parity;
    if (parallel(in_adj{m}_part, B, P, A[0] * ((A[4] - parity + 1) / 2), nt)) return 1;
  }}
  return 0;
}}""")
    return "\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dabdetr" / "kernels"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_flags() -> str:
    """What -march=native compiles for: the CPU's feature flags (a cached library built on
    another CPU must not be loaded here)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _openmp_runtimes() -> set[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; empty elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return set()
    names = ("libgomp", "libiomp", "libomp")
    return {line.split()[-1] for line in maps.splitlines()
            if "/" in line and any(n in line.rsplit("/", 1)[-1] for n in names)}


def build(directory: Path, compiler: str | None = None) -> Path:
    """Compile the kernels into `directory` (created, mode 0700) unless a library for this
    source, compiler and CPU is there already; returns its path. Raises RuntimeError naming the
    command and the compiler's message if compiling fails."""
    compiler = compiler or _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc or clang)")
    src = source()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"cannot run the C compiler {compiler}: {err}") from err
    key = hashlib.sha256("\n".join([src, compiler, version, " ".join(FLAGS), _cpu_flags()])
                         .encode()).hexdigest()[:20]
    library = directory / f"winograd_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    stem = directory / f"winograd_{key}.{os.getpid()}.{threading.get_ident()}"
    c_file, tmp_library = stem.with_suffix(".c"), stem.with_suffix(".so")
    c_file.write_text(src)
    command = [compiler, *FLAGS, str(c_file), "-o", str(tmp_library)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr.strip()[-2000:]}")
        os.replace(tmp_library, library)  # atomic: concurrent processes see all or nothing
    except (OSError, subprocess.SubprocessError) as err:
        raise RuntimeError(f"{' '.join(command)} failed: {err}") from err
    finally:
        c_file.unlink(missing_ok=True)
        tmp_library.unlink(missing_ok=True)
    return library


class Kernels:
    """The loaded library: one method per transform, on torch tensors (see `source`)."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        # With a second OpenMP runtime in the process (a torch built against another one) the
        # kernels' threads would compete with torch's instead of taking turns: run them on one.
        runtimes = _openmp_runtimes()
        self.threaded = len(runtimes) <= 1
        if not self.threaded:
            logger.warning("two OpenMP runtimes loaded (%s): the compiled Winograd kernels run "
                           "single-threaded", ", ".join(sorted(runtimes)))
        for m in (2, 4):
            for entry in ("in_tr", "out_tr", "out_adj", "in_adj", "k_tr", "k_adj"):
                fn = getattr(self._lib, f"{entry}{m}")
                fn.argtypes = [ctypes.POINTER(ctypes.c_long), ctypes.POINTER(ctypes.c_void_p),
                               ctypes.c_long, ctypes.c_int]
                fn.restype = ctypes.c_int

    def _run(self, entry: str, ints: list[int], tensors: list[Tensor | None], units: int) -> None:
        ints_c = (ctypes.c_long * len(ints))(*ints)
        ptrs = (ctypes.c_void_p * 4)(*[t.data_ptr() if t is not None else None
                                         for t in (tensors + [None] * 4)[:4]])
        threads = torch.get_num_threads() if self.threaded else 1
        if getattr(self._lib, entry)(ints_c, ptrs, units, threads):
            raise MemoryError(f"Winograd kernel {entry}: out of memory for its staging buffer")

    @staticmethod
    def _geometry(shape: Sequence[int], m: int) -> tuple[list[int], int]:
        """The tile kernels' integer arguments {N, H, W, C, tile rows, tile columns} for a
        tensor of shape (N, C, H, W), and the number of tiles."""
        n, c, h, w = shape
        th, tw, tiles = tiles_shape(shape, m)
        return [n, h, w, c, th, tw], tiles

    def input_transform(self, x: Tensor, m: int) -> Tensor:
        """x [N, C, H, W] channels_last -> B^T d B of every input tile [t^2, tiles, C]."""
        ints, tiles = self._geometry(x.shape, m)
        out = x.new_empty((m + 2) ** 2, tiles, x.shape[1])
        self._run(f"in_tr{m}", ints, [x, out], tiles)
        return out

    def output_transform(self, products: Tensor, m: int, shape: tuple[int, int, int, int],
                         scale: Tensor, shift: Tensor) -> Tensor:
        """products [t^2, tiles, K] -> shift + scale * A^T P A, [N, K, H, W] channels_last
        (shape = (N, K, H, W))."""
        ints, tiles = self._geometry(shape, m)
        y = torch.empty(shape, dtype=products.dtype, memory_format=torch.channels_last)
        self._run(f"out_tr{m}", ints, [products, y, scale, shift], tiles)
        return y

    def output_adjoint(self, grad: Tensor, m: int, scale: Tensor) -> Tensor:
        """grad [N, K, H, W] channels_last -> A (scale * g) A^T of every output block
        [t^2, tiles, K]."""
        ints, tiles = self._geometry(grad.shape, m)
        out = grad.new_empty((m + 2) ** 2, tiles, grad.shape[1])
        self._run(f"out_adj{m}", ints, [grad, out, scale], tiles)
        return out

    def input_adjoint(self, grad_tiles: Tensor, m: int, shape: tuple[int, int, int, int]) -> Tensor:
        """grad_tiles [t^2, tiles, C] -> the input gradient [N, C, H, W] channels_last: B G B^T
        of every tile, added over the overlapping tiles (shape = (N, C, H, W))."""
        n, c, h, w = shape
        ints, _ = self._geometry(shape, m)
        grad_x = torch.zeros(n, h, w, c, dtype=grad_tiles.dtype).permute(0, 3, 1, 2)
        self._run(f"in_adj{m}", ints, [grad_tiles, grad_x], 0)
        return grad_x

    def kernel_transform(self, weight: Tensor, m: int) -> Tensor:
        """weight [K, C, 3, 3] -> G g G^T of every kernel [t^2, K, C]."""
        k, c = weight.shape[:2]
        out = weight.new_empty((m + 2) ** 2, k, c)
        self._run(f"k_tr{m}", [k * c], [weight.contiguous(), out], k * c // LANES)
        return out

    def kernel_adjoint(self, grad_kernels: Tensor, m: int) -> Tensor:
        """grad_kernels [t^2, K, C] -> G^T V G of every kernel point set [K, C, 3, 3]."""
        _, k, c = grad_kernels.shape
        out = grad_kernels.new_empty(k, c, 3, 3)
        self._run(f"k_adj{m}", [k * c], [grad_kernels, out], k * c // LANES)
        return out


    def conv3x3(self, x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, m: int) -> Tensor:
        """conv2d(x, weight * scale, shift, padding=1) as F(m x m, 3 x 3): x [N, C, H, W] and the
        result [N, K, H, W] channels_last, weight [K, C, 3, 3], scale and shift [K], contiguous."""
        n, _, h, w = x.shape
        products = torch.bmm(self.input_transform(x, m),
                             self.kernel_transform(weight, m).transpose(1, 2))  # (t^2, tiles, K)
        return self.output_transform(products, m, (n, weight.shape[0], h, w), scale, shift)

    def conv3x3_backward(self, grad: Tensor, x: Tensor, weight: Tensor, scale: Tensor, m: int,
                         need_x: bool = True, need_weight: bool = True
                         ) -> tuple[Tensor | None, Tensor | None]:
        """(input gradient [N, C, H, W] channels_last, weight gradient [K, C, 3, 3]) of
        `conv3x3` for the output gradient grad [N, K, H, W]; None where not needed."""
        grad = grad.contiguous(memory_format=torch.channels_last)
        grad_products = self.output_adjoint(grad, m, scale)  # (t^2, tiles, K), scaled
        grad_x = grad_weight = None
        if need_x:
            grad_tiles = torch.bmm(grad_products, self.kernel_transform(weight, m))  # (t^2, tiles, C)
            grad_x = self.input_adjoint(grad_tiles, m, tuple(x.shape))
        if need_weight:
            grad_kernels = torch.bmm(grad_products.transpose(1, 2),
                                     self.input_transform(x, m))  # (t^2, K, C)
            grad_weight = self.kernel_adjoint(grad_kernels, m)
        return grad_x, grad_weight


def load(directory: Path | None = None, compiler: str | None = None) -> Kernels:
    """Build (or find) and load the kernels, then check them on a small convolution against the
    torch formulation. Raises RuntimeError if any of that fails."""
    kernels = Kernels(build(directory or cache_dir(), compiler))
    _self_check(kernels)
    return kernels


def _self_check(kernels: Kernels) -> None:
    """A small convolution through every kernel, forward and both gradients, against torch's
    direct convolution (F(4x4)'s float32 error is ~1e-5 of the largest value; a miscompiled or
    wrong kernel is off by far more)."""
    # the first use may come from inside an autograd Function's forward (grad off) or from
    # inference mode; the reference gradients need neither
    with torch.inference_mode(False), torch.enable_grad():
        _check_convolutions(kernels)


def _check_convolutions(kernels: Kernels) -> None:
    gen = torch.Generator().manual_seed(0)
    for m in (2, 4):
        x = torch.randn(2, 32, 7, 10, generator=gen).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(16, 32, 3, 3, generator=gen)
        scale, shift = torch.rand(16, generator=gen) + 0.5, torch.randn(16, generator=gen)
        grad = torch.randn(2, 16, 7, 10, generator=gen)
        x_ref, weight_ref = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out_ref = torch.nn.functional.conv2d(x_ref, weight_ref * scale[:, None, None, None],
                                             shift, padding=1)
        checks = zip(("output", "input gradient", "weight gradient"),
                     (kernels.conv3x3(x, weight, scale, shift, m),
                      *kernels.conv3x3_backward(grad, x, weight, scale, m)),
                     (out_ref.detach(), *torch.autograd.grad(out_ref, (x_ref, weight_ref), grad)),
                     strict=True)
        for what, got, expected in checks:
            error = ((got - expected).abs().max() / expected.abs().max()).item()
            if not error < 1e-4:
                raise RuntimeError(f"the compiled F({m}x{m}) kernels' {what} is off by {error:.2e}")


_LOCK = threading.Lock()
_STATE: dict[str, Kernels | None] = {}


def kernels() -> Kernels | None:
    """The process's kernels, built and loaded on first use; None where they are switched off
    ($DABDETR_NATIVE_KERNELS=0) or could not be built (warned once)."""
    if "kernels" not in _STATE:
        with _LOCK:
            if "kernels" not in _STATE:
                loaded = None
                if os.environ.get(ENV_SWITCH, "1") != "0":
                    try:
                        loaded = load()
                    except (RuntimeError, OSError) as err:
                        logger.warning("compiled Winograd kernels unavailable (%s); the torch "
                                       "formulation runs instead (slower, same results)", err)
                _STATE["kernels"] = loaded
    return _STATE["kernels"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block, Winograd convolutions use the torch formulation (to compare the two in
    one process; the convolution's backward follows its forward's choice)."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


_disabled = 0


def usable(x: Tensor, weight: Tensor) -> Kernels | None:
    """The kernels if they can compute this convolution (float32 on the CPU, input and output
    channels divisible by LANES; not within `disabled()`), else None."""
    if _disabled or not (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.shape[1] % LANES == 0 and weight.shape[0] % LANES == 0):
        return None
    return kernels()
