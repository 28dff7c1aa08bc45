"""Whole-clip encode and decode for the Wan2.1 VAE (diffusers `AutoencoderKLWan`), built on the VAE's own modules.

diffusers runs the encoder on frames 1, 4, 4, ... and the decoder on one latent frame at a time, handing the last
input frames of every causal convolution from one chunk to the next in a Python list (`feat_cache`). The functions
here run each module once over the whole clip instead, which is the same computation (equal to 1e-16 in float64,
tests/test_cosmos_vae.py):

- A causal convolution (kernel 3 in time) pads 2 zero frames in front. Chunk by chunk it is given the cached last
  frames of the previous chunk instead, and zeros before the first chunk: the same inputs as over the whole clip.
- RMS norms, SiLU, the mid-block attention and the spatial resampling convolutions act on each frame alone.
- Encoder `downsample3d`: the first chunk skips `time_conv` and keeps its one frame; every later chunk of 2m frames
  is prefixed with the last frame before it, so `time_conv` (kernel 3, stride 2, no padding) sees the windows
  (f0, f1, f2), (f2, f3, f4), ... In one pass: frame 0 unchanged, then `time_conv` over all frames f0, f1, ...
- Decoder `upsample3d`: the first chunk marks its cache "Rep" and keeps its one frame; the second chunk runs
  `time_conv` (kernel 3, 2C output channels) with its own 2 zero frames and caches [0, x1]; later chunks continue
  from that cache. So `time_conv` is a causal convolution over x1, x2, ... that never sees x0. In one pass: frame 0
  unchanged, then `time_conv` over frames 1.., each input frame's 2C channels becoming two output frames.

The VAE's own no-cache forward is not this: without a cache, `WanResample` skips `time_conv` altogether.
Also here: the GPU memory a whole-clip pass will hold, counted before it runs (to encode fewer clips at a time, or
decode frame by frame, where it would not fit), normalizing latents with the VAE's per-channel mean/std, and
decoding them to uint8 frames.

Layouts these functions were not proven on (Wan2.2's residual blocks and patchify, tiling) are refused by
`whole_clip_unsupported`.
"""

import functools
import json
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _time_conv_is(conv, stride, front_padding, channel_factor):
    """Whether a WanCausalConv3d is the kernel-3 temporal convolution the derivation above assumes."""
    return (
        tuple(conv.kernel_size) == (3, 1, 1)
        and tuple(conv.stride) == (stride, 1, 1)
        and conv._padding[4] == front_padding
        and conv.out_channels == channel_factor * conv.in_channels
    )


def whole_clip_unsupported(vae):
    """Why encode_whole_clip / decode_whole_clip cannot stand in for this VAE's own encode and decode, or None."""
    from diffusers.models.autoencoders import autoencoder_kl_wan as wan

    if not isinstance(vae, wan.AutoencoderKLWan):
        return f"{type(vae).__name__} is not an AutoencoderKLWan"
    if vae.config.is_residual:
        return "residual down and up blocks (is_residual=True, the Wan2.2 VAE) are not supported"
    if vae.config.patch_size is not None:
        return f"patchified input (patch_size={vae.config.patch_size}) is not supported"
    if vae.use_tiling:
        return "tiling is enabled"
    for layer in vae.encoder.down_blocks:
        if isinstance(layer, wan.WanResample):
            if layer.mode == "downsample3d" and not _time_conv_is(layer.time_conv, 2, 0, 1):
                return "an encoder time_conv of unknown shape"
            if layer.mode not in ("downsample2d", "downsample3d"):
                return f"an encoder resample of mode {layer.mode}"
        elif not isinstance(layer, (wan.WanResidualBlock, wan.WanAttentionBlock)):
            return f"an unknown encoder layer {type(layer).__name__}"
    for block in vae.decoder.up_blocks:
        if type(block) is not wan.WanUpBlock:
            return f"an unknown decoder block {type(block).__name__}"
        upsample = block.upsamplers[0] if block.upsamplers is not None else None
        if upsample is not None and upsample.mode == "upsample3d":
            if not _time_conv_is(upsample.time_conv, 1, 2, 2):
                return "a decoder time_conv of unknown shape"
        elif upsample is not None and upsample.mode != "upsample2d":
            return f"a decoder resample of mode {upsample.mode}"
    return None


def encode_whole_clip(vae, x):
    """Video [B, 3, 4k+1, H, W] in [-1, 1] -> posterior mean [B, z, k+1, H/8, W/8], as vae.encode(x).latent_dist.mean.

    Check the VAE with whole_clip_unsupported first.
    """
    if (x.shape[2] - 1) % 4:
        raise ValueError(f"the Wan VAE encodes 4k+1 frames, got {x.shape[2]}")
    encoder = vae.encoder
    x = encoder.conv_in(x)
    for layer in encoder.down_blocks:
        x = layer(x)  # residual and attention blocks; a resample layer without a cache resamples space only
        if getattr(layer, "mode", None) == "downsample3d" and x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], layer.time_conv(x)], dim=2)  # frame 0 unchanged, stride 2 over the rest
    x = encoder.mid_block(x)
    x = encoder.conv_out(encoder.nonlinearity(encoder.norm_out(x)))
    mean, _ = vae.quant_conv(x).chunk(2, dim=1)  # the posterior's mean and log-variance
    return mean


def _double_frames(time_conv, x):
    """Decoder temporal upsample: frame 0 unchanged, every later frame becomes two (time_conv's two channel halves)."""
    if x.shape[2] == 1:
        return x
    b, c, t, h, w = x.shape
    pairs = time_conv(x[:, :, 1:]).reshape(b, 2, c, t - 1, h, w)
    pairs = pairs.permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * (t - 1), h, w)
    return torch.cat([x[:, :, :1], pairs], dim=2)


def decode_whole_clip(vae, z):
    """Latents [B, z, T, h, w] (not normalized) -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], as vae.decode(z)."""
    decoder = vae.decoder
    x = decoder.mid_block(decoder.conv_in(vae.post_quant_conv(z)))
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x = resnet(x)
        if block.upsamplers is not None:
            upsample = block.upsamplers[0]
            if upsample.mode == "upsample3d":
                x = _double_frames(upsample.time_conv, x)
            x = upsample(x)  # without a cache: the spatial 2x upsample and convolution of every frame
    x = decoder.conv_out(decoder.nonlinearity(decoder.norm_out(x)))
    return x.clamp(-1, 1)


def convolutions_channels_last(vae):
    """Store the VAE's convolution weights channels-last (3D: NDHWC, 2D: NHWC), the layout cuDNN runs them in: with
    channels-last inputs, the whole encode then stays in one memory format. Values are unchanged; returns vae."""
    for module in vae.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d)):
            layout = torch.channels_last_3d if module.weight.ndim == 5 else torch.channels_last
            module.weight.data = module.weight.data.contiguous(memory_format=layout)
    return vae


@functools.cache
def compiled_decode_whole_clip():
    """decode_whole_clip under torch.compile (one graph per clip shape): 30% faster on an H200, see RESULTS.md."""
    return torch.compile(decode_whole_clip, dynamic=False)


def decode(vae, z, compiled=False):
    """vae.decode(z).sample, computed whole-clip on GPU when the VAE's layout is known, as many videos per call as fit
    in memory; `compiled`: that whole-clip decode compiled (sample.py --compile). On CPU the chunked decode is kept:
    the whole-clip one is no faster there."""
    if z.device.type == "cuda" and whole_clip_unsupported(vae) is None:
        videos = whole_clip_decodes_that_fit(vae, z)
        video = decode_whole_clip_if_it_runs(vae, z, videos, compiled) if videos else None
        if video is not None:
            return video
    return vae.decode(z, return_dict=False)[0]


TOO_LARGE_SHAPES = set()  # one video's latent shapes whose whole-clip decode did not fit or ran out of memory


def whole_clip_decodes_that_fit(vae, z):
    """How many of z's videos one whole-clip decode takes within the free GPU memory (whole_clips_that_fit). 0 when
    not one fits: it warns once per latent shape, and the caller decodes frame by frame without first compiling or
    running a pass that cannot fit (at 93x704x1280 one video holds about 97 GiB)."""
    shape = tuple(z.shape[1:])
    if shape in TOO_LARGE_SHAPES:
        return 0
    free = free_gpu_bytes(z.device)
    videos = whole_clips_that_fit(vae, decode_whole_clip, shape, len(z), free)
    if not videos:
        needed = MEMORY_MARGIN * whole_clip_peak_bytes(vae, decode_whole_clip, (1, *shape))
        _too_large(shape, f"needs about {needed / 2**30:.1f} GiB of GPU memory and {free / 2**30:.1f} GiB is free")
    return videos


def decode_whole_clip_if_it_runs(vae, z, videos, compiled):
    """The whole-clip decode of z, `videos` at a time, or None (with a warning) when it runs out of GPU memory all
    the same."""
    decode_videos = compiled_decode_whole_clip() if compiled else decode_whole_clip
    try:
        return torch.cat([decode_videos(vae, part) for part in z.split(videos)])
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the failed attempt's tensors are freed
    torch.cuda.empty_cache()
    _too_large(tuple(z.shape[1:]), "ran out of GPU memory")
    return None


def _too_large(shape, why):
    TOO_LARGE_SHAPES.add(shape)
    warnings.warn(
        f"the whole-clip VAE decode of latents {[1, *shape]} {why}: decoding frame by frame instead (slower)",
        stacklevel=4,
    )


# ----------------------------------------------------------------------------------------------------------------
# GPU memory of the whole-clip passes, counted before they run
# ----------------------------------------------------------------------------------------------------------------
# Room left above a counted peak for what the count leaves out: kernel workspaces and the caching allocator's
# rounding. On an H100 the decode's real peak equalled its count (benchmarks/vae_memory.py --measure).
MEMORY_MARGIN = 1.1


def free_gpu_bytes(device):
    """Bytes new tensors on `device` can take: the driver's free memory and what torch holds cached but unused. None
    off the GPU (no limit)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def whole_clips_that_fit(vae, function, clip_shape, most, free):
    """The most clips, up to `most`, of `clip_shape` (an input's shape less its batch) that one call of `function`
    (encode_whole_clip or decode_whole_clip) can take within `free` bytes with MEMORY_MARGIN; 0 if not one."""
    for clips in range(most, 0, -1):
        if MEMORY_MARGIN * whole_clip_peak_bytes(vae, function, (clips, *clip_shape)) <= free:
            return clips
    return 0


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of the storages that op outputs hold while any tensor still refers to them; `peak` is the
    most at any one time. Views share their base's storage and count once."""

    def __init__(self):
        super().__init__()
        self.storages = {}  # storage id -> [bytes, tensors alive that use it]
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.track(tensor)
        return out

    def track(self, tensor):
        key = tensor.untyped_storage()._cdata
        if key not in self.storages:
            self.storages[key] = [tensor.untyped_storage().nbytes(), 0]
            self.now += self.storages[key][0]
            self.peak = max(self.peak, self.now)
        self.storages[key][1] += 1
        weakref.finalize(tensor, self.release, key)

    def release(self, key):
        entry = self.storages[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.now -= entry[0]
            del self.storages[key]


@torch.no_grad()
def counted_peak_bytes(function, vae, x):
    """Peak bytes of the tensors that function(vae, x) (eager) holds at once (LiveBytes), on whatever device they are.
    The input and weights are not included, nor are kernel workspaces or the caching allocator's rounding."""
    counter = LiveBytes()
    with counter:
        function(vae, x)
    return counter.peak


def whole_clip_peak_bytes(vae, function, input_shape):
    """counted_peak_bytes of function(vae, input of `input_shape`), counted on a copy of the VAE built on the meta
    device (no memory; a few seconds on a CPU the first time, then cached per config, dtype, function and shape)."""
    config = json.dumps(dict(vae.config), sort_keys=True)  # hashable, for the cache
    return _meta_peak_bytes(type(vae), config, vae.dtype, function, tuple(input_shape))


@functools.cache
def _meta_peak_bytes(vae_class, config, dtype, function, input_shape):
    x = torch.empty(input_shape, dtype=dtype, device="meta")
    return counted_peak_bytes(function, _meta_vae(vae_class, config, dtype), x)


@functools.cache
def _meta_vae(vae_class, config, dtype):
    with torch.device("meta"):
        return vae_class.from_config(json.loads(config)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Normalized latents
# ----------------------------------------------------------------------------------------------------------------
def normalize_latents(latents, vae_config):
    mean, std = _mean_std(latents, vae_config)
    return (latents - mean) / std


def denormalize_latents(latents, vae_config):
    mean, std = _mean_std(latents, vae_config)
    return latents * std + mean


def _mean_std(latents, vae_config):
    shape = (1, -1, 1, 1, 1) if latents.ndim == 5 else (-1, 1, 1, 1)
    mean = torch.tensor(vae_config["latents_mean"], dtype=latents.dtype, device=latents.device).view(shape)
    std = torch.tensor(vae_config["latents_std"], dtype=latents.dtype, device=latents.device).view(shape)
    return mean, std


@torch.no_grad()
def decode_to_frames(vae, latents, compiled=False):
    """Normalized latents [B, 16, T, h, w] -> uint8 frames [B, T, H, W, 3] (`compiled`: see `decode`)."""
    video = decode(vae, denormalize_latents(latents.float(), vae.config).to(vae.dtype), compiled)
    video = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return video.permute(0, 2, 3, 4, 1).cpu()
