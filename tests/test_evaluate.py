"""evaluate.py and cosmos_metrics: the metrics against the libraries, the paired comparison (exactly 0 for a model
that is the base, a clear win for the overfit run on its clip), the missing-weights error, the pictures and the page
in a real headless Chromium."""

import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import cosmos_metrics
import evaluate
from conftest import TINY, base_transformer, error_line, no_model_may_load, run_script


def frames(seed, count=3, height=32, width=48):
    """Smooth random uint8 frames [count, H, W, 3] (upsampled noise, so SSIM and LPIPS see structure)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(count, 3, height // 8, width // 8, generator=g)
    big = torch.nn.functional.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    return (big * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def noisy(video, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (video.float() + torch.randn(video.shape, generator=g) * sigma).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def random_alexnet(tmp_path_factory):
    """torchvision's AlexNet with random weights, saved as its ImageNet checkpoint is (the --lpips_weights file)."""
    import torchvision

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "alexnet-random.pth")
    torch.save(torchvision.models.alexnet().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def random_i3d(tmp_path_factory):
    """cd-fvd's InceptionI3d with random weights, saved as its i3d_pretrained_400.pt is (the --fvd_weights file)."""
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("weights") / "i3d-random.pt")
    torch.save(InceptionI3d(400, in_channels=3).state_dict(), path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------
def test_psnr_and_ssim_agree_with_torchmetrics():
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    a = frames(0)
    b = noisy(a, 12)
    expected_psnr = [
        peak_signal_noise_ratio(x.float(), y.float(), data_range=255.0) for x, y in zip(a, b, strict=True)
    ]
    torch.testing.assert_close(cosmos_metrics.psnr_per_frame(a, b), torch.stack(expected_psnr), rtol=1e-4, atol=1e-4)
    assert cosmos_metrics.psnr(a, b) == pytest.approx(float(peak_signal_noise_ratio(a.float(), b.float(), 255.0)))
    x, y = (t.permute(0, 3, 1, 2).float() / 255 for t in (a, b))
    # torchmetrics averages SSIM over the reflect-padded image; its map at the valid positions is ours.
    maps = [
        structural_similarity_index_measure(x[i : i + 1], y[i : i + 1], data_range=1.0, return_full_image=True)[1]
        for i in range(3)
    ]
    expected_ssim = [m[..., 5:-5, 5:-5].mean() for m in maps]
    torch.testing.assert_close(cosmos_metrics.ssim_per_frame(a, b), torch.stack(expected_ssim), rtol=1e-4, atol=1e-4)
    # Equal videos: infinite PSNR over the video, 148 dB per exact frame, SSIM 1; more noise scores worse.
    assert cosmos_metrics.psnr(a, a) == float("inf") and abs(cosmos_metrics.ssim(a, a) - 1) < 1e-5
    assert cosmos_metrics.psnr_per_frame(a, a).min() > 140
    assert cosmos_metrics.ssim(a, b) > cosmos_metrics.ssim(a, noisy(a, 40)) > 0


def test_lpips_is_the_alexnet_lpips_with_the_weights_file(random_alexnet):
    import lpips
    import torchvision

    model = cosmos_metrics.load_lpips(random_alexnet, torch.device("cpu"))
    alexnet = torchvision.models.alexnet()
    alexnet.load_state_dict(torch.load(random_alexnet, weights_only=True))
    for index in (0, 3, 6, 8, 10):  # AlexNet's convolutions keep their indices in lpips' slices
        slice_ = next(
            s
            for s in (model.net.slice1, model.net.slice2, model.net.slice3, model.net.slice4, model.net.slice5)
            if str(index) in s._modules
        )
        assert torch.equal(slice_._modules[str(index)].weight, alexnet.features[index].weight)
    packaged = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # its linear layers ship with the package
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.lins.state_dict().values(), packaged.lins.state_dict().values(), strict=True)
    )
    a = frames(0)
    b = noisy(a, 30)
    x, y = (t.permute(0, 3, 1, 2).float() / 255 for t in (a, b))
    with torch.no_grad():
        expected = model(x, y, normalize=True).flatten()  # lpips' own [0, 1] input convention
    torch.testing.assert_close(cosmos_metrics.lpips_per_frame(model, a, b), expected, rtol=1e-5, atol=1e-6)
    assert cosmos_metrics.lpips_per_frame(model, a, a).abs().max() < 1e-6
    assert (cosmos_metrics.lpips_per_frame(model, a, noisy(a, 60)) > expected).all()


def test_fvd_of_a_set_against_itself_is_zero_and_grows_with_noise(random_i3d):
    fvd = cosmos_metrics.FrechetVideoDistance(random_i3d, torch.device("cpu"))
    real = np.stack([frames(seed, count=9).numpy() for seed in range(3)])
    fvd.add_real(real)
    for name, sigma in (("same", 0), ("noisy", 25), ("noisier", 80)):
        fvd.add_fake(name, np.stack([noisy(torch.from_numpy(v), sigma).numpy() for v in real]))
    same, small, large = fvd.distance("same"), fvd.distance("noisy"), fvd.distance("noisier")
    assert abs(same) < 1e-3 * small, (same, small, large)
    assert 0 < small < large, (same, small, large)


def test_paired_difference_and_the_verdict_line():
    base = np.array([[20.0, 21.0], [22.0, 23.0], [18.0, 18.5]])
    same = cosmos_metrics.paired_difference(base, base)
    assert (same.mean, same.low, same.high, same.resampled) == (0.0, 0.0, 0.0, "clips")
    better = cosmos_metrics.paired_difference(base + [[1.0, 1.2], [0.8, 1.1], [1.3, 0.9]], base)
    assert better.mean == pytest.approx(1.05) and 0.8 < better.low < better.mean < better.high < 1.3
    one_clip = cosmos_metrics.paired_difference(base[:1] + [[1.0, 2.0]], base[:1])
    assert one_clip.resampled == "seeds" and 1.0 <= one_clip.low <= one_clip.high <= 2.0
    line = cosmos_metrics.verdict_line("run", {"psnr": better, "ssim": same}, fvd=(412.04, 305.0))
    assert re.fullmatch(
        r"run vs base: PSNR \+1\.05 dB \[\+\d\.\d\d, \+\d\.\d\d\] over 3 clips x 2 seeds; "
        r"SSIM \+0\.0000 \[\+0\.0000, \+0\.0000\]; FVD 412\.0 -> 305\.0",
        line,
    ), line


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py
# ----------------------------------------------------------------------------------------------------------------
def fresh_adapters(model, run, folder):
    """A fine-tune folder as the overfit run's, with a freshly initialized LoRA (B = 0) of the same config."""
    from peft import get_peft_model_state_dict

    from cosmos_adapters import ADAPTER_CONFIG, lora_config, save_finetuned_weights

    config = json.load(open(os.path.join(run, ADAPTER_CONFIG)))
    config.pop("files")
    transformer = base_transformer(model)
    transformer.add_adapter(lora_config(config["lora_rank"], config["lora_alpha"], config["lora_target_modules"]))
    save_finetuned_weights(get_peft_model_state_dict(transformer), str(folder), config)
    return str(folder)


def evaluation(model, output_dir, *extra):
    args = evaluate.parse_args(
        ["--pretrained_model_name_or_path", model, "--output_dir", str(output_dir), *TINY, *map(str, extra)]
    )
    return evaluate.main(args)


def test_a_model_that_is_the_base_pairs_with_it_to_exactly_zero(tiny_model, latent_cache, overfit_run, tmp_path):
    clips = sorted(os.path.join(root, f) for root, _, names in os.walk(latent_cache) for f in names if "__" in f)[:3]
    fresh = fresh_adapters(tiny_model, overfit_run, tmp_path / "fresh")
    common = ["--input", *clips, "--seeds", 2, "--num_inference_steps", 3]
    for run, extra in ((fresh, []), (overfit_run, ["--lora_scale", 0])):
        summary = evaluation(tiny_model, tmp_path / "out", "--lora_path", run, *common, *extra)
        for metric, difference in summary.paired[os.path.basename(run)].items():
            assert (difference.mean, difference.low, difference.high) == (0.0, 0.0, 0.0), (run, metric)
            assert (difference.num_clips, difference.num_seeds) == (3, 2)
    # The seeds differ: two seeds of a clip are two different videos.
    record = json.load(open(tmp_path / "out" / "evaluation.json"))
    assert all(a != b for a, b in record["per_video"]["base"]["psnr"])


def test_missing_metric_weights_fail_in_one_line_before_any_model_loads(
    tiny_model, one_clip_cache, overfit_run, tmp_path, monkeypatch
):
    import sample

    clip = sample.list_cached_clips(one_clip_cache)[0].path
    monkeypatch.setattr(cosmos_metrics, "default_fvd_weights", lambda: str(tmp_path / "no_i3d.pt"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    no_model_may_load(monkeypatch, sample)
    with pytest.raises(FileNotFoundError, match="pass --fvd_weights FILE"):
        evaluation(tiny_model, tmp_path, "--lora_path", overfit_run, "--input", clip, "--metrics", "psnr", "fvd")
    with pytest.raises(FileNotFoundError, match="--lpips_weights /no/such.pth does not exist"):
        evaluation(tiny_model, tmp_path, "--lora_path", overfit_run, "--input", clip, "--metrics", "lpips",
                   "--lpips_weights", "/no/such.pth")  # fmt: skip
    # The script itself: LPIPS asked for with torch's hub cache empty and the hub offline.
    result = run_script(
        "evaluate.py", "--pretrained_model_name_or_path", tiny_model, "--output_dir", tmp_path, *TINY,
        "--lora_path", overfit_run, "--input", clip, "--metrics", "lpips",
        env={"TORCH_HOME": str(tmp_path / "torch_home")}, timeout=120,
    )  # fmt: skip
    assert "pass --lpips_weights FILE" in error_line(result)


def chromium_body(page):
    """The <body> tag of the page after Chromium ran it headless (its script marks the videos that loaded)."""
    browser = shutil.which("chromium")
    if browser is None:
        pytest.fail("chromium is not installed: run tools/setup_test_deps.sh (`make test` does)", pytrace=False)
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         f"file://{page}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    match = re.search(r"<body[^>]*>", result.stdout)
    assert match, result.stderr[-2000:]
    return match.group(0)


def test_the_overfit_run_beats_the_base_on_its_clip_and_the_page_shows_it(
    tiny_model, one_clip_cache, overfit_run, random_alexnet, tmp_path
):
    """The script end to end, on the one clip the run memorized (its training clip, as the note says: a run that
    memorized one clip has no held-out clip to be better on)."""
    import sample

    clip = sample.list_cached_clips(one_clip_cache)[0].path
    out = tmp_path / "eval"
    result = run_script(
        "evaluate.py", "--pretrained_model_name_or_path", tiny_model, "--output_dir", out, *TINY,
        "--lora_path", overfit_run, "--input", clip, "--seeds", 3, "--guidance_scale", 1,
        "--metrics", "psnr", "ssim", "lpips", "--lpips_weights", random_alexnet, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is a training clip of overfit" in result.stdout
    record = json.load(open(out / "evaluation.json"))
    name = os.path.basename(overfit_run)
    psnr, ssim = record["paired"][name]["psnr"], record["paired"][name]["ssim"]
    assert psnr["mean"] > 3 and psnr["low"] > 0 and ssim["low"] > 0, record["paired"]
    assert psnr["resampled"] == "seeds" and (psnr["num_clips"], psnr["num_seeds"]) == (1, 3)
    assert record["verdict"][0] in result.stdout and record["verdict"][0].startswith(f"{name} vs base: PSNR +")
    # Per-frame curves over the 16 generated frames; a PNG plot per metric.
    assert len(record["per_frame"]["psnr"]["base"]["mean"]) == 16
    for plot in record["plots"]:
        with Image.open(out / plot) as image:
            assert image.format == "PNG" and image.size == (700, 400)
    # The labelled side-by-side: truth | base | fine-tune, under a strip of text.
    video = sample.read_mp4(str(out / record["videos"][0]))
    assert video.shape == (17, 64 + 12, 3 * 112, 3)
    assert "| model | PSNR dB | SSIM | LPIPS |" in (out / "evaluation.md").read_text()
    # The page renders in Chromium, and its one video loads.
    body = chromium_body(out / "index.html")
    assert 'data-videos-loaded="1"' in body and 'data-video-errors="0"' in body, body
    page = (out / "index.html").read_text()
    assert "http" not in page and record["verdict"][0] in page.replace("&gt;", ">")


def test_help_names_every_flag_with_its_default():
    result = run_script("evaluate.py", "--help", timeout=60)
    assert result.returncode == 0
    for flag in ("--compare", "--seeds", "--metrics", "--lpips_weights", "--fvd_weights", "--lora_scale"):
        assert flag in result.stdout
    assert "(default: ['psnr', 'ssim'])" in result.stdout and "(default: 2)" in result.stdout


def test_compared_runs_are_paired_on_the_held_out_clips_and_one_that_trained_on_them_is_refused(
    tiny_model, latent_cache, overfit_run, tmp_path
):
    """Two runs that held out the same video of the cache are compared on its clips; a run that trained on that
    video is refused by name before any generation. (Copies of the overfit run with held_out.json written as a run
    on latent_cache writes it.)"""
    from cosmos_cache import list_cached_clips
    from cosmos_run import HELD_OUT, write_held_out

    clips = list_cached_clips(latent_cache)
    held_key = clips[0].key
    held = [c for c in clips if c.key == held_key]

    def run(name, held_clips):
        folder = tmp_path / name
        shutil.copytree(overfit_run, folder)
        os.remove(folder / HELD_OUT)
        train = [c for c in clips if c not in held_clips]
        write_held_out(str(folder), latent_cache, clips, train, held_clips, [latent_cache])
        return str(folder)

    first, second, trained_all = run("first", held), run("second", held), run("trained_all", [])
    common = ["--from_cache", latent_cache, "--num_videos", len(held), "--seeds", 1, "--num_inference_steps", 2]
    summary = evaluation(tiny_model, tmp_path / "out", "--lora_path", first, "--compare", second, *common)
    assert list(summary.paired) == ["first", "second"] and summary.paired["first"]["psnr"].num_clips == len(held)
    record = json.load(open(tmp_path / "out" / "evaluation.json"))
    assert [c["input"] for c in record["clips"]] == [c.path for c in held]
    # The same weights on the same clips and noise: the two fine-tunes' videos are the same.
    assert record["per_video"]["first"] == record["per_video"]["second"]
    with pytest.raises(ValueError, match=re.escape(f"is held out by {first} but trained trained_all")):
        evaluation(tiny_model, tmp_path / "out2", "--lora_path", first, "--compare", trained_all, *common)


def test_training_validation_logs_the_paired_numbers_against_the_base(tiny_model, latent_cache, tmp_path):
    """--validation_metrics: the base's scores once, before the first step, then each validation's own, the base's
    and their paired difference (val/METRIC_vs_base) in OUTPUT/validation/metrics.jsonl and the trackers."""
    import train_cosmos_lora as train
    from conftest import train_args

    flags = ["--max_train_steps", 2, "--validation_steps", 2, "--num_validation_clips", 1, "--validation_videos", 1]
    flags += ["--validation_inference_steps", 3, "--learning_rate", 3e-3]
    with pytest.raises(ValueError, match="give --validation_videos N too"):
        train.validate_args(train_args(tiny_model, latent_cache, tmp_path, "--validation_metrics", "psnr"))
    assert (
        train.main(train_args(tiny_model, latent_cache, tmp_path, *flags, "--validation_metrics", "psnr", "ssim")) == 0
    )
    base = json.load(open(tmp_path / "validation" / "base_metrics.json"))
    assert set(base) == {"psnr", "ssim"} and len(base["psnr"]) == 1
    assert len(list((tmp_path / "validation" / "step-0").glob("*.mp4"))) == 1  # the base's video
    rows = [json.loads(line) for line in open(tmp_path / "validation" / "metrics.jsonl")]
    assert [row["step"] for row in rows] == [2]
    for row in rows:
        assert row["val/psnr_base"] == pytest.approx(np.mean(base["psnr"]))
        assert row["val/psnr_vs_base"] == pytest.approx(row["val/psnr"] - row["val/psnr_base"])
        assert row["val/psnr_vs_base"] != 0  # one step of training changed the videos
