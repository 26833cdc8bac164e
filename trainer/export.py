"""`paratrain-export CHECKPOINT OUT.safetensors`: one consolidated file of the model, from any checkpoint.

    paratrain-export outputs/run1/checkpoints/step000600 model.safetensors
    paratrain-export outputs/run1 model.safetensors          # the run's newest checkpoint

Whatever mesh wrote the checkpoint, the file holds the plain model's state dict (`tok_emb.weight`,
`layers.0.ffn.experts.w1` stacked (E, d, h), ...) and loads with `load_exported` or with
`Transformer(cfg).load_state_dict(safetensors.torch.load_file(...))`. The model config travels in
the file's metadata (`paratrain.model_config`, JSON); `OUT.json` beside it holds the whole run config.
No optimizer state, no pickle.
"""

import argparse
import json
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from ..strategies import portable_state as ckpt
from .checkpoint_files import find_checkpoint
from .errors import ConfigError

FORMAT = "paratrain-export/1"
PREFIX = "model."  # the LightningModule holds the plain model as `.model`


def export(checkpoint, out) -> Path:
    """Write the model of `checkpoint` (a checkpoint or run directory) to `out`; returns `out`."""
    from safetensors.torch import save_file

    path = find_checkpoint(checkpoint, what="CHECKPOINT")
    meta = ckpt.verify(path)
    config = (meta.get("paratrain") or {}).get("config")
    if not config or "model" not in config:
        raise ConfigError(f"checkpoint {path} records no model config: it cannot be exported as a usable model.")
    state = {k[len(PREFIX):]: v.contiguous() for k, v in ckpt.consolidated_model_state(path).items()
             if k.startswith(PREFIX)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": FORMAT, "paratrain.model_config": json.dumps(config["model"]),
                "paratrain.step": str(meta.get("global_step")), "paratrain.checkpoint": str(path)}
    tmp = out.with_name(out.name + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    umask = os.umask(0)  # read it (os has no getter) and put it back
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # safetensors creates its file 0600; like our other files, it gets the umask's mode
    tmp.replace(out)
    out.with_suffix(".json").write_text(json.dumps(
        {"format": FORMAT, "step": meta.get("global_step"), "checkpoint": str(path), "config": config}, indent=2) + "\n")
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
    parser.add_argument("out", help="output .safetensors file (OUT.json is written beside it)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out)
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(ConfigError.exit_code)
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
