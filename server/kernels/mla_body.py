"""The fused decode kernel's bodies, written once over the primitives of `dialects.py`.

PARTIAL: one threadgroup per (split, sequence x head group). It walks its split's tokens in
tiles of TT. The raw bytes of a tile (INT4 codes, scales, biases, rope key) are copied
asynchronously into a ring of NSTAGE shared-memory stages, NSTAGE - 1 tiles ahead of the one
computed; each tile is dequantized from its stage into shared memory (`dequant8`: bit tricks,
latent columns permuted within groups of 8 to match, queries and outputs permuted alike), scored
against all HG heads with the matrix units (S = [q_latent | q_pe] [latent | k_pe]^T, the rope
part read straight from the stage), softmaxed online, and accumulated as O += P latent from the
same shared tile. The threadgroup whose split holds position context_lens[b] first quantizes the
new token exactly like `mx.quantize`, writes it into the cache in place, and uses its
dequantized value in its own tile. With MLA_DIRECT (one split) it writes `out`; otherwise
unnormalized partials (o_part [B, nsplit, H, R], ml_part [B, nsplit, H, 2] = max and sum, in log2
units) for COMBINE. A block id outside [0, num_blocks) is never dereferenced.

The launches that run these bodies (their buffers and template constants, in order) are
declared in `mla_decode.py`. The template constants: T the cache dtype, H heads, HG heads per
group (multiple of 16), R and P the latent and rope widths, GS the quant group, BS tokens per
cache block, TT tokens per tile (divides BS, multiple of 16), NW warps, NSTAGE ring stages,
SMEM_BYTES threadgroup memory. Runtime sizes come in `dims` = [table width, splits, blocks per
split, blocks in the pool], so a new batch size or context length compiles nothing. A tile
configuration may add MLA_Q_FROM_DEVICE (queries read from device memory at each score step:
Metal's only way to fit R=512 into 32 KB; `tiles.TileConfig.q_shared`).
"""

PARTIAL = r"""
  constexpr int K = R + P;
  constexpr int LDQ = K + 8;   // +16 bytes a row: fragment loads hit 32 distinct banks
  constexpr int LDK = R + 8;
  constexpr int LDE = P + 8;
  constexpr int LDP = TT + 8;
  constexpr int LDS = TT + 8;  // float rows shifted by 8 banks: conflict-free score stores
  constexpr int NT = NW * 32;
  constexpr int MT = HG / 16;
  constexpr int HGROUPS = (H + HG - 1) / HG;
  constexpr int QW = R / 8;
  constexpr int NG = R / GS;
  constexpr int PK_CH = R / 32;          // 16-byte chunks of packed codes per token
  constexpr int PE_CH = P / 8;           // 16-byte chunks of k_pe per token
  constexpr int SB_CH = TT * NG / 8;     // 16-byte chunks of a tile's scales (or biases)
  constexpr int ST_PK = 0;                             // stage layout, in bytes
  constexpr int ST_SC = ST_PK + TT * R / 2;
  constexpr int ST_BI = ST_SC + TT * NG * 2;
  constexpr int ST_PE = ST_BI + TT * NG * 2;
  constexpr int STAGE_BYTES = ST_PE + TT * LDE * 2;
  constexpr int NTW = (R / 8) / NW;  // output column tiles per warp, for every head tile
  constexpr int WPM = NW / MT;       // warps per head tile in the score product
  constexpr int SN = (TT / 8 + WPM - 1) / WPM;  // token tiles per warp
  constexpr int RPW = (HG + NW - 1) / NW;       // softmax rows per warp
  constexpr int O_PER = MT * NTW;
  constexpr int VPL = GS / 32;
  constexpr float NEG = -1e30f;  // a masked score; anything below NEG / 2 weighs exactly 0

  SMEM_ARRAY(smem, SMEM_BYTES);
#if MLA_Q_FROM_DEVICE
  SHARED_PTR(T) sK = (SHARED_PTR(T))smem;       // [TT][LDK]  dequantized latent of the tile
#else
  SHARED_PTR(T) sQ = (SHARED_PTR(T))smem;       // [HG][LDQ]  queries, heads as rows
  SHARED_PTR(T) sK = sQ + HG * LDQ;             // [TT][LDK]  dequantized latent of the tile
#endif
  SHARED_PTR(T) sP = sK + TT * LDK;             // [HG][LDP]  probabilities
  SHARED_PTR(T) sNew = sP + HG * LDP;           // [K]        the new token, as cached
  SHARED_PTR(uint8_t) sStage = (SHARED_PTR(uint8_t))(sNew + K);  // [NSTAGE][STAGE_BYTES] raw tiles
  SHARED_PTR(float) sS = (SHARED_PTR(float))(sStage + NSTAGE * STAGE_BYTES);  // [HG][LDS] scores
  SHARED_PTR(float) sM = sS + HG * LDS;         // [HG] running max (log2 units)
  SHARED_PTR(float) sL = sM + HG;               // [HG] running sum
  SHARED_PTR(float) sAlpha = sL + HG;           // [HG] rescale of this tile
  SHARED_PTR(float) sCode = sAlpha + HG;        // [R]  the new token's 4-bit codes

  // Runtime sizes (no recompile when they change): table width, splits, blocks per split,
  // blocks in the pool.
  const int maxb = dims[0];
  const int nsplit = dims[1];
  const int pps = dims[2];
  const int nblocks = dims[3];
  const int split = BX;
  const int b = BY / HGROUPS;
  const int h0 = (BY % HGROUPS) * HG;
  const int ctx = context_lens[b];
  const int t_begin = split * pps * BS;
  const int t_lim = min(ctx + 1, maxb * BS);  // the table's last entry bounds what is read
  if (t_begin >= t_lim) {
    return;  // the whole threadgroup: no barrier is skipped by part of it
  }
  const int t_end = min(t_begin + pps * BS, t_lim);
  const bool owns_new = t_end == ctx + 1;
  const float scale_log2 = params[0] * 1.4426950408889634f;

  // Latent columns sit in shared memory permuted within each group of 8 (element e at 2 (e % 4)
  // + e / 4), the order dequant8 produces; queries are loaded, and outputs written, to match.
  // With MLA_Q_FROM_DEVICE (Metal, R=512) the score steps read them from device memory instead,
  // in the same order (load_a_q).
#if !MLA_Q_FROM_DEVICE
  for (int i = TID; i < HG * K; i += NT) {
    const int h = i / K, k = i % K;
    T v = T(0.0f);
    if (h0 + h < H) {
      const int e = (k & ~7) + ((k & 7) >> 1) + 4 * (k & 1);
      v = k < R ? q_latent[(b * H + h0 + h) * R + e] : q_pe[(b * H + h0 + h) * P + (k - R)];
    }
    sQ[h * LDQ + k] = v;
  }
#endif
  for (int h = TID; h < HG; h += NT) {
    sM[h] = NEG;
    sL[h] = 0.0f;
  }
  // Scores: warp w takes head tile w % MT and every WPM-th token tile of it.
  const int mt_s = WARP % MT;

  // A block id outside [0, nblocks) is neither read nor written: its tokens weigh 0.
  const int new_page = owns_new ? block_table[b * maxb + ctx / BS] : -1;
  if (owns_new && new_page >= 0 && new_page < nblocks) {
    const size_t slot = size_t(new_page) * BS + ctx % BS;
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
        // what a later reader dequantizes, at its permuted column
        sNew[(col & ~7) + 2 * (col & 3) + ((col >> 2) & 1)] = T(float(sc_t) * code + float(bi_t));
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
  const int n_tiles = (t_end - t_begin + TT - 1) / TT;

  // Step `step` issues the raw bytes of tile `step` (packed codes, scales, biases, k_pe) into
  // stage step % NSTAGE asynchronously and computes tile step - (NSTAGE - 1): loads run NSTAGE - 1
  // tiles ahead. The stage written is the one tile step - NSTAGE used, which every warp finished
  // before that tile's score barrier. A tile lies in one cache block (TT divides BS); rows past
  // the end, the new token's row and a bad block read as zeros.
  for (int step = 0; step < n_tiles + NSTAGE - 1; step++) {
    if (step < n_tiles) {
      const int tn = t_begin + step * TT;
      const int page = block_table[b * maxb + tn / BS];
      const bool ok = page >= 0 && page < nblocks;
      const size_t slot0 = ok ? size_t(page) * BS + tn % BS : 0;
      SHARED_PTR(uint8_t) st = sStage + (step % NSTAGE) * STAGE_BYTES;
      for (int c = TID; c < TT * PK_CH; c += NT) {
        const int t = tn + c / PK_CH;
        ASYNC_COPY16(st + ST_PK + 16 * c, packed + slot0 * QW + 4 * c, ok && t < t_end && t != ctx);
      }
      for (int c = TID; c < 2 * SB_CH; c += NT) {
        const int cc = c % SB_CH;
        if (c < SB_CH) {
          ASYNC_COPY16(st + ST_SC + 16 * cc, scales + slot0 * NG + 8 * cc, ok);
        } else {
          ASYNC_COPY16(st + ST_BI + 16 * cc, biases + slot0 * NG + 8 * cc, ok);
        }
      }
      for (int c = TID; c < TT * PE_CH; c += NT) {
        const int tok = c / PE_CH, ch = c % PE_CH;
        const int t = tn + tok;
        ASYNC_COPY16(st + ST_PE + 2 * (tok * LDE + ch * 8), k_pe + (slot0 + tok) * P + ch * 8,
                     ok && t < t_end && t != ctx);
      }
    }
    ASYNC_COMMIT();  // an empty group past the end keeps the count uniform
    const int it = step - (NSTAGE - 1);
    if (it < 0) {
      continue;
    }
    const int tc = t_begin + it * TT;
    const int tile_page = block_table[b * maxb + tc / BS];
    const bool tile_ok = tile_page >= 0 && tile_page < nblocks;
    ASYNC_WAIT(NSTAGE - 1);
    BARRIER();  // tile it has landed for every thread; the previous tile is done with sK, sP
    SHARED_PTR(uint8_t) st = sStage + (it % NSTAGE) * STAGE_BYTES;
    SHARED_PTR(T) stE = (SHARED_PTR(T))(st + ST_PE);
    for (int c = TID; c < TT * PK_CH; c += NT) {
      const int tok = c / PK_CH, ch = c % PK_CH;
      SHARED_PTR(T) dst = sK + tok * LDK + ch * 32;
      if (tc + tok == ctx && tile_ok) {
        for (int j = 0; j < 4; j++) SMEM_U4(dst + 8 * j) = SMEM_U4(sNew + ch * 32 + 8 * j);
        if (ch < PE_CH) {  // its rope key, into the stage's k_pe rows that the scores read
          for (int e = ch; e < PE_CH; e += PK_CH) SMEM_U4(stE + tok * LDE + e * 8) = SMEM_U4(sNew + R + e * 8);
        }
      } else {
        const uint4 w = SMEM_U4(st + ST_PK + 16 * c);
        const T sc = ((SHARED_PTR(T))(st + ST_SC))[tok * NG + ch * 32 / GS];
        const T bi = ((SHARED_PTR(T))(st + ST_BI))[tok * NG + ch * 32 / GS];
        for (int j = 0; j < 4; j++) SMEM_U4(dst + 8 * j) = dequant8<T>(u4_get(w, j), sc, bi);
      }
    }
    BARRIER();
    CFrag c[SN];
    for (int s = 0; s < SN; s++) {
      for (int i = 0; i < 4; i++) c[s].v[i] = 0.0f;
    }
    for (int kk = 0; kk < R; kk += 16) {
      AFrag a;  // one load of the queries serves all of this warp's token tiles
#if MLA_Q_FROM_DEVICE
      load_a_q(a, q_latent + b * H * R, q_pe + b * H * P, h0 + mt_s * 16, H, R, P, kk, LANE);
#else
      load_a(a, sQ + mt_s * 16 * LDQ + kk, LDQ, LANE);
#endif
      for (int s = 0; s < SN; s++) {
        const int nt = WARP / MT + s * WPM;
        if (nt < TT / 8) {
          BFrag bf;
          load_b_nmajor(bf, sK + nt * 8 * LDK + kk, LDK, LANE);
          mma_t<T>(c[s], a, bf);
        }
      }
    }
    for (int kk = 0; kk < P; kk += 16) {
      AFrag a;
#if MLA_Q_FROM_DEVICE
      load_a_q(a, q_latent + b * H * R, q_pe + b * H * P, h0 + mt_s * 16, H, R, P, R + kk, LANE);
#else
      load_a(a, sQ + mt_s * 16 * LDQ + R + kk, LDQ, LANE);
#endif
      for (int s = 0; s < SN; s++) {
        const int nt = WARP / MT + s * WPM;
        if (nt < TT / 8) {
          BFrag bf;
          load_b_nmajor(bf, stE + nt * 8 * LDE + kk, LDE, LANE);
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
          sS[row * LDS + col] = tile_ok && tc + col < t_end ? c[s].v[i] * scale_log2 : NEG;
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
          const float s = sS[h * LDS + c];
          const float p = s > 0.5f * NEG ? f_exp2(s - mx[r]) : 0.0f;
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
  ASYNC_WAIT(0);  // no copy outlives the threadgroup

  for (int q = 0; q < O_PER; q++) {
    for (int i = 0; i < 4; i++) {
      const int row = (q / NTW) * 16 + c_row(LANE, i);
      const int h = h0 + row;
      const int pos = (nt_first + q % NTW) * 8 + c_col(LANE, i);
      const int col = (pos & ~7) + ((pos & 7) >> 1) + 4 * (pos & 1);
      if (h < H) {
#if MLA_DIRECT
        out[(b * H + h) * R + col] = T(sL[row] > 0.0f ? o[q].v[i] / sL[row] : 0.0f);
#else
        o_part[((size_t(b) * nsplit + split) * H + h) * R + col] = o[q].v[i];
#endif
      }
    }
  }
#if !MLA_DIRECT
  for (int h = TID; h < HG; h += NT) {
    if (h0 + h < H) {
      const size_t at = ((size_t(b) * nsplit + split) * H + h0 + h) * 2;
      ml_part[at] = sM[h];
      ml_part[at + 1] = sL[h];
    }
  }
#endif
"""

# One threadgroup per (sequence, head): merges the splits that hold tokens. Each warp finds the
# max and the denominator over all splits itself (lanes over splits), then sums every NW-th
# split's partial output with lanes over columns (coalesced loads, NW independent streams of
# them); the warps' sums meet in threadgroup memory. One thread walking every split in turn, as
# before, spent 39 us at B=1 S=32K on the H100 waiting on its loads.
COMBINE = r"""
  constexpr int NT = NW * 32;
  constexpr int RP = R / 32;  // columns per lane: LANE, LANE + 32, ...
  SMEM_ARRAY(smem, NW * R * 4);
  SHARED_PTR(float) sAcc = (SHARED_PTR(float))smem;  // [NW][R] each warp's sum over its splits
  const int b = BY / H;
  const int h = BY % H;
  const int nsplit = dims[1];
  const int span = dims[2] * BS;  // tokens per split
  const int n_split = min((min(context_lens[b] + 1, dims[0] * BS) + span - 1) / span, nsplit);
  const size_t base = (size_t(b) * nsplit) * H + h;
  float m = -1e30f;
  for (int s = LANE; s < n_split; s += 32) m = f_max(m, ml_part[(base + size_t(s) * H) * 2]);
  m = warp_max(m);
  float den = 0.0f;
  for (int s = LANE; s < n_split; s += 32) {
    const size_t at = (base + size_t(s) * H) * 2;
    den += ml_part[at + 1] * f_exp2(ml_part[at] - m);
  }
  den = warp_sum(den);
  const float inv = den > 0.0f ? 1.0f / den : 0.0f;  // no token weighed: zeros
  float acc[RP];
  for (int i = 0; i < RP; i++) acc[i] = 0.0f;
  for (int s = WARP; s < n_split; s += NW) {
    const size_t at = base + size_t(s) * H;
    const float w = f_exp2(ml_part[at * 2] - m);
    for (int i = 0; i < RP; i++) acc[i] += o_part[at * R + LANE + 32 * i] * w;
  }
  for (int i = 0; i < RP; i++) sAcc[WARP * R + LANE + 32 * i] = acc[i];
  BARRIER();
  for (int r = TID; r < R; r += NT) {
    float sum = 0.0f;
    for (int w = 0; w < NW; w++) sum += sAcc[w * R + r];
    out[(b * H + h) * R + r] = T(sum * inv);
  }
"""
