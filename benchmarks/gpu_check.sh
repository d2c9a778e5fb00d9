#!/usr/bin/env bash
# benchmarks/gpu_check.sh: everything in vpetl that needs an NVIDIA GPU, in one bounded run.
#
# On a machine with one NVIDIA GPU (H100/H200), the CUDA build of torch and the project's
# dependencies installed in the active environment (no internet needed), from anywhere:
#
#     bash benchmarks/gpu_check.sh                  # 7.5 minutes at most (440 s of step timeouts)
#     bash benchmarks/gpu_check.sh --copy-to DIR    # also copy the results folder into DIR
#     bash benchmarks/gpu_check.sh --dry-run        # list the steps and their timeouts, run nothing
#
# Steps, each under its own `timeout` (SIGINT first, so pytest still writes its report and a
# benchmark shows where it was; SIGKILL 5 s later); a failing step does not stop the others:
#   preflight  torch sees a CUDA device (else: one line on stderr, exit 2, nothing written)
#   env        device, driver, CUDA, torch, triton and package versions, date, git commit
#   tests      tests/test_kernels.py in 4 concurrent shards (Triton compiles on 16 cores), and
#              the other test files that touch CUDA or ask for the Triton kernels, concurrently
#   kernels    benchmarks/kernels.py --device cuda (ViT-B and 2 Swin-B shapes, r = 64/128)
#   train      benchmarks/train_step.py --big --device cuda --amp bf16, shortened: ViT-B/16 b64
#              with 7 methods, then Swin3D-B (8 frames, b8) with 3
#   summary    summary.md: every step's status, time, timeout, outputs, and the measured figures
#
# Results: benchmarks/results/gpu_check_<device>/ (e.g. gpu_check_nvidia-h200/), replaced on a
# rerun. Exit status: 0 when every step passed, 1 when one failed or timed out, 2 when the run
# could not start (no GPU, bad option), 130 when interrupted.
#
# Environment: PYTHON (interpreter, default `python`), GPU_CHECK_RESULTS (folder that receives
# gpu_check_<device>/, default benchmarks/results). For tests/test_gpu_check.py only:
# GPU_CHECK_STUB="step=fail,step=hang,step=real,..." runs the orchestration without a GPU, every
# step but env, summary and those marked real replaced by a stub that passes, fails or hangs,
# each under GPU_CHECK_STUB_TIMEOUT seconds (default 3).

set -u -o pipefail

REPO=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P) || exit 2
cd -- "$REPO" || exit 2

usage() {
    sed -n '2,/^[^#]/{/^#/{s/^# \{0,1\}//;p;};}' "${BASH_SOURCE[0]}"
}

ORIGINAL_CMD="bash benchmarks/gpu_check.sh${*:+ $*}"

DRY_RUN=0
COPY_TO=""
while (($#)); do
    case $1 in
        -n | --dry-run) DRY_RUN=1 ;;
        --copy-to)
            if (($# < 2)); then
                echo "gpu_check: --copy-to needs a folder" >&2
                exit 2
            fi
            COPY_TO=$2
            shift
            ;;
        --copy-to=*) COPY_TO=${1#*=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "gpu_check: unknown option '$1' (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

# ----------------------------------------------------------------------------- budget (seconds)

KILL_GRACE=5 # SIGKILL this long after the SIGINT of a step that ran out of time
declare -A TMO=(
    [preflight]=40 # importing torch from a cold disk can take a while
    [env]=15
    [tests_kernels_shapes_fp16]=130
    [tests_kernels_shapes_bf16]=130
    [tests_kernels_shapes_fp32_property]=130
    [tests_kernels_rest]=130
    [tests_other]=120 # tests/test_grouped_kernels.py compiles its Triton kernels here
    [kernels_bench]=75
    [train_step_vit]=110
    [train_step_swin3d]=60
    [summary]=10
)
# stages run one after the other; the steps of one stage run concurrently
STAGES=(
    "env"
    "tests_kernels_shapes_fp16 tests_kernels_shapes_bf16 tests_kernels_shapes_fp32_property tests_kernels_rest tests_other"
    "kernels_bench"
    "train_step_vit"
    "train_step_swin3d"
)

STUB=${GPU_CHECK_STUB:-}
if [[ -n $STUB ]]; then
    STUB_TIMEOUT=${GPU_CHECK_STUB_TIMEOUT:-3}
    for name in "${!TMO[@]}"; do
        [[ $name == env || $name == summary || ,$STUB, == *",$name=real,"* ]] || TMO[$name]=$STUB_TIMEOUT
    done
fi

PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || { [[ -z ${PYTHON:-} ]] && command -v python3 >/dev/null 2>&1 && PY=python3; }

RESULTS_ROOT=${GPU_CHECK_RESULTS:-$REPO/benchmarks/results}
KERNELS_OUT=$REPO/benchmarks/results # benchmarks/kernels.py always writes kernels_cuda.* here

export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}" # this checkout's vpetl, installed or not
export PYTHONUNBUFFERED=1                                 # complete logs even when a step is killed
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}                # no network: never wait for the Hub
export TRANSFORMERS_OFFLINE=${TRANSFORMERS_OFFLINE:-1}

# test files besides test_kernels.py whose outcome depends on a GPU: they use CUDA, or ask for
# the Triton kernels (which only run where there is a GPU)
read -r CUDA_PATTERN <<'EOF'
torch\.cuda\.|\.cuda\(|\.to\(["']cuda|device[[:space:]]*=[[:space:]]*["']cuda|mark\.(cuda|gpu)|requires_(cuda|gpu)|kernel[[:space:]]*=[[:space:]]*["']triton|triton_available\(
EOF
OTHER_TESTS=()
while IFS= read -r file; do
    case $file in tests/test_kernels.py | tests/test_gpu_check.py) continue ;; esac
    OTHER_TESTS+=("$file")
done < <(grep -lE -- "$CUDA_PATTERN" tests/test_*.py 2>/dev/null | LC_ALL=C sort)

# ----------------------------------------------------------------------------- embedded Python

read -r -d '' PREFLIGHT_PY <<'EOF'
import os, sys
try:
    import torch
except Exception as error:  # noqa: BLE001
    print(f"{type(error).__name__}: {error}; python {sys.executable}")
    sys.exit(3)
detail = f"torch {torch.__version__}, " + (f"CUDA build {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
if "CUDA_VISIBLE_DEVICES" in os.environ:
    detail += f", CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r}"
try:
    found = torch.cuda.is_available() and torch.cuda.device_count() > 0
    name = torch.cuda.get_device_name(0) if found else None
except Exception as error:  # noqa: BLE001
    found, detail = False, detail + f", {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
if not found:
    print(detail)
    sys.exit(4)
print(name)
EOF

read -r -d '' ENV_PY <<'EOF'
import datetime as dt, importlib.metadata as md, importlib.util, json, os, platform, shutil, subprocess, sys

out, repo, script_cmd = sys.argv[1], sys.argv[2], sys.argv[3]
info, problems = {}, []


def run(cmd):
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=8, cwd=repo)
    except (OSError, subprocess.SubprocessError) as error:
        return None, f"{type(error).__name__}: {error}"
    return (done.stdout.strip(), None) if done.returncode == 0 else (None, (done.stderr or done.stdout).strip())


info["date_utc"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
info["command"] = script_cmd
info["repo"] = repo
commit, _ = run(["git", "rev-parse", "HEAD"])
status, _ = run(["git", "status", "--porcelain"])
info["git_commit"] = commit
info["git_uncommitted"] = None if status is None else [line.strip() for line in status.splitlines()[:60]]
info["python"] = platform.python_version()
info["python_executable"] = sys.executable
info["platform"] = platform.platform()
info["cpu_count"] = os.cpu_count()
packages = {}
for name in ("torch", "triton", "pytorch-triton", "timm", "torchvision", "peft", "transformers", "safetensors",
             "einops", "numpy", "hypothesis", "pytest", "matplotlib", "psutil", "tqdm", "vpetl"):
    try:
        packages[name] = md.version(name)
    except md.PackageNotFoundError:
        packages[name] = None
info["packages"] = packages
# what the steps import: the tests (dev extra) and the benchmarks (bench extra)
needed = {"torch": "torch", "triton": "triton", "timm": "timm", "torchvision": "torchvision", "safetensors": "safetensors",
          "pytest": "pytest", "hypothesis": "hypothesis", "peft": "peft", "matplotlib": "matplotlib", "tqdm": "tqdm",
          "psutil": "psutil"}
missing = [dist for dist, module in needed.items() if importlib.util.find_spec(module) is None]
if missing:
    problems.append("missing packages: " + ", ".join(missing) + " (pip install -e '.[dev,bench]')")
spec = importlib.util.find_spec("vpetl")
info["vpetl_path"] = None if spec is None else spec.origin
try:
    import torch

    info["torch"] = torch.__version__
    info["torch_cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version()
    info["cuda_available"] = torch.cuda.is_available()
    info["device_count"] = torch.cuda.device_count()
    if info["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = torch.cuda.get_device_name(0)
        info["capability"] = "sm_%d%d" % torch.cuda.get_device_capability(0)
        info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["sm_count"] = props.multi_processor_count
    else:
        problems.append("torch.cuda.is_available() is False")
except Exception as error:  # noqa: BLE001
    problems.append(f"torch: {type(error).__name__}: {error}")
try:
    import triton

    info["triton"] = triton.__version__
except Exception as error:  # noqa: BLE001
    problems.append(f"triton: {type(error).__name__}: {error}")
smi = shutil.which("nvidia-smi")
query = "name,driver_version,memory.total,compute_cap,clocks.max.sm,power.limit,pstate,temperature.gpu,persistence_mode"
smi_query, smi_full = None, None
if smi:
    smi_query, error = run([smi, f"--query-gpu={query}", "--format=csv"])
    if smi_query is None:  # older drivers do not know every field
        smi_query, error = run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv"])
    smi_full, _ = run([smi])
    driver, _ = run([smi, "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = driver.splitlines()[0].strip() if driver else None
else:
    info["driver"] = None
info["nvidia_smi"] = smi_query
keep = ("CUDA_", "TRITON_", "VPETL_", "TORCH_", "PYTORCH_", "OMP_", "NVIDIA_")
info["environment"] = {k: v for k, v in sorted(os.environ.items()) if k.startswith(keep) or k in ("PYTHONPATH", "HF_HUB_OFFLINE")}
info["problems"] = problems
with open(os.path.join(out, "env.json"), "w") as handle:
    json.dump(info, handle, indent=2)
    handle.write("\n")
lines = [f"{k}: {v}" for k, v in info.items() if k not in ("packages", "environment", "nvidia_smi", "git_uncommitted")]
lines.append("packages: " + ", ".join(f"{k} {v}" for k, v in packages.items() if v))
lines.append("uncommitted: " + (", ".join(info["git_uncommitted"]) if info["git_uncommitted"] else "-"))
lines.append("environment: " + ", ".join(f"{k}={v}" for k, v in info["environment"].items()))
lines += ["", "nvidia-smi --query-gpu:", smi_query or "(nvidia-smi not found or failed)", "", smi_full or ""]
text = "\n".join(lines) + "\n"
with open(os.path.join(out, "env.txt"), "w") as handle:
    handle.write(text)
print(text)
sys.exit(1 if problems else 0)
EOF

read -r -d '' SUMMARY_PY <<'EOF'
import glob, json, os, sys
import xml.etree.ElementTree as ET

out = sys.argv[1]
lines = []


def fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


failures = []
for path in sorted(glob.glob(os.path.join(out, "*.junit.xml"))):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as error:
        failures.append(f"- `{os.path.basename(path)}`: unreadable ({error})")
        continue
    for case in root.iter("testcase"):
        for bad in list(case.findall("failure")) + list(case.findall("error")):
            message = (bad.get("message") or "").strip().splitlines()
            where = f"{case.get('classname', '')}::{case.get('name', '')}"
            failures.append(f"- `{where}` ({bad.tag}): {message[0][:200] if message else ''}")
if failures:
    lines += ["## Failed tests", ""] + failures[:40] + ([f"- ... {len(failures) - 40} more"] if len(failures) > 40 else []) + [""]

path = os.path.join(out, "kernels_cuda.json")
if os.path.exists(path):
    try:
        data = json.load(open(path))
        meta = data["meta"]
        lines += ["## benchmarks/kernels.py", "",
                  f"{meta.get('device_name')}, {meta.get('dtype')}, Triton measured: {meta.get('triton_measured')}. "
                  "Time / frozen projection (ratio of the fastest samples); README target: PATT-64 qkv fwd+bwd <= 1.3x.", "",
                  "| op | shape | r | mode | unfused | vpetl torch | vpetl triton |", "|---|---|---:|---|---:|---:|---:|"]
        for row in data["rows"]:
            res = row["results"]
            get = lambda name: res.get(name, {}).get("ratio")  # noqa: E731
            lines.append(f"| {row['op']} | {row['shape']} | {row['r']} | {row['mode']} | {fmt(get('reference (unfused)'))} "
                         f"| {fmt(get('vpetl torch'))} | {fmt(get('vpetl triton'))} |")
        lines.append("")
    except Exception as error:  # noqa: BLE001
        lines += [f"kernels_cuda.json unreadable: {type(error).__name__}: {error}", ""]

for path in sorted(glob.glob(os.path.join(out, "train_step_cuda_*.json"))):
    try:
        data = json.load(open(path))
        for model, res in data["models"].items():
            lines += [f"## benchmarks/train_step.py: {res['settings']['describe']} ({os.path.basename(path)})", ""]
            for t in res.get("targets", []):
                lines.append(f"- target {t['target']}: **{t['measured']:.3f}** ({t['source']}) "
                             f"{'pass' if t['pass'] else 'MISS'}")
            for s in res.get("skipped", []):
                lines.append(f"- skipped {s['method']}: {s['reason'][:160]}")
            lines += ["", "| method | step / full | FLOP-ideal | peak mem / full | infer / base |", "|---|---:|---:|---:|---:|"]
            for r in res["rows"]:
                lines.append(f"| {r['method']} | {fmt(r['step_ratio'])} | {fmt(r['flop_ratio'])} | {fmt(r['mem_ratio'])} "
                             f"| {fmt(r.get('infer_ratio'))} |")
            lines.append("")
    except Exception as error:  # noqa: BLE001
        lines += [f"{os.path.basename(path)} unreadable: {type(error).__name__}: {error}", ""]

with open(os.path.join(out, "highlights.md"), "w") as handle:
    handle.write("\n".join(lines) + ("\n" if lines else ""))
print("\n".join(lines) if lines else "no failed tests and no benchmark results to summarise")
EOF

read -r -d '' STUB_PY <<'EOF'
import sys, time
behaviour, command = sys.argv[1], sys.argv[2]
print(f"stub ({behaviour}) instead of: {command}", flush=True)
if behaviour == "hang":
    time.sleep(3600)
sys.exit(1 if behaviour == "fail" else 0)
EOF

# ----------------------------------------------------------------------------- steps

# The benchmarks run with TRITON_CACHE_AUTOTUNING=1: a tile choice made once (kernels.py tunes the
# ViT-B and Swin-B shapes train_step.py meets again) is read from Triton's cache by later
# processes, so train_step.py's per-method memory processes do not autotune again, which takes
# seconds and counts Triton's 256 MB benchmark buffer in their peak memory.

# show_cmd ARG...: a command line for people (quotes only where needed)
show_cmd() {
    local arg text=""
    for arg in "$@"; do
        if [[ $arg =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
            text+="$arg "
        else
            text+="'${arg//\'/\'\\\'\'}' "
        fi
    done
    printf '%s' "${text% }"
}

# pytest_cmd NAME ARG...: pytest ARG... with its junit report in the results folder (3 CPU threads
# each: the test steps run side by side, and Triton compiles on the CPU)
pytest_cmd() {
    local name=$1
    shift
    CMD=(env OMP_NUM_THREADS=3 "$PY" -m pytest -q -p no:cacheprovider -rfEs --durations=10
        -o faulthandler_timeout=60 "--junitxml=$RESULT_DIR/$name.junit.xml" "$@")
}

# step_cmd NAME: sets CMD (the command), SHOW (how it is listed) and OUTPUTS (files it writes)
step_cmd() {
    local name=$1
    SHOW=""
    OUTPUTS=("$name.log")
    case $name in
        env)
            CMD=("$PY" -c "$ENV_PY" "$RESULT_DIR" "$REPO" "$ORIGINAL_CMD")
            SHOW="nvidia-smi (if present) + python: device, driver, CUDA, torch, triton, packages, date, git commit"
            OUTPUTS=(env.txt env.json env.log)
            ;;
        tests_kernels_shapes_fp16) pytest_cmd "$name" tests/test_kernels.py -k "test_triton_gpu_shapes and dtype1" ;;
        tests_kernels_shapes_bf16) pytest_cmd "$name" tests/test_kernels.py -k "test_triton_gpu_shapes and dtype2" ;;
        tests_kernels_shapes_fp32_property)
            pytest_cmd "$name" tests/test_kernels.py \
                -k "(test_triton_gpu_shapes and not dtype1 and not dtype2) or test_triton_property"
            ;;
        tests_kernels_rest)
            pytest_cmd "$name" tests/test_kernels.py -k "not test_triton_gpu_shapes and not test_triton_property"
            ;;
        tests_other)
            if ((${#OTHER_TESTS[@]})); then
                pytest_cmd "$name" "${OTHER_TESTS[@]}"
            else
                CMD=()
                SHOW="(no other test file refers to CUDA or the Triton kernels: skipped)"
            fi
            ;;
        kernels_bench)
            CMD=(env TRITON_CACHE_AUTOTUNING=1 "$PY" benchmarks/kernels.py --device cuda --shapes "vit_b,swin_b.s1,swin_b.s3" --ranks "64,128" --repeats 10)
            SHOW="$(show_cmd "${CMD[@]}")  (then benchmarks/results/kernels_cuda.{json,md} are moved into the results folder)"
            OUTPUTS=(kernels_cuda.json kernels_cuda.md "$name.log")
            ;;
        train_step_vit)
            CMD=(env TRITON_CACHE_AUTOTUNING=1 "$PY" benchmarks/train_step.py
                --big --device cuda --amp bf16 --models vit_base_patch16_224
                --methods "full,bitfit,peft-lora-16,lora-16,adapter-64,patt-64,bapat-128"
                --repeats 5 --target-repeats 7 --warmup 2 --no-progress --out "$RESULT_DIR/train_step_cuda_vit_b16")
            OUTPUTS=(train_step_cuda_vit_b16.json train_step_cuda_vit_b16.md train_step_cuda_vit_b16.png "$name.log")
            ;;
        train_step_swin3d)
            CMD=(env TRITON_CACHE_AUTOTUNING=1 "$PY" benchmarks/train_step.py
                --big --device cuda --amp bf16 --models swin3d_b
                --methods "full,peft-lora-16,bapat-128" --repeats 3 --target-repeats 0 --warmup 1 --no-progress
                --out "$RESULT_DIR/train_step_cuda_swin3d_b")
            OUTPUTS=(train_step_cuda_swin3d_b.json train_step_cuda_swin3d_b.md train_step_cuda_swin3d_b.png "$name.log")
            ;;
        summary)
            CMD=("$PY" -c "$SUMMARY_PY" "$RESULT_DIR")
            SHOW="python: failed tests from the junit reports, figures from the benchmark JSONs -> summary.md"
            OUTPUTS=(summary.md highlights.md summary.log)
            ;;
        *)
            echo "gpu_check: internal error: unknown step $name" >&2
            exit 2
            ;;
    esac
    if [[ $name == tests_* && ${#CMD[@]} -gt 0 ]]; then
        OUTPUTS=("$name.junit.xml" "$name.log")
    fi
    [[ -n $SHOW ]] || SHOW=$(show_cmd "${CMD[@]}")
    SHOW=${SHOW//"$RESULT_DIR"/<results>}
}

stage_timeout() { # the timeout of one stage: its slowest step's
    local name max=0
    for name in $1; do ((TMO[$name] > max)) && max=${TMO[$name]}; done
    echo "$max"
}

total_timeout() {
    local stage total=$((TMO[preflight] + TMO[summary]))
    for stage in "${STAGES[@]}"; do total=$((total + $(stage_timeout "$stage"))); done
    echo "$total"
}

# ----------------------------------------------------------------------------- dry run

if ((DRY_RUN)); then
    RESULT_DIR="<results>"
    echo "gpu_check dry run: nothing is run. Results would go to ${RESULTS_ROOT#"$REPO"/}/gpu_check_<device-slug>/"
    echo "environment: PYTHONPATH=src:..., PYTHONUNBUFFERED=1, HF_HUB_OFFLINE=$HF_HUB_OFFLINE; python: $PY"
    echo "each step: timeout -s INT -k $KILL_GRACE <timeout> <command>; steps of one stage run concurrently"
    echo
    printf '  %-3s %-36s %6s  %s\n' "" step timeout command
    printf '  %-3s %-36s %5ss  %s\n' 0 preflight "${TMO[preflight]}" \
        "python -c 'import torch; torch.cuda.is_available()' (no GPU: one line on stderr, exit 2, nothing written)"
    index=0
    for stage in "${STAGES[@]}"; do
        index=$((index + 1))
        read -r -a members <<<"$stage"
        if ((${#members[@]} > 1)); then
            echo "  stage $index: ${#members[@]} steps concurrently, stage timeout $(stage_timeout "$stage") s"
        fi
        letters=(a b c d e f g h i j)
        n=0
        for name in "${members[@]}"; do
            step_cmd "$name"
            sub=$index
            if ((${#members[@]} > 1)); then
                sub=$index${letters[n]}
                n=$((n + 1))
            fi
            printf '  %-3s %-36s %5ss  %s\n' "$sub" "$name" "${TMO[$name]}" "$SHOW"
        done
    done
    printf '  %-3s %-36s %5ss  %s\n' $((index + 1)) summary "${TMO[summary]}" "$(step_cmd summary && echo "$SHOW")"
    echo
    echo "other test files with CUDA parts: ${OTHER_TESTS[*]:-(none)}"
    total=$(total_timeout)
    stages=$((${#STAGES[@]} + 2))
    echo "total timeout: $total s (sum over the $stages stages; worst case $((total + stages * KILL_GRACE)) s with the ${KILL_GRACE} s kill grace)"
    exit 0
fi

# ----------------------------------------------------------------------------- preflight

fail_start() {
    echo "gpu_check: $1" >&2
    exit 2
}

if [[ -n $STUB ]]; then
    DEVICE_NAME="Stub GPU"
else
    command -v "$PY" >/dev/null 2>&1 ||
        fail_start "no CUDA device visible to torch (python '$PY' not found; set PYTHON or activate the environment); run this on a machine with an NVIDIA GPU"
    preflight_out=$(timeout -k "$KILL_GRACE" "${TMO[preflight]}" "$PY" -c "$PREFLIGHT_PY" 2>/dev/null)
    preflight_rc=$?
    detail=$(printf '%s\n' "$preflight_out" | tail -n 1)
    case $preflight_rc in
        0) DEVICE_NAME=$detail ;;
        3) fail_start "no CUDA device visible to torch (torch does not import: $detail); run this on a machine with an NVIDIA GPU" ;;
        4) fail_start "no CUDA device visible to torch ($detail); run this on a machine with an NVIDIA GPU" ;;
        124 | 137) fail_start "no CUDA device visible to torch (importing torch and asking torch.cuda.is_available() took over ${TMO[preflight]} s); run this on a machine with an NVIDIA GPU" ;;
        *) fail_start "no CUDA device visible to torch (the check exited with status $preflight_rc${detail:+: $detail}); run this on a machine with an NVIDIA GPU" ;;
    esac
fi

SLUG=$(printf '%s' "$DEVICE_NAME" | tr '[:upper:]' '[:lower:]' | sed -E 's/[^a-z0-9]+/-/g; s/^-+//; s/-+$//')
SLUG=${SLUG:-unknown-gpu}
RESULT_DIR=$RESULTS_ROOT/gpu_check_$SLUG
rm -rf -- "$RESULT_DIR"
mkdir -p -- "$RESULT_DIR" || fail_start "cannot create $RESULT_DIR"
RUN_START=$(date +%s)

# ----------------------------------------------------------------------------- running steps

declare -A STATUS=() RC=() DUR=() START=() PID=() SHOWN=() OUTS=() RESULT=()
ORDER=()
INTERRUPTED=0
KERNELS_KEPT=""

say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*"; }

stub_behaviour() { # the behaviour GPU_CHECK_STUB asks of step $1 (pass by default)
    local item
    IFS=',' read -r -a items <<<"$STUB"
    for item in "${items[@]}"; do
        [[ ${item%%=*} == "$1" ]] && { echo "${item#*=}"; return; }
    done
    echo pass
}

before_step() {
    if [[ $1 == kernels_bench && -z $STUB ]]; then # keep a previous kernels_cuda.* out of the way
        local f
        for f in kernels_cuda.json kernels_cuda.md; do
            if [[ -e $KERNELS_OUT/$f ]]; then
                KERNELS_KEPT=$RESULT_DIR/.kept_kernels_cuda
                mkdir -p -- "$KERNELS_KEPT" && mv -f -- "$KERNELS_OUT/$f" "$KERNELS_KEPT/$f"
            fi
        done
    fi
}

after_step() {
    if [[ $1 == kernels_bench && -z $STUB ]]; then
        local f
        for f in kernels_cuda.json kernels_cuda.md; do
            [[ -e $KERNELS_OUT/$f ]] && mv -f -- "$KERNELS_OUT/$f" "$RESULT_DIR/$f"
            [[ -n $KERNELS_KEPT && -e $KERNELS_KEPT/$f ]] && mv -f -- "$KERNELS_KEPT/$f" "$KERNELS_OUT/$f"
        done
        [[ -n $KERNELS_KEPT ]] && rmdir -- "$KERNELS_KEPT" 2>/dev/null
        KERNELS_KEPT=""
    fi
}

start_step() {
    local name=$1
    step_cmd "$name"
    ORDER+=("$name")
    SHOWN[$name]=$SHOW
    OUTS[$name]="${OUTPUTS[*]}"
    if ((INTERRUPTED)); then
        STATUS[$name]="NOT RUN"
        return
    fi
    if ((${#CMD[@]} == 0)); then
        STATUS[$name]=SKIP
        DUR[$name]=0
        say "--- $name: skipped ${SHOW}"
        return
    fi
    if [[ -n $STUB && $name != env && $name != summary && $(stub_behaviour "$name") != real ]]; then
        CMD=("$PY" -c "$STUB_PY" "$(stub_behaviour "$name")" "$SHOW")
    fi
    before_step "$name"
    say ">>> $name (timeout ${TMO[$name]} s): $SHOW"
    START[$name]=$(date +%s)
    timeout -s INT -k "$KILL_GRACE" "${TMO[$name]}" "${CMD[@]}" >"$RESULT_DIR/$name.log" 2>&1 </dev/null &
    PID[$name]=$!
}

finish_step() {
    local name=$1 rc=$2 status
    DUR[$name]=$(($(date +%s) - START[$name]))
    RC[$name]=$rc
    case $rc in
        0) status=PASS ;;
        124) status=TIMEOUT ;;
        137) if ((DUR[$name] >= TMO[$name])); then status=TIMEOUT; else status=FAIL; fi ;;
        5) if [[ $name == tests_* ]]; then status=EMPTY; else status=FAIL; fi ;; # pytest: no test selected
        *) status=FAIL ;;
    esac
    if ((INTERRUPTED)) && [[ $status != PASS ]]; then
        status=INTERRUPTED
    fi
    STATUS[$name]=$status
    if [[ $name == tests_* ]]; then
        RESULT[$name]=$(grep -E '^[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran|^=+ .*(passed|failed|error).* =+$' \
            "$RESULT_DIR/$name.log" | tail -n 1 | sed -E 's/^=+ //; s/ =+$//')
    fi
    after_step "$name"
    say "<<< $name: $status (exit $rc, ${DUR[$name]} s)${RESULT[$name]:+: ${RESULT[$name]}}"
    if [[ $status == FAIL || $status == TIMEOUT ]]; then
        tail -n 15 "$RESULT_DIR/$name.log" | sed "s/^/    $name| /" >&2
    fi
}

run_stage() { # NAME...: start them all, then collect each as it ends
    local name rc running
    for name in "$@"; do start_step "$name"; done
    while :; do
        running=0
        for name in "$@"; do
            [[ -n ${PID[$name]:-} ]] || continue
            if kill -0 "${PID[$name]}" 2>/dev/null; then
                running=1
                continue
            fi
            wait "${PID[$name]}"
            rc=$?
            unset "PID[$name]"
            finish_step "$name" "$rc"
        done
        ((running)) || break
        sleep 0.5
    done
}

# shellcheck disable=SC2317  # called by the trap below
on_signal() {
    INTERRUPTED=1
    say "interrupted: stopping the running steps"
    local name
    for name in "${!PID[@]}"; do kill -TERM "${PID[$name]}" 2>/dev/null; done
}
trap on_signal INT TERM HUP

say "device: $DEVICE_NAME; results: $RESULT_DIR; total timeout $(total_timeout) s"
for stage in "${STAGES[@]}"; do
    read -r -a members <<<"$stage"
    run_stage "${members[@]}"
done
run_stage summary

# ----------------------------------------------------------------------------- summary.md

failed=()
for name in "${ORDER[@]}"; do
    case ${STATUS[$name]} in PASS | SKIP | EMPTY) ;; *) failed+=("$name") ;; esac
done
commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo "unknown commit")
if ((${#failed[@]})); then
    verdict="**FAIL**: ${#failed[@]} of ${#ORDER[@]} steps did not pass (${failed[*]})"
else
    verdict="**PASS**: every step passed"
fi
{
    echo "# GPU check: $DEVICE_NAME"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%M:%SZ), vpetl at $commit, \`$ORIGINAL_CMD\`: $(($(date +%s) - RUN_START)) s in all" \
        "(step timeouts $(total_timeout) s). $verdict."
    echo "Device, driver and versions: [env.txt](env.txt) ([env.json](env.json))."
    [[ -n $STUB ]] && echo && echo "STUB RUN (GPU_CHECK_STUB=$STUB): nothing was measured."
    echo
    echo "| step | status | exit | time s | timeout s | outputs | result |"
    echo "|---|---|---:|---:|---:|---|---|"
    for name in "${ORDER[@]}"; do
        outs=""
        for f in ${OUTS[$name]}; do
            [[ -e $RESULT_DIR/$f || $f == summary.md ]] && outs+="[$f]($f) "
        done
        echo "| $name | ${STATUS[$name]} | ${RC[$name]:--} | ${DUR[$name]:--} | ${TMO[$name]} | ${outs% } | ${RESULT[$name]:-} |"
    done
    echo
    echo "Statuses: PASS; FAIL (non-zero exit); TIMEOUT (SIGINT at the timeout, SIGKILL ${KILL_GRACE} s later);"
    echo "SKIP (nothing to run); EMPTY (pytest selected no test); NOT RUN / INTERRUPTED (the run was stopped)."
    echo
    [[ -s $RESULT_DIR/highlights.md ]] && cat "$RESULT_DIR/highlights.md" && echo
    echo "## Commands"
    echo
    echo "Each step: \`timeout -s INT -k $KILL_GRACE <timeout> <command>\`, from the repository root, with"
    echo "PYTHONPATH=src, PYTHONUNBUFFERED=1, HF_HUB_OFFLINE=$HF_HUB_OFFLINE; <results> is this folder."
    echo
    for name in "${ORDER[@]}"; do
        echo "- $name: \`${SHOWN[$name]}\`"
    done
} >"$RESULT_DIR/summary.md"

echo
sed '/^## Commands$/,$d' "$RESULT_DIR/summary.md" # the commands are in the file

if [[ -n $COPY_TO ]]; then
    if mkdir -p -- "$COPY_TO" && cp -r -- "$RESULT_DIR" "$COPY_TO/"; then
        say "copied $RESULT_DIR to $COPY_TO/"
    else
        say "could not copy $RESULT_DIR to $COPY_TO" >&2
    fi
fi

if ((INTERRUPTED)); then
    exit 130
fi
((${#failed[@]} == 0)) || exit 1
exit 0
