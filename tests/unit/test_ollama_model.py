"""Pure parts of hack/ollama_model.py: the import cache key and the isolated server environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from hack import ollama_model

pytestmark = pytest.mark.unit


def test_store_key_changes_with_every_input() -> None:
    base = ollama_model.store_key("0.17.4", "abc", "FROM ./x.gguf")
    assert base == ollama_model.store_key("0.17.4", "abc", "FROM ./x.gguf")
    assert base != ollama_model.store_key("0.17.5", "abc", "FROM ./x.gguf")
    assert base != ollama_model.store_key("0.17.4", "abd", "FROM ./x.gguf")
    assert base != ollama_model.store_key("0.17.4", "abc", "FROM ./x.gguf\nPARAMETER top_k 1")


def test_server_env_binds_loopback_and_inherits_no_ollama_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "0.0.0.0:11434")
    monkeypatch.setenv("OLLAMA_MODELS", "/home/someone/.ollama/models")
    env = ollama_model.server_env(Path("/tmp/models"), 4321, Path("/tmp/home"))
    assert env["OLLAMA_HOST"] == "127.0.0.1:4321"
    assert env["OLLAMA_MODELS"] == "/tmp/models"
    assert env["HOME"] == "/tmp/home"
    assert set(env) == {"PATH", "HOME", "OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_KEEP_ALIVE", "OLLAMA_NO_CLOUD",
                        "OLLAMA_NOPRUNE"}  # fmt: skip


def test_modelfile_imports_the_packaged_gguf_with_gemma_turns() -> None:
    text = ollama_model.MODELFILE.read_text()
    assert "FROM ./gemma-3-270m-q4_k_m.gguf" in text
    assert "<start_of_turn>user" in text
    assert "<start_of_turn>model" in text
    assert 'PARAMETER stop "<end_of_turn>"' in text
