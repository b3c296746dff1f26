"""prepare: the held-out tasks (every data split) and the fixed meta-validation tasks, as arrays."""
from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.core import Params, StageContext, io, stage

from .family import TaskArrays, dataset, family_task, save_task, split


class HeldOutTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    dataset: str = Field(pattern=r"^(wine|breast_cancer|digits|npz:\w+)$",
                         description="npz:<name> reads <data_dir>/<name>.npz (paper scale)")
    arch: str = Field(pattern=r"^(mlp|cnn|resnet_frn)$")
    hidden: list[int] = Field(min_length=1, description="MLP hidden widths; cnn / resnet_frn: [width] * depth")
    residual: bool = Field(description="cnn: residual blocks")
    activation: str = Field(pattern=r"^(relu|tanh|gelu|elu)$")
    unseen_architecture: bool = Field(description="an MLP absent from the meta-training family")


class Family(BaseModel):
    model_config = ConfigDict(extra="forbid")
    datasets: list[str] = Field(min_length=1)
    widths: list[int] = Field(min_length=1)
    depths: list[int] = Field(min_length=1)
    activations: list[str] = Field(min_length=1)
    archs: list[str] = Field(min_length=1, description="mlp, or cnn at paper scale")
    residual: list[bool] = Field(min_length=1)


class PrepareParams(Params):
    data_dir: str = Field(description="folder of the npz:<name> datasets (paper scale); '' at cpu scale")
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5)
    splits: list[int] = Field(min_length=1, description="data-split seeds of every held-out task")
    heldout: list[HeldOutTask] = Field(min_length=1)
    family: Family = Field(description="the meta-training task family (read by metatrain)")
    metaval_tasks: int = Field(gt=0, description="fixed family tasks of the meta-validation curve")
    metaval_seed: int = Field(ge=0)


@stage(params=PrepareParams)
def prepare(ctx: StageContext, p: PrepareParams) -> None:
    """Held-out tasks x splits and the meta-validation tasks from scikit-learn, standardised."""
    fam = p.family
    for task in p.heldout:
        in_family = (len(set(task.hidden)) == 1 and task.hidden[0] in fam.widths and task.arch in fam.archs
                     and len(task.hidden) in fam.depths and task.activation in fam.activations)
        if task.unseen_architecture and in_family:
            raise ValueError(f"held-out task {task.name} is marked unseen but its MLP is in the family")
    heldout = []
    for task in p.heldout:
        x, y = dataset(task.dataset, np.random.default_rng(0), p.data_dir)
        for s in p.splits:
            arrays = split(x, y, p.val_fraction, p.test_fraction, s)
            entry = save_task(ctx.out_dir / "heldout", TaskArrays(f"{task.name}_split{s}", tuple(task.hidden),
                                                                  task.activation, arrays, task.arch, task.residual))
            heldout.append({**entry, "task": task.name, "split": s, "n_train": len(arrays["y_train"]),
                            "n_test": len(arrays["y_test"]),
                            "unseen_architecture": task.unseen_architecture})
    rng = np.random.default_rng(p.metaval_seed)
    metaval = []
    for i in range(p.metaval_tasks):
        task = family_task(rng, fam.model_dump(), p.val_fraction, p.test_fraction, p.data_dir)
        metaval.append(save_task(ctx.out_dir / "metaval", TaskArrays(f"mv{i}_{task.name}", task.hidden,
                                                                     task.activation, task.arrays, task.arch,
                                                                     task.residual)))
    io.write_json(ctx.out_dir / "meta.json", {"heldout": heldout, "metaval": metaval,
                                              "family": fam.model_dump(), "data_dir": p.data_dir,
                                              "val_fraction": p.val_fraction,
                                              "test_fraction": p.test_fraction})
    ctx.log_metrics({"heldout_tasks": len(heldout), "metaval_tasks": len(metaval)})
