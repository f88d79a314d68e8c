#!/usr/bin/env bash
# Lay out a ComfyUI that runs on the CPU, with its own virtual environment, for the tests marked `comfyui`.
#
#   tests/comfyui_env.sh DEST [SOURCE] [REV]
#
#   DEST    folder for the ComfyUI checkout; its virtual environment goes to DEST/.venv
#   SOURCE  a git URL (default https://github.com/comfyanonymous/ComfyUI) or a local git directory, bare or not
#   REV     tag, branch or commit to check out (default v0.8.0, the release the tests are written against;
#           its commit is fc0cb10b)
#
# Environment:
#   PYTHON           interpreter that creates the venv (default python3; ComfyUI needs 3.10 or newer)
#   TORCH_SPEC       what pip installs for torch (default "torch==2.14.1 torchvision==0.29.1"); torchaudio is
#                    left out on purpose: ComfyUI guards its import and only its audio nodes need it
#   TORCH_INDEX_URL  index to take torch from, e.g. https://download.pytorch.org/whl/cpu for the small CPU-only
#                    wheels (default: pip's own configuration; the default build also runs on a CPU)
#
# Running it again reuses what is there: an existing checkout in DEST is kept (whatever its revision; remove DEST
# to start over), the venv is kept, and pip only installs what is missing. Progress goes to stderr; the last line
# on stdout is DEST, so `COMFYUI_DIR=$(tests/comfyui_env.sh /tmp/comfyui)` works.
set -euo pipefail

DEFAULT_SOURCE=https://github.com/comfyanonymous/ComfyUI
DEFAULT_REV=v0.8.0
DEFAULT_TORCH="torch==2.14.1 torchvision==0.29.1"

say() { printf 'comfyui_env: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

usage() {
    sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

[[ $# -ge 1 && $# -le 3 && $1 != -* ]] || usage
dest=$1
source=${2:-$DEFAULT_SOURCE}
rev=${3:-$DEFAULT_REV}
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-$DEFAULT_TORCH}
project=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

command -v git >/dev/null || die "git is not installed"
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

# --- the checkout ---------------------------------------------------------------------------------------------

# The commit REV names in the git directory $1. A release tag that the directory does not carry (a mirror copied
# without its tags) is looked up by ComfyUI's release commit subject, "ComfyUI vX.Y.Z".
local_commit() {
    local gd=$1 found
    if found=$(git --git-dir="$gd" rev-parse --verify -q "$rev^{commit}"); then
        echo "$found"
        return
    fi
    if [[ $rev =~ ^v[0-9]+(\.[0-9]+)+$ ]]; then
        found=$(git --git-dir="$gd" log --all -1 --format=%H --grep="^ComfyUI ${rev//./\\.}\$")
        if [[ -n $found ]]; then
            say "warning: $source has no tag $rev; using its release commit ${found:0:10}"
            echo "$found"
            return
        fi
    fi
    die "$source has no revision $rev"
}

# Write the tree of commit $2 from git directory $1 into DEST. A partial copy of a repository can lack some
# blobs (large files are often left out): those files are skipped and named, instead of failing the whole copy.
export_local() {
    local gd=$1 commit=$2 index path
    local -a missing=()
    index=$(mktemp)
    rm -f "$index"  # read-tree wants to create the index itself
    GIT_INDEX_FILE=$index git --git-dir="$gd" read-tree "$commit"
    # checkout-index goes on past an unreadable blob and reports it; the check below says what is absent
    GIT_INDEX_FILE=$index git --git-dir="$gd" --work-tree="$dest" checkout-index --all --force 2>/dev/null || true
    while IFS= read -r -d '' path; do
        [[ -e $dest/$path || -L $dest/$path ]] || missing+=("$path")
    done < <(GIT_INDEX_FILE=$index git --git-dir="$gd" ls-files -z)
    rm -f "$index"
    if ((${#missing[@]})); then
        say "warning: $source lacks ${#missing[@]} file(s) of $rev; they were left out:"
        printf '    %s\n' "${missing[@]}" >&2
    fi
    git --git-dir="$gd" log -1 --format='%h %s' "$commit" >"$dest/.comfyui_env_commit"
}

# A shallow clone of REV from a remote. A tag, a branch or a full commit hash comes in one shallow fetch; anything
# else (an abbreviated hash) needs the history, fetched without file contents, and then a normal checkout.
clone_remote() {
    git -C "$dest" init -q
    git -C "$dest" remote add origin "$source" 2>/dev/null || git -C "$dest" remote set-url origin "$source"
    if git -C "$dest" fetch -q --depth 1 origin "$rev" 2>/dev/null; then
        git -C "$dest" -c advice.detachedHead=false checkout -q FETCH_HEAD
    else
        say "no shallow fetch of $rev from $source; fetching the history without file contents"
        git -C "$dest" fetch -q --filter=blob:none --tags origin '+refs/heads/*:refs/remotes/origin/*' \
            || die "cannot fetch from $source"
        git -C "$dest" -c advice.detachedHead=false checkout -q "$rev" || die "$source has no revision $rev"
    fi
}

if [[ -f $dest/main.py && -d $dest/comfy ]]; then
    say "reusing the ComfyUI checkout in $dest"
else
    leftovers=$(find "$dest" -mindepth 1 -maxdepth 1 ! -name .venv ! -name .git -print -quit)
    [[ -z $leftovers ]] || die "$dest is neither empty nor a ComfyUI checkout (found $leftovers)"
    if [[ -d $source ]]; then
        gd=$(git -C "$source" rev-parse --absolute-git-dir 2>/dev/null) || die "$source is not a git directory"
        commit=$(local_commit "$gd")
        say "copying $rev (${commit:0:10}) from $source into $dest"
        export_local "$gd" "$commit"
    else
        say "cloning $rev from $source into $dest"
        clone_remote
    fi
    [[ -f $dest/main.py && -f $dest/requirements.txt ]] || die "$rev of $source does not look like ComfyUI"
fi

if [[ -d $dest/.git ]]; then
    checked_out=$(git -C "$dest" log -1 --format='%h %s' 2>/dev/null || echo "?")
else
    checked_out=$(cat "$dest/.comfyui_env_commit" 2>/dev/null || echo "?")
fi

# --- the virtual environment ----------------------------------------------------------------------------------

venv=$dest/.venv
py=$venv/bin/python
if ! "$py" -c 'import sys' 2>/dev/null; then
    command -v "$python" >/dev/null || die "no Python interpreter '$python' (set PYTHON)"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "$python is $("$python" -V 2>&1); ComfyUI needs Python 3.10 or newer (set PYTHON)"
    say "creating $venv with $("$python" -V 2>&1)"
    rm -rf "$venv"
    "$python" -m venv "$venv"
fi
pip=("$py" -m pip --disable-pip-version-check)

# torch first, on its own, so that TORCH_INDEX_URL applies to it alone
torch_args=()
[[ -z ${TORCH_INDEX_URL:-} ]] || torch_args=(--index-url "$TORCH_INDEX_URL")
say "installing $torch_spec (already-installed versions are kept)"
# shellcheck disable=SC2086  # TORCH_SPEC is a list of requirements
"${pip[@]}" install -q "${torch_args[@]}" $torch_spec >&2

# ComfyUI's requirements without the torch family, and this pack's own ones (the tests load the pack into that
# server); the torch just installed is held fixed so that nothing swaps it for another build. ComfyUI's front-end
# manager imports requests, which its requirements.txt does not name (other packages usually bring it in).
requirements=$venv/comfyui-requirements.txt
grep -v -i -E '^[[:space:]]*(torch|torchvision|torchaudio)[[:space:]]*([<>=!~;[].*)?$' "$dest/requirements.txt" \
    >"$requirements"
"$py" - >"$venv/torch-constraints.txt" <<'PY'
from importlib.metadata import PackageNotFoundError, version
for name in ("torch", "torchvision"):
    try:
        print(f"{name}=={version(name)}")
    except PackageNotFoundError:
        pass
PY
say "installing ComfyUI's requirements"
# onnx + onnxruntime: in tests/test_comfyui_engine.py onnxruntime stands in for a TensorRT engine under KSampler.
"${pip[@]}" install -q -r "$requirements" -r "$project/requirements.txt" requests onnx onnxruntime \
    -c "$venv/torch-constraints.txt" >&2

# --- a check that the server starts ---------------------------------------------------------------------------

"$py" -c 'import torch, torchvision, aiohttp, safetensors, einops' \
    || die "the environment in $venv cannot import ComfyUI's basics"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
say "checking that ComfyUI starts (main.py --cpu --quick-test-for-ci)"
if ! (cd "$dest" && "$py" main.py --cpu --quick-test-for-ci --base-directory "$scratch" \
        --disable-all-custom-nodes >"$scratch/start.log" 2>&1); then
    tail -n 30 "$scratch/start.log" >&2
    die "ComfyUI in $dest does not start"
fi

say "ComfyUI $checked_out in $dest, torch $("$py" -c 'import torch; print(torch.__version__)')"
say "run the tests with:"
say "    COMFYUI_DIR=$dest pytest -m comfyui tests"
echo "$dest"
