"""PyTorch CPU peer for bench/generate.bench.ts: Transformers' greedy generate() (key/value cache) of a
GPT-2-124M-shaped random model with a soft prompt (P=20) in front of B sequences of T tokens, 16 new tokens
(no early stop), all threads. Prints one JSON line per batch size (median of runs)."""
import json, sys, time
import torch
from timing import med

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
T = int(sys.argv[2]) if len(sys.argv) > 2 else 100
batches = [int(b) for b in (sys.argv[3] if len(sys.argv) > 3 else "2,16").split(",")]
torch.manual_seed(0); torch.set_num_threads(threads)
out = lambda **kw: print(json.dumps(kw), flush=True)

from transformers import GPT2Config, GPT2LMHeadModel
import transformers
out(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
m = GPT2LMHeadModel(GPT2Config()).eval()
P, NEW = 20, 16
prompt = torch.randn(P, 768) * 0.02

for B in batches:
    ids = torch.randint(0, 50257, (B, T))
    def gen():
        with torch.no_grad():
            x = torch.cat([prompt.expand(B, -1, -1), m.transformer.wte(ids)], 1)
            mask = torch.ones(B, P + T, dtype=torch.long)
            return m.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                              do_sample=False, pad_token_id=0)
    ms = med(gen, iters=3)
    out(what="gpt2_124M_generate", B=B, T=T, P=P, new=NEW, ms=ms, ms_per_example=ms / B)
