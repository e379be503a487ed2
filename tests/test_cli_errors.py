"""Bad input gets one clear line on stderr and exit code 2 — never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from edgekv.cli import app

runner = CliRunner()


def run(*args: str, input: str | None = None):
    return runner.invoke(app, list(args), input=input)


def assert_user_error(result, *needles: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


@pytest.fixture
def doc(tmp_path):
    p = tmp_path / "doc.txt"
    p.write_text("Edgekv keeps the KV cache in RAM and on disk. The sky is green in this story.\n")
    return p


def test_missing_document(tmp_path):
    assert_user_error(run("generate", str(tmp_path / "nope.txt"), "-p", "q"), "not found", "nope.txt")


def test_directory_instead_of_document(tmp_path):
    assert_user_error(run("generate", str(tmp_path), "-p", "q"), "is a directory")


def test_binary_document(tmp_path):
    p = tmp_path / "blob.bin"
    p.write_bytes(b"\x7fELF\x00\x01\x02" * 10)
    assert_user_error(run("generate", str(p), "-p", "q"), "binary")


def test_non_utf8_document(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    assert_user_error(run("generate", str(p), "-p", "q"), "not UTF-8")


def test_empty_document(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n ")
    assert_user_error(run("generate", str(p), "-p", "q"), "empty")


def test_empty_prompt(doc):
    assert_user_error(run("generate", str(doc), "-p", "   "), "empty prompt")


@pytest.mark.parametrize("option, value, needle", [
    ("--max-new-tokens", "0", "max-new-tokens"),
    ("--temperature", "-1", "temperature"),
    ("--block-size", "0", "block_size"),
    ("--device", "tpu", "device"),
    ("--dtype", "float8", "dtype"),
    ("--weight-dtype", "int4", "weight_dtype"),
    ("--truncate", "sideways", "sideways"),
])
def test_invalid_option_values(doc, option, value, needle):
    assert_user_error(run("generate", str(doc), "-p", "q", option, value), needle)


def test_missing_model_path(doc, tmp_path):
    assert_user_error(run("generate", str(doc), "-p", "q", "--model", str(tmp_path / "no-model")), "model path not found")


def test_model_folder_without_config(doc, tmp_path):
    (tmp_path / "m").mkdir()
    assert_user_error(run("generate", str(doc), "-p", "q", "--model", str(tmp_path / "m")), "no config.json")


def test_gguf_with_bad_magic(doc, tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"NOPE" + b"\x00" * 100)
    assert_user_error(run("generate", str(doc), "-p", "q", "--model", str(p)), "not a GGUF file")


def test_truncated_gguf(doc, tmp_path, embedded_source):
    from edgekv.loader import embedded_model_file

    p = tmp_path / "cut.gguf"
    with open(embedded_model_file(), "rb") as src:
        p.write_bytes(src.read(2_000_000))  # header intact, tensors cut off
    result = run("generate", str(doc), "-p", "q", "--model", str(p))
    assert_user_error(result, "cut.gguf", "truncated or corrupt")


def test_corrupt_safetensors(doc, tmp_path, tiny_models):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_models["llama3"], broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_user_error(run("generate", str(doc), "-p", "q", "--model", str(broken)), "corrupt or truncated")


def test_unsupported_architecture(doc, tmp_path, tiny_models):
    other = tmp_path / "gpt2ish"
    shutil.copytree(tiny_models["llama3"], other)
    config = json.loads((other / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(config))
    assert_user_error(run("generate", str(doc), "-p", "q", "--model", str(other)), "unsupported architecture")


def test_input_longer_than_context_names_both_counts(tmp_path, tiny_models, long_text):
    p = tmp_path / "long.txt"
    p.write_text(long_text[:20000])  # ~5K tokens; the tiny model's context is 2048
    result = run("generate", str(p), "-p", "Summarise.", "--model", str(tiny_models["llama3"]), "-n", "8")
    assert_user_error(result, "2048", "--truncate")
    assert any(ch.isdigit() for ch in result.stderr.split("2048")[0])  # the prompt's own count first


@pytest.mark.parametrize("mode", ["head", "tail", "middle"])
def test_truncate_makes_a_long_input_fit(tmp_path, tiny_models, long_text, mode):
    p = tmp_path / "long.txt"
    p.write_text(long_text[:12000])
    stats = tmp_path / "stats.json"
    result = run("generate", str(p), "-p", "Summarise.", "--model", str(tiny_models["llama3"]), "-n", "4",
                 "--truncate", mode, "--stats-json", str(stats))
    assert result.exit_code == 0, result.output
    figures = json.loads(stats.read_text())
    assert figures["prompt_tokens"] + 4 <= 2048
    assert figures["prompt_tokens"] > 1900  # cut to fit, not emptied


def test_stdin_document_streams_answer_and_summary(tiny_models, tmp_path):
    stats = tmp_path / "stats.json"
    result = run("generate", "-", "-p", "What colour is the sky?", "--model", str(tiny_models["qwen2"]),
                 "-n", "5", "--stats-json", str(stats), input="The sky is green in this story.\n")
    assert result.exit_code == 0, result.output
    figures = json.loads(stats.read_text())
    for key in ("prompt_tokens", "generated_tokens", "ttft_s", "prefill_tok_s", "decode_tok_s", "kv_bytes"):
        assert key in figures
    assert figures["generated_tokens"] >= 1
    assert "prompt" in result.stderr and "TTFT" in result.stderr and "decode" in result.stderr


def test_real_process_exits_2_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgekv", "generate", str(tmp_path / "missing.txt"), "-p", "q"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: document not found")
    assert "Traceback" not in proc.stderr
