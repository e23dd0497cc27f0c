"""Every ordering of cache reads and writes the engine uses, checked byte for byte.

MLX does not know that the fused kernel appends into the cache in place (docs/kernels.md, "In
place"). Between two decode steps the engine touches a layer's cache only through
`mla_attention` (prefill `LatentCache.write`, the decode append, prefill `LatentCache.read`, in
that order within a step) and one `mx.eval` of the step's outputs and the cache fields. These
tests drive the real `mla_attention` (with identity projections, so each token's latent and rope
key are known inputs) through the orderings the engine produces:

- prefill write then decode (whole and chunked prompts, a prefill chunk in the same step as
  decodes);
- decode then a prefix-reuse read (a block filled by decode appends, then read as another
  sequence's cached prefix in a step where the first keeps decoding);
- preemption and recompute (a preempted sequence's partial block goes to another sequence, which
  prefills and decodes over the stale bytes; the preempted one comes back through its cached
  full block and re-prefills its tail into a new block);

and after every step assert that the bytes of every live token equal a cache written from scratch,
and that each decode and prefill output equals the reference computed over that scratch cache.

Backends: the reference (plain MLX, functional updates); an in-place stand-in for the fused
kernel (CPU: it receives the real cache buffers through the fused launcher and writes the appended
rows into them through NumPy views, behind MLX's back as the GPU kernel does); and, on a machine
with Metal or CUDA, the fused kernel itself. Planted bugs (a kernel handed copies of the fields, an
append written to the wrong cache) show the checks fail when a write is lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from server.engine.model.mla_attention import AttentionBatch, PrefillChunk, mla_attention
from server.kernels import mla_decode, reference
from server.kernels.latent_cache import LatentCache
from server.kernels.mla_decode import Launch
from server.kernels.reference import append_slots, mla_decode_append_reference
from server.platform import current_platform

H, R, P, GS, BS = 2, 64, 16, 32, 16
DT = mx.float16
NUM_BLOCKS = 12
D = H * (R + P) + R + P  # one token's row: its query (H x (R + P)), then its latent and rope key
FIELDS = ("packed", "scales", "biases", "k_pe")


class IdentityAttention:
    """The attributes `mla_attention` uses, with identity projections and no rope: a token's row
    of `x` holds its query, latent and rope key as they are."""

    num_heads = H
    qk_nope_head_dim = R
    qk_rope_head_dim = P
    q_lora_rank = None
    kv_lora_rank = R
    scale = (R + P) ** -0.5

    def q_proj(self, x: mx.array) -> mx.array:
        return x[:, : H * (R + P)]

    def kv_a_proj_with_mqa(self, x: mx.array) -> mx.array:
        return x[:, H * (R + P) :]

    def kv_a_layernorm(self, x: mx.array) -> mx.array:
        return x

    def rope(self, x: mx.array, offset: mx.array) -> mx.array:
        return x

    def embed_q(self, x: mx.array, transpose: bool = True) -> mx.array:
        return x

    def unembed_out(self, x: mx.array) -> mx.array:
        return x

    def o_proj(self, x: mx.array) -> mx.array:
        return x


ATTN = IdentityAttention()


def token_row(key: int, pos: int) -> np.ndarray:
    """The `x` row of the token at `pos` of token stream `key` (same tokens, same row)."""
    return np.random.default_rng((key, pos)).standard_normal(D).astype(np.float16)


@dataclass(eq=False)
class Seq:
    key: int  # token stream: two sequences with the same key and positions have the same tokens
    blocks: list[int]
    n: int = 0  # tokens in the cache
    prefix: dict[int, int] = field(default_factory=dict)  # positions taken from another stream

    def row(self, pos: int) -> np.ndarray:
        return token_row(self.prefix.get(pos, self.key), pos)

    def slots(self, start: int, stop: int) -> list[int]:
        return [self.blocks[p // BS] * BS + p % BS for p in range(start, stop)]


def scratch_cache(live: list[tuple[Seq, int]]) -> LatentCache:
    """A fresh cache with the first `n` tokens of each sequence written by prefill's `write`."""
    cache = LatentCache(NUM_BLOCKS, BS, R, P, GS, DT)
    for seq, n in live:
        if n:
            x = mx.array(np.stack([seq.row(p) for p in range(n)]))
            cache.write(mx.array(seq.slots(0, n), mx.int32), x[:, H * (R + P) : H * (R + P) + R], x[:, -P:])
    mx.eval(*cache.arrays())
    return cache


def field_rows(cache: LatentCache, slots: list[int]) -> list[np.ndarray]:
    idx = mx.array(slots, mx.int32)
    return [np.array(a.reshape(NUM_BLOCKS * BS, -1)[idx]) for a in cache.arrays()]


def prefill_output(x: mx.array, cache: LatentCache, batch: AttentionBatch) -> mx.array:
    """What `mla_attention` marks as the prefill attention of `batch`'s one chunk."""
    got: list[mx.array] = []

    def mark(name: str, *arrays: mx.array) -> None:
        if name == "attn_prefill":
            got.append(arrays[0])

    mla_attention(ATTN, x, cache, batch, "reference", mark)  # nothing to decode
    return got[0]


class Engine:
    """The cache side of `ModelRunner` + `LLMEngine.step` for one layer: the same flat token
    layout (decodes first, then prefill chunks), block table (padded with 0) and context lengths,
    one `mla_attention` call decoding through `backend`, then one `mx.eval` of its output and the
    cache fields."""

    def __init__(self, backend: str, exact: bool) -> None:
        self.backend = backend
        self.cache = LatentCache(NUM_BLOCKS, BS, R, P, GS, DT)
        mx.eval(*self.cache.arrays())
        self.live: list[Seq] = []
        self.exact = exact
        self.failures: list[str] = []
        self.steps = 0

    def step(self, decodes: list[Seq], prefills: list[tuple[Seq, int]]) -> None:
        rows, positions, chunks = [], [], []
        for s in decodes:
            rows.append(s.row(s.n))
            positions.append(s.n)
        for s, k in prefills:
            rows.extend(s.row(p) for p in range(s.n, s.n + k))
            positions.extend(range(s.n, s.n + k))
            nb = -(-(s.n + k) // BS)
            chunks.append(
                PrefillChunk(s.n, k, mx.array(s.blocks[:nb], mx.int32), mx.array(s.slots(s.n, s.n + k), mx.int32))
            )
        table = ctx = None
        if decodes:
            width = max(len(s.blocks) for s in decodes)
            table = mx.array([s.blocks + [0] * (width - len(s.blocks)) for s in decodes], mx.int32)
            ctx = mx.array([s.n for s in decodes], mx.int32)
        x = mx.array(np.stack(rows))
        batch = AttentionBatch(mx.array(positions, mx.int32), len(decodes), table, ctx, chunks, None)
        marked: dict[str, list[mx.array]] = {"attn_decode": [], "attn_prefill": []}

        def mark(name: str, *arrays: mx.array) -> None:
            if name in marked:
                marked[name].append(arrays[0])

        before = [(s, s.n) for s in self.live]
        out = mla_attention(ATTN, x, self.cache, batch, self.backend, mark)
        mx.eval(out, *self.cache.arrays())
        self.steps += 1
        self.check_outputs(before, decodes, prefills, x, table, ctx, marked)
        for s in decodes:
            s.n += 1
        for s, k in prefills:
            s.n += k
        self.check_bytes()

    def check_outputs(
        self,
        before: list[tuple[Seq, int]],
        decodes: list[Seq],
        prefills: list[tuple[Seq, int]],
        x: mx.array,
        table: mx.array | None,
        ctx: mx.array | None,
        marked: dict[str, list[mx.array]],
    ) -> None:
        """Decode and prefill outputs against the reference over a cache written from scratch
        with every token cached before this step."""
        if decodes:
            assert table is not None and ctx is not None
            d = len(decodes)
            q = x[:d, : H * (R + P)].reshape(d, H, R + P)
            lat = x[:d, H * (R + P) :]
            want = mla_decode_append_reference(
                q[..., :R], q[..., R:], lat[:, :R], lat[:, R:], scratch_cache(before), table, ctx, ATTN.scale
            )
            self.compare(f"step {self.steps}: decode out", marked["attn_decode"][0], want)
        offset = len(decodes)
        for (s, k), got in zip(prefills, marked["attn_prefill"], strict=True):
            scratch = scratch_cache([(s, s.n)])
            nb = -(-(s.n + k) // BS)
            chunk = PrefillChunk(s.n, k, mx.array(s.blocks[:nb], mx.int32), mx.array(s.slots(s.n, s.n + k), mx.int32))
            alone = AttentionBatch(mx.arange(s.n, s.n + k, dtype=mx.int32), 0, None, None, [chunk], None)
            want = prefill_output(x[offset : offset + k], scratch, alone)
            self.compare(f"step {self.steps}: prefill out (start {s.n})", got, want)
            offset += k

    def compare(self, what: str, got: mx.array, want: mx.array) -> None:
        g, w = np.array(got.astype(mx.float32)), np.array(want.astype(mx.float32))
        ok = np.array_equal(g, w) if self.exact else np.allclose(g, w, rtol=2e-2, atol=2e-2)
        if not ok:
            self.failures.append(f"{what}: max abs diff {np.abs(g - w).max()}")

    def check_bytes(self) -> None:
        """The bytes of every live token equal a cache written from scratch."""
        live = [(s, s.n) for s in self.live]
        slots = [slot for s, n in live for slot in s.slots(0, n)]
        if not slots:
            return
        for name, got, want in zip(
            FIELDS, field_rows(self.cache, slots), field_rows(scratch_cache(live), slots), strict=True
        ):
            if not np.array_equal(got, want):
                bad = sorted({slots[i] for i in np.argwhere(got != want)[:, 0]})
                self.failures.append(f"step {self.steps}: {name} differs at slots {bad[:8]}")


# -- the engine's orderings ------------------------------------------------------------------


def prefill_then_decode(e: Engine) -> None:
    a, b, c = Seq(1, [0, 1]), Seq(2, [2]), Seq(3, [3, 4])
    d = Seq(4, [5, 6, 7, 8, 9])  # 5 blocks: the fused launcher splits it (split + combine)
    e.live += [a, b, c, d]
    e.step([], [(a, 20), (b, 5), (d, 40)])  # whole prompts and a first chunk
    e.step([a, b], [(c, 10), (d, 35)])  # chunks beside decodes
    e.step([a, b, d], [(c, 14)])  # the last chunk, over the first one's cached tokens
    for _ in range(3):
        e.step([a, b, c, d], [])


def decode_then_prefix_reuse(e: Engine) -> None:
    a = Seq(1, [0, 1])
    e.live.append(a)
    e.step([], [(a, 12)])
    for _ in range(4):  # decode appends fill block 0 (positions 12-15)
        e.step([a], [])
    # b's prompt starts with a's 16 tokens (block 0, full: a prefix hit); it reads them while a
    # keeps decoding into block 1 in the same step.
    b = Seq(2, [0, 5], n=16, prefix={p: 1 for p in range(16)})
    e.live.append(b)
    e.step([a], [(b, 6)])
    for _ in range(3):
        e.step([a, b], [])


def preemption_and_recompute(e: Engine) -> None:
    a, b = Seq(1, [0, 1]), Seq(2, [2, 4])
    e.live += [a, b]
    e.step([], [(a, 20), (b, 10)])
    for _ in range(4):  # a holds 24 tokens: block 0 full, block 1 half
        e.step([a, b], [])
    # a is preempted: its full block 0 stays cached, its partial block 1 is free again and c takes
    # it: c's prefill and decodes land over a's stale bytes.
    e.live.remove(a)
    n_a, a.blocks, a.n = a.n, [], 0
    c = Seq(3, [1])
    e.live.append(c)
    e.step([b], [(c, 5)])
    for _ in range(4):  # c's appends overwrite a's old tokens 21-23 one by one
        e.step([b, c], [])
    # a is recomputed: block 0 is a prefix hit, its other tokens re-prefill into a new block.
    a.blocks, a.n = [0, 3], BS
    e.live.append(a)
    e.step([b, c], [(a, n_a - BS)])
    for _ in range(3):
        e.step([a, b, c], [])


SCENARIOS = [prefill_then_decode, decode_then_prefix_reuse, preemption_and_recompute]


# -- backends ----------------------------------------------------------------------------------


def inplace_standin(copy_fields: bool = False) -> Callable[[str, Launch, int], Callable[..., list[mx.array]]]:
    """A `mla_decode._kernel` for the CPU: the fused launcher's contract, with the append written
    into the input buffers themselves (NumPy views), as the GPU kernel does behind MLX's back.
    `copy_fields`: the kernel gets copies of the fields (what MLX hands a kernel for an input that
    is not row-contiguous), so the append is lost: a planted bug."""
    pending: list[mx.array] = []
    launched: list[str] = []

    def kernel(backend: str, launch: Launch, smem: int) -> Callable[..., list[mx.array]]:
        def run(
            inputs: list[mx.array],
            template: list[tuple[str, Any]],
            output_shapes: list[tuple[int, ...]],
            output_dtypes: list[mx.Dtype],
            **_: Any,
        ) -> list[mx.array]:
            launched.append(launch.name)
            if launch.name == "combine":
                return [pending.pop()]
            named = dict(zip(launch.input_names, inputs, strict=True))
            consts = dict(template)
            mx.eval(*inputs)  # everything before the kernel has run (the fields are its inputs)
            nb = int(named["dims"][3].item())
            mine = LatentCache(nb, consts["BS"], consts["R"], consts["P"], consts["GS"], consts["T"])
            mine.packed, mine.scales, mine.biases, mine.k_pe = (mx.array(np.array(named[f])) for f in FIELDS)
            args = [named[n] for n in ("q_latent", "q_pe", "new_latent", "new_kpe")]
            out = mla_decode_append_reference(
                *args, mine, named["block_table"], named["context_lens"], float(named["params"][0].item())
            )
            slots, ok = append_slots(mine, named["block_table"], named["context_lens"])
            mx.eval(out, slots, ok, *mine.arrays())
            for f in FIELDS:
                target = mx.array(np.array(named[f])) if copy_fields else named[f]
                dst = np.array(target, copy=False).reshape(nb * consts["BS"], -1)  # a view
                src = np.array(getattr(mine, f)).reshape(nb * consts["BS"], -1)
                for slot, valid in zip(slots.tolist(), ok.tolist(), strict=True):  # type: ignore[union-attr]
                    if valid:  # the fused kernels drop an append into a bad block
                        dst[slot] = src[slot]
            if launch.name == "direct":
                return [out]
            pending.append(out)
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes, strict=True)]

        return run

    kernel.launched = launched  # type: ignore[attr-defined]
    return kernel


BACKENDS = ["reference", "inplace-standin", "device"]


@pytest.fixture
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    """(the parameter, the decode backend it runs)."""
    name: str = request.param
    if name == "reference":
        decode = "reference"
    elif name == "inplace-standin":
        kernel = inplace_standin()
        monkeypatch.setattr(mla_decode, "_kernel", kernel)
        decode = "cuda"  # the fused launcher, with the stand-in behind it
    else:
        decode = current_platform().defaults.decode_backend
    yield name, decode
    if name == "inplace-standin":  # the fused launcher ran, with the stand-in behind it
        assert {"direct", "split", "combine"} & set(kernel.launched)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_cache_bytes_equal_a_recomputation_after_every_step(
    backend: tuple[str, str], scenario: Callable[[Engine], None]
) -> None:
    name, decode = backend
    e = Engine(decode, exact=name != "device")
    scenario(e)
    assert e.steps >= 6
    assert e.failures == []


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_a_kernel_given_copies_of_the_fields_is_caught(
    monkeypatch: pytest.MonkeyPatch, scenario: Callable[[Engine], None]
) -> None:
    """Planted: the append lands in a copy (invariant 1 broken), so the cache misses it."""
    monkeypatch.setattr(mla_decode, "_kernel", inplace_standin(copy_fields=True))
    e = Engine("cuda", exact=True)
    scenario(e)
    assert any("differs at slots" in f for f in e.failures)
    assert any("decode out" in f or "prefill out" in f for f in e.failures)


def test_a_lost_reference_append_is_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Planted: the reference's append goes into a throwaway cache (a write MLX never sees)."""

    append = reference.append_guarded

    def lost(cache: LatentCache, *args: Any) -> None:
        append(LatentCache(cache.num_blocks, cache.block_size, cache.R, cache.P, cache.group_size, cache.dtype), *args)

    monkeypatch.setattr(reference, "append_guarded", lost)
    e = Engine("reference", exact=True)
    decode_then_prefix_reuse(e)
    assert any("differs at slots" in f for f in e.failures)
    assert any("prefill out" in f for f in e.failures)  # b read a's lost appends as its prefix
