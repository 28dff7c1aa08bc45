"""Long rollouts (sample.py --rollout_chunks N): the chained clips join without a gap (each clip after the first is
conditioned on the previous clip's last generated frames), the rollout has its length, the ground truth is the
source video's following frames, and cached clips (fixed-length) are refused before any model loads."""

import json
import os
import re

import pytest
import torch
from PIL import Image

import evaluate
import sample
from conftest import TINY, error_line, no_model_may_load, run_script, sample_args
from cosmos_families import FAMILIES
from cosmos_metrics import psnr
from cosmos_video import LABEL_HEIGHT, decode_frames, fit_frames, open_video, probe_video, read_mp4

FAST = ["--num_inference_steps", 2, "--guidance_scale", 1]
PREDICT2 = FAMILIES["Cosmos2VideoToWorldPipeline"]
PREDICT25 = FAMILIES["Cosmos2_5_PredictBasePipeline"]


def record_encoded_and_decoded(monkeypatch):
    """Lists that fill with the conditioning frames each clip's VAE encode is given and the frames each clip decodes
    to, as the script passes them."""
    encoded, decoded = [], []
    conditioning_latents, decode_to_frames = sample.conditioning_latents, sample.decode_to_frames

    def encode(job, *args, **kwargs):
        encoded.append(job.cond_frames.clone())
        return conditioning_latents(job, *args, **kwargs)

    def decode(*args, **kwargs):
        decoded.append(decode_to_frames(*args, **kwargs))
        return decoded[-1].clone()

    monkeypatch.setattr(sample, "conditioning_latents", encode)
    monkeypatch.setattr(sample, "decode_to_frames", decode)
    return encoded, decoded


def test_rollout_clips_join_without_a_gap(family, clips, tmp_path, monkeypatch):
    """Clip k+1 is conditioned on exactly the last 5 frames clip k decoded to; the joined video holds each frame
    once (17 + 12 + 12 frames); its first clip is the single-clip video of the same seed."""
    video = os.path.join(clips["videos"], clips["keys"][1] + ".mp4")
    args = sample_args(family.model, tmp_path, "--input", video, "--num_conditioning_frames", 5, *FAST)
    components = sample.load_pipeline_components(args, torch.device("cpu"), family.model_family)
    jobs = sample.collect_jobs(args, family.model_family)
    (single,) = sample.generate_rollouts(jobs, components, args, first_index=0)

    encoded, decoded = record_encoded_and_decoded(monkeypatch)
    args.rollout_chunks = 3
    (rollout,) = sample.generate_rollouts(jobs, components, args, first_index=0)

    assert len(encoded) == len(decoded) == 3
    assert torch.equal(encoded[0], jobs[0].cond_frames)
    for k in (1, 2):
        assert encoded[k].shape == (5, 64, 112, 3)
        assert torch.equal(encoded[k], decoded[k - 1][0, -5:])
        assert torch.equal(rollout.chunks[k].cond_frames, encoded[k])
    joined = rollout.video()
    assert joined.shape == (17 + 12 + 12, 64, 112, 3) == (sample.rollout_length(17, 5, 3), 64, 112, 3)
    assert torch.equal(joined, torch.cat([decoded[0][0], decoded[1][0, 5:], decoded[2][0, 5:]]))
    assert rollout.spans() == [
        {"frames": [0, 17], "conditioning_frames": [0, 5]},
        {"frames": [12, 29], "conditioning_frames": [12, 17]},
        {"frames": [24, 41], "conditioning_frames": [24, 29]},
    ]
    for k, span in enumerate(rollout.spans()[1:], start=1):  # the frames clip k was conditioned on are in the video
        assert torch.equal(joined[slice(*span["conditioning_frames"])], encoded[k])
    assert torch.equal(decoded[0][0], single.video())
    assert not torch.equal(decoded[1][0, 5:], decoded[2][0, 5:])


def test_a_batch_of_rollouts_equals_its_rollouts_one_by_one(tiny_model, clips, tmp_path):
    """In a batch, each job chains its own clips with its own seeds (job i, clip k), as it does alone."""
    videos = [os.path.join(clips["videos"], key + ".mp4") for key in clips["keys"][:2]]
    args = sample_args(tiny_model, tmp_path, "--input", *videos, "--rollout_chunks", 2, "--batch_size", 2, *FAST)
    family = PREDICT2
    components = sample.load_pipeline_components(args, torch.device("cpu"), family)
    jobs = sample.collect_jobs(args, family)
    batched = [r.video().float() for r in sample.generate_rollouts(jobs, components, args, first_index=0)]
    alone = [sample.generate_rollouts([job], components, args, i)[0].video().float() for i, job in enumerate(jobs)]
    for together, by_itself in zip(batched, alone, strict=True):
        assert together.shape == (33, 64, 112, 3)
        assert (together - by_itself).abs().max() <= 2  # uint8 rounding of float sums in another order
    assert (batched[0] - batched[1]).abs().mean() > 5


def source_frames(path, indices, height=64, width=112):
    with open_video(path) as container:
        num_source_frames, _ = probe_video(container)
        decoded = decode_frames(container, set(range(num_source_frames)))
    return fit_frames(torch.stack([torch.from_numpy(decoded[i]) for i in indices]), height, width)


def test_the_ground_truth_is_the_source_frames_that_follow_over_the_whole_rollout(tiny_model, tmp_path, capsys):
    """A 6.5 s 30 fps video holds a 3-clip rollout at 8 fps (17 + 16 + 16 = 49 frames, to 6.0 s): rollout frame t is
    source frame round(t * 30 / 8). Predict2.5 conditions on the video's last frames: no ground truth."""
    import make_synthetic_clips

    (key,) = make_synthetic_clips.make_dataset(
        str(tmp_path), num_videos=1, seconds=6.5, height=128, width=224, codec="h264", num_factories=1, seed=3
    )
    path = os.path.join(tmp_path, "videos", key + ".mp4")
    args = sample_args(tiny_model, tmp_path / "out", "--rollout_chunks", 3)
    job = sample.video_job(path, args, PREDICT2)
    expected = source_frames(path, [round(t * 30 / 8) for t in range(49)])
    assert torch.equal(job.truth_frames, expected)
    assert torch.equal(job.cond_frames, expected[:1])
    assert "note:" not in capsys.readouterr().out

    job = sample.video_job(path, args, PREDICT25)
    assert job.truth_frames is None
    assert torch.equal(job.cond_frames, source_frames(path, [194]))  # the last of its 195 frames


def test_a_video_shorter_than_the_rollout_is_scored_as_far_as_it_goes(tiny_model, clips, tmp_path):
    """sample.py --rollout_chunks 2, as a user runs it: a 4 s video holds 32 of the 33 frames at 8 fps, and says so;
    the mp4 is the whole rollout, results.json scores frames 1-31 one by one, the contact sheet captions them."""
    video = os.path.join(clips["videos"], clips["keys"][0] + ".mp4")
    common = ["--pretrained_model_name_or_path", tiny_model, "--output_dir", tmp_path, *FAST]
    tiny = ["--height", 64, "--width", 112, "--num_frames", 17, "--disable_safety_checker"]
    result = run_script("sample.py", *common, *tiny, "--input", video, "--rollout_chunks", 2, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"note: {video} holds 32 of the 33 frames generated at 8.0 fps" in result.stdout

    (scored,) = json.load(open(tmp_path / "results.json"))["videos"]
    assert scored["chunks"] == [
        {"frames": [0, 17], "conditioning_frames": [0, 1]},
        {"frames": [16, 33], "conditioning_frames": [16, 17]},
    ]
    assert scored["truth_frames"] == 32 and scored["per_frame"]["frame"] == list(range(1, 32))
    assert len(scored["per_frame"]["psnr"]) == len(scored["per_frame"]["ssim"]) == 31
    generated, both = read_mp4(tmp_path / scored["video"]), read_mp4(tmp_path / scored["side_by_side"])
    assert generated.shape == (33, 64, 112, 3) and both.shape == (33, 64, 224, 3)
    truth = torch.from_numpy(both[:31, :, :112])
    assert abs(psnr(torch.from_numpy(generated[1:31]), truth[1:31]) - scored["psnr"]) < 2  # lossy mp4s
    assert both[32, :, :112].mean() < 10  # black where the video ends
    sheet = Image.open(tmp_path / "contact_sheet.png")  # truth row, generated row with its frame captions
    assert sheet.size == (8 * 112, 2 * (LABEL_HEIGHT + 64 + 2) + LABEL_HEIGHT)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--from_cache", "CACHE"], "--rollout_chunks 2: --from_cache CACHE gives cached clips, and cached clips are"),
        (["--input", "CLIP"], "--rollout_chunks 2: --input CLIP is a cached clip, and cached clips are fixed-length"),
        (["--input", "IMAGE", "--num_frames", 5, "--num_conditioning_frames", 5], "needs clips longer than"),
    ],
)
def test_rollouts_beyond_a_cached_clip_are_refused_before_any_model_loads(
    tiny_model, one_clip_cache, image, tmp_path, monkeypatch, extra, message
):
    clip = sample.list_cached_clips(one_clip_cache)[0].path
    names = {"CACHE": one_clip_cache, "CLIP": clip, "IMAGE": image}
    no_model_may_load(monkeypatch, sample)
    args = sample_args(tiny_model, tmp_path / "out", *[names.get(e, e) for e in extra], "--rollout_chunks", 2)
    message = message.replace("CACHE", one_clip_cache).replace("CLIP", clip)
    with pytest.raises(ValueError, match=re.escape(message)) as raised:
        sample.main(args)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists()


def test_the_script_refuses_a_rollout_of_cached_clips_in_one_line(tiny_model, one_clip_cache, tmp_path):
    result = run_script(
        "sample.py",
        "--pretrained_model_name_or_path",
        tiny_model,
        "--output_dir",
        tmp_path,
        "--from_cache",
        one_clip_cache,
        "--rollout_chunks",
        2,
        "--disable_safety_checker",
        timeout=120,
    )
    assert "cached clips are fixed-length" in error_line(result)


def test_evaluate_scores_a_rollout_over_its_whole_length(tiny_model, overfit_run, tmp_path):
    """evaluate.py --rollout_chunks 3 on a video long enough: every model's per-frame curve spans the whole rollout
    (49 frames less the first conditioning frame), and the side-by-side video is as long as the rollout."""
    import make_synthetic_clips

    (key,) = make_synthetic_clips.make_dataset(
        str(tmp_path), num_videos=1, seconds=6.5, height=128, width=224, codec="h264", num_factories=1, seed=3
    )
    video = os.path.join(tmp_path, "videos", key + ".mp4")
    args = evaluate.parse_args(
        ["--pretrained_model_name_or_path", tiny_model, "--output_dir", str(tmp_path / "out"), *TINY]
        + ["--lora_path", overfit_run, "--input", video, "--seeds", "1", "--rollout_chunks", "3"]
        + [str(flag) for flag in FAST]
    )
    evaluate.main(args)
    record = json.load(open(tmp_path / "out" / "evaluation.json"))
    for curves in record["per_frame"].values():
        assert {name: len(curve["mean"]) for name, curve in curves.items()} == {
            "base": 48,
            os.path.basename(overfit_run): 48,
        }
    (side_by_side,) = [os.path.join(root, f) for root, _, names in os.walk(tmp_path / "out" / "videos") for f in names]
    assert len(read_mp4(side_by_side)) == 49
