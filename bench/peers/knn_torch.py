"""Exact kNN peers for bench/knn.bench.ts: PyTorch (matmul + topk) and FAISS (IndexFlatIP on normalised rows
for cosine), fp32 on the CPU, one JSON line per figure (median of runs), the same recipe as
shared/peers/cpu_peer.py: the vocabulary is normalised outside the timed region, the queries inside; the
one-shot figures (torch_cos_once, torch_l2_once: beside our nearestNeighbors) time the vocabulary's
normalisation or squared norms too.
usage: knn_torch.py THREADS Q V D K [self_chunk_rows]"""
import json
import sys

import torch
from timing import med

threads, Q, V, d, k = (int(a) for a in sys.argv[1:6])
self_chunk = int(sys.argv[6]) if len(sys.argv) > 6 else 0
torch.manual_seed(0)
torch.set_num_threads(threads)


def out(**kw):
    print(json.dumps(kw), flush=True)


out(torch=torch.__version__, threads=torch.get_num_threads())
E = torch.randn(V, d)
q = torch.randn(Q, d)
En = torch.nn.functional.normalize(E, dim=1)
ms = med(lambda: (torch.nn.functional.normalize(q, dim=1) @ En.T).topk(k), iters=7)
out(what="torch_cos", ms=ms)
e2 = (E * E).sum(1)
ms = med(lambda: ((q * q).sum(1, keepdim=True) - 2 * (q @ E.T) + e2).topk(k, largest=False), iters=7)
out(what="torch_l2", ms=ms)
ms = med(
    lambda: (torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(E, dim=1).T).topk(k), iters=5
)
out(what="torch_cos_once", ms=ms)
ms = med(lambda: ((q * q).sum(1, keepdim=True) - 2 * (q @ E.T) + (E * E).sum(1)).topk(k, largest=False), iters=5)
out(what="torch_l2_once", ms=ms)
try:
    import faiss

    faiss.omp_set_num_threads(threads)
    idx = faiss.IndexFlatIP(d)
    idx.add(En.numpy())
    qn = q.numpy()

    def faiss_cos():
        x = qn / (1e-30 + (qn * qn).sum(1, keepdims=True) ** 0.5)
        idx.search(x, k)

    out(what="faiss_cos", ms=med(faiss_cos, iters=7))
except ImportError as e:
    out(what="faiss_cos", error=str(e))
if self_chunk:
    rows = En[:self_chunk]

    def chunk():
        s = rows @ En.T
        s[torch.arange(self_chunk), torch.arange(self_chunk)] = -2.0  # exclude each row itself
        s.topk(k)

    out(what="torch_self_chunk", rows=self_chunk, ms=med(chunk, warm=1, iters=3))
