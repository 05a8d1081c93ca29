import time, statistics, torch, tempfile, sys
from pathlib import Path
import numpy as np, gguf
from tandem.deploy.pack_grid import join_pack_gguf
from tandem.actors import ggml_kernel as G
torch.set_num_threads(2)
name = sys.argv[1] if len(sys.argv) > 1 else "qwen2.5-coder-1.5b-instruct"
tmp = Path(tempfile.mkdtemp())
p = join_pack_gguf(name, tmp / "m.gguf")
rd = gguf.GGUFReader(str(p))
want = {"output.weight", "token_embd.weight", "blk.0.ffn_down.weight", "blk.0.attn_v.weight", "blk.1.ffn_down.weight"}
ts = {t.name: t for t in rd.tensors if t.name in want}
for n, t in ts.items(): print(n, t.tensor_type.name, t.shape.tolist(), t.data.shape)
ext = G._ext()
def bench(lin, rows, reps=30):
    x = torch.randn(rows, lin_in, dtype=torch.bfloat16)
    for _ in range(3): lin.forward(x, 2)
    ts_ = []
    for _ in range(reps):
        t = time.perf_counter(); lin.forward(x, 2); ts_.append(time.perf_counter() - t)
    return statistics.median(ts_) * 1000
for n in ("output.weight", "token_embd.weight", "blk.0.ffn_down.weight", "blk.1.ffn_down.weight"):
    if n not in ts: continue
    t = ts[n]; data = torch.from_numpy(np.array(t.data)).contiguous()
    if t.tensor_type.name != "Q6_K": print(n, "is", t.tensor_type.name); continue
    lin_in = int(t.shape[0]); out = int(t.shape[1])
    q6 = ext.Linear(data.view(torch.uint8).reshape(out, -1), 14, lin_in, True, True)
    w = torch.from_numpy(gguf.quants.dequantize(np.array(t.data), t.tensor_type)).reshape(out, lin_in)
    q8 = G.GgmlLinear(G.quantize_rows(w, "Q8_0"), "Q8_0", lin_in).impl
    print(n, "layouts", q6.layout, q8.layout, flush=True)
    for rows in (1, 2, 4, 5):
        a = []; b = []
        for rep in range(3):
            a.append(bench(q6, rows)); b.append(bench(q8, rows))
        print(f"  {rows} rows: Q6_K {min(a):.2f} ms, Q8_0 {min(b):.2f} ms", flush=True)
