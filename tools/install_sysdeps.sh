#!/usr/bin/env bash
# Installs the Debian programs the project calls (ffmpeg/ffprobe for audio I/O, soundstretch for
# pitch/tempo augmentation) when they are missing. Needs root and apt-get; otherwise it says what to do.
set -u
missing=()
command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 || missing+=(ffmpeg)
command -v soundstretch >/dev/null 2>&1 || missing+=(soundstretch)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages: ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  exit $?
fi
echo "warning: missing programs: ${missing[*]}. Install them with your package manager" \
     "(e.g. 'sudo apt-get install ${missing[*]}'); tests that need them are skipped." >&2
exit 0
