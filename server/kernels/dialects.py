"""The Metal and CUDA dialects the fused kernel body is written in: one `Dialect` per language.

The body (`mla_body.py`) uses only the names a dialect's prelude and prologue define:

- indices `TID`, `LANE`, `WARP`, `BX`, `BY` (ints; a warp is a 32-thread simdgroup);
- `warp_sum/max/min(float)`, `f_max/f_min/f_abs/f_round/f_exp2(float)`, `BARRIER()`;
- shared memory: `SMEM_ARRAY(name, bytes)` (16-byte aligned), `SHARED_PTR(type)`;
- 16-byte moves: `SMEM_U4(ptr)` (an lvalue), `u4_get(v, j)`, `pack2<T>(lo, hi)` (two floats as
  two T in one 32-bit word);
- asynchronous copies global -> shared: `ASYNC_COPY16(smem_dst, global_src, pred)` (16 bytes, zeros
  when `pred` is false, in which case `global_src` is not read), `ASYNC_COMMIT()` closes a group,
  `ASYNC_WAIT(n)` waits until at most n groups of this thread are in flight (a `BARRIER()` after it
  publishes them to the threadgroup). CUDA: `cp.async.cg` (bypasses L1); Metal: plain copies;
- `dequant8<T>(word, scale, bias)`: the 8 INT4 codes of one packed word as 8 T in a uint4, in the
  order (0, 4), (1, 5), (2, 6), (3, 7) (pair j of the uint4 holds codes j and j + 4), each
  `code * scale + bias` rounded once. CUDA builds `128 + code` (bf16) or `1024 + code` (fp16)
  by OR-ing the code into the mantissa of a magic number, subtracts it exactly and applies one
  packed fma: about 1.5 instructions per value, no int-to-float conversion;
- in-place writes into an input: `MUT(type, ptr)`;
- a warp-wide matrix multiply-accumulate: `CFrag c; AFrag a; BFrag b;`
  `load_a(a, p, ld, LANE)` reads A[16x16] row-major from shared memory; `load_b_nmajor(b, p, ld,
  LANE)` reads B[16x8] with B(k, n) = p[n * ld + k], `load_b_kmajor` with B(k, n) = p[k * ld + n];
  `mma_t<T>(c, a, b)` does C[16x8] += A B in float; element i < 4 of `c.v` sits at row
  `c_row(LANE, i)`, column `c_col(LANE, i)` of the tile;
- Metal only: `load_a_q(a, q_latent_b, q_pe_b, row0, H, R, P, k0, LANE)`, the queries' A fragment
  straight from device memory, for the body's MLA_Q_FROM_DEVICE form (R=512 within 32 KB).

CUDA implements the multiply with `mma.sync.aligned.m16n8k16` and the loads with `ldmatrix`, in
inline PTX (MLX's runtime compiler cannot include wmma); Metal with four 8x8
`simdgroup_float8x8` products on fragments loaded element by element.
"""

from __future__ import annotations

from dataclasses import dataclass

CUDA_PRELUDE = r"""
#define SHARED_PTR(type) type*
#define SMEM_ARRAY(name, bytes) extern __shared__ uint4 name[]
#define BARRIER() __syncthreads()
#define MUT(type, ptr) const_cast<type*>(ptr)
#define SMEM_U4(ptr) (*reinterpret_cast<uint4*>(ptr))
#define ASYNC_COPY16(dst, src, pred) async_copy16((dst), (src), (pred))
#define ASYNC_COMMIT() asm volatile("cp.async.commit_group;\n" ::: "memory")
#define ASYNC_WAIT(n) asm volatile("cp.async.wait_group %0;\n" ::"n"(n) : "memory")

__device__ inline float warp_sum(float v) {
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ inline float warp_min(float v) {
  for (int m = 16; m > 0; m >>= 1) v = fminf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v;
}
__device__ inline float f_max(float a, float b) { return fmaxf(a, b); }
__device__ inline float f_min(float a, float b) { return fminf(a, b); }
__device__ inline float f_abs(float a) { return fabsf(a); }
__device__ inline float f_round(float a) { return roundf(a); }
__device__ inline float f_exp2(float a) { return exp2f(a); }
__device__ inline unsigned u4_get(uint4 v, int j) {
  return j == 0 ? v.x : (j == 1 ? v.y : (j == 2 ? v.z : v.w));
}

template <typename T> __device__ inline unsigned pack2(float lo, float hi);
template <> __device__ inline unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <> __device__ inline unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

__device__ inline unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ inline void async_copy16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_addr(dst)), "l"(src), "r"(pred ? 16 : 0) : "memory");
}

// (word >> 4j) & 0x000F000F | magic in one lop3: codes j and j + 4 in the two mantissas.
template <unsigned MAGIC> __device__ inline unsigned nib_pair(unsigned w) {
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(w), "n"(0x000F000Fu), "n"(MAGIC));
  return r;
}
template <typename T> __device__ inline uint4 dequant8(unsigned w, T sc, T bi);
template <> __device__ inline uint4 dequant8<__nv_bfloat16>(unsigned w, __nv_bfloat16 sc, __nv_bfloat16 bi) {
  const __nv_bfloat162 s2 = __bfloat162bfloat162(sc), b2 = __bfloat162bfloat162(bi);
  const unsigned m = 0x43004300u;  // 128.0 twice: 128 + code is exact (7 mantissa bits)
  const __nv_bfloat162 m2 = *reinterpret_cast<const __nv_bfloat162*>(&m);
  unsigned r[4];
  for (int j = 0; j < 4; j++) {
    const unsigned x = nib_pair<0x43004300u>(w >> (4 * j));
    const __nv_bfloat162 v = __hfma2(__hsub2(*reinterpret_cast<const __nv_bfloat162*>(&x), m2), s2, b2);
    r[j] = *reinterpret_cast<const unsigned*>(&v);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}
template <> __device__ inline uint4 dequant8<__half>(unsigned w, __half sc, __half bi) {
  const __half2 s2 = __half2half2(sc), b2 = __half2half2(bi);
  const unsigned m = 0x64006400u;  // 1024.0 twice: 1024 + code is exact
  const __half2 m2 = *reinterpret_cast<const __half2*>(&m);
  unsigned r[4];
  for (int j = 0; j < 4; j++) {
    const unsigned x = nib_pair<0x64006400u>(w >> (4 * j));
    const __half2 v = __hfma2(__hsub2(*reinterpret_cast<const __half2*>(&x), m2), s2, b2);
    r[j] = *reinterpret_cast<const unsigned*>(&v);
  }
  return make_uint4(r[0], r[1], r[2], r[3]);
}

struct AFrag { unsigned r[4]; };
struct BFrag { unsigned r[2]; };
struct CFrag { float v[4]; };

__device__ inline int c_row(int lane, int i) { return (lane >> 2) + ((i & 2) << 2); }
__device__ inline int c_col(int lane, int i) { return ((lane & 3) << 1) + (i & 1); }

template <typename T> __device__ inline unsigned ld_pair(const T* p) {
  return *reinterpret_cast<const unsigned*>(p);
}
template <typename T> __device__ inline unsigned ld_two(const T* lo, const T* hi) {
  return unsigned(*reinterpret_cast<const unsigned short*>(lo)) |
         (unsigned(*reinterpret_cast<const unsigned short*>(hi)) << 16);
}
// ldmatrix: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; each lane receives the
// pair (row lane / 4, columns 2 (lane % 4) + {0, 1}) of each matrix, or with .trans of its
// transpose, which is exactly the mma fragment layout.
template <typename T> __device__ inline void load_a(AFrag& a, const T* p, int ld, int lane) {
  const int r = lane & 7, m = lane >> 3;
  const unsigned addr = smem_addr(p + (r + 8 * (m & 1)) * ld + 8 * (m >> 1));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a.r[0]), "=r"(a.r[1]), "=r"(a.r[2]), "=r"(a.r[3]) : "r"(addr) : "memory");
}
template <typename T> __device__ inline void load_b_nmajor(BFrag& b, const T* p, int ld, int lane) {
  const int r = lane & 7, m = (lane >> 3) & 1;
  const unsigned addr = smem_addr(p + r * ld + 8 * m);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(b.r[0]), "=r"(b.r[1]) : "r"(addr) : "memory");
}
template <typename T> __device__ inline void load_b_kmajor(BFrag& b, const T* p, int ld, int lane) {
  const int r = lane & 7, m = (lane >> 3) & 1;
  const unsigned addr = smem_addr(p + (r + 8 * m) * ld);
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(b.r[0]), "=r"(b.r[1]) : "r"(addr) : "memory");
}

template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ static inline void run(CFrag& c, const AFrag& a, const BFrag& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ static inline void run(CFrag& c, const AFrag& a, const BFrag& b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c.v[0]), "+f"(c.v[1]), "+f"(c.v[2]), "+f"(c.v[3])
        : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]));
  }
};
template <typename T> __device__ inline void mma_t(CFrag& c, const AFrag& a, const BFrag& b) {
  Mma<T>::run(c, a, b);
}
"""

CUDA_PROLOGUE = r"""
  const int TID = int(threadIdx.x);
  const int LANE = TID & 31;
  const int WARP = TID >> 5;
  const int BX = int(blockIdx.x);
  const int BY = int(blockIdx.y);
"""

METAL_PRELUDE = r"""
#include <metal_simdgroup>
#include <metal_simdgroup_matrix>
#define SHARED_PTR(type) threadgroup type*
#define SMEM_ARRAY(name, bytes) threadgroup uint4 name[(bytes) / 16]
#define BARRIER() threadgroup_barrier(mem_flags::mem_threadgroup)
#define MUT(type, ptr) const_cast<device type*>(ptr)
#define SMEM_U4(ptr) (*((threadgroup uint4*)(ptr)))
#define ASYNC_COPY16(dst, src, pred) \
  (*((threadgroup uint4*)(dst)) = (pred) ? *((const device uint4*)(src)) : uint4(0u))
#define ASYNC_COMMIT()
#define ASYNC_WAIT(n)

inline float warp_sum(float v) { return simd_sum(v); }
inline float warp_max(float v) { return simd_max(v); }
inline float warp_min(float v) { return simd_min(v); }
inline float f_max(float a, float b) { return metal::max(a, b); }
inline float f_min(float a, float b) { return metal::min(a, b); }
inline float f_abs(float a) { return metal::abs(a); }
inline float f_round(float a) { return metal::round(a); }
inline float f_exp2(float a) { return metal::exp2(a); }
inline uint u4_get(uint4 v, int j) { return v[j]; }

template <typename T> inline uint pack2(float lo, float hi) {
  return as_type<uint>(vec<T, 2>(T(lo), T(hi)));
}
template <typename T> inline uint4 dequant8(uint w, T sc, T bi) {
  const float s = float(sc), b = float(bi);
  uint r[4];
  for (int j = 0; j < 4; j++) {
    r[j] = pack2<T>(float((w >> (4 * j)) & 15u) * s + b, float((w >> (4 * j + 16)) & 15u) * s + b);
  }
  return uint4(r[0], r[1], r[2], r[3]);
}

// Each 8x8 simdgroup matrix gives a thread two adjacent elements of one row.
struct AFrag { float2 e[4]; };  // 8x8 blocks (rows 0-7 | 8-15) x (k 0-7 | 8-15): e[2 * rb + kb]
struct BFrag { float2 e[2]; };  // k 0-7, k 8-15
struct CFrag { float v[4]; };   // v[0..1] rows 0-7, v[2..3] rows 8-15

inline int frag_m(int lane) { return ((lane / 4) & 4) + ((lane / 2) % 4); }
inline int frag_n(int lane) { return ((lane / 4) & 2) * 2 + (lane % 2) * 2; }
inline int c_row(int lane, int i) { return frag_m(lane) + ((i & 2) << 2); }
inline int c_col(int lane, int i) { return frag_n(lane) + (i & 1); }

template <typename T>
inline void load_a(thread AFrag& a, const threadgroup T* p, int ld, int lane) {
  const int m = frag_m(lane), n = frag_n(lane);
  for (int rb = 0; rb < 2; rb++) {
    for (int kb = 0; kb < 2; kb++) {
      const threadgroup T* q = p + (m + 8 * rb) * ld + n + 8 * kb;
      a.e[2 * rb + kb] = float2(float(q[0]), float(q[1]));
    }
  }
}
// load_a's fragment of the queries, read from device memory: heads row0.. of `ql` [H, R] and `qp`
// [H, P] (one sequence's), columns k0..k0+15 of [q_latent | q_pe] with q_latent's columns in the
// order the latent tile holds them (permuted within each group of 8); heads past H are zeros.
template <typename T>
inline void load_a_q(thread AFrag& a, const device T* ql, const device T* qp, int row0, int H, int R, int P,
                     int k0, int lane) {
  const int m = frag_m(lane), n = frag_n(lane);
  for (int rb = 0; rb < 2; rb++) {
    const int h = row0 + m + 8 * rb;
    for (int kb = 0; kb < 2; kb++) {
      float v[2] = {0.0f, 0.0f};
      for (int j = 0; j < 2; j++) {
        const int k = k0 + n + 8 * kb + j;
        if (h < H) {
          v[j] = k < R ? float(ql[h * R + (k & ~7) + ((k & 7) >> 1) + 4 * (k & 1)]) : float(qp[h * P + k - R]);
        }
      }
      a.e[2 * rb + kb] = float2(v[0], v[1]);
    }
  }
}
template <typename T>
inline void load_b_nmajor(thread BFrag& b, const threadgroup T* p, int ld, int lane) {
  const int k = frag_m(lane), n = frag_n(lane);
  for (int kb = 0; kb < 2; kb++) {
    b.e[kb] = float2(float(p[n * ld + k + 8 * kb]), float(p[(n + 1) * ld + k + 8 * kb]));
  }
}
template <typename T>
inline void load_b_kmajor(thread BFrag& b, const threadgroup T* p, int ld, int lane) {
  const int k = frag_m(lane), n = frag_n(lane);
  for (int kb = 0; kb < 2; kb++) {
    const threadgroup T* q = p + (k + 8 * kb) * ld + n;
    b.e[kb] = float2(float(q[0]), float(q[1]));
  }
}
template <typename T>
inline void mma_t(thread CFrag& c, thread const AFrag& a, thread const BFrag& b) {
  simdgroup_float8x8 a00, a01, a10, a11, b0, b1, c0, c1;
  reinterpret_cast<thread float2&>(a00.thread_elements()) = a.e[0];
  reinterpret_cast<thread float2&>(a01.thread_elements()) = a.e[1];
  reinterpret_cast<thread float2&>(a10.thread_elements()) = a.e[2];
  reinterpret_cast<thread float2&>(a11.thread_elements()) = a.e[3];
  reinterpret_cast<thread float2&>(b0.thread_elements()) = b.e[0];
  reinterpret_cast<thread float2&>(b1.thread_elements()) = b.e[1];
  reinterpret_cast<thread float2&>(c0.thread_elements()) = float2(c.v[0], c.v[1]);
  reinterpret_cast<thread float2&>(c1.thread_elements()) = float2(c.v[2], c.v[3]);
  simdgroup_multiply_accumulate(c0, a00, b0, c0);
  simdgroup_multiply_accumulate(c0, a01, b1, c0);
  simdgroup_multiply_accumulate(c1, a10, b0, c1);
  simdgroup_multiply_accumulate(c1, a11, b1, c1);
  const float2 lo = reinterpret_cast<thread float2&>(c0.thread_elements());
  const float2 hi = reinterpret_cast<thread float2&>(c1.thread_elements());
  c.v[0] = lo.x; c.v[1] = lo.y; c.v[2] = hi.x; c.v[3] = hi.y;
}
"""

# MLX adds a Metal kernel's position attributes when the source names them.
METAL_PROLOGUE = r"""
  const int TID = int(thread_position_in_threadgroup.x);
  const int LANE = int(thread_index_in_simdgroup);
  const int WARP = int(simdgroup_index_in_threadgroup);
  const int BX = int(threadgroup_position_in_grid.x);
  const int BY = int(threadgroup_position_in_grid.y);
"""


@dataclass(frozen=True)
class Dialect:
    """One kernel language: `prelude` goes into MLX's header (after the launch's #defines),
    `prologue` opens the kernel body and defines the thread indices from the language's own."""

    name: str
    prelude: str
    prologue: str

    def render(self, body: str, defines: tuple[tuple[str, int], ...] = ()) -> tuple[str, str]:
        """(header, source) for `mx.fast.{metal,cuda}_kernel`: the primitives, then the body."""
        lines = [f"#define {k} {v}" for k, v in defines]
        return "\n".join(lines) + "\n" + self.prelude, self.prologue + body


CUDA = Dialect("cuda", CUDA_PRELUDE, CUDA_PROLOGUE)
METAL = Dialect("metal", METAL_PRELUDE, METAL_PROLOGUE)
DIALECTS = {d.name: d for d in (CUDA, METAL)}
