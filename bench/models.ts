// Random-weight models in Hugging Face layout for benchmarks (shapes matter, values do not).
// Written once to the OS temp directory and reused by later runs.
import { existsSync, mkdirSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TensorToWrite, writeSafetensorsAtomic } from "../lib/safetensors.js";

export type BenchModel = "gpt2-124M" | "llama-5M";

function randomNormal(n: number, std: number, seed: number): Float32Array {
  const out = new Float32Array(n);
  let s = seed >>> 0 || 1;
  const next = () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return (s + 0.5) / 4294967296;
  };
  for (let i = 0; i < n; i += 2) {
    const r = Math.sqrt(-2 * Math.log(next()));
    const t = 2 * Math.PI * next();
    out[i] = r * Math.cos(t) * std;
    if (i + 1 < n) out[i + 1] = r * Math.sin(t) * std;
  }
  return out;
}

export function benchModelDir(kind: BenchModel): string {
  const dir = join(tmpdir(), "priortune-bench", kind);
  if (existsSync(join(dir, "model.safetensors"))) return dir;
  mkdirSync(dir, { recursive: true });
  const tensors: TensorToWrite[] = [];
  let seed = 1;
  const add = (name: string, shape: number[], std = 0.02, fill?: number) => {
    const n = shape.reduce((a, b) => a * b, 1);
    const data = fill === undefined ? randomNormal(n, std, seed++) : new Float32Array(n).fill(fill);
    tensors.push({ name, dtype: "F32", shape, data });
  };
  if (kind === "gpt2-124M") {
    const C = 768;
    const config = {
      architectures: ["GPT2LMHeadModel"],
      model_type: "gpt2",
      vocab_size: 50257,
      n_embd: C,
      n_layer: 12,
      n_head: 12,
      n_positions: 1024,
      layer_norm_epsilon: 1e-5,
      activation_function: "gelu_new",
    };
    writeFileSync(join(dir, "config.json"), JSON.stringify(config, null, 2));
    add("wte.weight", [50257, C]);
    add("wpe.weight", [1024, C], 0.01);
    add("ln_f.weight", [C], 0, 1);
    add("ln_f.bias", [C], 0, 0);
    for (let l = 0; l < 12; l++) {
      const h = `h.${l}.`;
      add(`${h}ln_1.weight`, [C], 0, 1);
      add(`${h}ln_1.bias`, [C], 0, 0);
      add(`${h}attn.c_attn.weight`, [C, 3 * C]);
      add(`${h}attn.c_attn.bias`, [3 * C], 0, 0);
      add(`${h}attn.c_proj.weight`, [C, C]);
      add(`${h}attn.c_proj.bias`, [C], 0, 0);
      add(`${h}ln_2.weight`, [C], 0, 1);
      add(`${h}ln_2.bias`, [C], 0, 0);
      add(`${h}mlp.c_fc.weight`, [C, 4 * C]);
      add(`${h}mlp.c_fc.bias`, [4 * C], 0, 0);
      add(`${h}mlp.c_proj.weight`, [4 * C, C]);
      add(`${h}mlp.c_proj.bias`, [C], 0, 0);
    }
  } else {
    // The anchors' Llama-shaped 5M model: d=256, 4 layers, GQA 8/4, vocab 8192, intermediate 704, tied.
    const C = 256;
    const I = 704;
    const config = {
      architectures: ["LlamaForCausalLM"],
      model_type: "llama",
      vocab_size: 8192,
      hidden_size: C,
      intermediate_size: I,
      num_hidden_layers: 4,
      num_attention_heads: 8,
      num_key_value_heads: 4,
      tie_word_embeddings: true,
      rms_norm_eps: 1e-6,
      rope_theta: 10000,
      max_position_embeddings: 2048,
      hidden_act: "silu",
    };
    writeFileSync(join(dir, "config.json"), JSON.stringify(config, null, 2));
    add("model.embed_tokens.weight", [8192, C]);
    add("model.norm.weight", [C], 0, 1);
    for (let l = 0; l < 4; l++) {
      const h = `model.layers.${l}.`;
      add(`${h}input_layernorm.weight`, [C], 0, 1);
      add(`${h}post_attention_layernorm.weight`, [C], 0, 1);
      add(`${h}self_attn.q_proj.weight`, [C, C]);
      add(`${h}self_attn.k_proj.weight`, [C / 2, C]);
      add(`${h}self_attn.v_proj.weight`, [C / 2, C]);
      add(`${h}self_attn.o_proj.weight`, [C, C]);
      add(`${h}mlp.gate_proj.weight`, [I, C]);
      add(`${h}mlp.up_proj.weight`, [I, C]);
      add(`${h}mlp.down_proj.weight`, [C, I]);
    }
  }
  // Atomic: an interrupted write must not leave a file the existence check above takes as a cached model.
  writeSafetensorsAtomic(join(dir, "model.safetensors"), tensors);
  return dir;
}
