"""PyTorch CPU peer for bench/forward.bench.ts: fp32 GEMM 1024^3 and the no-grad forward of a
GPT-2-124M-shaped random model with a soft prompt (P=20) in front, B=4, 128 positions, all threads.
Prints one JSON line per figure (median of runs), like ../shared/peers/cpu_peer.py."""
import json, sys, time
import torch
from timing import med

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.manual_seed(0); torch.set_num_threads(threads)
out = lambda **kw: print(json.dumps(kw), flush=True)

out(torch=torch.__version__, threads=torch.get_num_threads())
a = torch.randn(1024, 1024); b = torch.randn(1024, 1024)
ms = med(lambda: a @ b, iters=20); out(what="gemm_fp32_1024", ms=ms, gflops=2 * 1024**3 / ms / 1e6)

from transformers import GPT2Config, GPT2LMHeadModel
m = GPT2LMHeadModel(GPT2Config()).eval()
B, T, P = 4, 128, 20
ids = torch.randint(0, 50257, (B, T - P)); prompt = torch.randn(P, 768) * 0.02
def fwd():
    with torch.no_grad():
        x = torch.cat([prompt.expand(B, -1, -1), m.transformer.wte(ids)], 1)
        return m(inputs_embeds=x).logits
ms = med(fwd, iters=5)
out(what="gpt2_124M_forward", B=B, T=T, ms=ms, tok_s=B * T / ms * 1e3)
