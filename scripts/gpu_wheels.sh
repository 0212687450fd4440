#!/usr/bin/env bash
# The wheels `python -m loadtest.gpu_probe --wheels DIR` needs on a GPU machine that has PyTorch,
# transformers, peft and Triton but no diffusers and no pydantic, and no package registry:
# diffusers and pydantic (with its compiled pydantic-core) at the versions pyproject.toml pins, their
# dependencies that those four packages do not already bring, and Previz itself as a wheel.
#
#   bash scripts/gpu_wheels.sh DIR [PYTHON_VERSION [PLATFORM]]
#   bash scripts/gpu_wheels.sh wheels/gpu 3.12 manylinux_2_28_x86_64   # the GPU machines
#   bash scripts/gpu_wheels.sh wheels/gpu                               # this interpreter's Python/platform
#
# Runs where the package registries are reachable. Without PYTHON_VERSION/PLATFORM, pip picks wheels for
# the interpreter that runs it ($PYTHON, else python3). DIR's old wheels are replaced; DIR must be outside
# the repository or git-ignored (`wheels/` is), and the set must stay under 64 MiB (the `run` tool
# carries at most that much). The probe unpacks DIR's wheels into a temporary folder and puts it first on
# sys.path (compiled modules such as pydantic-core's cannot be imported from inside a zip).
set -euo pipefail

usage="usage: bash scripts/gpu_wheels.sh DIR [PYTHON_VERSION (e.g. 3.12) [PLATFORM (e.g. manylinux_2_28_x86_64)]]"
dir=${1:?$usage}
target_python=${2:-}
target_platform=${3:-}
python=${PYTHON:-python3}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
max_bytes=$((64 * 1024 * 1024))

# Already on the GPU machine, because torch, transformers, peft or triton require them: never shadowed.
# (typing-extensions is shipped on purpose: pydantic needs a newer one than torch does, and it is
# backwards compatible.)
provided=(
    torch triton numpy filelock fsspec sympy mpmath networkx jinja2 markupsafe setuptools
    huggingface-hub hf-xet httpx httpx2 httpcore httpcore2 lazy-importer truststore h11 anyio sniffio click typer typer-slim shellingham rich
    markdown-it-py mdurl pygments packaging pyyaml regex safetensors tokenizers tqdm psutil accelerate kernels
)

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [[ $dir == "$repo"/* ]] && ! git -C "$repo" check-ignore -q "$dir"; then
    echo "gpu_wheels: $dir is inside the repository and not git-ignored; use wheels/... or a folder outside." >&2
    exit 2
fi

# diffusers' and pydantic's requirement strings, from pyproject.toml (the one place they are pinned)
mapfile -t requirements < <("$python" - "$repo/pyproject.toml" <<'EOF'
import re, sys, tomllib

with open(sys.argv[1], "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
for requirement in dependencies:
    if re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower() in {"diffusers", "pydantic"}:
        print(requirement)
EOF
)
if [[ ${#requirements[@]} -ne 2 ]]; then
    echo "gpu_wheels: expected diffusers and pydantic in pyproject.toml's dependencies, found: ${requirements[*]}" >&2
    exit 1
fi

staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
# 1. Resolve the closure for this interpreter (the registry has every wheel of that), keep what the GPU
#    machine lacks, as exact name==version pins.
"$python" -m pip download --disable-pip-version-check --quiet --only-binary=:all: \
    --dest "$staging/host" "${requirements[@]}"
pins=()
for wheel in "$staging"/host/*.whl; do
    file=$(basename "$wheel")
    name=$(echo "${file%%-*}" | tr '[:upper:]_.' '[:lower:]--')
    version=$(echo "$file" | cut -d- -f2)
    skip=0
    for have in "${provided[@]}"; do
        [[ $name == "$have" || $name == nvidia-* || $name == cuda-* ]] && skip=1 && break
    done
    [[ $skip -eq 0 ]] && pins+=("$name==$version")
done

# 2. Those pins for the target Python and platform (compiled ones differ: pydantic-core, pillow...).
mkdir -p "$staging/target"
if [[ -n $target_python || -n $target_platform ]]; then
    target=(--only-binary=:all: --implementation cp)
    [[ -n $target_python ]] && target+=(--python-version "$target_python")
    [[ -n $target_platform ]] && target+=(--platform "$target_platform")
    "$python" -m pip download --disable-pip-version-check --quiet --no-deps "${target[@]}" \
        --dest "$staging/target" "${pins[@]}" || {
        echo "gpu_wheels: the registry lacks a wheel of ${pins[*]} for ${target[*]}; see pip's message above." >&2
        exit 1
    }
else
    for pin in "${pins[@]}"; do
        name=${pin%%==*}
        for wheel in "$staging"/host/*.whl; do
            file=$(basename "$wheel")
            [[ $(echo "${file%%-*}" | tr '[:upper:]_.' '[:lower:]--') == "$name" ]] && cp "$wheel" "$staging/target/"
        done
    done
fi

# 3. Previz itself: built from a copy of its packages, so the checkout gets no build/ or egg-info folders
mkdir -p "$staging/src"
cp -r "$repo/pyproject.toml" "$repo/README.md" "$repo/pipeline" "$repo/serve" "$staging/src/"
find "$staging/src" -name __pycache__ -prune -exec rm -rf {} +
isolation=()
"$python" -c "import setuptools" 2>/dev/null && isolation=(--no-build-isolation)  # else pip fetches it
"$python" -m pip wheel --disable-pip-version-check --quiet --no-deps "${isolation[@]}" \
    --wheel-dir "$staging/target" "$staging/src"

rm -f "$dir"/*.whl
cp "$staging"/target/*.whl "$dir/"

total=$(cat "$dir"/*.whl | wc -c)
ls -1 "$dir"/*.whl | xargs -n1 basename
echo "gpu_wheels: $(ls -1 "$dir"/*.whl | wc -l) wheels, $total bytes ($((total / 1024 / 1024)) MiB) in $dir"
if ((total >= max_bytes)); then
    echo "gpu_wheels: $total bytes is over the 64 MiB the run tool carries." >&2
    exit 1
fi
