"""The `demucs` command: separate tracks into stems written as wav, flac or mp3 files.

With the default `split`, each track is decoded once into a temporary file, separated block by
block and every stem is streamed to a spool (`demucs.audio.AudioWriter`), so memory does not grow
with the track's duration. Each stem is written under a temporary name and renamed only when the
whole track succeeded (`demucs.files.atomic_write`), so a failure never leaves partial outputs
behind; other tracks are still processed.
"""
import argparse
from contextlib import ExitStack
import logging
from pathlib import Path
import sys
import typing as tp

import torch

from .allocator import tune_malloc
from .api import LoadAudioError, Separator, SegmentTooLongError
from .audio import MP3_BITRATES, AudioFormat, AudioWriter
from .backends import BACKENDS, LoadModelError, check_backend, check_device, default_device, \
    list_models, onnx_dir_manifest
from .files import atomic_write, created_folders, describe_spool_error, describe_write_error, \
    remove_stale_partials, unwritable_reason
from .pretrained import DEFAULT_MODEL, add_model_flags
from .utils import exit_on_interrupt
# Names Demucs 4.1's separate module makes importable from it.
from .api import save_audio  # noqa: F401
from .apply import BagOfModels  # noqa: F401
from .htdemucs import HTDemucs  # noqa: F401
from .pretrained import ModelLoadingError  # noqa: F401
from .utils import fatal  # noqa: F401

logger = logging.getLogger(__name__)


class SeparationError(Exception):
    """A track could not be separated (reported, then the next track is processed)."""


class UsageError(ValueError):
    """The call cannot do what it asks (bad option value, clashing outputs): nothing is done."""


FILENAME_FIELDS = dict(track="track", trackext="wav", stem="stem", ext="wav")


def get_parser() -> argparse.ArgumentParser:
    """The `demucs` command's flags (those of upstream Demucs, in its order)."""
    parser = argparse.ArgumentParser("demucs",
                                     description="Separate the sources for the given tracks")
    parser.add_argument("tracks", nargs="*", type=Path, default=[], help="Path to tracks")
    add_model_flags(parser)
    parser.add_argument("--list-models", action="store_true",
                        help="List available models from current repo and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("-o", "--out", type=Path, default=Path("separated"),
                        help="Folder where to put extracted tracks. A subfolder with the model "
                             "name will be created.")
    parser.add_argument("--filename", default="{track}/{stem}.{ext}",
                        help="Set the name of output file. Use \"{track}\", \"{trackext}\", "
                             "\"{stem}\", \"{ext}\" to use variables of track name without "
                             "extension, track extension, stem name and default output file "
                             "extension. Default is \"{track}/{stem}.{ext}\".")
    parser.add_argument("-d", "--device", default=default_device(),
                        help="Device to use, default is cuda if available, else mps, else cpu.")
    _add_separation_flags(parser)
    _add_output_format_flags(parser)
    _add_speed_flags(parser)
    return parser


def _add_separation_flags(parser: argparse.ArgumentParser) -> None:
    """How the model is applied: shifts, overlap, segments and which stems to keep."""
    parser.add_argument("--shifts", default=1, type=int,
                        help="Number of random shifts for equivariant stabilization. Increase "
                             "separation time but improves quality for Demucs. 10 was used in "
                             "the original paper.")
    parser.add_argument("--overlap", default=0.25, type=float, help="Overlap between the splits.")
    split_group = parser.add_mutually_exclusive_group()
    split_group.add_argument("--no-split", action="store_false", dest="split", default=True,
                             help="Doesn't split audio in chunks. This can use large amounts "
                                  "of memory.")
    split_group.add_argument("--segment", type=int,
                             help="Set split size of each chunk. This can help save memory of "
                                  "graphic card.")
    parser.add_argument("--two-stems", dest="stem", metavar="STEM",
                        help="Only separate audio into {STEM} and no_{STEM}. ")
    parser.add_argument("--stems", type=_stem_list, metavar="STEM[,STEM...]",
                        help="Only compute and save these stems (e.g. vocals,drums); the models "
                             "of a bag that do not weigh them are not run.")
    parser.add_argument("--other-method", dest="other_method", choices=["none", "add", "minus"],
                        default="add",
                        help="Decide how to get \"no_{STEM}\". \"none\" will not save "
                             "\"no_{STEM}\". \"add\" will add all the other stems. \"minus\" "
                             "will use the original track minus the selected stem.")


def _add_output_format_flags(parser: argparse.ArgumentParser) -> None:
    """How stems are encoded: wav depth, clipping, flac or mp3."""
    depth_group = parser.add_mutually_exclusive_group()
    depth_group.add_argument("--int24", action="store_true", help="Save wav output as 24 bits wav.")
    depth_group.add_argument("--float32", action="store_true",
                             help="Save wav output as float32 (2x bigger).")
    parser.add_argument("--clip-mode", default="rescale", choices=["rescale", "clamp", "none"],
                        help="Strategy for avoiding clipping: rescaling entire signal if "
                             "necessary  (rescale) or hard clipping (clamp).")
    format_group = parser.add_mutually_exclusive_group()
    format_group.add_argument("--flac", action="store_true",
                              help="Convert the output wavs to flac.")
    format_group.add_argument("--mp3", action="store_true", help="Convert the output wavs to mp3.")
    parser.add_argument("--mp3-bitrate", default=320, type=int, help="Bitrate of converted mp3.")
    parser.add_argument("--mp3-preset", choices=range(2, 8), type=int, default=2,
                        help="Encoder preset of MP3, 2 for highest quality, 7 for fastest speed. "
                             "Default is 2")


def _add_speed_flags(parser: argparse.ArgumentParser) -> None:
    """Opt-in speed options and parallel jobs."""
    parser.add_argument("--amp", choices=["bf16", "fp16"], default=None,
                        help="Run the model in mixed precision (opt-in): faster on GPUs and on "
                             "CPUs with bfloat16 units, with a slightly different output than "
                             "the default float32.")
    parser.add_argument("--compile", action="store_true",
                        help="Compile the model with torch.compile (opt-in): the first segments "
                             "are slow while it compiles, the next ones faster.")
    parser.add_argument("--batch-segments", default=1, type=int, metavar="N",
                        help="Run N consecutive segments of a track in one forward (opt-in): "
                             "keeps a GPU busier, uses more memory; same output up to float "
                             "rounding. Default 1.")
    parser.add_argument("-j", "--jobs", default=0, type=int,
                        help="Number of jobs. This can increase memory usage but will be much "
                             "faster when multiple cores are available.")
    parser.add_argument("--backend", choices=BACKENDS, default="torch",
                        help="Run each segment with PyTorch (default) or with ONNX Runtime "
                             "(pip install 'demucs[onnx]'; see docs/onnx.md).")
    parser.add_argument("--onnx-dir", type=_folder_argument, default=None,
                        help="With --backend onnxruntime: a folder written by "
                             "`python3 -m tools.export_onnx` (the model name is then read from "
                             "it), or where to export the model the first time. Default: an "
                             "export made once and cached beside the downloaded models.")


def _folder_argument(value: str) -> Path:
    """A folder flag's value; an empty one (which `Path` would read as ".") is refused."""
    if not value.strip():
        raise argparse.ArgumentTypeError("give a folder, not an empty path")
    return Path(value)


def _output_format(args: argparse.Namespace, samplerate: int) -> AudioFormat:
    ext = "mp3" if args.mp3 else "flac" if args.flac else "wav"
    return AudioFormat(ext=ext, samplerate=samplerate, clip=args.clip_mode,
                       bits_per_sample=24 if args.int24 else 16, as_float=args.float32,
                       bitrate=args.mp3_bitrate, preset=args.mp3_preset)


def _stem_list(text: str) -> tp.List[str]:
    """`--stems a,b` as `["a", "b"]`."""
    stems = [stem.strip() for stem in text.split(",")]
    if not all(stems):
        raise argparse.ArgumentTypeError(f"{text!r}: give stem names separated by commas, "
                                         f"e.g. vocals,drums")
    return stems


def _needed_stems(args: argparse.Namespace, model: tp.Any) -> tp.Optional[tp.List[str]]:
    """The stems the outputs need computed, None for all: `--stems`, or the `--two-stems` stem
    when its complement is not the sum of the others (`--other-method minus` or `none`)."""
    if args.stems is not None:
        return args.stems
    if args.stem is None:
        return None
    if args.other_method != "add":
        return [args.stem]
    if isinstance(model, BagOfModels):
        logger.info("--two-stems %s adds up every other stem for no_%s, so every model of the "
                    "bag runs; --other-method minus (the mixture minus %s) runs only the models "
                    "that weigh %s.", args.stem, args.stem, args.stem, args.stem)
    return None


def _stem_names(sources: tp.List[str], stem: tp.Optional[str], other_method: str) -> tp.List[str]:
    if stem is None:
        return list(sources)
    extra = {"add": ["no_" + stem], "minus": ["minus_" + stem], "none": []}[other_method]
    return [stem] + extra


def _stems_of_block(origin: torch.Tensor, sources: tp.Dict[str, torch.Tensor],
                    stem: tp.Optional[str], other_method: str) -> tp.Dict[str, torch.Tensor]:
    """The stems to write for one block, following `--two-stems` and `--other-method`."""
    if stem is None:
        return sources
    out = {stem: sources[stem]}
    if other_method == "add":
        others = [source for name, source in sources.items() if name != stem]
        out["no_" + stem] = torch.stack(others).sum(0)
    elif other_method == "minus":
        out["minus_" + stem] = origin - sources[stem]
    return out


def _output_path(out: Path, pattern: str, track: Path, stem: str, ext: str) -> Path:
    name, _, trackext = track.name.rpartition(".")
    if not name:
        name, trackext = trackext, ""
    return out / pattern.format(track=name, trackext=trackext, stem=stem, ext=ext)


def _check_filename_pattern(pattern: str) -> None:
    try:
        pattern.format(**FILENAME_FIELDS)
    except (KeyError, IndexError, ValueError) as error:
        detail = f"{{{error.args[0]}}}" if isinstance(error, KeyError) else str(error)
        raise UsageError(f"--filename {pattern!r} has an unknown field or is malformed "
                         f"({detail}); use {{track}}, {{trackext}}, {{stem}} and {{ext}}.") \
            from None


def plan_outputs(tracks: tp.Sequence[Path], out: Path, pattern: str, stems: tp.Sequence[str],
                 ext: str) -> tp.Dict[Path, tp.Dict[str, Path]]:
    """`{track: {stem: output path}}` for the whole call, or `UsageError` when two outputs would
    share a path (which would keep only the last one written) or an output would replace an
    input track. The same track given twice is separated once."""
    plan: tp.Dict[Path, tp.Dict[str, Path]] = {}
    owners: tp.Dict[Path, str] = {}
    inputs: tp.Dict[Path, Path] = {}
    for track in tracks:
        if track.resolve() in inputs:
            logger.warning("%s is given more than once: it is separated once.", track)
        else:
            inputs[track.resolve()] = track
    for track in inputs.values():
        plan[track] = {}
        for stem in stems:
            path = _output_path(out, pattern, track, stem, ext)
            resolved, owner = path.resolve(), f"stem {stem} of {track}"
            if resolved in owners:
                raise UsageError(_clash_message(path, owners[resolved], owner, pattern))
            if resolved in inputs:
                raise UsageError(f"{owner} would be written to {path}, replacing the input track "
                                 f"{inputs[resolved]}; choose another --out or --filename.")
            owners[resolved] = owner
            plan[track][stem] = path
    return plan


def _clash_message(path: Path, first: str, second: str, pattern: str) -> str:
    if "{stem}" not in pattern:
        hint = "--filename must contain {stem} so that each stem gets its own file"
    elif "{track}" not in pattern:
        hint = "--filename must contain {track} so that each track gets its own files"
    else:
        hint = ("tracks with the same name from different folders need separate calls with "
                "different --out folders (or rename one)")
    return f"{first} and {second} would both be written to {path}: {hint}."


def _check_writable(folders: tp.Iterable[Path]) -> None:
    problems = [reason for reason in map(unwritable_reason, dict.fromkeys(folders)) if reason]
    if problems:
        raise UsageError("; ".join(problems) + "; choose another --out.")


def _check_options(args: argparse.Namespace) -> None:
    """Everything that can be checked before the model is loaded: option values, the device,
    the input files and the output folder."""
    if args.stems is not None and args.stem is not None:
        raise UsageError("--stems and --two-stems both choose the stems: give one of them "
                         "(--two-stems STEM also writes the rest as no_STEM or minus_STEM).")
    if args.batch_segments < 1:
        raise UsageError(f"--batch-segments {args.batch_segments}: give 1 or more segments "
                         "per forward.")
    if args.mp3 and args.mp3_bitrate not in MP3_BITRATES:
        raise UsageError(f"--mp3-bitrate {args.mp3_bitrate} is not an mp3 bitrate; use one of "
                         f"{', '.join(map(str, MP3_BITRATES))} (kbps).")
    try:
        check_device(args.device)
    except ValueError as error:
        raise UsageError(f"-d/--device: {error}") from None
    _check_backend_options(args)
    _check_filename_pattern(args.filename)
    missing = [str(track) for track in args.tracks if not track.is_file()]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}. If a path contains spaces, "
                         "surround it with quotes.")
    _check_writable([args.out])


def _check_backend_options(args: argparse.Namespace) -> None:
    if args.onnx_dir is not None and args.backend != "onnxruntime":
        raise UsageError("--onnx-dir is used by the ONNX Runtime backend: add --backend "
                         "onnxruntime.")
    try:
        check_backend(args.backend, args.device, args.amp, args.compile,
                      option_names=("--amp", "--compile"))
    except ImportError as error:
        raise UsageError(str(error)) from None
    except ValueError as error:
        raise UsageError(f"--backend {args.backend}: {error}") from None
    if args.onnx_dir is not None:
        try:
            args.onnx_manifest = onnx_dir_manifest(args.onnx_dir)
        except LoadModelError as error:
            raise UsageError(f"--onnx-dir: {error}") from None


def _model_name(args: argparse.Namespace) -> str:
    """-n, else --sig, else the model an --onnx-dir export was made from, else the default."""
    if args.name is not None:
        return args.name
    if args.sig is not None:
        return args.sig
    manifest = getattr(args, "onnx_manifest", None)  # None: no export there yet
    return (manifest or {}).get("name") or DEFAULT_MODEL


def _blocks(separator: Separator, track: Path, split: bool):
    if split:
        yield from separator.separate_audio_file_in_blocks(track)
    else:
        yield separator.separate_audio_file(track)


def separate_track(separator: Separator, track: Path, paths: tp.Dict[str, Path],
                   args: argparse.Namespace, fmt: AudioFormat) -> tp.List[Path]:
    """Separate one track and write its stems to `paths` (`{stem: path}`, see `plan_outputs`);
    returns the written paths. Either every stem is written or none."""
    for path in paths.values():
        remove_stale_partials(path)
    with ExitStack() as writers_stack:
        writers = {name: writers_stack.enter_context(AudioWriter(separator.audio_channels))
                   for name in paths}
        try:
            for origin, sources in _blocks(separator, track, args.split):
                stems = _stems_of_block(origin, sources, args.stem, args.other_method)
                for name, block in stems.items():
                    writers[name].append(block)
        except OSError as error:  # the spools of the decoded track and of the stems
            raise SeparationError("could not write temporary audio: "
                                  + describe_spool_error(error)) from error
        _encode_all_or_none(writers, paths, fmt)
    return list(paths.values())


def _encode_all_or_none(writers: tp.Dict[str, AudioWriter], paths: tp.Dict[str, Path],
                        fmt: AudioFormat) -> None:
    """Encode every stem under a temporary name; rename them only once all of them succeeded
    (on failure, every temporary and every folder made for them is removed and previous outputs
    stay as they were). A write error names the file and its cause."""
    with ExitStack() as renames:
        for name, path in paths.items():
            renames.enter_context(created_folders(path.parent))
            try:
                writers[name].encode(renames.enter_context(atomic_write(path)), fmt)
            except (OSError, RuntimeError) as error:
                raise SeparationError("could not write " + describe_write_error(error, path)) \
                    from error


_OUT_OF_MEMORY_MARKS = ("out of memory", "can't allocate memory", "not enough memory")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` says a device ran out of memory (CUDA's `torch.OutOfMemoryError`, or the
    RuntimeError of MPS and of the CPU allocator)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(
        mark in str(error).lower() for mark in _OUT_OF_MEMORY_MARKS)


def out_of_memory_advice(error: BaseException, track: Path, args: argparse.Namespace) -> str:
    """One message for an out-of-memory: where, and the options that use less memory."""
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    advice = ["a shorter --segment (e.g. --segment 4)"]
    if args.batch_segments > 1:
        advice.append(f"fewer --batch-segments than {args.batch_segments}")
    else:
        advice.append("--batch-segments 1 (the default)")
    if args.jobs > 0:
        advice.append("fewer -j/--jobs")
    if torch.device(args.device).type != "cpu":
        advice.append("-d cpu (slower, uses main memory)")
    return (f"error: out of memory on {args.device} while separating {track} ({cause}). "
            f"Use less memory: {', '.join(advice)}. The stems of the tracks before it are kept.")


def _print_models(repo: tp.Optional[Path]) -> None:
    try:
        models = list_models(repo)
    except (LoadModelError, OSError) as error:
        _fatal(f"error: --list-models: {error}")
    print("Bag of models:", end="\n    ")
    print("\n    ".join(models["bag"]))
    print("Single models:", end="\n    ")
    print("\n    ".join(models["single"]))


def _fatal(message: str) -> tp.NoReturn:
    logger.error(message)
    sys.exit(1)


def _make_separator(args: argparse.Namespace) -> Separator:
    try:
        separator = Separator(model=args.name, repo=args.repo, device=args.device,
                              shifts=args.shifts, overlap=args.overlap, split=args.split,
                              segment=args.segment, jobs=args.jobs, progress=True, amp=args.amp,
                              compile_model=args.compile, backend=args.backend,
                              onnx_dir=args.onnx_dir, segment_batch=args.batch_segments)
    except SegmentTooLongError as error:
        _fatal("Cannot use a Transformer model with a longer segment than it was trained for. "
               f"Maximum segment is: {error.limit}")
    except (LoadModelError, ValueError, TypeError, ImportError) as error:
        _fatal(str(error))
    _warn_about_slow_options_on_cpu(args)
    for stem in [args.stem] if args.stems is None else args.stems:
        if stem is not None and stem not in separator.model.sources:
            _fatal(f'error: stem "{stem}" is not in selected model. '
                   f"STEM must be one of {', '.join(separator.model.sources)}.")
    try:
        separator.update_parameter(stems=_needed_stems(args, separator.model))
    except ValueError as error:
        _fatal(f"error: --stems: {error}")
    return separator


def _warn_about_slow_options_on_cpu(args: argparse.Namespace) -> None:
    """Speed options that usually slow a CPU separation down (docs/performance.md)."""
    if torch.device(args.device).type != "cpu":
        return
    if args.amp == "fp16":
        logger.warning("--amp fp16 is usually slower than float32 on CPU, up to 40 times (few "
                       "CPUs compute in float16); --amp bf16 is faster on CPUs with bfloat16 "
                       "support.")
    if args.compile:
        logger.warning("--compile on CPU compiles for many minutes before the first segment "
                       "(19 min for htdemucs on 2 cores) and the compiled model was no faster "
                       "than the default; it is meant for GPUs.")


def main(opts: tp.Optional[tp.List[str]] = None) -> None:
    """Entry point of the `demucs` command; exits with status 1 if any track failed, 130 or 143
    on Ctrl-C or SIGTERM (at once when run as a command, `opts` None)."""
    tune_malloc()
    args = get_parser().parse_args(opts)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    if args.list_models:
        _print_models(args.repo)
        return
    with exit_on_interrupt("demucs", "the stems of finished tracks are kept, nothing of the "
                           "current one was written", immediate=opts is None):
        _separate_all(args)


def _separate_all(args: argparse.Namespace) -> None:
    if not args.tracks:
        _fatal("error: no tracks given; pass the audio files to separate.")
    try:
        _check_options(args)
        args.name = _model_name(args)
    except UsageError as error:
        _fatal(f"error: {error}")
    separator = _make_separator(args)
    out = args.out / args.name
    fmt = _output_format(args, separator.samplerate)
    names = _stem_names(separator.stems, args.stem, args.other_method)
    try:
        plan = plan_outputs(args.tracks, out, args.filename, names, fmt.ext)
        _check_writable(path.parent for paths in plan.values() for path in paths.values())
    except UsageError as error:
        _fatal(f"error: {error}")
    logger.info("Separated tracks will be stored in %s", out.resolve())
    failures = 0
    for track, paths in plan.items():
        logger.info("Separating track %s", track)
        try:
            separate_track(separator, track, paths, args, fmt)
        except (LoadAudioError, SeparationError, ValueError, OSError, RuntimeError) as error:
            if is_out_of_memory(error):  # the next tracks would run out too: stop here
                _fatal(out_of_memory_advice(error, track, args))
            logger.error("Could not separate %s: %s", track, error)
            failures += 1
    if failures:
        _fatal(f"{failures} of {len(plan)} track(s) could not be separated.")


if __name__ == "__main__":
    main()
