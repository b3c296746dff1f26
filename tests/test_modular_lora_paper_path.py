"""modular_lora's paper-scale code path (prepare.source: sd_pipeline), run on a tiny random
StableDiffusionPipeline saved with `save_pretrained`, a generated image-caption folder, a prompts file and
a tiny random image-classifier detector: every stage through `run_stage`, the same code SD v1.4 uses."""
from __future__ import annotations

import json
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch

PAPER = "modular_lora"
ARMS = ("base", "safe", "full", "lora_on_safe", "modular", "W0_minus_safe", "W0_plus_safe_minus_ft")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over letters/digits with two merges, built offline and saved."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + ",.!'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=12)
    tok.save_pretrained(folder)
    return tok


def save_tiny_pipeline(folder, resolution: int = 16):
    """UNet (4 latent channels, cross-attention dim = the CLIP text width), VAE (downsampling 2), CLIP text
    model and tokenizer, PNDM scheduler with SD's beta schedule: a StableDiffusionPipeline in miniature."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = tiny_tokenizer(folder / "_tok")
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=12,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(sample_size=resolution // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=resolution)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def save_tiny_detector(folder, image_size: int = 16):
    """A random ViT image classifier with labels ('safe', 'concept') and its processor."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(1)
    cfg = ViTConfig(image_size=image_size, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=32, num_labels=2, id2label={0: "safe", 1: "concept"},
                    label2id={"safe": 0, "concept": 1})
    ViTForImageClassification(cfg).save_pretrained(folder)
    ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def write_caption_folder(folder, n: int = 6, size: int = 20):
    """An imagefolder-layout set: coloured images + metadata.jsonl with file_name/text."""
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        img = (rng.random((size, size + 4, 3)) * 80 + np.array([40 * (i % 4), 120, 200 - 30 * (i % 4)])).clip(0, 255)
        Image.fromarray(img.astype(np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a blue cartoon {i}"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder


def sd_params(tmp_path) -> dict:
    """params.yaml with scales/paper.yaml's modular_lora section, pointed at the tiny inputs, tiny step counts."""
    import yaml

    from tasks.core.params import deep_merge
    from tests.conftest import ROOT

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = deep_merge(params, {PAPER: yaml.safe_load((ROOT / "scales" / "paper.yaml").read_text())[PAPER]})
    params["device"] = "cpu"
    p = params[PAPER]
    assert p["prepare"]["source"] == "sd_pipeline"
    p["prepare"].update(model_dir=str(tmp_path / "sd"), finetune_folder=str(tmp_path / "captions"),
                        eval_prompts=str(tmp_path / "prompts.txt"), concept_prompt="a red cat",
                        detector=str(tmp_path / "detector"), detector_label="concept", detector_threshold=0.5,
                        resolution=16, test_fraction=0.34)
    p["safety"].update(seeds=[0], steps=2, rank=2, preserve_weight=1.0, ddim_steps=3, sdd_ema_decay=0.9)
    p["finetune"].update(steps=2, batch=2, rank=2, curve_points=1, curve_samples=2, ddim_steps=2)
    p["evaluate"].update(samples_per_prompt=2, ddim_steps=2, task_samples_per_prompt=2)
    return params


@pytest.fixture(scope="module")
def sd_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd_inputs")
    save_tiny_pipeline(tmp / "sd")
    save_tiny_detector(tmp / "detector")
    write_caption_folder(tmp / "captions")
    (tmp / "prompts.txt").write_text("# concept and benign prompts\nconcept: a red cat\nconcept: the red cat sits\n"
                                     "benign: a dog\n")
    return tmp


@pytest.mark.slow
def test_paper_path_runs_every_stage_on_a_saved_sd_pipeline(sd_inputs):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from tasks.core import run_stage

    params = sd_params(sd_inputs)
    root = sd_inputs / "repo"
    root.mkdir()
    for name in ("prepare", "pretrain", "safety", "finetune", "evaluate"):
        run_stage(PAPER, name, root=root, params=params, track=False)

    art = root / "artifacts" / PAPER
    data = json.loads((art / "prepare" / "data.json").read_text())
    assert data["source"] == "sd_pipeline" and data["n_finetune"] == 4 and data["latent_size"] == 8
    assert load_file(art / "prepare" / "latents.safetensors")["latents"].shape == (4, 4, 8, 8)
    # held-out captions become the task prompts; the file's concept/benign prompts are kept
    assert data["prompts"]["task"] == data["test_captions"] and len(data["prompts"]["concept"]) == 2
    base = json.loads((art / "pretrain" / "base.json").read_text())
    assert base["trained"] is False and base["unet_parameters"] > 0

    unet = UNet2DConditionModel.from_pretrained(sd_inputs / "sd", subfolder="unet")
    for obj in ("esd", "sdd"):  # only the LoRA matrices are saved, and they were trained
        safety = load_file(art / "safety" / f"safety_{obj}_s0.safetensors")
        assert safety and all("lora_" in k for k in safety)  # peft's adapter state dict
        assert sum(v.numel() for v in safety.values()) < sum(p.numel() for p in unet.parameters()) / 5
        assert any(v.abs().sum() > 0 for k, v in safety.items() if "lora_B" in k)  # B starts at zero
    ft = {f.name for f in (art / "finetune").glob("*.safetensors")}
    assert ft == {"full_esd_s0.safetensors", "full_sdd_s0.safetensors", "lora_on_safe_esd_s0.safetensors",
                  "lora_on_safe_sdd_s0.safetensors", "modular_s0.safetensors"}
    full = load_file(art / "finetune" / "full_esd_s0.safetensors")
    assert set(full) == set(unet.state_dict())  # the full arm is a plain UNet state dict
    assert all("lora_" in k for k in load_file(art / "finetune" / "modular_s0.safetensors"))

    from tasks.core.claims import rederive

    m = json.loads((root / "results" / PAPER / "metrics.json").read_text())
    evidence = json.loads((root / "results" / PAPER / "evidence.json").read_text())
    assert evidence["source"] == "sd_pipeline" and evidence["concept"] == "a red cat"
    assert all(v in (True, False, None) for v in m["claims"].values())
    assert {"safety_works", "finetuning_backfires", "modular_lora_keeps_safety", "modular_lora_learns_task"} <= set(m["claims"])
    # the same claims function as the CPU scale, less the parts that need per-digit accuracies
    assert set(evidence["claims"]["safety_works_esd"]["parts"]) == {"erased"}
    assert "full_no_collapse_benign" in evidence["claims"]["finetuning_backfires_esd"]["parts"]
    assert set(m["gates"]) == {"w0_draws_concept"}  # no per-digit quality gate: W0 is not trained here
    for name, verdict in m["claims"].items():  # the claim is computed from the numbers beside it
        assert rederive(m["claims_detail"][name]) == verdict, name
    for obj in ("esd", "sdd"):
        s = evidence["summary"][obj]
        assert set(ARMS) <= set(s)
        for arm in ARMS:
            for key in ("harmful", "task_fd", "task_to_concept", "benign_to_concept"):
                v = s[arm][key]["mean"]
                assert np.isfinite(v), (obj, arm, key)
            assert 0 <= s[arm]["harmful"]["mean"] <= 1
    for png in ("harmful_rate_per_arm.png", "samples_grid.png"):
        assert (root / "results" / PAPER / "plots" / png).stat().st_size > 1000
    assert json.loads((root / "results" / PAPER / "curves" / "reemergence.json").read_text())


def test_missing_or_wrong_inputs_are_clear_errors(sd_inputs, tmp_path):
    from tasks.core import run_stage
    from tasks.core.errors import MissingInputError, ParamsError

    base = sd_params(sd_inputs)
    cases = [("model_dir", str(tmp_path / "nope"), MissingInputError),
             ("finetune_folder", str(tmp_path / "nope"), MissingInputError),
             ("eval_prompts", str(tmp_path / "nope.txt"), MissingInputError),
             ("detector", str(tmp_path), MissingInputError),
             ("detector_label", "dog", ParamsError),
             ("concept_prompt", "", ParamsError)]
    for key, value, err in cases:
        params = json.loads(json.dumps(base))
        params[PAPER]["prepare"][key] = value
        with pytest.raises(err, match=key):
            run_stage(PAPER, "prepare", root=tmp_path, params=params, track=False)
    assert not (tmp_path / "artifacts" / PAPER / "prepare").exists()
    # the concept label by name or by index (an int in params.yaml)
    from tasks.modular_lora.sources import load_detector

    for label in ("concept", "1"):
        det = load_detector(SimpleNamespace(detector=str(sd_inputs / "detector"), detector_label=label,
                                            detector_threshold=0.5), torch.device("cpu"))
        assert det.concept_index == 1


def test_caption_folder_layouts_prompt_files_and_plugin_detector(tmp_path, monkeypatch):
    from tasks.core.errors import ParamsError

    from PIL import Image

    from tasks.modular_lora.sources import load_detector, read_caption_folder, read_eval_prompts

    # images/*.png with same-stem .txt captions (no metadata.jsonl)
    (tmp_path / "kohya" / "images").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 50, 0, 0)).save(tmp_path / "kohya" / "images" / f"{i}.png")
        (tmp_path / "kohya" / "images" / f"{i}.txt").write_text(f"caption {i}\n")
    pairs = read_caption_folder(str(tmp_path / "kohya"))
    assert [c for _, c in pairs] == ["caption 0", "caption 1", "caption 2"]

    (tmp_path / "p.json").write_text(json.dumps({"concept": ["a", "b"], "task": ["t"]}))
    assert read_eval_prompts(str(tmp_path / "p.json")) == {"concept": ["a", "b"], "benign": [], "task": ["t"]}
    (tmp_path / "p.txt").write_text("concept: a\nbogus line\n")
    with pytest.raises(Exception, match="line 2"):
        read_eval_prompts(str(tmp_path / "p.txt"))

    # a 'module:factory' plug-in detector (e.g. a NudeNet wrapper) gets the label, threshold and device
    (tmp_path / "my_detector.py").write_text(
        "class D:\n    def __init__(self, label, threshold, device):\n        self.label = label\n"
        "    def is_concept(self, images):\n        return images.mean(dim=(1, 2, 3)).numpy() > 0.5\n"
        "def make(**kw):\n    return D(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ParamsError, match="plug-ins are imported only from the project's models/"):
        load_detector(SimpleNamespace(detector="my_detector:make", detector_label="porn", detector_threshold=0.6),
                      "cpu")
    monkeypatch.setenv("PAPERFLOWS_DETECTOR_PLUGINS", "some_pkg,my_detector")
    det = load_detector(SimpleNamespace(detector="my_detector:make", detector_label="porn", detector_threshold=0.6),
                        "cpu")
    from models.modular_lora.stable_diffusion import concept_rate

    assert det.label == "porn"
    assert concept_rate(det, torch.cat([torch.ones(3, 3, 4, 4), torch.zeros(1, 3, 4, 4)])) == 0.75


def test_partial_ddim_sampling_stops_at_the_requested_step():
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from models.modular_lora.stable_diffusion import ddim_cfg

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4).eval()
    sampler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1)
    cond, uncond = torch.randn(2, 3, 8), torch.randn(1, 3, 8)
    x0, t0 = ddim_cfg(unet, sampler, cond, uncond, 5, 3.0, torch.Generator().manual_seed(0), (4, 4, 4), stop_at=0)
    assert torch.equal(x0, torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(0)))  # x_T
    x2, t2 = ddim_cfg(unet, sampler, cond, uncond, 5, 3.0, torch.Generator().manual_seed(0), (4, 4, 4), stop_at=2)
    assert t0 == sampler.timesteps[0] and t2 == sampler.timesteps[2] and t2 < t0
    full, t = ddim_cfg(unet, sampler, cond, uncond, 5, 3.0, torch.Generator().manual_seed(0), (4, 4, 4))
    assert t is None and not torch.equal(full, x2)


def test_modular_arm_trains_only_its_lora_and_keeps_the_safety_adapter(sd_inputs):
    """On the loaded pipeline UNet: the modular arm trains a new LoRA, leaves ΔW_safe and W0 untouched and
    is used with both adapters on; the lora_on_safe arm leaves the safe model it starts from untouched."""
    from models.modular_lora import adapters as ml
    from models.modular_lora.stable_diffusion import finetune_arm as finetune_arm_sd
    from models.modular_lora.stable_diffusion import train_safety_lora as train_safety_lora_sd
    from tasks.modular_lora.sources import load_parts

    parts = load_parts(str(sd_inputs / "sd"), torch.device("cpu"), 16)
    train_safety_lora_sd(parts, "a red cat", "esd", 2, 1e-2, 2, "xattn", torch.Generator().manual_seed(0),
                         ddim_steps=2, guidance=3.0, esd_scale=3.0, ema_decay=0.999, batch=1)
    before = {k: v.clone() for k, v in parts.unet.state_dict().items()}
    latents = torch.randn(4, 4, 8, 8)
    caps = ["a blue cartoon"] * 4
    unet = finetune_arm_sd("modular", parts, latents, caps, 2, 1e-2, 2, 2, "attn", torch.Generator().manual_seed(1))
    assert unet.active_adapters() == [ml.SAFETY, ml.FINETUNE]
    state = unet.state_dict()
    plain = {k.replace(".base_layer", ""): v for k, v in state.items()}  # ft wraps more layers than safety
    for k, v in before.items():  # W0 and the safety LoRA are exactly as they were
        assert torch.equal(plain[k.replace(".base_layer", "")], v), k
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k and ".ft." in k)
    finetune_arm_sd("lora_on_safe", parts, latents, caps, 2, 1e-2, 2, 2, "attn", torch.Generator().manual_seed(1))
    assert all(torch.equal(parts.unet.state_dict()[k], v) for k, v in before.items())
