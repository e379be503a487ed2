"""`edgekv bench tiers`: what the offloaded, compressed KV store costs and saves, in one run.

On one real ~8K-token document (Python's pydoc topics) and one question:
1. host bytes of the KV at each bit width, as a ratio to 16 bits (scales included);
2. a RAM budget below the KV size (forcing the disk tier) gives the same greedy tokens
   as the all-in-RAM run, with the bytes each tier served per token;
3. the persistent document cache: time to first token of a second question in a new
   engine (document KV loaded from disk) vs the first (document prefilled).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from .errors import EdgekvError


def _store_bytes(engine) -> int:
    """Bytes of the compressed rows held in RAM and on disk (the host-side KV)."""
    resident = engine.kv.store.resident_bytes()
    return resident["ram"] + resident["disk"]


def run_tiers_bench(model: str | None, *, doc_tokens: int, new_tokens: int, bits: list[int], plot: Path | None) -> dict:
    from .doccache import DocumentCache
    from .engine import load
    from .prefix_cache import ask_about_document
    from .report import ProgressBar
    from .sizes import format_size

    probe = load(model, progress=False)
    if doc_tokens + new_tokens + 64 > probe.max_context:
        raise EdgekvError(f"--doc-tokens {doc_tokens} + answer does not fit the model's {probe.max_context}-token context")
    from .bench_speed import prompt_ids

    document = probe.tokenizer.decode(prompt_ids(probe.tokenizer, doc_tokens))
    question = "Summarise the text above in three sentences."
    report: dict = {"doc_tokens": doc_tokens, "host_bytes": {}, "disk_run": {}, "doc_cache": {}}
    probe.close()

    def engine_with(**policy):
        return load(model, progress=False, **policy)

    # 1. host bytes per bit width (prefill only)
    for b in bits:
        print(f"[1/3] {b}-bit: prefill {doc_tokens} tokens", file=sys.stderr)
        engine = engine_with(kv_bits=b)
        engine.prefill(engine.encode(document + "\n\n" + question), ProgressBar(f"  {b}-bit"))
        report["host_bytes"][b] = _store_bytes(engine)
        engine.close()
    if 16 in report["host_bytes"]:
        report["host_ratio"] = {b: n / report["host_bytes"][16] for b, n in report["host_bytes"].items()}

    with tempfile.TemporaryDirectory(prefix="edgekv-bench-") as tmp:
        cache = DocumentCache(Path(tmp) / "docs")
        # 2. all in RAM (this also fills the document cache: the first question's TTFT)
        print("[2/3] 4-bit, all in RAM, first question (document prefilled and cached)", file=sys.stderr)
        in_ram = engine_with(kv_bits=4)
        first = ask_about_document(in_ram, document, question, cache=cache, max_new_tokens=new_tokens,
                                   ignore_eos=True, on_progress=ProgressBar("  prefill"))
        kv_host = _store_bytes(in_ram)
        layer_rows = in_ram.kv.num_kv_heads * in_ram.kv.max_blocks * in_ram.kv.codec.row_bytes
        in_ram.close()
        ram = max(layer_rows, kv_host // 3)
        print(f"[2/3] 4-bit, RAM budget {format_size(ram)} < KV {format_size(kv_host)}: spills to disk", file=sys.stderr)
        spilling = engine_with(kv_bits=4, ram_bytes=ram, disk_dir=str(Path(tmp) / "tier"))
        second_run = ask_about_document(spilling, document, question, cache=None, max_new_tokens=new_tokens,
                                        ignore_eos=True, on_progress=ProgressBar("  prefill"))
        spilling.close()
        report["disk_run"] = {
            "ram_budget": ram, "kv_host_bytes": kv_host,
            "tiers": second_run.stats["kv_bytes"], "read_per_token": second_run.stats.get("kv_read_bytes_per_token"),
            "gbps": second_run.stats.get("kv_gbps"),
            "identical_tokens": first.token_ids == second_run.token_ids,
            "decode_tok_s": {"ram": first.stats["decode_tok_s"], "disk": second_run.stats["decode_tok_s"]},
        }
        # 3. second question, new engine: the document comes from the cache
        print("[3/3] 4-bit, new engine, second question (document KV from the cache)", file=sys.stderr)
        again = engine_with(kv_bits=4)
        second = ask_about_document(again, document, "Which Python statements does the text describe?",
                                    cache=cache, max_new_tokens=new_tokens)
        again.close()
        report["doc_cache"] = {
            "first_ttft_s": first.stats["ttft_s"], "second_ttft_s": second.stats["ttft_s"],
            "speedup": first.stats["ttft_s"] / second.stats["ttft_s"],
            "second_source": second.stats.get("document_kv"),
        }
    print(format_report(report))
    return report


def format_report(r: dict) -> str:
    from .sizes import format_size

    lines = [f"document: {r['doc_tokens']} tokens", "host KV bytes (RAM + disk, scales included):"]
    for b, n in r["host_bytes"].items():
        ratio = r.get("host_ratio", {}).get(b)
        lines.append(f"  {b:>2}-bit  {format_size(n):>10}" + (f"  {ratio:.3f}x of 16-bit" if ratio else ""))
    d = r["disk_run"]
    lines.append(f"RAM budget {format_size(d['ram_budget'])} below the {format_size(d['kv_host_bytes'])} KV: "
                 f"tiers {', '.join(f'{k} {format_size(v)}' for k, v in d['tiers'].items())}; "
                 f"greedy tokens identical to all-in-RAM: {'yes' if d['identical_tokens'] else 'NO'}")
    if d.get("read_per_token"):
        lines.append("  read per token: " + ", ".join(f"{k} {format_size(v)}" for k, v in d["read_per_token"].items())
                     + f"; decode {d['decode_tok_s']['ram']:.1f} tok/s in RAM vs {d['decode_tok_s']['disk']:.1f} tok/s spilling")
    c = r["doc_cache"]
    lines.append(f"document cache: TTFT first question {c['first_ttft_s']:.2f} s, second question (new engine, "
                 f"KV from {c['second_source']}) {c['second_ttft_s']:.2f} s: {c['speedup']:.1f}x lower")
    return "\n".join(lines)
