"""Which videos and which clips: the video sources of cache_latents.py and caption_clips.py (a local folder, local
WebDataset tars, or a `datasets` dataset in any of its layouts), their split into shards, each video's clip plan, and
the captions a --captions_file gives per video or per clip. Both scripts plan clips with this code alone, so a
caption of caption_clips.py belongs to exactly one clip that cache_latents.py caches.
"""

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

from cosmos_cli import CAPTION_COLUMNS, KEY_COLUMNS, VIDEO_COLUMNS, VIDEO_EXTENSIONS
from cosmos_video import (
    Bucket,
    check_clip_geometry,
    nearest_bucket_size,
    parse_bucket,
    plan_bucket_clips,
    probe_video,
    video_size,
)

CAPTION_SHARD_FILE = "captions.jsonl"  # caption_clips.py: OUTPUT/shard_NNNNN/captions.jsonl


# ----------------------------------------------------------------------------------------------------------------
# Shards and source flags
# ----------------------------------------------------------------------------------------------------------------
def resolve_source_args(args):
    """The defaults that depend on other values: --num_shards / --shard_index default to the SLURM array (task
    count, and task id minus the first id); --buckets, parsed, defaults to one bucket of --num_frames x --height x
    --width."""
    if args.num_shards is None:
        args.num_shards = int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1))
    if args.shard_index is None:
        task_id = os.environ.get("SLURM_ARRAY_TASK_ID")
        args.shard_index = int(task_id) - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)) if task_id else 0
    args.buckets = (
        [parse_bucket(b) for b in args.buckets] if args.buckets else [Bucket(args.num_frames, args.height, args.width)]
    )


def given_sources(args):
    return [name for name in ("video_dir", "tars", "dataset") if getattr(args, name)]


def validate_source_args(args, source_required=True):
    """One-line errors for the source, the clip plan and the shard, before any model loads."""
    sources = given_sources(args)
    if len(sources) > 1:
        raise ValueError(f"give one source, not {' and '.join('--' + s for s in sources)}")
    if not sources and source_required:
        raise ValueError("give a source: --video_dir, --tars or --dataset")
    check_clip_geometry(args.num_frames, args.height, args.width)
    if args.clip_stride_seconds is not None and args.clip_stride_seconds <= 0:
        raise ValueError(f"--clip_stride_seconds must be positive, got {args.clip_stride_seconds}")
    if not 0 <= args.shard_index < args.num_shards:
        raise ValueError(
            f"--shard_index {args.shard_index} is outside 0..{args.num_shards - 1} (--num_shards {args.num_shards})"
        )
    if len(set(args.buckets)) != len(args.buckets):
        raise ValueError(f"--buckets lists a bucket twice: {' '.join(b.name for b in args.buckets)}")
    if args.video_dir and not os.path.isdir(args.video_dir):
        raise FileNotFoundError(f"--video_dir {args.video_dir} is not a directory")
    if args.video_dir and not list_local_videos(args.video_dir):
        raise FileNotFoundError(f"--video_dir {args.video_dir} holds no video file ({', '.join(VIDEO_EXTENSIONS)})")
    if args.tars and not glob.glob(args.tars, recursive=True):
        raise FileNotFoundError(f"--tars {args.tars!r} matches no file")


# ----------------------------------------------------------------------------------------------------------------
# The clip plan
# ----------------------------------------------------------------------------------------------------------------
def clip_plan(args):
    """Every setting that decides which frames each clip of a video holds."""
    return {
        "fps": args.fps,
        "clip_stride_seconds": args.clip_stride_seconds,
        "max_clips_per_video": args.max_clips_per_video,
        "resize_mode": args.resize_mode,
        "buckets": [b.name for b in args.buckets],
    }


def clip_plan_sha(plan):
    return hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedClip:
    """One clip of a video's plan: its place in the plan, its shape and the source frames it holds."""

    index: int
    bucket: Bucket
    indices: list  # source frame indices, one per clip frame
    start_seconds: float


@dataclass(frozen=True)
class VideoPlan:
    """A video's clips; `error` says why it has none."""

    clips: list
    source_fps: float
    error: str | None = None


def plan_video(container, args):
    """The clips of an open video under the clip plan of `args` (--buckets, --fps, --clip_stride_seconds,
    --max_clips_per_video): the buckets of its nearest aspect ratio, each clip the longest that still fits."""
    num_source_frames, source_fps = probe_video(container)
    height, width = video_size(container)
    size = nearest_bucket_size(args.buckets, height, width)
    buckets = [b for b in args.buckets if (b.height, b.width) == size]
    planned = plan_bucket_clips(
        buckets, num_source_frames, source_fps, args.fps, args.clip_stride_seconds, args.max_clips_per_video
    )
    clips = [
        PlannedClip(index, bucket, indices, indices[0] / source_fps) for index, (bucket, indices) in enumerate(planned)
    ]
    if clips:
        return VideoPlan(clips, source_fps)
    shortest = min(buckets, key=lambda b: b.num_frames)
    return VideoPlan(
        [],
        source_fps,
        f"too short for every bucket of its aspect ratio: {num_source_frames / source_fps:.2f} s, the shortest clip "
        f"({shortest.name}) needs {(shortest.num_frames - 1) / args.fps:.2f} s; source {width}x{height}",
    )


# ----------------------------------------------------------------------------------------------------------------
# Captions from a file: per video (rows with a key) or per clip (caption_clips.py rows: a key and a start time)
# ----------------------------------------------------------------------------------------------------------------
def clip_id(key, start_seconds):
    """How a per-clip caption finds its clip: the video key and the start time to the millisecond."""
    return key, round(float(start_seconds), 3)


@dataclass
class Captions:
    """Captions of a --captions_file: `videos` {key: caption}, `clips` {clip_id: caption}, and the clip plans
    (clip_plan_sha) the per-clip rows were made for."""

    videos: dict = field(default_factory=dict)
    clips: dict = field(default_factory=dict)
    clip_plans: set = field(default_factory=set)

    def __len__(self):
        return len(self.videos) + len(self.clips)


def caption_files(path):
    """The jsonl/csv file itself, or the caption files of a caption_clips.py output folder."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, "shard_*", "*.jsonl")))
    return [path]


def read_caption_rows(path):
    if path.endswith(".csv"):
        import csv

        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_captions_file(path, field):
    """Captions of a jsonl or csv file with a `key` column, or of a caption_clips.py output folder. A row with a
    `start_seconds` captions one clip; a row without captions the whole video."""
    captions = Captions()
    for name in caption_files(path):
        for row in read_caption_rows(name):
            if not row.get(field):
                continue
            if row.get("start_seconds") not in (None, ""):
                captions.clips[clip_id(str(row["key"]), row["start_seconds"])] = row[field]
                captions.clip_plans.add(row.get("clip_plan_sha"))
            else:
                captions.videos[str(row["key"])] = row[field]
    return captions


# ----------------------------------------------------------------------------------------------------------------
# Sources: every source yields (key, video, caption), where video is a path or the file's bytes.
# ----------------------------------------------------------------------------------------------------------------
def list_local_videos(video_dir):
    """Sorted (key, path) pairs; the key is the path relative to video_dir without its extension."""
    found = []
    for root, _, files in os.walk(video_dir):
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                path = os.path.join(root, name)
                found.append((os.path.splitext(os.path.relpath(path, video_dir))[0], path))
    return sorted(found)


def local_part_videos(video_dir, part, num_parts):
    """The (key, path) pairs of part `part` of `num_parts` of a --video_dir: every num_parts-th video from `part`."""
    return list_local_videos(video_dir)[part::num_parts]


def sidecar_caption(video_path, field):
    """Caption from KEY.txt, or from `field` of KEY.json, next to a video; None if neither has one."""
    stem = os.path.splitext(video_path)[0]
    if os.path.isfile(stem + ".txt"):
        with open(stem + ".txt") as f:
            return f.read().strip() or None
    if os.path.isfile(stem + ".json"):
        with open(stem + ".json") as f:
            return json.load(f).get(field)
    return None


def load_streaming_dataset(args):
    """The same `datasets` streaming code path reads hub datasets, local dataset folders and local tar shards."""
    import datasets

    if args.tars:
        files = sorted(glob.glob(args.tars, recursive=True))
        ds = datasets.load_dataset("webdataset", data_files=files, split="train", streaming=True)
    else:
        ds = datasets.load_dataset(args.dataset, data_files=args.data_files, split=args.split, streaming=True)
    return ds.decode(False)  # raw bytes or paths: we decode with PyAV, not the Video feature


def take_part(ds, num_parts, index):
    """Part `index` of `num_parts` of a streaming dataset, split by whole files so nothing is read twice."""
    if num_parts == 1:
        return ds
    if index >= ds.num_shards:
        return None  # more parts than files: this part has no file
    return ds.shard(num_shards=min(num_parts, ds.num_shards), index=index)


@dataclass(frozen=True)
class Layout:
    """Which columns of a streamed dataset hold the video, its caption and its key (None: not in the data)."""

    video: str
    caption: str | None
    key: str | None


def looks_like_video(value):
    return isinstance(value, (bytes, bytearray, str)) or (isinstance(value, dict) and {"bytes", "path"} & set(value))


def resolve_layout(example, args):
    """Pick the video, caption and key columns from the first example; a layout that does not fit fails in one line
    naming the columns found."""
    columns = list(example)
    source = args.tars or args.dataset
    found = f"columns found: {', '.join(columns)}"
    for flag in ("video_column", "caption_column", "key_column"):
        if getattr(args, flag) and getattr(args, flag) not in example:
            raise ValueError(f"--{flag} {getattr(args, flag)} is not in {source}; {found}")
    # A WebDataset member KEY.video.mp4 is the column video.mp4: match names on their last extension too.
    named = [c for c in columns if c.lower() in VIDEO_COLUMNS or c.rsplit(".", 1)[-1].lower() in VIDEO_COLUMNS]
    video = args.video_column or next((c for c in named if looks_like_video(example[c])), None)
    if video is None:
        video = next((c for c in columns if isinstance(example[c], dict) and "bytes" in example[c]), None)
    if video is None:
        raise ValueError(f"{source}: no column holds a video ({found}); name it with --video_column")
    if not looks_like_video(example[video]):
        raise ValueError(
            f"{source}: column {video} holds {type(example[video]).__name__}, not video bytes, a path or a "
            f'{{"bytes", "path"}} dict; {found}'
        )
    texts = [c for c in CAPTION_COLUMNS if isinstance(example.get(c), str)]
    caption = args.caption_column or (texts[0] if texts else None)
    key = args.key_column or next((c for c in KEY_COLUMNS if c in example), None)
    return Layout(video, caption, key)


def probe_layout(args):
    """Read the first example of a --tars/--dataset source (before any model loads) and return its Layout."""
    example = next(iter(load_streaming_dataset(args)), None)
    if example is None:
        raise ValueError(f"{args.tars or args.dataset} holds no example")
    return resolve_layout(example, args)


def key_from_path(path, root):
    """A video's path relative to the dataset (a local folder or hf://datasets/ID@REV/...), without extension."""
    path = re.sub(r"^hf://datasets/[^/]+/[^/@]+(@[^/]+)?/", "", path.removeprefix("file://"))
    if root and os.path.isabs(path) and os.path.isdir(root):
        path = os.path.relpath(path, os.path.abspath(root))
    return os.path.splitext(path)[0]


def video_input(value, root):
    """Bytes or a local path PyAV can open, from a column value: bytes, a path, or a {"bytes", "path"} dict."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ValueError(f"the video column holds {type(value).__name__}, not bytes or a path")
    for path in (value, os.path.join(root or "", value)):
        if os.path.isfile(path):
            return path
    if "://" not in value and root and not os.path.isdir(root):
        value = f"hf://datasets/{root}/{value}"  # a path inside a hub dataset
    from datasets.utils.file_utils import xopen

    with xopen(value, "rb") as f:
        return f.read()


def example_key(example, layout, root):
    """Stable and unique per video: the key column, else the video's path, else a hash of its bytes."""
    if layout.key:
        return str(example[layout.key])
    value = example[layout.video]
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    if path:
        return key_from_path(path, root)
    data = value.get("bytes") if isinstance(value, dict) else value
    return "sha1-" + hashlib.sha1(data).hexdigest()[:16]


def example_caption(example, layout, field):
    if layout.caption and example.get(layout.caption):
        return str(example[layout.caption]).strip() or None
    meta = example.get("json")
    return meta.get(field) if isinstance(meta, dict) else None


@dataclass(frozen=True)
class SourceVideo:
    """One video of a source: its key, the video (a path, bytes, or the exception reading it raised) and the caption
    it comes with (None without one, or when no caption field is read)."""

    key: str
    video: object
    caption: str | None


def iter_part_videos(args, layout, part, num_parts, video_captions=None, caption_field=None):
    """The SourceVideos of part `part` of `num_parts`. Captions come from `video_captions` {key: caption}, else, with
    a `caption_field`, from the source itself (KEY.txt/KEY.json sidecars, the caption column, a json member)."""
    video_captions = video_captions or {}
    if args.video_dir:
        for key, path in local_part_videos(args.video_dir, part, num_parts):
            caption = video_captions.get(key) or (sidecar_caption(path, caption_field) if caption_field else None)
            yield SourceVideo(key, path, caption)
        return
    ds = take_part(load_streaming_dataset(args), num_parts, part)
    root = None if args.tars else args.dataset
    for example in ds or []:
        key = example_key(example, layout, root)
        try:
            video = video_input(example[layout.video], root)
        except Exception as error:  # a missing file is this video's failure, not the run's
            video = error
        caption = video_captions.get(key) or (
            example_caption(example, layout, caption_field) if caption_field else None
        )
        yield SourceVideo(key, video, caption)
