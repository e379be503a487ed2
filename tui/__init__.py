"""The `edgekv chat` terminal app (textual)."""
