#!/usr/bin/env python
"""Did fine-tuning help? The base model against one or more fine-tunes of it on the same clips, paired.

Every model generates each (clip, seed) from the same conditioning frames, prompt and initial noise, through
sample.py's own generation path (its --compile fast path included). Each video is scored against the ground truth
frames that follow its conditioning frames (a cached clip's VAE reconstruction, a video input's own frames): PSNR,
SSIM and LPIPS per video and per frame index, FVD over the set. For each fine-tune and metric: the mean paired
difference against the base with a bootstrap 95% interval over clips (seeds averaged within a clip), and one line to
quote, e.g.

    ego-lora vs base: PSNR +1.21 dB [+0.84, +1.60] over 32 clips x 2 seeds; SSIM +0.0310 [+0.0200, +0.0420]

With --from_cache the clips are those the --lora_path run held out (its held_out.json), never a training clip of any
compared run. Writes to --output_dir: evaluation.json (every number), evaluation.md (the table and the verdict),
index.html (verdict, table, plots and videos on one page; open it in a browser), per_frame_METRIC.png (each metric
against the frame index, one line and 95% band per model), videos/CLIP.mp4 (truth | base | each fine-tune, labelled,
the clip's first seed) and grid.mp4 (all of those).

    python evaluate.py --pretrained_model_name_or_path nvidia/Cosmos-Predict2-2B-Video2World \\
        --lora_path outputs/ego-lora --from_cache /scratch/cache --num_videos 32 --seeds 2 --output_dir eval/

Seed k of clip c is job k * num_clips + c and draws its noise from --seed + k * num_clips + c, as sample.py's job
of that index does: sample.py --seed S + k * num_clips on the same clips makes the same videos.
"""

import argparse
import dataclasses
import html
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

import sample
from cosmos_cache import atomic_write_text, list_cached_clips
from cosmos_cli import parse_with_config, positive_int
from cosmos_families import detect_family, take_text_projection
from cosmos_metrics import (
    ALEXNET_URL,
    DEFAULT_METRICS,
    DIGITS,
    METRICS,
    NAMES,
    PER_FRAME_METRICS,
    UNITS,
    FrechetVideoDistance,
    check_metric_weights,
    default_lpips_weights,
    format_difference,
    load_lpips,
    lpips_per_frame,
    mean_curve,
    paired_difference,
    psnr,
    psnr_per_frame,
    scored_frames,
    ssim_per_frame,
    verdict_line,
)
from cosmos_process import file_written_whole, run_main, stage
from cosmos_run import HELD_OUT, read_held_out, split_by_record
from cosmos_video import label_strip, video_grid, write_mp4

BASE = "base"


def parse_args(argv=None):
    parser = sample.build_parser(__doc__, conflict_handler="resolve")  # sample.py's flags; a few redefined here
    parser.add_argument(
        "--lora_path",
        required=True,
        help="The fine-tune to evaluate: a train_cosmos_lora.py output dir or one of its checkpoint-STEP dirs. With "
        f"--from_cache its {HELD_OUT} decides the clips.",
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="RUN",
        help="More fine-tunes of the same base model, one row each (with the same --use_ema and --lora_scale). "
        "With --from_cache none may have trained on an evaluated clip.",
    )
    evaluation.add_argument(
        "--seeds",
        type=positive_int,
        default=2,
        help="Noise seeds per clip; a clip's seeds are averaged before the bootstrap over clips.",
    )
    evaluation.add_argument(
        "--metrics",
        nargs="+",
        choices=METRICS,
        default=list(DEFAULT_METRICS),
        help="What to compute. lpips and fvd run a network whose weights come from --lpips_weights/--fvd_weights "
        "or the libraries' caches (downloaded there when the hub is not offline). Default: those without a network.",
    )
    evaluation.add_argument(
        "--lpips_weights",
        default=None,
        help=f"torchvision's AlexNet ImageNet checkpoint ({os.path.basename(ALEXNET_URL)}) for LPIPS's backbone "
        f"(the lpips package ships its linear layers). Default: torch's hub cache, {default_lpips_weights()}.",
    )
    evaluation.add_argument(
        "--fvd_weights",
        default=None,
        help="cd-fvd's I3D weights (i3d_pretrained_400.pt) for FVD. Default: the file cd-fvd downloads into its "
        "own package folder (cdfvd/third_party/i3d/).",
    )
    evaluation.add_argument(
        "--bootstrap_samples", type=positive_int, default=10000, help="Resamples of the 95%% intervals."
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="Where evaluation.json, evaluation.md, index.html, the plots and the videos go.",
    )
    return parse_with_config(parser, argv)


# ----------------------------------------------------------------------------------------------------------------
# Models and clips
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Model:
    """One row of the evaluation: the base, or a fine-tune of it."""

    name: str  # "base", or the fine-tune's folder name
    args: argparse.Namespace  # sample.py's settings with this model's --lora_path (None for the base)


@dataclass
class Clip:
    """A clip with ground truth, and the runs that trained on it (only possible with --input)."""

    job: sample.Job
    trained_on: list


@dataclass
class Networks:
    """The metric networks asked for (None where not)."""

    lpips: torch.nn.Module | None
    fvd: FrechetVideoDistance | None


@dataclass
class Scores:
    """One model's scores: per video [clips, seeds] and per frame [clips, seeds, frames] (NaN past a clip's end),
    for each of its metrics; the first seed's video of each clip for the side-by-side videos."""

    per_video: dict
    per_frame: dict
    first_seed_videos: list


def models_to_evaluate(args):
    """The base, then --lora_path, then each --compare run, each with its own copy of the settings."""
    models = [Model(BASE, argparse.Namespace(**{**vars(args), "lora_path": None, "use_ema": False}))]
    for path in [args.lora_path, *args.compare]:
        name = os.path.basename(os.path.normpath(path))
        names = [m.name for m in models]
        name = name if name not in names else f"{name}_{len(models)}"
        models.append(Model(name, argparse.Namespace(**{**vars(args), "lora_path": path})))
    return models


def runs_that_trained_on(job, models):
    """The fine-tunes whose held_out.json says they trained on this cached clip."""
    if job.kind != "cached":
        return []
    cache_dir = os.path.dirname(os.path.dirname(job.source))
    trained = []
    for model in models[1:]:
        record = read_held_out(model.args.lora_path)
        if record is None or os.path.realpath(cache_dir) not in [
            record["cache_dir"],
            *record.get("trained_caches", []),
        ]:
            continue
        if record["cache_dir"] != os.path.realpath(cache_dir):  # a cache it trained on whole
            trained.append(model.name)
            continue
        train, _ = split_by_record(list_cached_clips(cache_dir), cache_dir, record)
        if os.path.realpath(job.source) in {os.path.realpath(c.path) for c in train}:
            trained.append(model.name)
    return trained


def collect_clips(args, family, models):
    """sample.py's jobs, each with ground truth; a --from_cache clip no compared run trained on. Bad inputs fail
    here, before any model loads."""
    clips = []
    for job in sample.collect_jobs(args, family):
        if job.kind == "image" or (job.kind == "video" and job.truth_frames is None):
            raise ValueError(
                f"{job.source} holds no ground truth to score against (give cached clips, or videos a "
                f"{family.name} model conditions on the first frames of)"
            )
        trained_on = runs_that_trained_on(job, models)
        if trained_on and args.from_cache:
            raise ValueError(f"{job.source} is held out by {args.lora_path} but trained {', '.join(trained_on)}")
        if trained_on:
            print(f"note: {job.name} is a training clip of {', '.join(trained_on)}")
        clips.append(Clip(job, trained_on))
    return clips


def seed_jobs(clips, num_seeds):
    """Job k * num_clips + c is clip c's seed k: its noise seed is --seed plus that index."""
    return [dataclasses.replace(clip.job) for _ in range(num_seeds) for clip in clips]


# ----------------------------------------------------------------------------------------------------------------
# Generation and scoring
# ----------------------------------------------------------------------------------------------------------------
def score_video(video, truth, num_cond, metrics, networks, device):
    """{metric: per-frame values} and {metric: per-video value} of the generated frames that have ground truth."""
    generated, reference = (t.to(device) for t in scored_frames(torch.from_numpy(video), truth, num_cond))
    per_frame = {"psnr": psnr_per_frame(generated, reference), "ssim": ssim_per_frame(generated, reference)}
    if networks.lpips is not None:
        per_frame["lpips"] = lpips_per_frame(networks.lpips, generated, reference)
    per_video = {metric: float(values.mean()) for metric, values in per_frame.items()}
    per_video["psnr"] = psnr(generated, reference)  # over the whole video, as sample.py reports it
    keep = [m for m in metrics if m in PER_FRAME_METRICS]
    return {m: per_frame[m].cpu().numpy() for m in keep}, {m: per_video[m] for m in keep}


def evaluate_model(model, components, jobs, truths, args, networks, progress):
    """Generate every (clip, seed) job with one model and score it as it comes."""
    num_clips, device = len(truths), components.transformer.device
    length = max(len(t) for t in truths)
    metrics = [m for m in args.metrics if m in PER_FRAME_METRICS]
    scores = Scores(
        per_video={m: np.full((num_clips, args.seeds), np.nan) for m in metrics},
        per_frame={m: np.full((num_clips, args.seeds, length), np.nan) for m in metrics},
        first_seed_videos=[None] * num_clips,
    )
    sample.check_projected_embeddings(jobs, components.text_projection)
    for batch, indices in sample.shape_batches(jobs, range(len(jobs)), args.batch_size):
        # Generate the batch (the same noise for every model: the seed follows the job's index).
        with stage(f"{model.name}: generating {', '.join(job.name for job in batch)}"):
            rollouts, videos = sample.generate_videos(batch, components, model.args, indices[0])
            num_cond = rollouts[0].chunks[0].num_cond_frames  # pixel frames
        # Score each video against its clip's ground truth; keep each clip's first seed for the side-by-side.
        for index, video in zip(indices, videos, strict=True):
            seed, clip = divmod(index, num_clips)
            with stage(f"{model.name}: scoring {jobs[index].name} seed {seed}"):
                per_frame, per_video = score_video(video, truths[clip], num_cond, metrics, networks, device)
                for metric in metrics:
                    scores.per_video[metric][clip, seed] = per_video[metric]
                    scores.per_frame[metric][clip, seed, : len(per_frame[metric])] = per_frame[metric]
                if networks.fvd is not None:
                    add_to_fvd(
                        networks.fvd, model.name, video, truths[clip], num_cond, first=model.name == BASE and seed == 0
                    )
                if seed == 0:
                    scores.first_seed_videos[clip] = video
            progress.update(1)
    return scores


def add_to_fvd(fvd, name, video, truth, num_cond, first):
    """Add the generated frames to the model's FVD set; with the clip's `first` video, its ground truth to the
    reference set (the frames after the conditioning frames of both)."""
    generated, reference = scored_frames(video, truth, num_cond)
    fvd.add_fake(name, generated[None])
    if first:
        fvd.add_real(reference[None].numpy())


def model_components(model, base, device, family):
    """The base's components, with a fine-tune's transformer in place of the base's (the VAE, text encoder and
    scheduler are shared)."""
    if model.name == BASE:
        return base
    transformer = sample.load_transformer(model.args, device, family)
    return dataclasses.replace(base, transformer=transformer, text_projection=take_text_projection(transformer))


def ground_truths(clips, components, args):
    """Each clip's ground truth frames, uint8 [T, H, W, 3] on the CPU."""
    truths = []
    for clip in clips:
        with stage(f"decoding the ground truth of {clip.job.name}"):
            truths.append(sample.ground_truth(clip.job, components.vae, compiled=args.compile).cpu())
    return truths


def load_networks(args, weights, device):
    return Networks(
        lpips=load_lpips(weights.lpips, device) if "lpips" in args.metrics else None,
        fvd=FrechetVideoDistance(weights.fvd, device) if "fvd" in args.metrics else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Summaries: numbers, verdict, plots, videos, page
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Summary:
    """Every number of the evaluation, as evaluation.json holds it."""

    means: dict  # model -> metric -> mean over all videos
    paired: dict  # fine-tune -> metric -> PairedDifference
    fvd: dict  # model -> FVD against the ground truth set
    curves: dict  # metric -> model -> {"mean", "low", "high"} per frame index after the conditioning frames
    verdict: list  # one line per fine-tune


def summarize(models, scores, networks, args):
    per_video_metrics = [m for m in args.metrics if m in PER_FRAME_METRICS]
    fvd = {m.name: networks.fvd.distance(m.name) for m in models} if networks.fvd is not None else {}
    means = {m.name: {k: float(np.mean(scores[m.name].per_video[k])) for k in per_video_metrics} for m in models}
    for name, value in fvd.items():
        means[name]["fvd"] = value
    paired, verdict = {}, []
    base = scores[BASE]
    for model in models[1:]:
        paired[model.name] = {
            k: paired_difference(scores[model.name].per_video[k], base.per_video[k], args.bootstrap_samples)
            for k in per_video_metrics
        }
        fvd_pair = (fvd[BASE], fvd[model.name]) if fvd else None
        verdict.append(verdict_line(model.name, paired[model.name], fvd_pair))
    curves = {k: {m.name: curve_of(scores[m.name].per_frame[k]) for m in models} for k in per_video_metrics}
    return Summary(means, paired, fvd, curves, verdict)


def curve_of(per_frame):
    mean, low, high = mean_curve(per_frame)
    return {"mean": mean.tolist(), "low": low.tolist(), "high": high.tolist()}


def plot_curves(metric, curves, path):
    """One line and 95% band per model of a per-frame metric against the frame index after the conditioning."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
    for name, curve in curves.items():
        x = np.arange(1, len(curve["mean"]) + 1)
        axes.plot(x, curve["mean"], label=name)
        axes.fill_between(x, curve["low"], curve["high"], alpha=0.2)
    axes.set_xlabel("frame after the last conditioning frame")
    axes.set_ylabel(NAMES[metric] + UNITS[metric])
    axes.set_title(f"{NAMES[metric]} per frame (mean and 95% band over clips)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with file_written_whole(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def labelled(video, text):
    """The video under a strip of text, uint8 [T, LABEL + H, W, 3]."""
    strip = label_strip(text, video.shape[2])
    return np.concatenate([np.broadcast_to(strip, (len(video), *strip.shape)), video], axis=1)


def write_side_by_sides(clips, truths, models, scores, output_dir):
    """videos/CLIP.mp4 per clip (truth | base | each fine-tune, first seed) and grid.mp4; their relative paths."""
    os.makedirs(os.path.join(output_dir, "videos"), exist_ok=True)
    paths, side_by_sides = [], []
    for c, (clip, truth) in enumerate(zip(clips, truths, strict=True)):
        videos = [scores[m.name].first_seed_videos[c] for m in models]
        length = min(len(truth), *(len(v) for v in videos))
        truth_label = "truth (VAE)" if clip.job.kind == "cached" else "truth"  # a cached clip's VAE reconstruction
        panels = [labelled(truth.numpy()[:length], truth_label)]
        panels += [labelled(v[:length], m.name) for m, v in zip(models, videos, strict=True)]
        side_by_side = np.concatenate(panels, axis=2)
        path = os.path.join("videos", f"{clip.job.name}.mp4")
        with stage(f"writing {path}"):
            write_mp4(os.path.join(output_dir, path), side_by_side, clip.job.fps)
        paths.append(path)
        side_by_sides.append(side_by_side)
    write_mp4(os.path.join(output_dir, "grid.mp4"), video_grid(side_by_sides), clips[0].job.fps)
    return paths


def results_table(models, summary, metrics):
    """Markdown rows: each model's means, and each fine-tune's paired difference with its interval."""
    header = "| model | " + " | ".join(f"{NAMES[k]}{UNITS[k]}" for k in metrics) + " |"
    rows = [header, "|" + "---|" * (len(metrics) + 1)]
    for model in models:
        cells = []
        for k in metrics:
            value = summary.means[model.name].get(k)
            text = "" if value is None else f"{value:.{DIGITS[k]}f}"
            if model.name in summary.paired and k in summary.paired[model.name]:
                text += f" ({format_difference(k, summary.paired[model.name][k]).split(' ', 1)[1]})"
            cells.append(text)
        rows.append(f"| {model.name} | " + " | ".join(cells) + " |")
    return rows


def markdown_report(models, clips, summary, args):
    lines = ["# Evaluation: base against fine-tuned", ""]
    lines += ["```", *summary.verdict, "```", ""]
    lines += results_table(models, summary, args.metrics)
    lines += [
        "",
        f"Means over {len(clips)} clips x {args.seeds} seeds; in brackets the paired difference against the base "
        "with its bootstrap 95% interval over clips. Scored on the frames after the conditioning frames.",
    ]
    trained = [f"{c.job.name} (trained {', '.join(c.trained_on)})" for c in clips if c.trained_on]
    if trained:
        lines += ["", "Training clips among the evaluated ones: " + ", ".join(trained) + "."]
    return "\n".join(lines) + "\n"


PAGE_SCRIPT = """
const videos = document.querySelectorAll("video");
let loaded = 0, failed = 0;
function mark() {
  document.body.dataset.videosLoaded = loaded;
  document.body.dataset.videoErrors = failed;
}
videos.forEach(v => {
  v.addEventListener("loadeddata", () => { loaded++; mark(); });
  v.addEventListener("error", () => { failed++; mark(); });
  v.load();
});
mark();
"""


def html_page(models, clips, summary, plots, videos, args):
    """index.html: the verdict, the table, the plots and the side-by-side videos; relative paths, nothing external.
    Its script counts the videos that loaded (body data-videos-loaded) and those that failed (data-video-errors)."""
    table = results_table(models, summary, args.metrics)

    def row(line, cell):
        cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
        return "<tr>" + "".join(f"<{cell}>{c}</{cell}>" for c in cells) + "</tr>"

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Evaluation</title>',
        "<style>body{font-family:sans-serif;margin:2em}pre{background:#f4f4f4;padding:1em;white-space:pre-wrap}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}img{max-width:100%}"
        "video{width:100%;max-width:1344px}</style>",
        '</head><body data-videos-loaded="0" data-video-errors="0">',
        "<h1>Base against fine-tuned</h1>",
        '<pre id="verdict">' + html.escape("\n".join(summary.verdict)) + "</pre>",
        "<table>" + row(table[0], "th") + "".join(row(line, "td") for line in table[2:]) + "</table>",
        f"<p>Means over {len(clips)} clips x {args.seeds} seeds; in brackets the paired difference against the base "
        "with its bootstrap 95% interval over clips.</p>",
        *[f'<h2>{NAMES[k]} per frame</h2><img src="{html.escape(p)}" alt="{NAMES[k]} per frame">' for k, p in plots],
        "<h2>Videos: truth | base | fine-tunes (each clip's first seed)</h2>",
        *[
            f'<h3>{html.escape(c.job.name)}</h3><video src="{html.escape(v)}" controls muted loop preload="auto">'
            "</video>"
            for c, v in zip(clips, videos, strict=True)
        ],
        f"<script>{PAGE_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def write_outputs(models, clips, truths, scores, summary, args):
    out = args.output_dir
    plots = []
    for metric, curves in summary.curves.items():
        plots.append((metric, f"per_frame_{metric}.png"))
        plot_curves(metric, curves, os.path.join(out, plots[-1][1]))
    videos = write_side_by_sides(clips, truths, models, scores, out)
    record = {
        "settings": vars(args),
        "models": [{"name": m.name, "lora_path": m.args.lora_path} for m in models],
        "clips": [
            {"name": c.job.name, "input": c.job.source, "shape": c.job.shape, "trained_on": c.trained_on}
            for c in clips
        ],
        "seeds": [args.seed + k * len(clips) for k in range(args.seeds)],
        "verdict": summary.verdict,
        "means": summary.means,
        "paired": {n: {k: dataclasses.asdict(d) for k, d in p.items()} for n, p in summary.paired.items()},
        "fvd": summary.fvd,
        "per_video": {m.name: {k: v.tolist() for k, v in scores[m.name].per_video.items()} for m in models},
        "per_frame": summary.curves,
        "videos": videos,
        "plots": [p for _, p in plots],
    }
    atomic_write_text(os.path.join(out, "evaluation.json"), json.dumps(record, indent=2, default=str))
    atomic_write_text(os.path.join(out, "evaluation.md"), markdown_report(models, clips, summary, args))
    atomic_write_text(os.path.join(out, "index.html"), html_page(models, clips, summary, plots, videos, args))


# ----------------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------------
def validate_args(args):
    """Everything that can fail before a model loads: the metric weights first, then what sample.py checks, for
    every fine-tune."""
    weights = check_metric_weights(args.metrics, args.lpips_weights, args.fvd_weights)
    sample.validate_args(args)
    for run in args.compare:
        sample.validate_lora_args(argparse.Namespace(**{**vars(args), "lora_path": run}), flag="--compare")
    return weights


def main(args):
    weights = validate_args(args)
    family = detect_family(args.pretrained_model_name_or_path, args.revision)
    args.num_inference_steps = args.num_inference_steps or family.num_inference_steps
    models = models_to_evaluate(args)
    for model in models[1:]:
        sample.check_lora_family(model.args.lora_path, family)
    clips = collect_clips(args, family, models)
    jobs = seed_jobs(clips, args.seeds)
    state = Accelerator()  # reads ACCELERATE_USE_CPU, as sample.py does
    if state.num_processes > 1:
        raise ValueError("evaluate.py runs in one process: start it with python, not accelerate launch")
    os.makedirs(args.output_dir, exist_ok=True)
    networks = load_networks(args, weights, state.device)
    base = sample.load_pipeline_components(models[0].args, state.device, family)
    truths = ground_truths(clips, base, args)
    scores = {}
    progress = tqdm(total=len(models) * len(jobs), desc="videos")
    for model in models:
        # Load the model (a fine-tune: its transformer only), generate and score its videos, then free it.
        with stage(f"loading {model.name}"):
            components = model_components(model, base, state.device, family)
        scores[model.name] = evaluate_model(model, components, jobs, truths, args, networks, progress)
        del components
    progress.close()
    summary = summarize(models, scores, networks, args)
    write_outputs(models, clips, truths, scores, summary, args)
    for line in summary.verdict:
        print(line)
    print(f"wrote evaluation.json, evaluation.md, index.html, the plots and {len(clips)} videos to {args.output_dir}")
    return summary


if __name__ == "__main__":
    run_main(main, parse_args)
