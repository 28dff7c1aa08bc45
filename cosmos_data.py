"""Training batches from latent caches: several caches mixed by weight, one clip shape (bucket) per batch, the
held-out videos split off, and a clip that fails to load replaced by another of its shape and named."""

import os
import re
from dataclasses import dataclass

import torch

from cosmos_cache import (
    bucket_name,
    list_cached_clips,
    load_text_embeds,
    missing_clip_files,
    read_cache_info,
    read_clip,
    vae_normalization,
)
from cosmos_families import load_component_config, text_embed_width
from cosmos_process import ignore_stop_signals
from cosmos_run import hold_out_clips, read_held_out, split_by_record


def parse_cache_spec(spec):
    """`NAME=PATH:WEIGHT`, `PATH:WEIGHT` or `PATH` -> (name, path, weight or None)."""
    name, _, rest = spec.rpartition("=") if "=" in spec else ("", "", spec)
    path, weight = rest, None
    head, sep, tail = rest.rpartition(":")
    if sep and re.fullmatch(r"[0-9.]+", tail):
        path, weight = head, float(tail)
    return name or os.path.basename(os.path.normpath(path)), path, weight


@dataclass
class Cache:
    """One latent cache given to --cache_dir: its clips (manifest rows) and the weight it is drawn with."""

    name: str
    path: str
    clips: list
    weight: float | None  # None: in proportion to its size


def load_caches(specs, pretrained_model_name_or_path, revision=None, *, family):
    """Read and check every cache before any model loads; return [Cache] and the first cache's info.

    Caches of different clip shapes mix (each batch holds one shape); they must share the model family, the VAE
    normalization and the text embeddings. Every listed clip file must exist.
    """
    vae_config = load_component_config(pretrained_model_name_or_path, "vae", revision)
    transformer_config = load_component_config(pretrained_model_name_or_path, "transformer", revision)
    caches, first = [], None
    for spec in specs:
        name, path, weight = parse_cache_spec(spec)
        info = read_cache_info(path)
        clips = list_cached_clips(path)
        if not clips:
            raise ValueError(f"cache {path} holds no clips; run cache_latents.py on it first")
        if info["vae_normalization"] != vae_normalization(vae_config):
            raise ValueError(
                f"cache {path} was normalized with another VAE's latents_mean/std than "
                f"{pretrained_model_name_or_path}; re-cache it with this model"
            )
        if info["family"] != family.name:
            raise ValueError(
                f"cache {path} was made with a {info['family']} model, {pretrained_model_name_or_path} is "
                f"{family.name}; re-cache it with this model"
            )
        missing = missing_clip_files(clips)
        if missing:
            raise FileNotFoundError(
                f"cache {path}: {len(missing)} of its {len(clips)} listed clip files are missing (first: "
                f"{missing[0]}); run cache_latents.py --verify on it, or rerun its caching to complete it"
            )
        text = info["text_embeds"]
        expected = text_embed_width(transformer_config, text["kind"])
        if text["shape"][1] != expected:
            raise ValueError(
                f"cache {path} has {text['shape'][1]}-dim {text['kind']} text embeddings, the transformer "
                f"expects {expected}"
            )
        if first and first[1]["text_embeds"] != text:
            raise ValueError(f"cache {path} holds other text embeddings than {first[0]}; mix only alike caches")
        first = first or (path, info)
        caches.append(Cache(name, path, clips, weight))
    return caches, first[1]


class CachedClips(torch.utils.data.Dataset):
    """Clip latents and caption embeddings by index. A clip that fails to load (a damaged file) is replaced by the
    next clip of the same shape, and named in the item's `bad_clips`, so a batch keeps its size and shape."""

    def __init__(self, clips):
        self.clips = clips
        same_shape = {}
        for index, clip in enumerate(clips):
            same_shape.setdefault(clip.shape, []).append(index)
        self.same_shape = same_shape

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        group = self.same_shape[self.clips[index].shape]
        start, bad = group.index(index), []
        for offset in range(len(group)):
            clip = self.clips[group[(start + offset) % len(group)]]
            try:
                latents = read_clip(clip.path)[0].float()
            except Exception as error:
                bad.append(f"{clip.path} ({type(error).__name__}: {error})".splitlines()[0])
                continue
            return {"latents": latents, "prompt_embeds": load_text_embeds(clip.text_path).float(), "bad_clips": bad}
        raise RuntimeError(f"no clip of shape {list(clip.shape)} loads: {bad}")


def collate_clips(items):
    return {
        "latents": torch.stack([item["latents"] for item in items]),
        "prompt_embeds": torch.stack([item["prompt_embeds"] for item in items]),
        "bad_clips": [name for item in items for name in item["bad_clips"]],
    }


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of one clip shape, mixing caches by weight; deterministic under (seed, epoch).

    The clips are split into groups of one cache and one shape (bucket). Each batch draws a group with probability
    weight(cache) * clips(cache, bucket) / clips(cache), so caches keep their mixture weights and buckets their share
    within a cache, then takes that group's next batch_size clips in its own shuffled order, reshuffled whenever it
    runs out (a group smaller than a batch repeats clips). An epoch has a multiple of num_processes batches, so
    accelerate never pads it with batches of mixed shapes.
    """

    def __init__(self, groups, probabilities, batch_size, num_batches, seed):
        self.groups, self.batch_size, self.num_batches, self.seed, self.epoch = (
            groups,
            batch_size,
            num_batches,
            seed,
            0,
        )
        self.probabilities = torch.tensor(probabilities, dtype=torch.float64)
        self.drop_last = True  # read by accelerate's BatchSamplerShard

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        choices = torch.multinomial(self.probabilities, self.num_batches, replacement=True, generator=generator)
        orders, positions = [[] for _ in self.groups], [0] * len(self.groups)
        for g in choices.tolist():
            batch = []
            while len(batch) < self.batch_size:
                if positions[g] == len(orders[g]):
                    orders[g], positions[g] = torch.randperm(len(self.groups[g]), generator=generator).tolist(), 0
                batch.append(self.groups[g][orders[g][positions[g]]])
                positions[g] += 1
            yield batch


@dataclass
class ClipGroup:
    """The clips of one cache and one bucket, as indices into the concatenated training clips."""

    cache: str
    bucket: str
    indices: list
    probability: float


def clip_groups(caches):
    """Split every cache's clips by bucket; each group's probability is its cache's weight times its share of it."""
    weights = [len(cache.clips) if cache.weight is None else cache.weight for cache in caches]
    groups, offset = [], 0
    for cache, weight in zip(caches, weights, strict=True):
        by_shape = {}
        for i, clip in enumerate(cache.clips):
            by_shape.setdefault(clip.shape, []).append(offset + i)
        for shape, indices in sorted(by_shape.items()):
            share = weight / sum(weights) * len(indices) / len(cache.clips)
            groups.append(ClipGroup(cache.name, bucket_name(shape), indices, share))
        offset += len(cache.clips)
    return groups


def bucket_table(groups, batch_size):
    """The start-of-run table: clips per bucket per cache and the share of batches each group gets."""
    lines = [f"{'cache':<16}{'bucket':<16}{'clips':>9}{'batches':>10}"]
    for group in groups:
        note = f"  (fewer clips than a batch of {batch_size}: repeats)" if len(group.indices) < batch_size else ""
        lines.append(f"{group.cache:<16}{group.bucket:<16}{len(group.indices):>9,}{group.probability:>9.1%}{note}")
    return "\n".join(lines)


def build_train_dataloader(caches, args, num_processes):
    """An epoch draws about as many clips as the caches hold (at least one batch per process), in batches of one
    bucket mixed by cache weight."""
    clips = [clip for cache in caches for clip in cache.clips]
    groups = clip_groups(caches)
    num_batches = max(1, len(clips) // args.train_batch_size // num_processes) * num_processes
    sampler = BucketBatchSampler(
        [g.indices for g in groups], [g.probability for g in groups], args.train_batch_size, num_batches, args.seed
    )
    loader = torch.utils.data.DataLoader(
        CachedClips(clips),
        batch_sampler=sampler,
        collate_fn=collate_clips,
        num_workers=args.dataloader_num_workers,
        worker_init_fn=ignore_stop_signals,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=args.dataloader_num_workers > 0,  # no worker restart (and GPU stall) at each epoch
    )
    return loader, groups


def check_clip_frames(caches, args):
    """Every clip needs a latent frame to predict beyond the largest number of conditioning frames."""
    frames = min(clip.shape[1] for cache in caches for clip in cache.clips)
    if frames < 2:
        raise ValueError(
            "a cache's clips have 1 latent frame (--num_frames 1): video2world needs at least 2 (--num_frames 5)"
        )
    if max(args.conditioning_frames) >= frames:
        raise ValueError(
            f"--conditioning_frames {','.join(map(str, args.conditioning_frames))} leaves no frame to predict in "
            f"clips of {frames} latent frames; use fewer conditioning frames or longer clips"
        )


def split_validation_clips(cache, resume_path, args):
    """(train, validation) clips of the first cache: as the checkpoint recorded them, or held out under --seed."""
    record = read_held_out(resume_path) if resume_path else None
    if record is not None:
        return split_by_record(cache.clips, cache.path, record)
    return hold_out_clips(cache.clips, args.num_validation_clips, args.seed)


def caption_summary(caches):
    """One line: how many clips train, on how many distinct captions (one per clip where each has its own)."""
    clips = [clip for cache in caches for clip in cache.clips]
    captions = len({clip.caption_hash for clip in clips})
    return f"training on {len(clips)} clips with {captions} distinct caption{'s' * (captions != 1)}"


def held_out_summary(first_cache_clips, train_clips, validation_clips):
    """One line: how many videos of the first cache are held out, how many of their clips validate, and how many
    others neither train nor validate."""
    trained = {c.key for c in train_clips}
    videos = len({c.key for c in first_cache_clips} - trained)
    unused = len(first_cache_clips) - len(train_clips) - len(validation_clips)
    return (
        f"held-out videos: {videos}; their clips that validate: {len(validation_clips)}; "
        f"their other clips, which neither train nor validate: {unused}"
    )
