"""Fixtures and helpers shared by the test modules (no test module imports another): the tiny models and caches,
the training runs several modules read, the scripts' argument builders, readers of what the scripts write, and the
stand-in safety checker."""

import argparse
import json
import os
import shutil
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Small clips keep the CPU tests fast: 17 frames at 8 fps, 64x112 (a crop of the 456x256 sources).
CLIP_ARGS = ["--num_frames", "17", "--height", "64", "--width", "112", "--num_workers", "0"]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A diffusers-format random Cosmos-Predict2 checkpoint written by tools/make_random_cosmos.py."""
    import make_random_cosmos

    path = str(tmp_path_factory.mktemp("models") / "tiny-cosmos")
    make_random_cosmos.main(make_random_cosmos.parse_args(["--size", "tiny", "--output_dir", path]))
    return path


@pytest.fixture(scope="session")
def clips(tmp_path_factory):
    """Six 4-second synthetic egocentric videos (H.264 and H.265) as a folder and as WebDataset tars."""
    import make_synthetic_clips

    root = str(tmp_path_factory.mktemp("clips"))
    keys = make_synthetic_clips.make_dataset(
        output_dir=root,
        num_videos=6,
        seconds=4.0,
        fps=30.0,
        height=256,
        width=456,
        codec="both",
        captions=True,
        num_factories=2,
        videos_per_tar=2,
        seed=0,
    )
    return {"root": root, "videos": os.path.join(root, "videos"), "tars": os.path.join(root, "tars"), "keys": keys}


@pytest.fixture(scope="session")
def image(tmp_path_factory, clips):
    """The first frame of a synthetic video, at the generation size (so no resizing differs)."""
    import torch
    from PIL import Image

    from cosmos_video import fit_frames, open_video

    with open_video(os.path.join(clips["videos"], clips["keys"][2] + ".mp4")) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    path = tmp_path_factory.mktemp("image") / "first_frame.png"
    Image.fromarray(fit_frames(torch.from_numpy(frame)[None], 64, 112)[0].numpy()).save(path)
    return str(path)


def run_script(script, *args, env=None, **kwargs):
    """Run one of the project's scripts in a subprocess, the way a user does."""
    import subprocess

    script = script if script.startswith("-") else os.path.join(REPO, script)  # "-m" runs a module
    return subprocess.run(
        [sys.executable, script, *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})),
        **kwargs,
    )


def error_line(result):
    """The one `error: ...` line a script ends with on bad input (torch and torchao may log warnings at import
    before it), checked to be the last line, alone and without a traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], result.stderr[-2000:]
    return lines[-1]


class Captured(Exception):
    pass


def parser_of(module, monkeypatch, *argv):
    """The ArgumentParser a script's parse_args builds, caught when it parses (given argv, if any)."""
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise Captured

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(Captured):
            module.parse_args(list(argv)) if argv else module.parse_args()
    return parsers[-1]


def help_entries(help_text):
    """A script's --help text as {first option string: its whole help entry, wrapped lines joined}."""
    entries, current = {}, None
    for line in help_text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            entries[current] = line
        elif line.startswith("   ") and current:
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


# accelerate_configs/cpu_2proc.yaml starts two gloo processes only with this variable set.
TWO_CPU_PROCESSES = {"ACCELERATE_USE_CPU": "1"}

ALL_LINEAR = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
]
# Settings that make the tiny model memorize one clip quickly.
OVERFIT_ARGS = [
    "--learning_rate",
    "3e-3",
    "--lr_scheduler",
    "constant",
    "--train_batch_size",
    "4",
    "--text_dropout",
    "0",
    "--conditioning_frames",
    "1",
    "--lora_rank",
    "16",
    "--lora_alpha",
    "16",
    "--lora_target_modules",
    *ALL_LINEAR,
]


def train_args(model, cache, output_dir, *extra):
    """Parsed train_cosmos_lora.py flags with the model family's defaults filled in, as main() fills them."""
    import train_cosmos_lora as train

    args = train.parse_args(
        [
            "--pretrained_model_name_or_path",
            model,
            "--cache_dir",
            *([cache] if isinstance(cache, str) else cache),
            "--output_dir",
            str(output_dir),
            "--dataloader_num_workers",
            "0",
            "--num_validation_clips",
            "0",
            "--report_to",
            "none",
            *map(str, extra),
        ]
    )
    train.resolve_family_defaults(args)
    return args


def loss_rows(output_dir):
    """Every row of a training run's losses.jsonl, timing columns included."""
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def losses(output_dir):
    """(step, loss) rows of a training run's losses.jsonl, without the timing columns."""
    return [{"step": row["step"], "loss": row["loss"]} for row in loss_rows(output_dir)]


def cache_clips(model, output_dir, *args, extra=()):
    """Run cache_latents.py's main() at the tests' small clip size; `args` (a source) and `extra` follow CLIP_ARGS,
    so they win."""
    import cache_latents

    argv = ["--pretrained_model_name_or_path", model, "--output_dir", str(output_dir), *CLIP_ARGS]
    return cache_latents.main(cache_latents.parse_args([*argv, *map(str, args), *map(str, extra)]))


def text_embed_files(cache):
    """Paths of a cache's text embedding files (text_embeds/HH/HASH.safetensors)."""
    import glob

    return sorted(glob.glob(os.path.join(cache, "text_embeds", "*", "*.safetensors")))


def cache_report(output_dir, shard=0):
    """The report.json cache_latents.py writes for a shard: written, skipped and failed clips."""
    with open(os.path.join(output_dir, f"shard_{shard:05d}", "report.json")) as f:
        return json.load(f)


def copy_cache(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_cache_info(cache, **changes):
    from cosmos_cache import CACHE_INFO

    path = os.path.join(cache, CACHE_INFO)
    info = json.load(open(path))
    info.update(changes)
    json.dump(info, open(path, "w"))


def no_model_may_load(monkeypatch, *modules):
    """Make loading any model component from these script modules fail the test."""

    def fail(*args, **kwargs):
        raise AssertionError("a model loaded before the error")

    for module in modules:
        monkeypatch.setattr(module, "load_component", fail)


# The tests' generation size, without the guardrail (cosmos-guardrail downloads models).
TINY = ["--height", "64", "--width", "112", "--num_frames", "17", "--disable_safety_checker"]


def sample_args(model, output_dir, *extra, fixed=TINY):
    """Parsed sample.py flags: the model, the output dir, `fixed` (by default the tests' size), then `extra`."""
    import sample

    return sample.parse_args(
        ["--pretrained_model_name_or_path", model, "--output_dir", str(output_dir), *fixed, *map(str, extra)]
    )


class StandInSafetyChecker:
    """What diffusers' own Cosmos tests pass instead of the guardrail, which downloads models."""

    def to(self, *args, **kwargs):
        return self

    def check_text_safety(self, prompt):
        return True

    def check_video_safety(self, video):
        return video


def text_width(transformer):
    """The width of the text embeddings the transformer takes: Predict2.5's go through crossattn_proj first."""
    import torch

    projection = getattr(transformer, "crossattn_proj", None)
    if isinstance(projection, torch.nn.Sequential):
        return projection[0].in_features
    return transformer.config.text_embed_dim


def random_inputs(transformer, frames=5, height=8, width=14, seed=0):
    """Seeded transformer inputs: 2 clips of `frames` latent frames, the first one conditioning."""
    import torch

    g = torch.Generator().manual_seed(seed)
    cond = torch.zeros(2, 1, frames, 1, 1)
    cond[:, :, :1] = 1
    return dict(
        hidden_states=torch.randn(2, 16, frames, height, width, generator=g),
        timestep=(cond * 1e-4 + (1 - cond) * torch.rand(2, 1, 1, 1, 1, generator=g)),
        encoder_hidden_states=torch.randn(2, 512, text_width(transformer), generator=g),
        fps=None,
        condition_mask=cond.expand(2, 1, frames, height, width).clone(),
        padding_mask=torch.zeros(1, 1, height * 8, width * 8),
        return_dict=False,
    )


def output(transformer, inputs):
    import torch

    with torch.no_grad():
        return transformer(**inputs)[0]


def base_transformer(model):
    """The base transformer as the scripts run it (per-frame modulation)."""
    from cosmos_families import detect_family, load_component
    from cosmos_speed import modulate_per_frame

    return modulate_per_frame(load_component(model, "transformer", family=detect_family(model)))


@pytest.fixture(scope="session")
def latent_cache(tiny_model, clips, tmp_path_factory):
    """The six videos cached as 12 clips (starts every second), with per-video captions."""
    out = tmp_path_factory.mktemp("latent_cache")
    assert cache_clips(tiny_model, out, "--video_dir", clips["videos"], "--clip_stride_seconds", "1") == 0
    return str(out)


@pytest.fixture(scope="session")
def one_clip_cache(tiny_model, clips, tmp_path_factory):
    """A cache of a single clip (the first video's first 17 frames)."""
    videos = tmp_path_factory.mktemp("one_video")
    shutil.copy(os.path.join(clips["videos"], clips["keys"][0] + ".mp4"), videos)
    out = tmp_path_factory.mktemp("one_clip_cache")
    assert (
        cache_clips(
            tiny_model, out, "--video_dir", videos, "--max_clips_per_video", "1", "--prompt", "a worker's hands"
        )
        == 0
    )
    return str(out)


# Three buckets: landscape 17 frames, its 9-frame tail, and portrait 17 frames.
BUCKETS = ["17x64x112", "9x64x112", "17x112x64"]


@pytest.fixture(scope="session")
def bucket_videos(clips, tmp_path_factory):
    """Two 4 s landscape videos, two 3 s portrait videos (256x456) and a 0.5 s landscape one that fits no bucket."""
    import make_synthetic_clips

    folder = tmp_path_factory.mktemp("bucket_videos")
    for key in clips["keys"][:2]:
        shutil.copy(os.path.join(clips["videos"], key + ".mp4"), folder / f"land_{key}.mp4")
    for seed in (1, 2):
        frames = make_synthetic_clips.render_video(seed=seed, num_frames=90, height=456, width=256)
        (folder / f"portrait_{seed}.mp4").write_bytes(make_synthetic_clips.encode_mp4(frames, 30.0, "h264"))
    short = make_synthetic_clips.render_video(seed=3, num_frames=15, height=256, width=456)
    (folder / "short.mp4").write_bytes(make_synthetic_clips.encode_mp4(short, 30.0, "h264"))
    return str(folder)


@pytest.fixture(scope="session")
def bucket_cache(tiny_model, bucket_videos, tmp_path_factory):
    """The bucket videos cached into BUCKETS: each landscape video gives a 17-frame clip and its 9-frame tail, each
    portrait one a portrait clip: 6 clips, two per bucket."""
    out = tmp_path_factory.mktemp("bucket_cache")
    assert cache_clips(tiny_model, out, "--video_dir", bucket_videos, "--buckets", *BUCKETS) == 0
    return str(out)


@pytest.fixture(scope="session")
def tiny_model_25(tmp_path_factory):
    """A random Cosmos-Predict2.5 checkpoint (tiny Qwen2.5-VL: 2 layers x 32, so [512, 64] embeddings)."""
    import make_random_cosmos

    path = str(tmp_path_factory.mktemp("models") / "tiny-cosmos25")
    make_random_cosmos.main(
        make_random_cosmos.parse_args(["--family", "predict2.5", "--size", "tiny", "--output_dir", path])
    )
    return path


@pytest.fixture(scope="session")
def one_clip_cache_25(tiny_model_25, clips, tmp_path_factory):
    """The first video's first clip cached with the Predict2.5 model (projected text embeddings)."""
    videos = tmp_path_factory.mktemp("one_video_25")
    shutil.copy(os.path.join(clips["videos"], clips["keys"][0] + ".mp4"), videos)
    out = tmp_path_factory.mktemp("one_clip_cache_25")
    argv = ["--video_dir", videos, "--max_clips_per_video", "1", "--prompt", "a worker's hands"]
    assert cache_clips(tiny_model_25, out, *argv) == 0
    return str(out)


OVERFIT_STEPS = 300


@pytest.fixture(scope="session")
def overfit_run(tiny_model, one_clip_cache, tmp_path_factory):
    """The tiny model trained until it memorizes the one cached clip: its output dir (weights, losses.jsonl)."""
    import train_cosmos_lora as train

    out = tmp_path_factory.mktemp("overfit")
    args = train_args(tiny_model, one_clip_cache, out, "--max_train_steps", OVERFIT_STEPS, *OVERFIT_ARGS)
    assert train.main(args) == 0
    return str(out)


@pytest.fixture(scope="session")
def overfit_run_25(tiny_model_25, one_clip_cache_25, tmp_path_factory):
    """The tiny Predict2.5 model trained until it memorizes its one cached clip (150 steps suffice here)."""
    import train_cosmos_lora as train

    out = tmp_path_factory.mktemp("overfit_25")
    args = train_args(tiny_model_25, one_clip_cache_25, out, "--max_train_steps", 150, *OVERFIT_ARGS)
    assert train.main(args) == 0
    return str(out)


class Family:
    """One model family's tiny model, one-clip cache and overfit run, each built only when a test first asks."""

    FIXTURES = {
        "predict2": ("tiny_model", "one_clip_cache", "overfit_run"),
        "predict2.5": ("tiny_model_25", "one_clip_cache_25", "overfit_run_25"),
    }

    def __init__(self, name, request):
        self.name, self._request = name, request

    def _get(self, which):
        return self._request.getfixturevalue(self.FIXTURES[self.name][which])

    @property
    def model(self):
        return self._get(0)

    @property
    def one_clip_cache(self):
        return self._get(1)

    @property
    def overfit_run(self):
        return self._get(2)

    @property
    def model_family(self):
        """The cosmos_families.ModelFamily of its model."""
        from cosmos_families import detect_family

        return detect_family(self.model)


@pytest.fixture(params=list(Family.FIXTURES))
def family(request):
    """Runs a test once per model family, Predict2 and Predict2.5."""
    return Family(request.param, request)
