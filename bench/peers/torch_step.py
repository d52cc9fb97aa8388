"""PyTorch CPU peer for bench/step.bench.ts: one prompt-tuning step (loss + backward to the prompt +
AdamW) with a frozen model, P=20 soft-prompt vectors, labels on every token, fp32, as in the anchors'
cpu_peer.py. Usage: torch_step.py THREADS MODEL B POSITIONS, MODEL in {gpt2-124M, llama-5M}.
Prints one JSON line (median of runs)."""
import json, resource, sys, time
import torch
from timing import med

threads, kind, B, T = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0); torch.set_num_threads(threads)

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
if kind == "gpt2-124M":
    m = GPT2LMHeadModel(GPT2Config()).eval(); emb = m.transformer.wte; d, V = 768, 50257
else:
    cfg = LlamaConfig(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg).eval(); emb = m.model.embed_tokens; d, V = 256, 8192
for p in m.parameters(): p.requires_grad_(False)
P = 20
prompt = torch.nn.Parameter(torch.randn(P, d) * 0.02); opt = torch.optim.AdamW([prompt], lr=5e-3)
ids = torch.randint(0, V, (B, T - P)); labels = torch.cat([torch.full((B, P), -100), ids], 1)
def step():
    x = torch.cat([prompt.expand(B, -1, -1), emb(ids)], 1)
    loss = m(inputs_embeds=x, labels=labels).loss; loss.backward(); opt.step(); opt.zero_grad()
ms = med(step, iters=3 if kind == "gpt2-124M" else 7)
print(json.dumps(dict(what="step", model=kind, B=B, T=T, ms=ms, tok_s=B * T / ms * 1e3,
                      max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      torch=torch.__version__, threads=torch.get_num_threads())), flush=True)
