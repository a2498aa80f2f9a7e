#!/usr/bin/env bash
# Prepare, on a machine with PyPI, what `python3 -m tools.gpu_check` needs on the nvidia-h200
# device machine, which has no network (docs/performance.md, section GPU):
#
#   .whl/        wheels (CPython 3.12, manylinux x86_64, or pure) of the packages this project
#                needs that the device image lacks, pinned to the versions of .venv;
#   .whl/peer/   the official demucs 4.1.0, installed there into its own folder (--peer-site);
#   .gpu_golden/ the reference vectors of ../shared/golden (which does not travel).
#
#   bash tools/prepare_device.sh
#
# Environment: PYTHON (an interpreter with pip; default .venv/bin/python), GOLDEN (default
# ../shared/golden), KINDS (the device's package list; default /work/.library/device/KINDS.md).
# Both folders are added to .git/info/exclude, and travel only when the run names them in its
# `carry`. The tree that travels (tracked and untracked-not-ignored files plus the carried
# folders) must stay under 64 MiB: the largest golden cases are left out until it does, and the
# script says which. It fails when a wheel needs a package that is neither carried nor on the
# device (from the Requires-Dist lines of the wheels, markers evaluated for Python 3.12 on Linux).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
GOLDEN=${GOLDEN:-../shared/golden}
KINDS=${KINDS:-/work/.library/device/KINDS.md}
LIMIT_BYTES=$((64 * 1024 * 1024 - 1024 * 1024))  # 64 MiB, less 1 MiB for files others add

# Packages this project imports (separation, training, the test helpers), then their needs that
# the device image lacks (checked below against the wheels' metadata).
OURS="julius lameenc dora-search hydra-core hydra-colorlog omegaconf submitit treetable soundfile
      musdb museval"
NEEDS="antlr4-python3-runtime colorlog retrying cffi pycparser stempeg ffmpeg-python future pyaml
       jsonschema jsonschema-specifications referencing rpds-py"
PEER="demucs==4.1.0"
# Needed by a carried wheel, absent on the device, and deliberately not carried (name: why).
NOT_CARRIED="sphn: audio I/O of the official demucs; gpu_check imports only its model and apply_model"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux1_x86_64"

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for entry in /.whl/ /.gpu_golden/; do
    grep -qxF "$entry" "$exclude" 2>/dev/null || echo "$entry" >>"$exclude"
done

pinned() {  # NAME==VERSION as installed in $PYTHON, or NAME when it is not installed there
    "$PYTHON" - "$1" <<'EOF'
import importlib.metadata
import sys
try:
    print(f"{sys.argv[1]}=={importlib.metadata.version(sys.argv[1])}")
except importlib.metadata.PackageNotFoundError:
    print(sys.argv[1])
EOF
}

download() {  # REQUIREMENT DEST: a cp312 manylinux or pure wheel; a pure wheel built from the
              # sdist when PyPI has no wheel (antlr4-python3-runtime 4.9.3)
    # shellcheck disable=SC2086
    if "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp $PLATFORMS -d "$2" "$1" 2>/dev/null; then
        return
    fi
    local build
    build=$(mktemp -d)
    "$PYTHON" -m pip wheel -q --no-deps -w "$build" "$1" 2>/dev/null || true
    if ! ls "$build"/*-none-any.whl >/dev/null 2>&1; then
        echo "prepare_device: no CPython 3.12 x86_64 or pure wheel for $1" >&2
        exit 1
    fi
    mv "$build"/*-none-any.whl "$2"/
    rm -rf "$build"
}

rm -rf .whl
mkdir -p .whl/peer
for name in $OURS $NEEDS; do
    download "$(pinned "$name")" .whl
done
download "$PEER" .whl/peer
echo "prepare_device: $(ls .whl/*.whl | wc -l) wheels in .whl/, $(ls .whl/peer) in .whl/peer/"

# Every requirement of every wheel must be carried or on the device.
"$PYTHON" - "$KINDS" "$NOT_CARRIED" .whl/*.whl .whl/peer/*.whl <<'EOF'
import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

kinds, not_carried, wheels = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
if not kinds.is_file():
    sys.exit(f"prepare_device: {kinds} not found: set KINDS to the device's package list")
line = next(line for line in kinds.read_text().splitlines()
            if line.startswith("nvidia-h200:") and "Packages:" in line)
device = {canonicalize_name(name.strip().rstrip("."))
          for name in line.split("Packages:", 1)[1].split(",")}
skipped = {canonicalize_name(item.split(":")[0]) for item in not_carried.split(";")}
carried = {}
for wheel in wheels:
    name, version, _, _ = parse_wheel_filename(Path(wheel).name)
    carried[name] = version
environment = dict(default_environment(), python_version="3.12", python_full_version="3.12.3",
                   sys_platform="linux", platform_system="Linux", platform_machine="x86_64",
                   implementation_name="cpython", platform_python_implementation="CPython",
                   os_name="posix", extra="")
problems = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        lines = archive.read(metadata).decode().splitlines()
    for text in (l.split(":", 1)[1].strip() for l in lines if l.startswith("Requires-Dist:")):
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        if name in carried:
            if carried[name] not in requirement.specifier:
                problems.append(f"{Path(wheel).name} needs {text}, carried {carried[name]}")
        elif name not in device and name not in skipped:
            problems.append(f"{Path(wheel).name} needs {text}: neither carried nor on the device")
if problems:
    sys.exit("prepare_device:\n  " + "\n  ".join(problems))
print(f"prepare_device: every requirement of the {len(wheels)} wheels is carried or on the "
      f"device (not carried: {not_carried})")
EOF

rm -rf .gpu_golden
mkdir -p .gpu_golden
for case in "$GOLDEN"/*/; do
    [ -f "$case/io.pt" ] && cp -r "$case" .gpu_golden/
done
cp "$GOLDEN"/README.md .gpu_golden/ 2>/dev/null || true

# What travels: tracked files, untracked files git does not ignore, shared/, the carried folders.
travel_size() {
    "$PYTHON" - <<'EOF'
import os
import subprocess

names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       capture_output=True, check=True).stdout.split(b"\0")
paths = {name.decode() for name in names if name}
for folder in ("shared", ".whl", ".gpu_golden"):
    for root, _, files in os.walk(folder):
        paths.update(os.path.join(root, name) for name in files)
print(sum(os.path.getsize(p) for p in paths if os.path.isfile(p) and not os.path.islink(p)))
EOF
}

size=$(travel_size)
while [ "$size" -gt "$LIMIT_BYTES" ]; do
    largest=$(du -sb .gpu_golden/*/ 2>/dev/null | sort -n | tail -1 | cut -f2)
    if [ -z "$largest" ]; then
        echo "prepare_device: $size bytes travel without any golden case: over the limit" >&2
        exit 1
    fi
    echo "prepare_device: left out the golden case $(basename "$largest") ($(du -sh "$largest" |
        cut -f1)) to stay under 64 MiB"
    rm -rf "$largest"
    size=$(travel_size)
done
echo "prepare_device: golden cases in .gpu_golden/: $(cd .gpu_golden && ls -d */ | tr -d / |
    tr '\n' ' ')"
echo "prepare_device: $(du -sb .whl | cut -f1) bytes of wheels, $(du -sb .gpu_golden | cut -f1)" \
     "bytes of golden cases; $size bytes travel in all (limit $((64 * 1024 * 1024)))"
