"""Tier 1: every group option and recipe composes against the schema and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from paratrain.strategies import MeshStrategy
from paratrain.trainer.models.transformer import build_model
from paratrain.trainer.module import build_optimizer
from paratrain.trainer.recipes import recipe_names, register_recipes
from paratrain.trainer.schema import register_configs
from paratrain.trainer.validate import validate

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ["model", "strategy", "optimizer", "data", "cluster", "trainer", "logger"]


def options(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.fixture(scope="module", autouse=True)
def hydra_ctx():
    register_configs()
    register_recipes()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def compose_run(*overrides):
    return compose(config_name="config", overrides=list(overrides))


def test_recipes_and_groups_exist():
    assert {"moe_8x", "dense_baseline"} <= set(recipe_names())
    for group in GROUPS:
        assert options(group), f"conf/{group}/ has no option"


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option, tmp_path):
    extra = []
    if group == "data" and option == "text":
        (tmp_path / "a.txt").write_text("hello world\n" * 100)
        extra = [f"data.path={tmp_path}/*.txt"]
    if group == "data" and option == "tokens":
        (tmp_path / "t.u16").write_bytes(bytes(4000))
        extra = [f"data.path={tmp_path}/t.u16"]
    if group == "strategy" and option in ("expert", "hybrid"):
        extra = ["+recipe=moe_8x", "trainer.devices=4"]
    if group == "strategy" and option in ("ddp", "fsdp"):
        extra = ["trainer.devices=2"]
    cfg = compose_run(f"{group}={option}", *extra)
    assert OmegaConf.select(cfg, group) is not None
    dims = validate(cfg)
    assert dims.world_size == cfg.trainer.devices * cfg.trainer.num_nodes


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_composes_and_instantiates(recipe):
    cfg = compose_run(f"+recipe={recipe}")
    validate(cfg)
    model = build_model(cfg.model, cfg.seed, device="meta")
    assert sum(p.numel() for p in model.parameters()) > 0
    if sum(p.numel() for p in model.parameters()) > 10**9:
        return  # a real-size architecture (mixtral_8x7b, ...): planned on the meta device only (tests/test_plan.py)
    optimizer = build_optimizer(cfg.optimizer, build_model(cfg.model, 0).named_parameters())
    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr
    strategy = instantiate(cfg.strategy, mesh=dict(cfg.strategy.mesh))
    assert isinstance(strategy, MeshStrategy) and strategy.name == cfg.strategy.name


def test_moe_recipe_sets_experts_and_dense_baseline_matches_active_width():
    moe = compose_run("+recipe=moe_8x")
    dense = compose_run("+recipe=dense_baseline")
    assert (moe.model.moe.num_experts, moe.model.moe.top_k) == (8, 2)
    assert dense.model.moe is None
    assert dense.model.ffn_dim == moe.model.moe.top_k * moe.model.moe.expert_ffn_dim


@pytest.mark.parametrize("option", options("optimizer"))
def test_optimizers_instantiate_with_their_kwargs(option):
    cfg = compose_run(f"optimizer={option}")
    opt = build_optimizer(cfg.optimizer, torch.nn.Linear(3, 3).named_parameters())
    assert type(opt).__name__ == cfg.optimizer._target_.rsplit(".", 1)[1]
    if cfg.optimizer.get("momentum") is not None:
        assert opt.param_groups[0]["momentum"] == cfg.optimizer.momentum
    # matrices decay, vectors do not
    assert [g["weight_decay"] for g in opt.param_groups] == [cfg.optimizer.weight_decay, 0.0]


def test_unknown_key_fails_at_compose_time():
    with pytest.raises(Exception, match="nm_experts"):
        compose_run("+recipe=moe_8x", "model.moe.nm_experts=4")


def test_user_recipe_on_search_path(tmp_path):
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("# @package _global_\nmodel:\n  n_layers: 3\nseed: 7\n")
    cfg = compose_run("+recipe=mine", f"hydra.searchpath=[file://{tmp_path}]")
    assert cfg.model.n_layers == 3 and cfg.seed == 7


def test_accelerator_auto_is_the_default_and_picks_this_machines_device():
    """auto: Lightning's choice (CUDA where torch sees a GPU, else the CPU), ranks over nccl or gloo to match."""
    import lightning as L

    cfg = compose_run("strategy=ddp", "trainer.devices=2")
    assert cfg.trainer.accelerator == "auto"
    validate(cfg)
    strategy = instantiate(cfg.strategy, mesh=dict(cfg.strategy.mesh))
    trainer = L.Trainer(accelerator=cfg.trainer.accelerator, devices=1 if torch.cuda.is_available() else 2,
                        strategy=strategy, logger=False, enable_progress_bar=False, enable_checkpointing=False)
    gpu = torch.cuda.is_available()
    assert type(trainer.accelerator).__name__ == ("CUDAAccelerator" if gpu else "CPUAccelerator")
    assert strategy.root_device.type == ("cuda" if gpu else "cpu")
    assert strategy._get_process_group_backend() == ("nccl" if gpu else "gloo")
