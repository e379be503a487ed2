"""edgekv: long-context LLM inference with an offloaded, compressed KV cache."""
