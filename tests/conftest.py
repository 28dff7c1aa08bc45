import os
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
        output_dir=root, num_videos=6, seconds=4.0, fps=30.0, height=256, width=456, codec="both", captions=True,
        num_factories=2, videos_per_tar=2, seed=0,
    )
    return {"root": root, "videos": os.path.join(root, "videos"), "tars": os.path.join(root, "tars"), "keys": keys}


def run_script(script, *args, **kwargs):
    """Run one of the project's scripts in a subprocess, the way a user does."""
    import subprocess

    return subprocess.run([sys.executable, os.path.join(REPO, script), *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, env=dict(os.environ, HF_HUB_OFFLINE="1"), **kwargs)
