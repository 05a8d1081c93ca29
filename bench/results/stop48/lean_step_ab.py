"""Stop 48: one-row steps of a pack runner with the lean forward (actors/lean_layers.py) against the
general one, interleaved. Usage: python lean_step_ab.py <pack name>"""
import time, statistics, torch, sys
from tandem.deploy.models import ModelSpec, build_runner
torch.set_num_threads(2)
ref = sys.argv[1]
r = build_runner(ModelSpec(ref=ref, dtype="bfloat16", device="cpu", quantize="pack"))
keep = r._lean
s = r.new_sequence(512); r.prefill(s, list(range(1000, 1150)))
def run(on, N=20):
    r._lean = keep if on else None
    r.rollback(s, 150); t = time.perf_counter()
    for _ in range(N): int(r.extend_batch([s], [[7]])[0][-1].argmax())
    return (time.perf_counter() - t) / N * 1000
run(True, 5); run(False, 5)
A, B = [], []
for rep in range(10):
    if rep % 2: A.append(run(True)); B.append(run(False))
    else: B.append(run(False)); A.append(run(True))
print(ref, f"lean {statistics.median(A):.2f} general {statistics.median(B):.2f} ms; paired general-lean", sorted(round(b - a, 2) for a, b in zip(A, B)))
