#!/usr/bin/env python
"""Make short synthetic mp4 clips shaped like the Egocentric-100K dataset.

Each clip shows a textured background that pans smoothly (a camera pan) with
2-4 textured shapes moving on smooth trajectories on top. The motion is simple
and fully determined by a seed, so a video model can learn it quickly, which
makes the clips useful for tests and CPU demos.

Output layout under ``--output_dir``::

    videos/KEY.mp4                               every clip, in one flat folder
    videos/KEY.txt                               caption (only with --captions)
    tars/factoryNNN/workerNNN/partNNN.tar        the same clips as WebDataset shards,
                                                 each holding KEY.mp4 + KEY.json

Example::

    python tools/make_synthetic_clips.py --output_dir /tmp/synth --captions
"""

import argparse
import io
import json
import os
import tarfile
from fractions import Fraction

import av
import numpy as np

CODECS = {"h264": "libx264", "h265": "libx265"}

# Encoder options. x264's macroblock-tree rate control made the output bytes differ from
# run to run (even single-threaded), so it is off: same seed, same files. libx265 logs
# every encode at "info" level unless told not to.
ENCODER_OPTIONS = {
    "h264": {"preset": "veryfast", "crf": "23", "x264-params": "mbtree=0"},
    "h265": {"preset": "ultrafast", "crf": "26", "x265-params": "log-level=error"},
}

# Named, clearly distinct colours (RGB) so shapes are easy to tell apart and to caption.
PALETTE = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (40, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 200),
    "magenta": (230, 50, 170),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(
        description="Make synthetic Egocentric-100K-style mp4 clips (panning textured background plus "
        "moving textured shapes) as a flat videos/ folder and as WebDataset tar shards.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--output_dir",
        type=str,
        required=True,
        help="Folder to write into. Gets videos/ (flat mp4 files) and tars/ (WebDataset shards).",
    )
    parser.add_argument("--num_videos", type=int, default=6, help="Number of clips to make in total.")
    parser.add_argument("--seconds", type=float, default=4.0, help="Length of each clip in seconds.")
    parser.add_argument("--fps", type=float, default=30.0, help="Frame rate of each clip.")
    parser.add_argument("--height", type=int, default=256, help="Frame height in pixels (must be even).")
    parser.add_argument("--width", type=int, default=456, help="Frame width in pixels (must be even).")
    parser.add_argument(
        "--codec",
        type=str,
        default="both",
        choices=["h264", "h265", "both"],
        help="Video codec. 'both' alternates H.264 and H.265 across clips so both appear.",
    )
    parser.add_argument(
        "--captions",
        action="store_true",
        help="Also write a caption per clip: videos/KEY.txt and a 'caption' field in each tar's KEY.json.",
    )
    parser.add_argument(
        "--num_factories",
        type=int,
        default=2,
        help="Number of factories to spread the clips over (one worker per factory).",
    )
    parser.add_argument(
        "--videos_per_tar", type=int, default=2, help="Maximum number of clips in each tar shard (partNNN.tar)."
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="Base random seed. Each clip derives its own seed from it and its index."
    )
    args = parser.parse_args(input_args)

    if args.height % 2 or args.width % 2:
        parser.error("--height and --width must be even (yuv420p needs even frame sizes).")
    if args.height < 32 or args.width < 32:
        parser.error("--height and --width must be at least 32.")
    if args.num_videos < 1 or args.num_factories < 1 or args.videos_per_tar < 1:
        parser.error("--num_videos, --num_factories and --videos_per_tar must be at least 1.")
    if args.seconds <= 0 or args.fps <= 0:
        parser.error("--seconds and --fps must be positive.")
    return args


def video_seed(base_seed: int, index: int) -> int:
    """Derive an independent, reproducible seed for video number `index`."""
    return int(np.random.SeedSequence([base_seed, index]).generate_state(1)[0])


def _grid(height: int, width: int):
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return ys, xs


def make_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A float32 [height, width, 3] canvas: smooth colour blotches overlaid with floor-like tile lines."""
    ys, xs = _grid(height, width)
    base = rng.uniform(60, 160, size=3).astype(np.float32)
    canvas = np.broadcast_to(base, (height, width, 3)).copy()

    # Low-frequency colour variation: a few random plane waves per channel.
    for _ in range(4):
        angle = rng.uniform(0, 2 * np.pi)
        wavelength = rng.uniform(40, 160)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * (2 * np.pi / wavelength) + phase)
        canvas += wave[..., None] * rng.uniform(-30, 30, size=3).astype(np.float32)

    # Tile grout lines give sharp edges, so the pan is clearly visible.
    tile = rng.uniform(24, 56)
    line = 2.0
    grout = (np.mod(xs, tile) < line) | (np.mod(ys, tile) < line)
    canvas[grout] *= 0.45

    # Fine speckle adds texture inside tiles.
    canvas += rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)
    return np.clip(canvas, 0, 255)


def _bounce(start: float, velocity: float, low: float, high: float, t: np.ndarray) -> np.ndarray:
    """Position over time of a point moving at constant speed and bouncing between `low` and `high`."""
    span = high - low
    x = np.mod(start - low + velocity * t, 2 * span)
    return low + np.where(x > span, 2 * span - x, x)


def _trajectory(rng: np.random.Generator, num_frames: int, low: float, high: float):
    """Sample one coordinate's path: ('bounce' | 'wave', positions [num_frames])."""
    t = np.arange(num_frames, dtype=np.float64)
    if rng.random() < 0.5:
        speed = rng.uniform(1.0, 3.5) * rng.choice([-1, 1])
        return "bounce", _bounce(rng.uniform(low, high), speed, low, high, t)
    centre = (low + high) / 2
    amplitude = (high - low) / 2 * rng.uniform(0.5, 1.0)
    period = rng.uniform(40, 120)  # frames
    return "wave", centre + amplitude * np.sin(2 * np.pi * t / period + rng.uniform(0, 2 * np.pi))


def sample_scene(seed: int, num_frames: int, height: int, width: int) -> dict:
    """Draw everything random about one clip: background, camera pan and shapes with their paths."""
    rng = np.random.default_rng(seed)

    # Camera pan: constant velocity (pixels per frame) over a canvas big enough for the whole clip.
    angle = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.5, 2.0)
    pan_velocity = (speed * np.cos(angle), speed * np.sin(angle))  # (dx, dy)
    travel_x = int(np.ceil(abs(pan_velocity[0]) * num_frames)) + 2
    travel_y = int(np.ceil(abs(pan_velocity[1]) * num_frames)) + 2
    background = make_background(rng, height + travel_y, width + travel_x)
    # Start at the side of the canvas the pan moves away from.
    pan_start = (0.0 if pan_velocity[0] >= 0 else travel_x - 1.0, 0.0 if pan_velocity[1] >= 0 else travel_y - 1.0)

    shapes = []
    colour_names = rng.choice(list(PALETTE), size=int(rng.integers(2, 5)), replace=False)
    for colour_name in colour_names:
        half = rng.uniform(0.06, 0.14) * min(height, width) * np.array([1.0, 1.0])
        kind = "disc" if rng.random() < 0.5 else "rectangle"
        if kind == "rectangle":
            half = half * rng.uniform(0.6, 1.6, size=2)
        half_h, half_w = float(half[0]), float(half[1])
        motion_x, xs = _trajectory(rng, num_frames, half_w, width - half_w)
        motion_y, ys = _trajectory(rng, num_frames, half_h, height - half_h)
        colour = np.array(PALETTE[colour_name], dtype=np.float32)
        shapes.append(
            {
                "kind": kind,
                "texture": "striped" if rng.random() < 0.5 else "checkered",
                "colour_name": str(colour_name),
                "colour": colour,
                "colour2": colour * 0.55 + 0.45 * (255 - colour),  # contrasting second colour
                "period": float(rng.uniform(5, 12)),
                "stripe_angle": float(rng.uniform(0, np.pi)),
                "half_h": half_h,
                "half_w": half_w,
                "centre_x": xs,
                "centre_y": ys,
                "motion": "bouncing" if "bounce" in (motion_x, motion_y) else "swaying",
            }
        )
    return {
        "height": height,
        "width": width,
        "num_frames": num_frames,
        "background": background,
        "pan_start": pan_start,
        "pan_velocity": pan_velocity,
        "shapes": shapes,
    }


def _crop_subpixel(canvas: np.ndarray, x: float, y: float, height: int, width: int) -> np.ndarray:
    """Bilinearly interpolated crop of `canvas` with top-left corner at (x, y), so slow pans stay smooth."""
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    fx, fy = np.float32(x - x0), np.float32(y - y0)
    patch = canvas[y0 : y0 + height + 1, x0 : x0 + width + 1]
    top = patch[:-1, :-1] * (1 - fx) + patch[:-1, 1:] * fx
    bottom = patch[1:, :-1] * (1 - fx) + patch[1:, 1:] * fx
    return top * (1 - fy) + bottom * fy


def _draw_shape(frame: np.ndarray, shape: dict, frame_index: int) -> None:
    """Alpha-blend one textured shape into `frame` (float32 [H, W, 3]) in place."""
    height, width = frame.shape[:2]
    cx, cy = shape["centre_x"][frame_index], shape["centre_y"][frame_index]
    hw, hh = shape["half_w"], shape["half_h"]
    # Only touch the shape's bounding box (clipped to the frame).
    x0, x1 = max(int(cx - hw) - 1, 0), min(int(cx + hw) + 2, width)
    y0, y1 = max(int(cy - hh) - 1, 0), min(int(cy + hh) + 2, height)
    if x0 >= x1 or y0 >= y1:
        return
    v, u = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    u -= cx
    v -= cy

    # Coverage in [0, 1] with a one-pixel soft edge (cheap anti-aliasing).
    if shape["kind"] == "disc":
        inside = hw - np.sqrt(u**2 + v**2)  # discs are circles: half_w == half_h
    else:
        inside = np.minimum(hw - np.abs(u), hh - np.abs(v))
    alpha = np.clip(inside + 0.5, 0, 1)[..., None]

    # The texture lives in shape-local coordinates, so it travels with the shape.
    period = shape["period"]
    if shape["texture"] == "striped":
        a = shape["stripe_angle"]
        pattern = np.floor((u * np.cos(a) + v * np.sin(a)) / period) % 2
    else:
        pattern = (np.floor(u / period) + np.floor(v / period)) % 2
    pattern = pattern[..., None].astype(np.float32)
    colour = shape["colour"] * (1 - pattern) + shape["colour2"] * pattern

    region = frame[y0:y1, x0:x1]
    region *= 1 - alpha
    region += alpha * colour


def render_scene(scene: dict) -> np.ndarray:
    """Render a scene from `sample_scene` to uint8 frames [T, H, W, 3]."""
    height, width, num_frames = scene["height"], scene["width"], scene["num_frames"]
    (px, py), (vx, vy) = scene["pan_start"], scene["pan_velocity"]
    video = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    for t in range(num_frames):
        frame = _crop_subpixel(scene["background"], px + vx * t, py + vy * t, height, width)
        for shape in scene["shapes"]:
            _draw_shape(frame, shape, t)
        np.clip(frame, 0, 255, out=frame)
        video[t] = frame.astype(np.uint8)
    return video


def render_video(seed: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """Render one deterministic synthetic clip as uint8 frames [T, H, W, 3]."""
    return render_scene(sample_scene(seed, num_frames, height, width))


def _direction_words(dx: float, dy: float) -> str:
    """Describe a pan velocity (image coordinates, y down) in words, e.g. 'left and slightly up'."""
    # The view moving right over the scene means the camera pans right.
    horizontal = "right" if dx > 0 else "left"
    vertical = "down" if dy > 0 else "up"
    if abs(dx) >= 2 * abs(dy):
        return horizontal if abs(dy) < 0.2 * abs(dx) else f"{horizontal} and slightly {vertical}"
    if abs(dy) >= 2 * abs(dx):
        return vertical if abs(dx) < 0.2 * abs(dy) else f"{vertical} and slightly {horizontal}"
    return f"diagonally {vertical} and {horizontal}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption_scene(scene: dict) -> str:
    """A short deterministic caption naming the pan direction and the shapes."""
    speed = float(np.hypot(*scene["pan_velocity"]))
    pace = "slowly" if speed < 1.0 else "steadily"
    shapes = [f"{_article(s['colour_name'])} {s['colour_name']} {s['texture']} {s['kind']}" for s in scene["shapes"]]
    listed = ", ".join(shapes[:-1]) + f" and {shapes[-1]}"
    motions = {s["motion"] for s in scene["shapes"]}
    if len(motions) > 1:
        motion = "moving around"
    else:
        motion = {"bouncing": "bouncing around", "swaying": "swaying back and forth"}[motions.pop()]
    return (
        f"A first-person view panning {pace} {_direction_words(*scene['pan_velocity'])} over a tiled floor, "
        f"with {listed} {motion} in front of the camera."
    )


def encode_mp4(frames: np.ndarray, fps: float, codec: str) -> bytes:
    """Encode uint8 frames [T, H, W, 3] (RGB) to mp4 bytes with H.264 ("h264") or H.265 ("h265"), yuv420p."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    rate = Fraction(fps).limit_denominator(1001)
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream(CODECS[codec], rate=rate, options=dict(ENCODER_OPTIONS[codec]))
        stream.width = frames.shape[2]
        stream.height = frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "h265":
            stream.codec_tag = "hvc1"  # the tag Apple players and most tools expect for HEVC in mp4
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)
    return buffer.getvalue()


def _atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` via PATH.tmp and os.replace, so readers never see a partial file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            f.write(data)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def write_tar(path: str, members: list[tuple[str, bytes]]) -> None:
    """Atomically write an uncompressed tar holding `members` (name, bytes) in the given order."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp_path = path + ".tmp"
    try:
        with tarfile.open(tmp_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                info.mtime = 0  # fixed, so the same inputs give byte-identical shards
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def split_evenly(total: int, parts: int) -> list[int]:
    """Split `total` items into `parts` counts that differ by at most one (earlier parts get the extra)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def make_dataset(
    output_dir: str,
    num_videos: int = 6,
    seconds: float = 4.0,
    fps: float = 30.0,
    height: int = 256,
    width: int = 456,
    codec: str = "both",
    captions: bool = False,
    num_factories: int = 2,
    videos_per_tar: int = 2,
    seed: int = 0,
) -> list[str]:
    """Make the clips, the flat videos/ folder and the tar shards; return the keys in order."""
    num_frames = max(1, round(seconds * fps))
    duration = num_frames / fps
    videos_dir = os.path.join(output_dir, "videos")
    keys = []
    video_index = 0
    for factory, factory_count in enumerate(split_evenly(num_videos, num_factories), start=1):
        factory_id, worker_id = f"factory{factory:03d}", "worker001"
        shard_members: list[tuple[str, bytes]] = []
        part = 0
        for local_index in range(factory_count):
            key = f"{factory_id}_{worker_id}_{local_index:05d}"
            video_codec = codec if codec != "both" else ("h264", "h265")[video_index % 2]
            scene = sample_scene(video_seed(seed, video_index), num_frames, height, width)
            mp4 = encode_mp4(render_scene(scene), fps, video_codec)

            metadata = {
                "key": key,
                "fps": float(fps),
                "factory_id": factory_id,
                "worker_id": worker_id,
                "video_index": local_index,
                "duration": duration,
                "num_frames": num_frames,
                "width": width,
                "height": height,
                "codec": video_codec,
            }
            _atomic_write_bytes(os.path.join(videos_dir, f"{key}.mp4"), mp4)
            if captions:
                metadata["caption"] = caption_scene(scene)
                _atomic_write_bytes(os.path.join(videos_dir, f"{key}.txt"), (metadata["caption"] + "\n").encode())

            shard_members += [(f"{key}.mp4", mp4), (f"{key}.json", json.dumps(metadata, indent=1).encode())]
            keys.append(key)
            video_index += 1

            # Close a shard when it is full or the worker has no more clips.
            if len(shard_members) == 2 * videos_per_tar or local_index == factory_count - 1:
                tar_path = os.path.join(output_dir, "tars", factory_id, worker_id, f"part{part:03d}.tar")
                write_tar(tar_path, shard_members)
                shard_members, part = [], part + 1
    return keys


def main(args):
    keys = make_dataset(
        output_dir=args.output_dir,
        num_videos=args.num_videos,
        seconds=args.seconds,
        fps=args.fps,
        height=args.height,
        width=args.width,
        codec=args.codec,
        captions=args.captions,
        num_factories=args.num_factories,
        videos_per_tar=args.videos_per_tar,
        seed=args.seed,
    )
    print(
        f"Wrote {len(keys)} synthetic clips ({args.width}x{args.height}, {args.fps:g} fps, {args.seconds:g} s) "
        f"to {os.path.join(args.output_dir, 'videos')} and tar shards to {os.path.join(args.output_dir, 'tars')}"
    )


if __name__ == "__main__":
    main(parse_args())
