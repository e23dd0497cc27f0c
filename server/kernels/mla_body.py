"""The fused decode kernel's bodies, written once over the primitives of `dialects.py`.

PARTIAL: one threadgroup per (split, sequence x head group). It walks its split's tokens in
tiles of TT: the INT4 latent and rope key of a tile are loaded into registers one tile ahead,
dequantized into shared memory, scored against all HG heads with the matrix units
(S = [q_latent | q_pe] [latent | k_pe]^T), softmaxed online, and accumulated as O += P latent
from the same shared tile. The threadgroup whose split holds position context_lens[b] first
quantizes the new token exactly like `mx.quantize`, writes it into the cache in place, and
uses its dequantized value in its own tile. With MLA_DIRECT (one split) it writes `out`;
otherwise unnormalized partials (o_part [B, NSPLIT, H, R], ml_part [B, NSPLIT, H, 2] = max
and sum, in log2 units) for COMBINE.

The launches that run these bodies (their buffers and template constants, in order) are
declared in `mla_decode.py`. The constants mean: T the cache dtype, H heads, HG heads per group
(multiple of 16), R and P the latent and rope widths, GS the quant group, BS tokens per cache
block, TT tokens per tile (divides BS, multiple of 16), PPS blocks per split, NW warps, MAXB the
block-table width, NSPLIT splits, SMEM_BYTES threadgroup memory.
"""

PARTIAL = r"""
  constexpr int K = R + P;
  constexpr int LDK = K + 8;  // +16 bytes a row: fragment loads hit 32 distinct banks
  constexpr int LDP = TT + 8;
  constexpr int LDS = TT + 8;  // float rows shifted by 8 banks: conflict-free score stores
  constexpr int NT = NW * 32;
  constexpr int MT = HG / 16;
  constexpr int HGROUPS = (H + HG - 1) / HG;
  constexpr int QW = R / 8;
  constexpr int NG = R / GS;
  constexpr int PK_CH = R / 32;
  constexpr int PE_CH = P / 8;
  constexpr int PK_PER = (TT * PK_CH + NT - 1) / NT;
  constexpr int PE_PER = (TT * PE_CH + NT - 1) / NT;
  constexpr int NTW = (R / 8) / NW;  // output column tiles per warp, for every head tile
  constexpr int WPM = NW / MT;       // warps per head tile in the score product
  constexpr int SN = (TT / 8 + WPM - 1) / WPM;  // token tiles per warp
  constexpr int RPW = (HG + NW - 1) / NW;       // softmax rows per warp
  constexpr int O_PER = MT * NTW;
  constexpr int VPL = GS / 32;
  constexpr float NEG = -1e30f;

  SMEM_ARRAY(smem, SMEM_BYTES);
  SHARED_PTR(T) sQ = (SHARED_PTR(T))smem;       // [HG][LDK]  queries, heads as rows
  SHARED_PTR(T) sK = sQ + HG * LDK;             // [TT][LDK]  dequantized tile
  SHARED_PTR(T) sP = sK + TT * LDK;             // [HG][LDP]  probabilities
  SHARED_PTR(T) sNew = sP + HG * LDP;           // [K]        the new token, as cached
  SHARED_PTR(float) sS = (SHARED_PTR(float))(sNew + K);  // [HG][LDS] scores
  SHARED_PTR(float) sM = sS + HG * LDS;         // [HG] running max (log2 units)
  SHARED_PTR(float) sL = sM + HG;               // [HG] running sum
  SHARED_PTR(float) sAlpha = sL + HG;           // [HG] rescale of this tile
  SHARED_PTR(float) sCode = sAlpha + HG;        // [R]  the new token's 4-bit codes

  const int split = BX;
  const int b = BY / HGROUPS;
  const int h0 = (BY % HGROUPS) * HG;
  const int ctx = context_lens[b];
  const int t_begin = split * PPS * BS;
  if (t_begin > ctx) {
    return;  // the whole threadgroup: no barrier is skipped by part of it
  }
  const int t_end = min(t_begin + PPS * BS, ctx + 1);
  const bool owns_new = t_end == ctx + 1;
  const float scale_log2 = params[0] * 1.4426950408889634f;

  for (int i = TID; i < HG * K; i += NT) {
    const int h = i / K, k = i % K;
    T v = T(0.0f);
    if (h0 + h < H) {
      v = k < R ? q_latent[(b * H + h0 + h) * R + k] : q_pe[(b * H + h0 + h) * P + (k - R)];
    }
    sQ[h * LDK + k] = v;
  }
  for (int h = TID; h < HG; h += NT) {
    sM[h] = NEG;
    sL[h] = 0.0f;
  }
  // Scores: warp w takes head tile w % MT and every WPM-th token tile of it.
  const int mt_s = WARP % MT;

  if (owns_new) {
    const size_t slot = size_t(block_table[b * MAXB + ctx / BS]) * BS + ctx % BS;
    for (int g = WARP; g < NG; g += NW) {
      float w[VPL];
      float lo = 3.0e38f, hi = 0.0f;  // hi starts at 0 as in MLX's GPU quantizers
      for (int j = 0; j < VPL; j++) {
        w[j] = float(new_latent[b * R + g * GS + LANE * VPL + j]);
        lo = f_min(lo, w[j]);
        hi = f_max(hi, w[j]);
      }
      lo = warp_min(lo);
      hi = warp_max(hi);
      float sc = f_max((hi - lo) / 15.0f, 1e-7f);
      const bool side = f_abs(lo) > f_abs(hi);
      sc = side ? sc : -sc;
      const float edge = side ? lo : hi;
      const float q0 = f_round(edge / sc);
      const bool at_zero = q0 == 0.0f;
      sc = at_zero ? sc : edge / q0;
      const float bi = at_zero ? 0.0f : edge;
      const T sc_t = T(sc);
      const T bi_t = T(bi);
      for (int j = 0; j < VPL; j++) {
        const float code = f_min(f_round((w[j] - bi) / sc), 15.0f);
        const int col = g * GS + LANE * VPL + j;
        sCode[col] = code;
        sNew[col] = T(float(sc_t) * code + float(bi_t));  // what a later reader dequantizes
      }
      if (LANE == 0) {
        MUT(T, scales)[slot * NG + g] = sc_t;
        MUT(T, biases)[slot * NG + g] = bi_t;
      }
    }
    for (int i = TID; i < P; i += NT) {
      const T v = new_kpe[b * P + i];
      sNew[R + i] = v;
      MUT(T, k_pe)[slot * P + i] = v;
    }
    BARRIER();
    for (int i = TID; i < QW; i += NT) {
      unsigned word = 0u;
      for (int j = 0; j < 8; j++) {
        word |= unsigned(sCode[i * 8 + j]) << (4 * j);
      }
      MUT(uint32_t, packed)[slot * QW + i] = word;
    }
  }

  CFrag o[O_PER];
  for (int q = 0; q < O_PER; q++) {
    for (int i = 0; i < 4; i++) o[q].v[i] = 0.0f;
  }
  const int nt_first = WARP * NTW;  // o[mt * NTW + j] is head tile mt, column tile nt_first + j

  // Registers one tile ahead. Scales and biases stay in T until used, and the next tile's
  // block id is read one tile earlier still: nothing in the prefetch waits on memory.
  uint4 pk[PK_PER];
  uint4 pe[PE_PER];
  T psc[PK_PER];
  T pbi[PK_PER];
  const int n_tiles = (t_end - t_begin + TT - 1) / TT;
  int page_next = block_table[b * MAXB + t_begin / BS];

  for (int it = 0; it <= n_tiles; it++) {
    const int tc = t_begin + (it - 1) * TT;  // the tile computed in this iteration
    if (it > 0) {
      BARRIER();  // the previous tile is done with sK and sP
      for (int i = 0; i < PK_PER; i++) {
        const int c = TID + i * NT;
        if (c < TT * PK_CH) {
          const int tok = c / PK_CH, ch = c % PK_CH;
          SHARED_PTR(T) dst = sK + tok * LDK + ch * 32;
          if (tc + tok == ctx) {
            for (int j = 0; j < 4; j++) SMEM_U4(dst + 8 * j) = SMEM_U4(sNew + ch * 32 + 8 * j);
          } else {
            for (int j = 0; j < 4; j++) {
              const unsigned word = u4_get(pk[i], j);
              const float sc = float(psc[i]), bi = float(pbi[i]);
              uint4 v;
              v.x = pack2<T>(float(word & 15u) * sc + bi, float((word >> 4) & 15u) * sc + bi);
              v.y = pack2<T>(float((word >> 8) & 15u) * sc + bi, float((word >> 12) & 15u) * sc + bi);
              v.z = pack2<T>(float((word >> 16) & 15u) * sc + bi, float((word >> 20) & 15u) * sc + bi);
              v.w = pack2<T>(float((word >> 24) & 15u) * sc + bi, float(word >> 28) * sc + bi);
              SMEM_U4(dst + 8 * j) = v;
            }
          }
        }
      }
      for (int i = 0; i < PE_PER; i++) {
        const int c = TID + i * NT;
        if (c < TT * PE_CH) {
          const int tok = c / PE_CH, ch = c % PE_CH;
          SMEM_U4(sK + tok * LDK + R + ch * 8) =
              tc + tok == ctx ? SMEM_U4(sNew + R + ch * 8) : pe[i];
        }
      }
    }
    if (it < n_tiles) {
      // Issue the next tile's loads now; they land while this tile computes. A tile lies in
      // one cache block (TT divides BS).
      const int tn = t_begin + it * TT;
      const size_t slot0 = size_t(page_next) * BS + tn % BS;
      if (it + 1 < n_tiles) page_next = block_table[b * MAXB + (tn + TT) / BS];
      for (int i = 0; i < PK_PER; i++) {
        const int c = TID + i * NT;
        const int t = tn + c / PK_CH;
        if (c < TT * PK_CH && t < t_end && t != ctx) {
          const size_t slot = slot0 + c / PK_CH;
          const int ch = c % PK_CH;
          pk[i] = LOAD_U4(packed, slot * PK_CH + ch);
          psc[i] = scales[slot * NG + ch * 32 / GS];
          pbi[i] = biases[slot * NG + ch * 32 / GS];
        } else {
          pk[i] = ZERO_U4;  // rows past the end dequantize to exact zeros
          psc[i] = T(0.0f);
          pbi[i] = T(0.0f);
        }
      }
      for (int i = 0; i < PE_PER; i++) {
        const int c = TID + i * NT;
        const int t = tn + c / PE_CH;
        if (c < TT * PE_CH && t < t_end && t != ctx) {
          pe[i] = LOAD_U4(k_pe, (slot0 + c / PE_CH) * PE_CH + c % PE_CH);
        } else {
          pe[i] = ZERO_U4;
        }
      }
    }
    if (it > 0) {
      BARRIER();
      CFrag c[SN];
      for (int s = 0; s < SN; s++) {
        for (int i = 0; i < 4; i++) c[s].v[i] = 0.0f;
      }
      for (int kk = 0; kk < K; kk += 16) {
        AFrag a;  // one load of the queries serves all of this warp's token tiles
        load_a(a, sQ + mt_s * 16 * LDK + kk, LDK, LANE);
        for (int s = 0; s < SN; s++) {
          const int nt = WARP / MT + s * WPM;
          if (nt < TT / 8) {
            BFrag bf;
            load_b_nmajor(bf, sK + nt * 8 * LDK + kk, LDK, LANE);
            mma_t<T>(c[s], a, bf);
          }
        }
      }
      for (int s = 0; s < SN; s++) {
        const int nt = WARP / MT + s * WPM;
        if (nt < TT / 8) {
          for (int i = 0; i < 4; i++) {
            const int row = mt_s * 16 + c_row(LANE, i);
            const int col = nt * 8 + c_col(LANE, i);
            sS[row * LDS + col] = tc + col < t_end ? c[s].v[i] * scale_log2 : NEG;
          }
        }
      }
      BARRIER();
      // Online softmax, warp w taking rows w, w + NW, ...: the rows' reductions interleave.
      float mx[RPW], sum[RPW];
      for (int r = 0; r < RPW; r++) {
        const int h = WARP + r * NW;
        mx[r] = NEG;
        if (h < HG) {
          for (int c = LANE; c < TT; c += 32) mx[r] = f_max(mx[r], sS[h * LDS + c]);
        }
      }
      for (int r = 0; r < RPW; r++) mx[r] = f_max(warp_max(mx[r]), sM[(WARP + r * NW) % HG]);
      for (int r = 0; r < RPW; r++) {
        const int h = WARP + r * NW;
        sum[r] = 0.0f;
        if (h < HG) {
          for (int c = LANE; c < TT; c += 32) {
            const float p = f_exp2(sS[h * LDS + c] - mx[r]);
            sum[r] += p;
            sP[h * LDP + c] = T(p);
          }
        }
      }
      for (int r = 0; r < RPW; r++) sum[r] = warp_sum(sum[r]);
      for (int r = 0; r < RPW; r++) {
        const int h = WARP + r * NW;
        if (LANE == 0 && h < HG) {
          const float alpha = f_exp2(sM[h] - mx[r]);
          sAlpha[h] = alpha;
          sL[h] = sL[h] * alpha + sum[r];
          sM[h] = mx[r];
        }
      }
      BARRIER();
      for (int mt = 0; mt < MT; mt++) {
        for (int i = 0; i < 4; i++) {
          const float alpha = sAlpha[mt * 16 + c_row(LANE, i)];
          for (int j = 0; j < NTW; j++) o[mt * NTW + j].v[i] *= alpha;
        }
      }
      for (int kt = 0; kt < TT; kt += 16) {
        AFrag a[MT];
        for (int mt = 0; mt < MT; mt++) load_a(a[mt], sP + mt * 16 * LDP + kt, LDP, LANE);
        for (int j = 0; j < NTW; j++) {
          BFrag bf;  // one load of the tile's values serves every head tile
          load_b_kmajor(bf, sK + kt * LDK + (nt_first + j) * 8, LDK, LANE);
          for (int mt = 0; mt < MT; mt++) mma_t<T>(o[mt * NTW + j], a[mt], bf);
        }
      }
    }
  }

  for (int q = 0; q < O_PER; q++) {
    for (int i = 0; i < 4; i++) {
      const int row = (q / NTW) * 16 + c_row(LANE, i);
      const int h = h0 + row;
      const int col = (nt_first + q % NTW) * 8 + c_col(LANE, i);
      if (h < H) {
#if MLA_DIRECT
        out[(b * H + h) * R + col] = T(o[q].v[i] / sL[row]);
#else
        o_part[((size_t(b) * NSPLIT + split) * H + h) * R + col] = o[q].v[i];
#endif
      }
    }
  }
#if !MLA_DIRECT
  for (int h = TID; h < HG; h += NT) {
    if (h0 + h < H) {
      const size_t at = ((size_t(b) * NSPLIT + split) * H + h0 + h) * 2;
      ml_part[at] = sM[h];
      ml_part[at + 1] = sL[h];
    }
  }
#endif
"""

# One threadgroup per (sequence, head): merges the splits that hold tokens.
COMBINE = r"""
  constexpr int NT = NW * 32;
  const int b = BY / H;
  const int h = BY % H;
  const int n_split = (context_lens[b] + 1 + PPS * BS - 1) / (PPS * BS);
  const size_t base = (size_t(b) * NSPLIT) * H + h;
  float m = -1e30f;
  for (int s = 0; s < n_split; s++) m = f_max(m, ml_part[(base + size_t(s) * H) * 2]);
  float den = 0.0f;
  for (int s = 0; s < n_split; s++) {
    const size_t at = (base + size_t(s) * H) * 2;
    den += ml_part[at + 1] * f_exp2(ml_part[at] - m);
  }
  const float inv = 1.0f / den;
  for (int r = TID; r < R; r += NT) {
    float acc = 0.0f;
    for (int s = 0; s < n_split; s++) {
      const size_t at = base + size_t(s) * H;
      acc += o_part[at * R + r] * f_exp2(ml_part[at * 2] - m);
    }
    out[(b * H + h) * R + r] = T(acc * inv);
  }
"""
