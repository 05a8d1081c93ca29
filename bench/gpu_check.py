"""`make gpu-check`: on a machine with a GPU, show that tandem's runtime runs there.

Three steps, under 5 minutes on one GPU, then one summary line (and
bench/results/gpu_check.json):
1. the runtime and lossless tests on CUDA (tests/runtime, their "cuda" parameter: runner
   against transformers, every method's greedy equality and sampled distribution);
2. greedy fidelity on the real packs in float32 on CUDA: sd output equals target-only
   output token for token (3 code prompts x 48 tokens);
3. a short speed run in bf16 on CUDA: target-only (ar) and sd, tokens/s and their ratio.

Without a visible CUDA device it says so and exits 2 (nothing is run, nothing is claimed).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "bench" / "eval" / "code_dev.jsonl"


def say(msg: str) -> None:
    print(f"[gpu-check] {msg}", file=sys.stderr, flush=True)


def run_tests(timeout_s: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/runtime", "-k", "cuda"]
    say("1/3 runtime and lossless tests on CUDA: " + " ".join(cmd[2:]))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired:
        tail, ok = [f"timed out after {timeout_s:.0f} s"], False
    passed = re.search(r"(\d+) passed", tail[0])
    failed = re.search(r"(\d+) failed", tail[0])
    return {
        "ok": ok and passed is not None,
        "passed": int(passed.group(1)) if passed else 0,
        "failed": int(failed.group(1)) if failed else 0,
        "summary": tail[0],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def prompts(tokenizer, n: int) -> list[list[int]]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()][:n]
    return [
        tokenizer.apply_chat_template([{"role": "user", "content": r["turns"][0]}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for r in rows
    ]


def engine_for(dtype: str, quantize: str | None):
    from tandem.actors.local import LocalEngine, ThreadSplit
    from tandem.deploy.models import ModelSpec, build_runner
    from tandem.deploy.packs import DEFAULT_DRAFT, DEFAULT_TARGET

    target = build_runner(ModelSpec(ref=DEFAULT_TARGET, dtype=dtype, device="cuda"))
    draft = build_runner(ModelSpec(ref=DEFAULT_DRAFT, dtype=dtype, device="cuda", quantize=quantize, exit_adapters="none"))
    return LocalEngine(target, draft, threads=1, split=ThreadSplit(target=1, draft=1))


def fidelity(n_prompts: int, n_tokens: int) -> dict:
    from tandem.deploy.models import tokenizer_for
    from tandem.deploy.packs import DEFAULT_TARGET

    say(f"2/3 greedy fidelity, float32 on CUDA: sd == target-only on {n_prompts} prompts x {n_tokens} tokens")
    tok = tokenizer_for(DEFAULT_TARGET)
    with engine_for("float32", None) as eng:
        equal = 0
        for p in prompts(tok, n_prompts):
            ref = eng.generate(p, method="ar", max_new_tokens=n_tokens).tokens
            out = eng.generate(p, method="sd", max_new_tokens=n_tokens, draft_len=5).tokens
            equal += out == ref
    return {"ok": equal == n_prompts, "equal": equal, "prompts": n_prompts, "tokens": n_tokens}


def speed(n_prompts: int, n_tokens: int) -> dict:
    from tandem.deploy.models import tokenizer_for
    from tandem.deploy.packs import DEFAULT_TARGET

    say(f"3/3 speed, bf16 on CUDA: ar and sd, {n_prompts} prompts x {n_tokens} tokens")
    tok = tokenizer_for(DEFAULT_TARGET)
    ids = prompts(tok, n_prompts)
    rates: dict[str, float] = {}
    with engine_for("bfloat16", "int4") as eng:
        eng.generate(ids[0], method="sd", max_new_tokens=8)  # warm-up (kernels, allocator)
        for method in ("ar", "sd"):
            tokens, t0 = 0, time.perf_counter()
            for p in ids:
                tokens += len(eng.generate(p, method=method, max_new_tokens=n_tokens).tokens)
            torch.cuda.synchronize()
            rates[method] = tokens / (time.perf_counter() - t0)
        kernel = eng.draft.kernel
    return {"ar_tok_s": round(rates["ar"], 2), "sd_tok_s": round(rates["sd"], 2), "sd_vs_ar": round(rates["sd"] / rates["ar"], 2), "draft_kernel": kernel}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "gpu_check.json"))
    ap.add_argument("--test-timeout", type=float, default=150.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"gpu-check: NOT RUN: no CUDA device visible (torch {torch.__version__}, CUDA build {torch.version.cuda})")
        return 2
    name = torch.cuda.get_device_name(0)
    t0 = time.perf_counter()
    result = {"device": name, "torch": torch.__version__, "tests": run_tests(args.test_timeout)}
    try:
        result["fidelity"] = fidelity(3, 48)
        result["speed"] = speed(3, 64)
    except Exception as exc:  # noqa: BLE001 - reported in the summary line
        result["error"] = f"{type(exc).__name__}: {exc}"
    result["seconds"] = round(time.perf_counter() - t0, 1)
    ok = result["tests"]["ok"] and result.get("fidelity", {}).get("ok", False) and "error" not in result
    result["ok"] = bool(ok)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    s = result.get("speed", {})
    f = result.get("fidelity", {})
    print(
        f"gpu-check: {'PASS' if ok else 'FAIL'} on {name}: tests {result['tests']['summary']}; "
        f"float32 greedy sd == ar on {f.get('equal', 0)}/{f.get('prompts', 0)} prompts; "
        f"bf16 ar {s.get('ar_tok_s', '-')} tok/s, sd {s.get('sd_tok_s', '-')} tok/s ({s.get('sd_vs_ar', '-')}x); "
        f"{result['seconds']:.0f} s" + (f"; error: {result['error']}" if "error" in result else "")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
