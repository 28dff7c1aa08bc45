"""The README, docs/ and configs/ agree with the code: every command they give that runs one of the project's scripts
is parsed by that script's own `parse_args` (a flag that does not exist, a bad value or an old spelling fails here),
every relative link points to a file (and heading) that exists, and each `configs/` example parses."""

import contextlib
import glob
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys

import pytest

import cache_latents
import caption_clips
import evaluate
import sample
import train_cosmos_lora
from conftest import parser_of
from cosmos_sources import clip_plan

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
SCRIPTS = {
    "caption_clips.py": caption_clips,
    "cache_latents.py": cache_latents,
    "train_cosmos_lora.py": train_cosmos_lora,
    "sample.py": sample,
    "evaluate.py": evaluate,
}
# What the SLURM wrappers pass to their script before the user's arguments, where the script requires it.
WRAPPERS = {
    "slurm/cache_latents.sh": ("cache_latents.py", ["--output_dir", "CACHE_DIR", "--video_dir", "VIDEO_DIR"]),
    "slurm/caption_clips.sh": ("caption_clips.py", ["--output_dir", "CAPTIONS_DIR", "--video_dir", "VIDEO_DIR"]),
    "slurm/train.sh": ("train_cosmos_lora.py", []),
    "slurm/train_multinode.sh": ("train_cosmos_lora.py", []),
    "slurm/sample.sh": ("sample.py", ["--output_dir", "SAMPLE_OUTPUT_DIR"]),
}
# Commands checked here only for the files they name, because something else runs them whole.
RUN_ELSEWHERE = {
    "make demo": "runs tools/demo.sh, the whole chain on tiny random models (the CPU demo)",
    "make test": "is the CI command: ruff and this test suite",
    "sbatch": "tests/test_slurm.py submits the wrappers to a real single-node SLURM; here the arguments they pass on "
    "to the Python script are parsed",
    "benchmarks": "GPU benchmarks, run by hand on GPUs; here the script must exist",
}
# `python SCRIPT.py --help` and `bash slurm/NAME.sh` stand for each script.
PLACEHOLDER_SCRIPTS = {"SCRIPT.py", "slurm/NAME.sh"}
COMMAND_START = re.compile(r"^(?:[A-Z_]+=\S*\s+)*(?:python3?|\$PY|accelerate|sbatch|make|bash|pip)\s")


def relative(path):
    return os.path.relpath(path, REPO)


# ----------------------------------------------------------------------------------------------------------------
# Extracting commands
# ----------------------------------------------------------------------------------------------------------------
def fenced_blocks(text):
    """(language, body) of each ``` block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def shell_lines(body):
    """The commands of a shell block: continuation lines joined, `$(...)` taken out as commands of their own,
    lines split at `&&`, `;` and `|`."""
    lines = []
    for line in body.replace("\\\n", " ").splitlines():
        for inner in re.findall(r"\$\(([^()]*)\)", line):
            lines.append(inner)
        line = re.sub(r"\$\(([^()]*)\)", "VALUE", line)
        lines += re.split(r"\s(?:&&|\|\|?|;)\s", line)
    return [line.strip() for line in lines if line.strip()]


def inline_commands(text):
    """Inline code spans that are whole commands (`python ...`, `sbatch ...`), outside fenced blocks."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    spans = (" ".join(span.split()) for span in re.findall(r"`([^`]+)`", text))
    return [span for span in spans if COMMAND_START.match(span + " ")]


def doc_commands():
    """(where, command) of every shell command in the README and docs/, and the header commands of configs/."""
    found = []
    for path in DOCS:
        text = open(path).read()
        for language, body in fenced_blocks(text):
            if language in ("bash", "sh", "shell", "console"):
                found += [(relative(path), line) for line in shell_lines(body)]
        found += [(f"{relative(path)} (inline)", span) for span in inline_commands(text)]
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml"))):
        for line in open(path):
            match = re.match(r"#\s+((?:python|accelerate launch)\s.*)", line)
            if match:
                found.append((relative(path), match.group(1).strip()))
    return found


def tokens_of(command):
    tokens = shlex.split(command, comments=True)
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # VAR=value before the command
        tokens.pop(0)
    return [token for token in tokens if token != "..."]  # "more flags" in prose


# ----------------------------------------------------------------------------------------------------------------
# Checking one command
# ----------------------------------------------------------------------------------------------------------------
def load_tool(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], os.path.join(REPO, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_with(script, argv):
    """Parse argv with the script's own parse_args; returns None or the reason it failed. `--help` exits 0."""
    module = SCRIPTS.get(script) or load_tool(script)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            module.parse_args(argv)
    except SystemExit as exit_info:
        return None if exit_info.code == 0 else f"{script}: {stderr.getvalue().strip().splitlines()[-1]}"
    except ValueError as error:  # a --config file that does not fit
        return f"{script} {' '.join(argv)}: {error}"
    return None


def check_command(tokens):
    """None when the command is sound, else what is wrong; also the kind of command, for the census."""
    program = tokens[0]
    if program in ("python", "python3", "$PY"):
        script, argv = tokens[1], tokens[2:]
        if script in PLACEHOLDER_SCRIPTS:
            return "placeholder", None
        if not os.path.isfile(os.path.join(REPO, script)):
            return "python", f"{script} does not exist"
        if script.startswith("benchmarks/"):
            return "benchmarks", None
        return "python", parse_with(script, argv)
    if program == "accelerate":
        assert tokens[1] == "launch", tokens
        scripts = [i for i, token in enumerate(tokens) if token.endswith(".py")]
        if "--config_file" in tokens:
            config = tokens[tokens.index("--config_file") + 1]
            if not os.path.isfile(os.path.join(REPO, config)):
                return "accelerate", f"accelerate config {config} does not exist"
        if not scripts:  # the launcher's own flags, spelled out in prose
            return "accelerate", None
        return "accelerate", parse_with(tokens[scripts[0]], tokens[scripts[0] + 1 :])
    if program == "make":
        targets = re.findall(r"^([\w-]+):", open(os.path.join(REPO, "Makefile")).read(), flags=re.M)
        missing = [t for t in tokens[1:] if t not in targets]
        return f"make {' '.join(tokens[1:])}", f"no Makefile target {missing}" if missing else None
    if program in ("sbatch", "bash"):
        wrappers = [i for i, token in enumerate(tokens) if token.startswith("slurm/")]
        if not wrappers:  # sbatch's own options, spelled out in prose
            return "sbatch", None
        wrapper, argv = tokens[wrappers[0]], tokens[wrappers[0] + 1 :]
        if wrapper in PLACEHOLDER_SCRIPTS:
            return "placeholder", None
        if wrapper not in WRAPPERS:
            return "sbatch", f"{wrapper} is not a job script"
        script, required = WRAPPERS[wrapper]
        if wrapper == "slurm/sample.sh" and argv and not argv[0].startswith("-"):
            argv = argv[1:]  # the checkpoint
        return "sbatch", parse_with(script, [*required, *argv])
    if program == "pip":
        files = [tokens[i + 1] for i, token in enumerate(tokens) if token == "-r"]
        missing = [f for f in files if not os.path.isfile(os.path.join(REPO, f))]
        return "pip", f"{missing} do not exist" if missing else None
    return "other", None


COMMANDS = doc_commands()
PROJECT_COMMANDS = [(where, command) for where, command in COMMANDS if COMMAND_START.match(command + " ")]


def test_the_docs_give_commands_of_every_kind():
    """The extraction finds what the README shows: a guard against a regex that silently finds nothing."""
    kinds = {check_command(tokens_of(command))[0] for _, command in PROJECT_COMMANDS}
    assert {"python", "accelerate", "make demo", "make test", "sbatch"} <= kinds, kinds
    scripts = " ".join(command for _, command in PROJECT_COMMANDS)
    for name in [
        "caption_clips.py",
        "cache_latents.py",
        "train_cosmos_lora.py",
        "sample.py",
        "slurm/cache_latents.sh",
    ]:
        assert name in scripts


@pytest.mark.parametrize("where, command", PROJECT_COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in PROJECT_COMMANDS])
def test_every_documented_command_parses(where, command):
    kind, problem = check_command(tokens_of(command))
    if problem and " ... " in f"{command} " and "the following arguments are required" in problem:
        problem = None  # `...` stands for the rest of the flags
    assert problem is None, f"{where}: `{command}`: {problem}"
    if kind in RUN_ELSEWHERE or kind.split()[0] in RUN_ELSEWHERE:
        assert RUN_ELSEWHERE.get(kind) or RUN_ELSEWHERE[kind.split()[0]]  # run whole elsewhere, for that reason


def test_a_stale_flag_in_a_command_is_caught():
    """The checker itself: a flag that no longer exists and a bad value both fail."""
    assert (
        "unrecognized arguments: --no_temporal_adapters"
        in check_command(tokens_of("accelerate launch train_cosmos_lora.py --no_temporal_adapters"))[1]
    )
    assert "invalid choice" in check_command(tokens_of("python sample.py --output_dir o --resize_mode fit"))[1]
    assert "must be above 0.0" in check_command(tokens_of("sbatch slurm/train.sh --learning_rate 0"))[1]
    assert check_command(tokens_of("make deploy"))[1] == "no Makefile target ['deploy']"
    assert "do not exist" in check_command(tokens_of("pip install -r requirements-nope.txt"))[1]


# ----------------------------------------------------------------------------------------------------------------
# Links
# ----------------------------------------------------------------------------------------------------------------
def heading_anchors(path):
    """GitHub's anchors of a markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#+\s+(.*)$", re.sub(r"^```.*?^```", "", open(path).read(), flags=re.M | re.S), re.M):
        anchors.add(re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-"))
    return anchors


LINKS = [
    (relative(path), target)
    for path in DOCS
    for target in re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", open(path).read())
    if not re.match(r"^[a-z]+:", target)
]


@pytest.mark.parametrize("where, target", LINKS, ids=[f"{w}->{t}" for w, t in LINKS])
def test_every_relative_link_points_to_an_existing_file(where, target):
    path, _, anchor = target.partition("#")
    resolved = (
        os.path.normpath(os.path.join(REPO, os.path.dirname(where), path)) if path else os.path.join(REPO, where)
    )
    assert os.path.exists(resolved), f"{where}: link to {target}: {relative(resolved)} does not exist"
    if anchor:
        assert anchor in heading_anchors(resolved), f"{where}: {target}: no heading #{anchor}"


def test_docs_are_linked_from_the_readme():
    readme = open(os.path.join(REPO, "README.md")).read()
    for path in DOCS[1:]:
        assert f"({relative(path)})" in readme, f"README.md does not link {relative(path)}"


# ----------------------------------------------------------------------------------------------------------------
# configs/: one commented example per script
# ----------------------------------------------------------------------------------------------------------------
CONFIGS = {
    "caption_clips.yaml": "caption_clips.py",
    "cache_latents.yaml": "cache_latents.py",
    "train.yaml": "train_cosmos_lora.py",
    "train_nvidia.yaml": "train_cosmos_lora.py",
    "sample.yaml": "sample.py",
    "evaluate.yaml": "evaluate.py",
}


def test_every_config_belongs_to_a_script_and_every_script_has_one():
    assert sorted(os.listdir(os.path.join(REPO, "configs"))) == sorted(CONFIGS)
    assert sorted(set(CONFIGS.values())) == sorted(SCRIPTS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_example_parses_with_its_script(name):
    path = os.path.join(REPO, "configs", name)
    text = open(path).read()
    assert text.startswith("#") and f"--config configs/{name}" in text  # commented, with the command that uses it
    args = SCRIPTS[CONFIGS[name]].parse_args(["--config", path])
    assert args.config == path and args.output_dir and "egocentric100k" in args.output_dir
    if name == "caption_clips.yaml":
        assert args.caption_model == caption_clips.DEFAULT_CAPTION_MODEL
    else:
        assert args.pretrained_model_name_or_path == (
            "nvidia/Cosmos-Predict2.5-2B" if name == "train_nvidia.yaml" else "nvidia/Cosmos-Predict2-2B-Video2World"
        )
    overridden = SCRIPTS[CONFIGS[name]].parse_args(["--config", path, "--output_dir", "elsewhere"])
    assert overridden.output_dir == "elsewhere"  # the command line wins


def test_the_recipe_configs_agree():
    """The files describe one run: caching reads the captions of its own clips, sampling reads the cache that
    training reads, and the weights it writes."""
    captions = caption_clips.parse_args(["--config", os.path.join(REPO, "configs", "caption_clips.yaml")])
    cache = cache_latents.parse_args(["--config", os.path.join(REPO, "configs", "cache_latents.yaml")])
    assert cache.captions_file == captions.output_dir and clip_plan(cache) == clip_plan(captions)
    assert (cache.dataset, cache.data_files) == (captions.dataset, captions.data_files)
    train = train_cosmos_lora.parse_args(["--config", os.path.join(REPO, "configs", "train.yaml")])
    generate = sample.parse_args(["--config", os.path.join(REPO, "configs", "sample.yaml")])
    assert train.cache_dir == [cache.output_dir] and generate.from_cache == cache.output_dir
    assert generate.lora_path == train.output_dir
    assert generate.num_videos <= train.num_validation_clips  # sample.py takes clips the run held out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_each_script_takes_its_config_and_help_in_a_real_process(name):
    result = subprocess.run(
        [sys.executable, CONFIGS[name], "--config", os.path.join("configs", name), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "--config CONFIG" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Flags several scripts share are one definition
# ----------------------------------------------------------------------------------------------------------------
def definition(parser, flag):
    action = next(a for a in parser._actions if flag in a.option_strings)
    return (action.option_strings, action.dest, action.default, action.type, action.choices, action.nargs, action.help)


@pytest.mark.parametrize("flag", ["--num_frames", "--fps", "--height", "--width", "--resize_mode", "--buckets"])
def test_clip_plan_flags_are_the_same_in_caching_and_sampling(flag, monkeypatch):
    caching, sampling = (
        definition(parser_of(m, monkeypatch, "--output_dir", "o"), flag) for m in (cache_latents, sample)
    )
    assert caching == sampling


@pytest.mark.parametrize(
    "flag",
    ["--num_frames", "--fps", "--height", "--width", "--resize_mode", "--buckets", "--clip_stride_seconds",
     "--max_clips_per_video", "--video_dir", "--tars", "--dataset", "--data_files", "--split", "--video_column",
     "--key_column", "--num_shards"],
)  # fmt: skip
def test_source_and_clip_plan_flags_are_the_same_in_captioning_and_caching(flag, monkeypatch):
    captioning, caching = (
        definition(parser_of(m, monkeypatch, "--output_dir", "o"), flag) for m in (caption_clips, cache_latents)
    )
    assert captioning == caching


@pytest.mark.parametrize("flag", ["--config", "--pretrained_model_name_or_path", "--revision"])
def test_model_and_config_flags_are_the_same_in_every_script(flag, monkeypatch):
    """caption_clips.py loads no Cosmos checkpoint: its --caption_model and --revision name the captioner."""
    modules = [module for module in SCRIPTS.values() if module is not caption_clips or flag == "--config"]
    definitions = [definition(parser_of(module, monkeypatch, "--output_dir", "o"), flag) for module in modules]
    assert all(d == definitions[0] for d in definitions)


@pytest.mark.parametrize("module", [cache_latents, sample], ids=["cache_latents", "sample"])
def test_a_bad_fps_fails_at_parse_time_in_both(module, capsys):
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--output_dir", "o", "--fps", "0"])
    assert exit_info.value.code == 2 and "argument --fps: must be above 0.0, got 0" in capsys.readouterr().err


def test_a_config_can_hold_a_required_flag(tmp_path):
    config = tmp_path / "cache.yaml"
    config.write_text("output_dir: /tmp/cache\nvideo_dir: /data/videos\nbuckets: [61x256x448, 61x448x256]\n")
    args = cache_latents.parse_args(["--config", str(config)])
    assert args.output_dir == "/tmp/cache" and [b.name for b in args.buckets] == ["61x256x448", "61x448x256"]
