"""`paratrain-export CHECKPOINT OUT.safetensors`: one consolidated file of the model, from any checkpoint.

    paratrain-export outputs/run1/checkpoints/step000600 model.safetensors
    paratrain-export outputs/run1 model.safetensors          # the run's newest checkpoint
    paratrain-export outputs/run1 hf-model --format hf       # a Hugging Face directory (trainer/hf.py)

`--format hf` writes OUT as a directory that `transformers.AutoModelForCausalLM.from_pretrained(OUT)`
loads without custom code: the dense model as Llama, the MoE model as Mixtral, or as Qwen2-MoE when
its shared expert is gated (an option none of them has is an error, exit 2, that names it). The run's tokenizer file, if any, is copied beside it.

Whatever mesh wrote the checkpoint, the file holds the plain model's state dict (`tok_emb.weight`,
`layers.0.ffn.experts.w1` stacked (E, d, h), ...) and loads with `load_exported` or with
`Transformer(cfg).load_state_dict(safetensors.torch.load_file(...))`. The model config travels in
the file's metadata (`paratrain.model_config`, JSON); `OUT.json` beside it holds the whole run config.
No optimizer state, no pickle.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..strategies import portable_state as ckpt
from . import hf, tokenizer
from .checkpoint_files import find_checkpoint
from .errors import ConfigError

FORMAT = "paratrain-export/1"
PREFIX = "model."  # the LightningModule holds the plain model as `.model`


def export(checkpoint, out, fmt: str = "paratrain") -> Path:
    """Write the model of `checkpoint` (a checkpoint or run directory) to `out`; returns `out`."""
    from safetensors.torch import save_file

    path = find_checkpoint(checkpoint, what="CHECKPOINT")
    meta = ckpt.verify(path)
    config = (meta.get("paratrain") or {}).get("config")
    if not config or "model" not in config:
        raise ConfigError(f"checkpoint {path} records no model config: it cannot be exported as a usable model.")
    if fmt == "hf":
        hf.to_hf_config(OmegaConf.create(config["model"]))  # an unmappable option fails before the weights are read
    state = {k[len(PREFIX):]: v.contiguous() for k, v in ckpt.consolidated_model_state(path).items()
             if k.startswith(PREFIX)}
    if fmt == "hf":
        return export_hf(state, config, out)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "paratrain.model_config": json.dumps(config["model"]),
                "paratrain.step": str(meta.get("global_step")), "paratrain.checkpoint": str(path)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.chmod(0o644)  # safetensors writes 0600: an exported model is meant to be shared
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"format": FORMAT, "step": meta.get("global_step"), "checkpoint": str(path), "config": config}, indent=2) + "\n")
    return out


def export_hf(state: dict, config: dict, out) -> Path:
    out = hf.save_hf(state, OmegaConf.create(config["model"]), out, hf.max_position(config["data"]["seq_len"]))
    spec = (config.get("data") or {}).get("tokenizer")
    if not tokenizer.is_bytes(spec):
        if Path(spec).expanduser().is_file():  # AutoTokenizer.from_pretrained(out) then loads it
            shutil.copyfile(Path(spec).expanduser(), out / "tokenizer.json")
            (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}) + "\n")
        else:
            print(f"warning: the run's data.tokenizer={spec} is not here; copy it to {out}/tokenizer.json yourself",
                  file=sys.stderr)
    return out


def load_exported(path, device="cpu"):
    """(model, model config) from an exported file: a fresh Transformer holding the exported weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models.transformer import build_model

    with safe_open(str(path), framework="pt") as f:
        model_cfg = OmegaConf.create(json.loads(f.metadata()["paratrain.model_config"]))
    model = build_model(model_cfg, seed=0, device=device)  # weights replaced right below
    model.load_state_dict(load_file(str(path), device=str(device)), strict=True)
    return model, model_cfg


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="paratrain-export", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="checkpoint directory, or a run directory (its newest checkpoint)")
    parser.add_argument("out", help="output .safetensors file (OUT.json is written beside it); a directory for --format hf")
    parser.add_argument("--format", choices=("paratrain", "hf"), default="paratrain",
                        help="paratrain: one safetensors file (default); hf: a Hugging Face Llama/Mixtral/Qwen2-MoE directory")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, args.format)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    if args.format == "hf":
        print(f"wrote {out}/ (config.json, model.safetensors): load it with "
              f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    else:
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
