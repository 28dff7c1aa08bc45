"""tools/export_lora.py (ComfyUI LoRA and merged diffusers checkpoint), the model card every final export writes, and
--push_to_hub's upload call (without the network)."""

import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import REPO, StandInSafetyChecker, error_line, random_inputs, run_script, train_args

# NVIDIA's parameter names of the Cosmos-Predict2 DiT (cosmos-predict2's MiniTrainDIT, the names ComfyUI's
# comfy/ldm/cosmos/predict2.py loads), per block and at the top level. The LayerNorms have no weights.
NVIDIA_BLOCK_PARAMETERS = [
    f"{attention}.{name}.weight"
    for attention in ("self_attn", "cross_attn")
    for name in ("q_proj", "q_norm", "k_proj", "k_norm", "v_proj", "output_proj")
] + [
    "mlp.layer1.weight",
    "mlp.layer2.weight",
    *(f"adaln_modulation_{part}.{i}.weight" for part in ("self_attn", "cross_attn", "mlp") for i in (1, 2)),
]
NVIDIA_TOP_PARAMETERS = [
    "x_embedder.proj.1.weight",
    "t_embedder.1.linear_1.weight",
    "t_embedder.1.linear_2.weight",
    "t_embedding_norm.weight",
    "final_layer.linear.weight",
    "final_layer.adaln_modulation.1.weight",
    "final_layer.adaln_modulation.2.weight",
]
# The published NVIDIA -> diffusers rename table of Cosmos 2.0 (diffusers scripts/convert_cosmos_to_diffusers.py,
# TRANSFORMER_KEYS_RENAME_DICT_COSMOS_2_0), applied as that script applies it: each pair in order, by str.replace.
NVIDIA_TO_DIFFUSERS = {
    "t_embedder.1": "time_embed.t_embedder",
    "t_embedding_norm": "time_embed.norm",
    "blocks": "transformer_blocks",
    "adaln_modulation_self_attn.1": "norm1.linear_1",
    "adaln_modulation_self_attn.2": "norm1.linear_2",
    "adaln_modulation_cross_attn.1": "norm2.linear_1",
    "adaln_modulation_cross_attn.2": "norm2.linear_2",
    "adaln_modulation_mlp.1": "norm3.linear_1",
    "adaln_modulation_mlp.2": "norm3.linear_2",
    "self_attn": "attn1",
    "cross_attn": "attn2",
    "q_proj": "to_q",
    "k_proj": "to_k",
    "v_proj": "to_v",
    "output_proj": "to_out.0",
    "q_norm": "norm_q",
    "k_norm": "norm_k",
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
    "x_embedder.proj.1": "patch_embed.proj",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "final_layer.linear": "proj_out",
}
ALL_LINEAR = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v"]
ALL_LINEAR += ["attn2.to_out.0", "ff.net.0.proj", "ff.net.2"]
# A short run whose LoRA has moved off zero: rank 4, alpha 8 (scale 2, so a loader that drops alpha shows).
SHORT_RUN = ["--max_train_steps", "3", "--learning_rate", "1e-2", "--lora_rank", "4", "--lora_alpha", "8"]
SHORT_RUN += ["--lora_target_modules", *ALL_LINEAR, "--checkpointing_steps", "1000"]


def to_diffusers(nvidia_name):
    for old, new in NVIDIA_TO_DIFFUSERS.items():
        nvidia_name = nvidia_name.replace(old, new)
    return nvidia_name


def nvidia_parameters(num_blocks):
    return [
        f"blocks.{i}.{name}" for i in range(num_blocks) for name in NVIDIA_BLOCK_PARAMETERS
    ] + NVIDIA_TOP_PARAMETERS


def load_transformer(model):
    from cosmos_families import detect_family, load_component

    return load_component(model, "transformer", dtype=torch.float32, family=detect_family(model))


def short_run(tiny_model, one_clip_cache, out, *extra):
    import train_cosmos_lora as train

    assert train.main(train_args(tiny_model, one_clip_cache, out, *SHORT_RUN, *extra)) == 0
    return str(out)


@pytest.fixture(scope="module")
def lora_run(tiny_model, one_clip_cache, tmp_path_factory):
    """A LoRA-only run (no temporal adapters, proj_out frozen) with an EMA."""
    out = tmp_path_factory.mktemp("lora_run")
    return short_run(
        tiny_model, one_clip_cache, out, "--no-use_temporal_adapters", "--no-train_proj_out", "--ema_decay", "0.5"
    )


@pytest.fixture(scope="module")
def full_run(tiny_model, one_clip_cache, tmp_path_factory):
    """A run with the defaults beside the LoRA: temporal adapters and a trained proj_out."""
    return short_run(tiny_model, one_clip_cache, tmp_path_factory.mktemp("full_run"))


@pytest.fixture(scope="module")
def proj_out_run(tiny_model, one_clip_cache, tmp_path_factory):
    """LoRA and a trained proj_out, no temporal adapters: all of it folds into a merged checkpoint."""
    return short_run(tiny_model, one_clip_cache, tmp_path_factory.mktemp("proj_out_run"), "--no-use_temporal_adapters")


def export(*argv):
    import export_lora

    return export_lora.main(export_lora.parse_args([str(a) for a in argv]))


# ----------------------------------------------------------------------------------------------------------------
# --to comfyui
# ----------------------------------------------------------------------------------------------------------------
def test_the_nvidia_names_in_these_tests_convert_to_the_diffusers_transformer(tiny_model):
    """The test's own data is right: NVIDIA's names through the published table are the transformer's parameters."""
    transformer = load_transformer(tiny_model)
    converted = sorted(to_diffusers(name) for name in nvidia_parameters(transformer.config.num_layers))
    assert converted == sorted(transformer.state_dict())


def test_comfyui_export_in_a_real_process(lora_run, tiny_model, tmp_path):
    output = tmp_path / "comfy" / "lora.safetensors"
    result = run_script("tools/export_lora.py", "--lora_path", lora_run, "--to", "comfyui", "--output", output)
    assert result.returncode == 0, result.stderr[-2000:]
    exported = load_file(output)
    transformer = load_transformer(tiny_model)
    shapes = {name: transformer.state_dict()[to_diffusers(name)].shape for name in nvidia_parameters(2)}
    original = load_file(os.path.join(lora_run, "pytorch_lora_weights.safetensors"))
    round_trip = {}
    for key, tensor in exported.items():
        assert key.startswith("diffusion_model."), key
        module, kind = re.fullmatch(r"diffusion_model\.(.+)\.(lora_A\.weight|lora_B\.weight|alpha)", key).groups()
        out_features, in_features = shapes[f"{module}.weight"]  # a KeyError: no such NVIDIA parameter
        if kind == "alpha":
            assert tensor.item() == 8.0
            continue
        rank = 4
        assert tuple(tensor.shape) == ((rank, in_features) if kind == "lora_A.weight" else (out_features, rank))
        round_trip[f"transformer.{to_diffusers(module)}.{kind}"] = tensor
    assert round_trip.keys() == original.keys() and len(original) == 2 * 2 * len(ALL_LINEAR)
    for key, tensor in original.items():
        assert torch.equal(round_trip[key], tensor)
    with safe_open(output, "pt") as f:
        metadata = f.metadata()
    assert metadata["base_model"] == tiny_model and metadata["lora_rank"] == "4" and float(metadata["lora_alpha"]) == 8
    assert metadata["family"] == "predict2"


def test_comfyui_export_of_the_ema(lora_run, tmp_path):
    export("--lora_path", lora_run, "--use_ema", "--to", "comfyui", "--output", tmp_path / "ema.safetensors")
    exported = load_file(tmp_path / "ema.safetensors")
    ema = load_file(os.path.join(lora_run, "ema", "pytorch_lora_weights.safetensors"))
    key = "transformer.transformer_blocks.0.attn2.to_q.lora_B.weight"
    assert torch.equal(exported["diffusion_model.blocks.0.cross_attn.q_proj.lora_B.weight"], ema[key])


def test_comfyui_refuses_adapters_in_one_line_in_a_real_process(full_run, tmp_path):
    output = tmp_path / "lora.safetensors"
    result = run_script("tools/export_lora.py", "--lora_path", full_run, "--to", "comfyui", "--output", output)
    line = error_line(result)
    assert "trained temporal adapters, which a ComfyUI LoRA cannot hold" in line and "--drop_adapters" in line
    assert not output.exists()


def test_comfyui_drop_adapters_warns_and_proj_out_goes_in_as_a_difference(full_run, tiny_model, tmp_path, capsys):
    """ComfyUI's loader adds `<module>.diff` times the LoRA strength: trained - base carries proj_out over."""
    export("--lora_path", full_run, "--to", "comfyui", "--output", tmp_path / "l.safetensors", "--drop_adapters")
    assert "warning: --drop_adapters: the temporal adapters of" in capsys.readouterr().out
    exported = load_file(tmp_path / "l.safetensors")
    assert not any("temporal_adapter" in key for key in exported)
    diff = exported["diffusion_model.final_layer.linear.diff"]
    assert "final_layer.linear.weight" in NVIDIA_TOP_PARAMETERS
    trained = load_file(os.path.join(full_run, "temporal_adapters.safetensors"))["proj_out.weight"]
    base = load_transformer(tiny_model).state_dict()[to_diffusers("final_layer.linear.weight")]
    assert diff.shape == base.shape and diff.abs().max() > 0
    torch.testing.assert_close(base + diff, trained, rtol=0, atol=1e-6)


def test_comfyui_refuses_predict25(lora_run, tmp_path):
    fake = tmp_path / "run25"
    fake.mkdir()
    config = json.load(open(os.path.join(lora_run, "adapter_config.json")))
    for name in config["files"]:
        os.symlink(os.path.join(lora_run, name), fake / name)
    json.dump(dict(config, family="predict2.5"), open(fake / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="ComfyUI runs no Cosmos-Predict2.5 model"):
        export("--lora_path", fake, "--to", "comfyui", "--output", tmp_path / "x.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# --to merged
# ----------------------------------------------------------------------------------------------------------------
def test_merged_checkpoint_loads_in_the_stock_pipeline_and_equals_the_lora(proj_out_run, tiny_model, tmp_path):
    from diffusers import Cosmos2VideoToWorldPipeline

    from cosmos_adapters import load_finetuned_weights

    output = tmp_path / "merged"
    export(
        "--lora_path", proj_out_run, "--to", "merged", "--output", output, "--lora_scale", 0.7, "--dtype", "float32"
    )
    for root, dirs, files in os.walk(output):
        assert not any(os.path.islink(os.path.join(root, name)) for name in dirs + files)
    pipe = Cosmos2VideoToWorldPipeline.from_pretrained(str(output), safety_checker=StandInSafetyChecker())
    merged = pipe.transformer
    base = load_transformer(tiny_model)
    assert not getattr(merged, "peft_config", None) and sorted(merged.state_dict()) == sorted(base.state_dict())
    load_finetuned_weights(base, proj_out_run, scale=0.7)
    inputs = random_inputs(base)
    with torch.no_grad():
        expected, actual = base(**inputs)[0], merged(**inputs)[0]
        base.set_adapters(["default"], weights=[0.0])
        unmerged = base(**inputs)[0]
    assert (expected - unmerged).abs().max() > 1e-3  # the LoRA changes the output
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    card = (output / "README.md").read_text()
    assert "at scale 0.7" in card and "Left out" not in card and "base_model_relation: merge" not in card  # local
    (code,) = python_blocks(card)
    with pytest.MonkeyPatch.context() as patch:
        assert not getattr(run_loading_code(code, patch).transformer, "peft_config", None)


def test_merged_refuses_adapters_then_drops_them_on_request(full_run, tiny_model, tmp_path, capsys):
    with pytest.raises(ValueError, match="temporal adapters, which the stock diffusers transformer cannot hold"):
        export("--lora_path", full_run, "--to", "merged", "--output", tmp_path / "m")
    assert not (tmp_path / "m").exists()
    export("--lora_path", full_run, "--to", "merged", "--output", tmp_path / "m", "--drop_adapters")
    assert "the temporal adapters of" in capsys.readouterr().out
    weights = load_file(tmp_path / "m" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not any("temporal_adapter" in key for key in weights) and weights["proj_out.weight"].dtype == torch.bfloat16
    trained = load_file(os.path.join(full_run, "temporal_adapters.safetensors"))["proj_out.weight"]
    torch.testing.assert_close(weights["proj_out.weight"].float(), trained, rtol=1e-2, atol=1e-2)


def test_merged_never_overwrites_a_folder(lora_run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not empty"):
        export("--lora_path", lora_run, "--to", "merged", "--output", tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_merged_refuses_a_run_of_another_family(lora_run, tiny_model_25, tmp_path):
    with pytest.raises(ValueError, match="trained on a predict2 model"):
        export(
            "--lora_path",
            lora_run,
            "--to",
            "merged",
            "--output",
            tmp_path / "m",
            "--pretrained_model_name_or_path",
            tiny_model_25,
        )


# ----------------------------------------------------------------------------------------------------------------
# The model card and the Hub
# ----------------------------------------------------------------------------------------------------------------
def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def run_loading_code(code, monkeypatch):
    """Run a card's diffusers code with the stand-in safety checker (the guardrail downloads models)."""
    from diffusers import Cosmos2VideoToWorldPipeline

    loader = Cosmos2VideoToWorldPipeline.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        return loader(cls, *args, safety_checker=StandInSafetyChecker(), **kwargs)

    monkeypatch.setattr(Cosmos2VideoToWorldPipeline, "from_pretrained", classmethod(from_pretrained))
    namespace = {}
    exec(compile(code, "model card", "exec"), namespace)
    return namespace["pipe"]


def assert_lora_loaded(transformer, run):
    layer = transformer.transformer_blocks[1].attn1.to_v
    assert list(layer.scaling.values()) == [2.0]  # alpha 8 / rank 4: the config stored in the file was read
    saved = load_file(os.path.join(run, "pytorch_lora_weights.safetensors"))
    expected = saved["transformer.transformer_blocks.1.attn1.to_v.lora_B.weight"]
    torch.testing.assert_close(next(iter(layer.lora_B.values())).weight.float(), expected, rtol=1e-2, atol=1e-2)


def test_the_model_card_describes_the_run_and_its_loading_code_runs(lora_run, tiny_model, monkeypatch):
    card = open(os.path.join(lora_run, "README.md")).read()
    assert card.startswith("---\n") and "license_name: nvidia-open-model-license" in card
    assert (
        f"- model: `{tiny_model}`" in card and "- family: predict2 (diffusers `Cosmos2VideoToWorldPipeline`)" in card
    )
    assert "| `lora_rank` | `4` |" in card and "| `max_train_steps` | `3` |" in card
    assert "## Use in ComfyUI" in card and "NVIDIA Open Model License" in card
    assert "## Validation" not in card and "metric" not in card.lower()  # no videos, no evaluation: nothing said
    (code,) = python_blocks(card)
    assert_lora_loaded(run_loading_code(code, monkeypatch).transformer, lora_run)


def test_the_card_lists_validation_videos_and_says_what_diffusers_cannot_load(tmp_path):
    import train_cosmos_lora as train
    from cosmos_card import write_model_card

    videos = tmp_path / "validation" / "step-3"
    videos.mkdir(parents=True)
    (videos / "00_17x64x112_truth_vs_generated.mp4").write_bytes(b"")
    args = train.parse_args(["--output_dir", str(tmp_path)])
    args.family = "predict2"
    card = open(write_model_card(tmp_path, args)).read()
    assert "[00_17x64x112_truth_vs_generated.mp4](validation/step-3/00_17x64x112_truth_vs_generated.mp4)" in card
    assert "temporal adapters" in card and "## Data" not in card
    assert "base_model: nvidia/Cosmos-Predict2-2B-Video2World\nbase_model_relation: adapter\n" in card


def test_the_readme_loading_line_works(lora_run, tiny_model, monkeypatch):
    readme = open(os.path.join(REPO, "README.md")).read()
    section = readme.split("## Use the LoRA elsewhere", 1)[1].split("\n## ", 1)[0]
    (code,) = python_blocks(section)
    code = code.replace("nvidia/Cosmos-Predict2-2B-Video2World", tiny_model).replace("outputs/ego-lora", lora_run)
    assert_lora_loaded(run_loading_code(code, monkeypatch).transformer, lora_run)


def test_push_to_hub_uploads_the_export_and_not_the_checkpoints(lora_run, tmp_path, monkeypatch):
    import argparse
    import shutil

    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    import cosmos_run

    run = shutil.copytree(lora_run, tmp_path / "ego-lora")
    os.makedirs(run / "checkpoint-3")  # what a longer run has
    args = argparse.Namespace(**json.load(open(run / "training_args.json")))
    args.output_dir, args.push_to_hub, args.hub_model_id = str(run), True, None
    calls = {}

    class Repo:
        repo_id = "someone/ego-lora"

    def create_repo(**kwargs):
        calls["create_repo"] = kwargs
        return Repo()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.setdefault("upload_folder", kwargs))
    assert cosmos_run.push_to_hub(args) == "someone/ego-lora"
    assert calls["create_repo"] == {"repo_id": "ego-lora", "exist_ok": True}
    upload = calls["upload_folder"]
    assert upload["repo_id"] == "someone/ego-lora" and upload["folder_path"] == str(run)
    files = [os.path.relpath(os.path.join(root, name), run) for root, _, names in os.walk(run) for name in names]
    uploaded = set(filter_repo_objects(files, ignore_patterns=upload["ignore_patterns"]))
    assert {"README.md", "pytorch_lora_weights.safetensors", "adapter_config.json", "training_args.json"} <= uploaded
    assert "ema/pytorch_lora_weights.safetensors" in uploaded
    assert not any(f.startswith(("checkpoint-", "logs/")) for f in uploaded)
    # the uploaded card loads the LoRA from the repo
    assert "load_lora_adapter('someone/ego-lora', weight_name=" in (run / "README.md").read_text()
    args.hub_model_id = "org/name"
    cosmos_run.push_to_hub(args)
    assert calls["create_repo"]["repo_id"] == "org/name"


def test_push_to_hub_is_refused_offline(tiny_model, monkeypatch, tmp_path):
    import train_cosmos_lora as train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = train.parse_args(["--pretrained_model_name_or_path", tiny_model, "--cache_dir", "c", "--push_to_hub"])
    with pytest.raises(ValueError, match="--push_to_hub needs the network"):
        train.validate_args(args)


# ----------------------------------------------------------------------------------------------------------------
# Predict2.5: merged checkpoint and the card's load_lora_weights code
# ----------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_run_25(tiny_model_25, one_clip_cache_25, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_run_25")
    return short_run(tiny_model_25, one_clip_cache_25, out, "--no-use_temporal_adapters")


def test_predict25_merged_checkpoint_and_card(lora_run_25, tiny_model_25, tmp_path):
    from diffusers import Cosmos2_5_PredictBasePipeline

    from cosmos_adapters import load_finetuned_weights

    output = tmp_path / "merged25"
    export("--lora_path", lora_run_25, "--to", "merged", "--output", output, "--dtype", "float32")
    merged = Cosmos2_5_PredictBasePipeline.from_pretrained(str(output), safety_checker=StandInSafetyChecker())
    base = load_transformer(tiny_model_25)
    load_finetuned_weights(base, lora_run_25)
    inputs = random_inputs(base)
    torch.testing.assert_close(merged.transformer(**inputs)[0], base(**inputs)[0], rtol=1e-5, atol=1e-5)

    card = open(os.path.join(lora_run_25, "README.md")).read()
    assert "## Use in ComfyUI" not in card and "Cosmos2_5_PredictBasePipeline" in card
    (code,) = python_blocks(card)
    loader = Cosmos2_5_PredictBasePipeline.from_pretrained.__func__
    patched = classmethod(lambda cls, *a, **k: loader(cls, *a, safety_checker=StandInSafetyChecker(), **k))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Cosmos2_5_PredictBasePipeline, "from_pretrained", patched)
        namespace = {}
        exec(compile(code, "model card", "exec"), namespace)
    transformer = namespace["pipe"].transformer
    assert list(transformer.transformer_blocks[1].attn1.to_v.scaling.values()) == [2.0]
    with torch.no_grad():
        loaded = transformer.to(torch.float32)(**inputs)[0]
    # the card loads the LoRA and the proj_out the run trained: the fine-tuned model, to bfloat16 precision
    torch.testing.assert_close(loaded, base(**inputs)[0], rtol=5e-2, atol=5e-2)
