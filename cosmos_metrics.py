"""How close generated video is to the ground truth, and whether one model beats another on the same inputs.

PSNR and SSIM per video and per frame (no network); LPIPS per frame (the `lpips` package's AlexNet LPIPS v0.1);
FVD over a set of videos (I3D logits, the `cd-fvd` package). The two networks take their weights from a local file
(--lpips_weights, --fvd_weights) or the libraries' own caches; `check_metric_weights` refuses, in one line and before
any model loads, to compute one whose weights are missing while the hub is offline. `paired_difference` is the mean
difference of two models over the same clips and seeds with a bootstrap 95% interval over clips; `verdict_line` says
it in one line.
"""

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cosmos_cli import hub_offline

METRICS = ("psnr", "ssim", "lpips", "fvd")
DEFAULT_METRICS = ("psnr", "ssim")  # those that need no network weights
PER_FRAME_METRICS = ("psnr", "ssim", "lpips")  # also scored per video and per frame index; FVD is one per set
UNITS = {"psnr": " dB", "ssim": "", "lpips": "", "fvd": ""}
DIGITS = {"psnr": 2, "ssim": 4, "lpips": 4, "fvd": 1}
NAMES = {"psnr": "PSNR", "ssim": "SSIM", "lpips": "LPIPS", "fvd": "FVD"}
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "lpips": False, "fvd": False}
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"  # torchvision's AlexNet IMAGENET1K_V1
MAX_PSNR_MSE = 1e-10  # per-frame PSNR of an exact frame: 10 log10(255^2 / 1e-10) = 148 dB, not infinity


# ----------------------------------------------------------------------------------------------------------------
# PSNR and SSIM
# ----------------------------------------------------------------------------------------------------------------
def psnr(a, b):
    """PSNR in dB of uint8 frames [T, H, W, 3] over the whole video (infinite where they are equal)."""
    mse = F.mse_loss(a.float(), b.float())
    return float("inf") if mse == 0 else float(10 * torch.log10(255.0**2 / mse))


def psnr_per_frame(a, b):
    """PSNR in dB of each frame [T] (an exact frame scores 148 dB)."""
    mse = ((a.float() - b.float()) ** 2).flatten(1).mean(1).clamp(min=MAX_PSNR_MSE)
    return 10 * torch.log10(255.0**2 / mse)


def ssim_per_frame(a, b):
    """SSIM of each frame [T] of uint8 frames [T, H, W, 3]: Gaussian window 11, sigma 1.5, per channel, valid
    positions only (as scikit-image crops it; torchmetrics averages over the reflect-padded image instead)."""
    x, y = (t.permute(0, 3, 1, 2).float() / 255 for t in (a, b))
    coords = torch.arange(11, dtype=torch.float32, device=x.device) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)

    def blur(t):
        return F.conv2d(t, window, groups=3)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return value.flatten(1).mean(1)


def ssim(a, b):
    """Mean SSIM of uint8 frames [T, H, W, 3] (every frame has the same weight)."""
    return float(ssim_per_frame(a, b).mean())


def scored_frames(generated, truth, num_cond_pixel_frames):
    """The frames every metric scores: the generated (non-conditioning) frames that have ground truth, and that
    truth."""
    end = min(len(generated), len(truth))
    return generated[num_cond_pixel_frames:end], truth[num_cond_pixel_frames:end]


def frame_metrics(generated, truth, num_cond_pixel_frames):
    """PSNR/SSIM over the scored frames (scored_frames), and frame by frame (`per_frame`, by frame index)."""
    gen, ref = scored_frames(generated, truth, num_cond_pixel_frames)
    ssim_frames = ssim_per_frame(gen, ref)
    return {
        "psnr": psnr(gen, ref),
        "ssim": float(ssim_frames.mean()),
        "per_frame": {
            "frame": list(range(num_cond_pixel_frames, num_cond_pixel_frames + len(gen))),
            "psnr": psnr_per_frame(gen, ref).tolist(),
            "ssim": ssim_frames.tolist(),
        },
    }


# ----------------------------------------------------------------------------------------------------------------
# Metric networks: LPIPS (AlexNet) and FVD (I3D)
# ----------------------------------------------------------------------------------------------------------------
def default_lpips_weights():
    """Where torchvision caches AlexNet's ImageNet weights (the backbone LPIPS needs)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(ALEXNET_URL))


def default_fvd_weights():
    """Where cd-fvd keeps the I3D weights it downloads on first use (inside the installed package)."""
    import importlib.util

    spec = importlib.util.find_spec("cdfvd")
    if spec is None:
        raise ValueError("--metrics fvd needs the cd-fvd package: pip install cd-fvd")
    return os.path.join(os.path.dirname(spec.origin), "third_party", "i3d", "i3d_pretrained_400.pt")


@dataclass
class MetricWeights:
    """The weight files of the metric networks asked for; None where the library will download them."""

    lpips: str | None = None
    fvd: str | None = None


def check_metric_weights(metrics, lpips_weights=None, fvd_weights=None):
    """The weight file of each network metric asked for: the flag's file, else the library's cache; refused in one
    line when the flag's file is missing, or when neither exists and the hub is offline (HF_HUB_OFFLINE)."""
    found = MetricWeights()
    for metric, flag, given, default in (
        ("lpips", "--lpips_weights", lpips_weights, default_lpips_weights),
        ("fvd", "--fvd_weights", fvd_weights, default_fvd_weights),
    ):
        if metric not in metrics:
            continue
        if given and not os.path.isfile(given):
            raise FileNotFoundError(f"{flag} {given} does not exist")
        path = given or default()
        if not os.path.isfile(path):
            if hub_offline():
                raise FileNotFoundError(
                    f"--metrics {metric} needs its network's weights: {path} is missing and HF_HUB_OFFLINE is set; "
                    f"pass {flag} FILE (or --metrics without {metric})"
                )
            path = None  # the library downloads them
        setattr(found, metric, path)
    if "lpips" in metrics:
        import lpips  # noqa: F401  (fail here, before any model loads, when the package is missing)
    if "fvd" in metrics:
        default_fvd_weights()  # the same for cd-fvd
    return found


def load_lpips(weights, device):
    """LPIPS v0.1 on AlexNet (the `lpips` package; its linear layers ship with it) with the AlexNet backbone from
    `weights`, torchvision's checkpoint file (downloaded to torch's hub cache when None)."""
    import lpips

    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)  # the backbone built without its weights
    if weights is None:
        state = torch.hub.load_state_dict_from_url(ALEXNET_URL, map_location="cpu", weights_only=True)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"--lpips_weights {weights} holds no AlexNet `features.*` weights")
    # lpips' slices keep AlexNet's own layer indices: slice1.0.weight is features.0.weight.
    backbone = {key: features[key.split(".", 1)[1]] for key in model.net.state_dict()}
    model.net.load_state_dict(backbone)
    return model.eval().requires_grad_(False).to(device)


def lpips_per_frame(model, a, b, batch_size=16):
    """LPIPS of each frame [T] of uint8 frames [T, H, W, 3] (on the model's device)."""
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(a), batch_size):
        x, y = (
            t[start : start + batch_size].to(device).permute(0, 3, 1, 2).float() / 127.5 - 1 for t in (a, b)
        )  # [-1, 1]
        with torch.no_grad():
            values.append(model(x, y).flatten())
    return torch.cat(values)


class FrechetVideoDistance:
    """FVD of generated sets against one set of real videos: I3D logits (cd-fvd's InceptionI3d, its preprocessing:
    frames resized to 224x224, scaled to [-1, 1]) and the Frechet distance of their Gaussians."""

    def __init__(self, weights, device):
        from cdfvd import fvd

        self.scorer = fvd.cdfvd(model="i3d", ckpt_path=weights, device=str(device))
        self.fake_stats = {}

    def add_real(self, videos):
        """Add uint8 videos [N, T, H, W, 3] to the real set."""
        self.scorer.add_real_stats(np.asarray(videos))

    def add_fake(self, name, videos):
        """Add uint8 videos [N, T, H, W, 3] to the generated set `name`."""
        if name not in self.fake_stats:
            self.scorer.empty_fake_stats()
            self.fake_stats[name] = self.scorer.fake_stats
        self.scorer.fake_stats = self.fake_stats[name]
        self.scorer.add_fake_stats(np.asarray(videos))
        self.fake_stats[name] = self.scorer.fake_stats

    def distance(self, name):
        return float(self.scorer.compute_fvd_from_stats(fake_stats=self.fake_stats[name]))


# ----------------------------------------------------------------------------------------------------------------
# Paired comparison and its summaries
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class PairedDifference:
    """Mean of (model - base) over the same clips and seeds, with a bootstrap 95% interval: clips resampled (seeds
    averaged within a clip), or seeds where there is one clip; no interval from a single video."""

    mean: float
    low: float | None
    high: float | None
    num_clips: int
    num_seeds: int
    resampled: str  # "clips", "seeds" or "nothing"


def paired_difference(model, base, num_resamples=10000, seed=0):
    """PairedDifference of per-video values [clips, seeds] of a model and of the base on the same videos."""
    diff = np.asarray(model, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    num_clips, num_seeds = diff.shape
    units, resampled = (diff.mean(axis=1), "clips") if num_clips > 1 else (diff[0], "seeds")
    if len(units) == 1:
        return PairedDifference(float(units[0]), None, None, num_clips, num_seeds, "nothing")
    picks = np.random.default_rng(seed).integers(0, len(units), (num_resamples, len(units)))
    low, high = np.percentile(units[picks].mean(axis=1), [2.5, 97.5])
    return PairedDifference(float(units.mean()), float(low), float(high), num_clips, num_seeds, resampled)


def mean_curve(values):
    """Per frame index, over videos [clips, seeds, frames] (NaN past a video's end): the mean and a normal 95% band
    of it over clips (seeds averaged within a clip; over seeds where there is one clip)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[..., : int(np.sum(np.any(~np.isnan(values), axis=(0, 1))))]  # frame indices some video has
    units = np.nanmean(values, axis=1) if values.shape[0] > 1 else values[0]
    count = np.sum(~np.isnan(units), axis=0)
    mean = np.nanmean(units, axis=0)
    spread = np.nanstd(units, axis=0, ddof=1) if len(units) > 1 else np.zeros_like(mean)
    half = 1.96 * np.nan_to_num(spread) / np.sqrt(np.maximum(count, 1))
    return mean, mean - half, mean + half


def format_value(metric, value, signed=False):
    sign = "+" if signed else ""
    return f"{value:{sign}.{DIGITS[metric]}f}"


def format_difference(metric, paired):
    text = f"{NAMES[metric]} {format_value(metric, paired.mean, True)}{UNITS[metric]}"
    if paired.low is not None:
        text += f" [{format_value(metric, paired.low, True)}, {format_value(metric, paired.high, True)}]"
    return text


def verdict_line(name, paired, fvd=None):
    """`NAME vs base: PSNR +1.21 dB [+0.84, +1.60] over 32 clips x 2 seeds; LPIPS -0.0310 [...]; FVD 412.0 -> 305.0`
    from {metric: PairedDifference} and, for FVD, (base, model)."""
    parts = []
    for i, (metric, difference) in enumerate(paired.items()):
        text = format_difference(metric, difference)
        if i == 0:
            text += f" over {difference.num_clips} clips x {difference.num_seeds} seeds"
            if difference.resampled == "seeds":
                text += " (interval over seeds: one clip)"
        parts.append(text)
    if fvd is not None:
        parts.append(f"FVD {format_value('fvd', fvd[0])} -> {format_value('fvd', fvd[1])}")
    return f"{name} vs base: " + "; ".join(parts)
