"""Every shell command of README.md and docs/*.md runs as written.

Each command of a ```bash block is listed in `COMMANDS` with how it is proven:
- `RUN`: run as written, in the order of `STORY`, in a copy of the repository with the toy MusDB, a
  random model with the released htdemucs architecture in the user's caches (offline) and a
  `track.mp3` in the folder (`test_the_documented_story_runs_as_written`, marked `docs`: `make
  test-docs`, run by CI). Placeholders are replaced: `SIG` by the toy XP's signature, `/path/to/...`
  by the toy MusDB or a scratch folder.
- `CONFIG`: a `dora` command whose config is composed and checked as `dora run` does, without
  training (the full trainings they start take days);
- `PARSE`: the command's flags are accepted by its parser;
- `MAKE`: the Makefile has the target (`make -n`);
- any other string: why it cannot run here, and which test covers it.
A command added to the docs without an entry here, or an entry whose command left the docs, fails
`test_every_documented_command_is_listed`.
"""
import os
from pathlib import Path
import re
import shlex
import shutil
import subprocess
import sys
import typing as tp

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

RUN, CONFIG, PARSE, MAKE = "run", "config", "parse", "make"
SLURM = ("submits Slurm jobs: tests/test_slurm.py runs the toy grid on a local cluster "
         "(make test-slurm)")
LOCAL_SLURM = "needs root and the Debian Slurm packages: tests/test_slurm.py (make test-slurm)"

# The training runs whose signature the docs call SIG and SIX.
TOY_RUN = "dora run dset=toy model=htdemucs htdemucs.channels=8 epochs=2"
SIX_STEMS_RUN = ("dora run dset=toy dset.musdb=data/toy6 "
                 "dset.sources=[drums,bass,guitar,piano,other,vocals] weights=[1,1,1,1,1,1] "
                 "model=htdemucs htdemucs.channels=8 epochs=1")
# docs/training.md "Fine-tune a released model": from SIG, the "released" model, to 6 stems.
SIX_FROM_SIG = ("dset=toy dset.musdb=data/toy6 dset.sources=[drums,bass,guitar,piano,other,vocals]")
FROZEN_RUN = (f"dora run {SIX_FROM_SIG} weights=[1,1,1,1,1,1] continue_pretrained=SIG "
              "pretrained_repo=./release_models 'continue_sources_init={guitar:other,piano:other}' "
              "'optim.freeze=[encoder.*,tencoder.*]' epochs=1")
LORA_RUN = (f"dora run {SIX_FROM_SIG} weights=[1,1,1,1,1,1] continue_pretrained=SIG "
            "pretrained_repo=./release_models lora.rank=4 epochs=1")
ONE_HOT = " ".join(f"'[{','.join('1' if i == j else '0' for j in range(6))}]'" for i in range(6))
SPECIALISTS_RUN = (f"for weights in {ONE_HOT}; do dora run {SIX_FROM_SIG} weights=$weights "
                   "continue_pretrained=SIG pretrained_repo=./release_models epochs=1 "
                   "max_batches=1 test.sdr=false; done")
# The XPs a command makes, by the name the docs give them (several: their signatures, spaced).
PLACEHOLDERS = {TOY_RUN: "SIG", SIX_STEMS_RUN: "SIX", LORA_RUN: "LORA",
                SPECIALISTS_RUN: "SPECIALISTS"}

COMMANDS: tp.Dict[str, str] = {
    # README.md
    "make demo": MAKE,
    "make test": MAKE,
    ".venv/bin/python -m tools.toy_musdb data/toy_musdb": RUN,
    "demucs track.mp3": RUN,
    "demucs --repo ./release_models -n SIG track.mp3": RUN,
    "demucs --two-stems vocals --mp3 track.mp3": RUN,
    "demucs --stems vocals,drums track.mp3": RUN,
    "demucs --list-models --repo ./release_models": RUN,
    "dora run -d -f SIG": "needs GPUs (Dora: DDP is only available on GPU); `dora run -f SIG` "
                          "runs in the story",
    "dora run -f SIG": RUN,
    TOY_RUN: RUN,
    "dora grid NAME": SLURM,
    "python3 -m tools.export SIG": RUN,
    "python3 -m tools.test_pretrained -n SIG --repo ./release_models dset.musdb=/path/to/musdbhq":
        RUN,
    # docs/onnx.md
    "python3 -m tools.export_onnx htdemucs -o onnx/htdemucs": RUN,
    "python3 -m tools.export_onnx SIG --repo ./release_models -o onnx/SIG": RUN,
    "python3 -m tools.export_onnx htdemucs -o onnx/htdemucs_int8 --quantize int8": RUN,
    "demucs --backend onnxruntime track.mp3": RUN,
    "demucs --backend onnxruntime --repo ./release_models -n SIG track.mp3": RUN,
    "demucs --backend onnxruntime --onnx-dir onnx/htdemucs_int8 track.mp3": RUN,
    # docs/performance.md
    "python3 -m tools.gpu_check --dry-run --out gpu_check_out":
        "tests/test_gpu_check.py runs it as written, with --out in a scratch folder",
    "bash tools/prepare_device.sh": "downloads wheels from PyPI and copies 54 MB of reference "
                                    "vectors for the offline GPU machine: run by hand before a "
                                    "device session (it checks what it fetched itself)",
    # docs/training.md
    "dora run dset.musdb=/path/to/musdbhq": CONFIG,
    "dora run dset.musdb=/path/to/my_songs dset.valid_tracks=2": CONFIG,
    "dora run dset.musdb=/path/to/my_songs dset.valid_tracks=2 "
    "dset.sources=[drums,bass,guitar,piano,other,vocals] weights=[1,1,1,1,1,1]": CONFIG,
    "python3 -m tools.toy_musdb data/toy6 --sources drums,bass,guitar,piano,other,vocals": RUN,
    SIX_STEMS_RUN: RUN,
    "python3 -m tools.export SIX": RUN,
    "demucs --repo ./release_models -n SIX track.mp3": RUN,
    "python3 -m tools.test_pretrained -n SIX --repo ./release_models dset.musdb=data/toy6 "
    "test.sdr=false": RUN,
    "NUMBA_NUM_THREADS=1 python3 -m tools.automix --musdb /path/to/musdbhq "
    "--out /path/to/automix_musdb": PARSE,
    "dora run model=hdemucs hdemucs.channels=32 optim.lr=1e-4 batch_size=16": CONFIG,
    "dora run -d model=htdemucs": CONFIG,
    "dora run -d -f 955717e8": CONFIG,
    "dora info -f 955717e8": RUN,
    "python3 -m tools.plot_xp SIG": RUN,
    "tensorboard --logdir outputs/xps": "starts a web server that runs until stopped; "
                                        "tests/test_tracking.py reads the events it would show",
    "dora grid mdx": SLURM,
    "dora grid mmi": SLURM,
    "dora grid mmi_ft": SLURM,
    "dora grid mmi --dry_run --init": RUN,
    "dora run -d continue_from=955717e8 variant=finetune": CONFIG,
    "dora run -d continue_pretrained=htdemucs variant=finetune":
        "downloads the released htdemucs and trains it for days: the story runs the same keys "
        "from the toy model (below), tests/test_train.py the dora run from an exported model",
    FROZEN_RUN: RUN,
    LORA_RUN: RUN,
    "python3 -m tools.export LORA": RUN,
    "demucs --repo ./release_models -n LORA track.mp3": RUN,
    SPECIALISTS_RUN: RUN,
    "python3 -m tools.export --specialists toy_ft SPECIALISTS": RUN,
    "demucs --repo ./release_models -n toy_ft track.mp3": RUN,
    "python3 -m tools.export SIG [SIG ...]": PARSE,
    "python3 -m tools.export --sign SIG": RUN,
    "python3 -m tools.test_pretrained -n SIG --repo ./release_models": PARSE,
    "python3 -m tools.test_pretrained -n SIG --repo ./release_models dset.musdb=/path/to/musdbhq "
    "test.shifts=2": RUN,
    "dora grid mmi --no_monitoring": SLURM,
    "dora grid mmi --retry": SLURM,
    "dora grid mmi --replace_done": SLURM,
    "dora grid mmi --replace": SLURM,
    "dora grid mmi --cancel": SLURM,
    "dora grid mmi --clear": SLURM,
    "dora grid mmi htdemucs -t 0": SLURM,
    "dora info -f 955717e8 -t": "follows the log of a running job: tests/test_slurm.py",
    "sudo .venv/bin/python -m tools.slurm_local start /tmp/slurm": LOCAL_SLURM,
    "export SLURM_CONF=/tmp/slurm/slurm.conf PATH=/tmp/slurm/bin:$PATH": LOCAL_SLURM,
    "python3 -m tools.toy_musdb data/toy_musdb": RUN,
    "dora grid toy -p local --no_monitoring": LOCAL_SLURM,
    'squeue -t all -o "%i %j %T %r"': LOCAL_SLURM,
    "dora grid toy -p local": LOCAL_SLURM,
    "sudo .venv/bin/python -m tools.slurm_local stop /tmp/slurm": LOCAL_SLURM,
    "torchrun --nnodes=2 --nproc_per_node=8 --node_rank=0 --master_addr=HOST0 "
    "--master_port=29500 -m dora run model=htdemucs": "needs two machines with GPUs",
}

# The RUN commands in the order a user follows them (each needs what the ones before made).
STORY = [
    ".venv/bin/python -m tools.toy_musdb data/toy_musdb",
    "python3 -m tools.toy_musdb data/toy_musdb",
    "dora run dset=toy model=htdemucs htdemucs.channels=8 epochs=2",
    "dora run -f SIG",
    "python3 -m tools.plot_xp SIG",
    "python3 -m tools.export SIG",
    "python3 -m tools.export --sign SIG",
    "demucs --repo ./release_models -n SIG track.mp3",
    "demucs --list-models --repo ./release_models",
    "demucs track.mp3",
    "demucs --two-stems vocals --mp3 track.mp3",
    "demucs --stems vocals,drums track.mp3",
    "python3 -m tools.test_pretrained -n SIG --repo ./release_models dset.musdb=/path/to/musdbhq",
    "python3 -m tools.test_pretrained -n SIG --repo ./release_models dset.musdb=/path/to/musdbhq "
    "test.shifts=2",
    "python3 -m tools.export_onnx SIG --repo ./release_models -o onnx/SIG",
    "python3 -m tools.export_onnx htdemucs -o onnx/htdemucs",
    "python3 -m tools.export_onnx htdemucs -o onnx/htdemucs_int8 --quantize int8",
    "demucs --backend onnxruntime track.mp3",
    "demucs --backend onnxruntime --repo ./release_models -n SIG track.mp3",
    "demucs --backend onnxruntime --onnx-dir onnx/htdemucs_int8 track.mp3",
    "dora grid mmi --dry_run --init",
    "dora info -f 955717e8",
    "python3 -m tools.toy_musdb data/toy6 --sources drums,bass,guitar,piano,other,vocals",
    SIX_STEMS_RUN,
    "python3 -m tools.export SIX",
    "demucs --repo ./release_models -n SIX track.mp3",
    "python3 -m tools.test_pretrained -n SIX --repo ./release_models dset.musdb=data/toy6 "
    "test.sdr=false",
    FROZEN_RUN,
    LORA_RUN,
    "python3 -m tools.export LORA",
    "demucs --repo ./release_models -n LORA track.mp3",
    SPECIALISTS_RUN,
    "python3 -m tools.export --specialists toy_ft SPECIALISTS",
    "demucs --repo ./release_models -n toy_ft track.mp3",
]
STORY_TIMEOUT = 900  # seconds, for one command


def documented_commands() -> tp.Dict[str, str]:
    """`{command: "file:line"}` for each command of the ```bash blocks of the docs; trailing
    comments dropped, backslash continuations joined, whitespace collapsed."""
    commands: tp.Dict[str, str] = {}
    for doc in DOCS:
        text = doc.read_text()
        for block in re.finditer(r"```bash\n(.*?)```", text, re.S):
            first_line = text[:block.start()].count("\n") + 2
            body = block.group(1).replace("\\\n", " ")
            for offset, line in enumerate(body.splitlines()):
                command = " ".join(_without_comment(line).split())
                if command:
                    commands.setdefault(command, f"{doc.relative_to(ROOT)}:{first_line + offset}")
    return commands


def _without_comment(line: str) -> str:
    """`line` up to its first `#` that follows a blank and is outside quotes."""
    quote = None
    for index, char in enumerate(line):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def test_every_documented_command_is_listed():
    documented = documented_commands()
    unlisted = {command: where for command, where in documented.items() if command not in COMMANDS}
    stale = [command for command in COMMANDS if command not in documented]
    assert not unlisted, f"documented commands with no entry in COMMANDS: {unlisted}"
    assert not stale, f"COMMANDS entries no longer in the docs: {stale}"
    assert set(STORY) == {command for command, kind in COMMANDS.items() if kind == RUN}


def _dora_argv(command: str) -> tp.List[str]:
    words = shlex.split(command)
    assert words[:2] == ["dora", "run"], command
    return [word for word in words[2:] if word != "-d"]


@pytest.mark.parametrize("command", [c for c, kind in COMMANDS.items() if kind == CONFIG])
def test_documented_dora_configs_are_valid(command: str, tmp_path: Path, monkeypatch):
    """The config each documented `dora run` would train with composes and passes the checks
    (`-f SIG` is looked up among the signatures of upstream's grids; the XP a `continue_from`
    names is there, as after the user trained it: the check matches a numeric one against it)."""
    from demucs.grids._xps import checked_argv
    from demucs.grids.mmi_ft import PARENTS
    from demucs.train import main
    argv = _dora_argv(command)
    monkeypatch.setattr(main.dora, "dir", tmp_path)
    for word in argv:
        if word.startswith("continue_from="):
            (tmp_path / "xps" / word.split("=", 1)[1]).mkdir(parents=True)
    if argv[:1] == ["-f"]:  # an XP of upstream's grids: its overrides must give that signature
        argv = checked_argv(main, PARENTS[argv[1]][0], argv[1])
    assert main.get_xp(argv).sig


def _parse(command: str) -> None:
    words = [word for word in shlex.split(command) if "=" not in word or word.startswith("-")]
    if words[0] == "demucs":
        from demucs.separate import get_parser
        module_args = words[1:]
    else:
        assert words[:2] == ["python3", "-m"], command
        module = __import__(words[2], fromlist=["get_parser"])
        get_parser = module.get_parser
        module_args = words[3:]
    module_args = [word for word in module_args if word not in ("[SIG", "...]")]
    get_parser().parse_args(module_args)


@pytest.mark.parametrize("command", [c for c, kind in COMMANDS.items() if kind in (PARSE, RUN)
                                     and not c.startswith(("dora", ".venv", "for "))])
def test_documented_flags_are_accepted(command: str):
    _parse(command)


@pytest.mark.parametrize("command", [c for c, kind in COMMANDS.items() if kind == MAKE])
def test_documented_make_targets_exist(command: str):
    proc = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------------
# The story, run as written.


def _scratch_repository(folder: Path) -> Path:
    """A copy of the tracked files of the repository, with its virtual environment linked."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, target)
    (folder / ".venv").symlink_to(Path(sys.prefix))
    return folder


def _story_environment(home: Path, repo: Path) -> tp.Dict[str, str]:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("HF_", "HUGGINGFACE_", "TORCH_", "XDG_", "PYTHON", "_DORA"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1",
               PATH=f"{Path(sys.prefix) / 'bin'}:{env.get('PATH', '')}",
               PYTHONPATH=str(repo))
    return env


def _substitute(command: str, sigs: tp.Dict[str, str], repo: Path) -> str:
    command = command.replace("/path/to/musdbhq", str(repo / "data" / "toy_musdb"))
    for placeholder, sig in sigs.items():
        command = re.sub(rf"\b{placeholder}\b", sig, command)
    return command


def _xps(repo: Path) -> tp.Set[str]:
    folder = repo / "outputs" / "xps"
    return {path.name for path in folder.iterdir()} if folder.is_dir() else set()


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.timeout(len(STORY) * 120)  # trainings, exports and separations: 2 min each
def test_the_documented_story_runs_as_written(tmp_path: Path):
    from tools.test_clients import place_model, write_track
    from demucs.audio import encode_mp3, read_audio
    repo = _scratch_repository(tmp_path / "repo")
    home = tmp_path / "home"
    place_model(home)
    write_track(tmp_path / "track.wav")
    encode_mp3(read_audio(tmp_path / "track.wav", 44100, 2), repo / "track.mp3", 44100)
    env = _story_environment(home, repo)
    sigs: tp.Dict[str, str] = {}
    for command in STORY:
        concrete = _substitute(command, sigs, repo)
        before = _xps(repo)
        proc = subprocess.run(concrete, shell=True, cwd=repo, env=env, capture_output=True,
                              text=True, timeout=STORY_TIMEOUT)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{concrete}\n{output[-3000:]}"
        assert "Traceback" not in output, f"{concrete}\n{output[-3000:]}"
        assert "Warning" not in output, f"{concrete}\n{output[-3000:]}"
        if command in PLACEHOLDERS:
            made = sorted(_xps(repo) - before)
            assert made, f"{concrete} made no XP"
            sigs[PLACEHOLDERS[command]] = " ".join(made)
    sig = sigs["SIG"]
    assert sorted(path.name for path in (repo / "separated" / sig / "track").iterdir()) == \
        ["bass.wav", "drums.wav", "other.wav", "vocals.wav"]
    assert (repo / "separated" / "htdemucs" / "track" / "no_vocals.mp3").is_file()
    # `tools.export --sign` replaced the unsigned export of the same XP
    exports = sorted(path.name for path in (repo / "release_models").iterdir())
    assert [name[:9] for name in exports if name.startswith(sig)] == [f"{sig}-"]
    assert (repo / "onnx" / sig).is_dir() and (repo / "onnx" / "htdemucs_int8").is_dir()
    # `demucs --backend onnxruntime` exported htdemucs and the toy model into the cache
    cached = sorted(path.name.split("-")[0]
                    for path in (home / ".cache" / "torch" / "hub" / "demucs_onnx").iterdir())
    assert cached == sorted(["htdemucs", sig])
    assert (repo / "outputs" / "plots" / f"{sig}.png").stat().st_size > 10_000
    assert list((repo / "outputs" / "xps" / sig / "tensorboard").iterdir())
    six_stems = sorted(f"{stem}.wav" for stem in
                       ["drums", "bass", "guitar", "piano", "other", "vocals"])
    for model in [sigs["SIX"], sigs["LORA"], "toy_ft"]:  # toy_ft: the bag of six specialists
        stems = sorted(path.name for path in (repo / "separated" / model / "track").iterdir())
        assert stems == six_stems, model
    assert len(sigs["SPECIALISTS"].split()) == 6
