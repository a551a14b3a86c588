#!/usr/bin/env bash
# GPU rows of the performance record: batched (torch-sim) relaxation vs the ASE loop, same model, on CUDA,
# in atoms·FIRE-steps per second (goal: batched >= 20x the ASE loop), for CHGNet (pretrained, in its wheel) and
# the tiny committed MACE model (tests/data/tiny_mace.model; offline). One short call (< 5 min).
#
# Runs from a copy of the repo WITHOUT .venv: it uses $PYTHON if given, else a python3 that already has the
# packages, else it makes a lean venv (--system-site-packages, so a preinstalled CUDA torch is reused) and pip
# installs only what materials/batched.py needs (torch if missing, chgnet, mace-torch, torch-sim, pymatgen, ase,
# pydantic; no Ray, MLflow, GPAW). Offline, point WHEELS at a folder of wheels (pip --no-index --find-links).
#
# On a machine with no network and a CUDA torch already in its python3 (measured this way on an H200, results in
# benchmarks/results/gpu_check_h200.json): download the wheels listed in benchmarks/gpu_wheels.txt into .whl/ where
# pip works, copy .whl/ there, then
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site PYTHON=python3 benchmarks/gpu_check.sh
#
#   benchmarks/gpu_check.sh                      # cuda, full sizes; table on stdout, JSON in ${OUT:-/tmp}/gpu_check.json
#   PYTHON=.venv/bin/python benchmarks/gpu_check.sh --device cpu --small     # the CPU smoke test of this script
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SMALL=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --small) SMALL=1; shift ;;
        *) echo "usage: $0 [--device cuda|cpu] [--small]" >&2; exit 2 ;;
    esac
done
OUT_DIR="${OUT:-/tmp}"
mkdir -p "$OUT_DIR"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PIP_DISABLE_PIP_VERSION_CHECK=1
NEEDED="import torch, torch_sim, chgnet, mace, pymatgen, ase, pydantic"
PINS=(chgnet==0.4.2 mace-torch==0.3.16 torch-sim-atomistic==0.3.0 pymatgen ase "pydantic>=2.5")

has_packages() { "$1" -c "$NEEDED" >/dev/null 2>&1; }

if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python3 /usr/bin/python3 /opt/conda/bin/python; do
        if command -v "$candidate" >/dev/null && has_packages "$candidate"; then PYTHON="$candidate"; break; fi
    done
fi
if [[ -z "${PYTHON:-}" ]]; then
    VENV="${VENV:-/tmp/semidisc-gpu-venv}"
    echo "setting up $VENV (lean: only what the batched relaxation needs) ..." >&2
    if [[ -x "$VENV/bin/python" ]] || python3 -m venv --system-site-packages "$VENV"; then
        PYTHON="$VENV/bin/python"
        PIP=("$PYTHON" -m pip install -q --timeout 30)
    else  # no venv module (Debian without python3-venv): install into a folder on PYTHONPATH instead
        PYTHON=python3
        mkdir -p "$VENV/site"
        export PYTHONPATH="$PYTHONPATH:$VENV/site"
        PIP=(python3 -m pip install -q --timeout 30 --target "$VENV/site")
    fi
    [[ -n "${WHEELS:-}" ]] && PIP+=(--no-index --find-links "$WHEELS")
    if ! "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        "${PIP[@]}" "${TORCH_SPEC:-torch==2.13.0}"   # PyPI's Linux torch wheel is the CUDA build
    fi
    mkdir -p "$VENV"
    "$PYTHON" -c "import torch; print(f'torch=={torch.__version__}')" > "$VENV/constraints.txt"
    "${PIP[@]}" -c "$VENV/constraints.txt" "${PINS[@]}"
    has_packages "$PYTHON" || { echo "gpu_check: the packages did not install (offline? set WHEELS=DIR)" >&2; exit 1; }
fi
"$PYTHON" - "$DEVICE" <<'EOF' >&2
import sys, torch
device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check: --device cuda but torch sees no GPU (CPU-only torch build, or no driver)")
    print(f"GPU: {torch.cuda.get_device_name(0)}")
EOF

# The batch must be large on a GPU; the ASE loop's rate per atom·step does not depend on its cell count.
# Every cell does exactly --fixed-steps FIRE steps in both paths (the same work whatever the convergence).
sizes() {
    if [[ $SMALL == 1 ]]; then echo "--cells 8 --ase-cells 4 --fixed-steps 10"
    elif [[ $DEVICE == cpu ]]; then echo "--cells 64 --ase-cells 16 --fixed-steps 40"
    elif [[ $1 == mace ]]; then echo "--cells 2048 --ase-cells 24 --fixed-steps 40 --batch-max-atoms 16384"
    else echo "--cells 512 --ase-cells 24 --fixed-steps 40 --batch-max-atoms 4096"  # CHGNet: graphs built on CPU
    fi
}
RESULTS=()
for potential in mace chgnet; do
    file="$OUT_DIR/gpu_check_$potential.json"
    read -r -a SIZES <<< "$(sizes "$potential")"
    echo "relaxing with $potential on $DEVICE: ${SIZES[*]} ..." >&2
    timeout 200 "$PYTHON" benchmarks/relax_throughput.py --potential "$potential" --device "$DEVICE" \
        ${DTYPE:+--dtype "$DTYPE"} "${SIZES[@]}" > "$file"
    RESULTS+=("$file")
done

"$PYTHON" - "$OUT_DIR/gpu_check.json" "${RESULTS[@]}" <<'EOF'
import json, sys
rows = [json.load(open(path)) for path in sys.argv[2:]]
json.dump({"goal_speedup": 20.0, "rows": rows}, open(sys.argv[1], "w"), indent=1)
print(f"\n{'potential':22s} {'device':7s} {'ASE loop':>14s} {'batched':>14s} {'speedup':>8s} {'goal':>6s}  cells (ASE/batched), max|dE| eV/atom")
print(f"{'':22s} {'':7s} {'atom·steps/s':>14s} {'atom·steps/s':>14s}")
for r in rows:
    a, b = r["ase_loop"], r["batched"]
    de = r["max_abs_dE_ev_per_atom"]
    met = "met" if r["speedup_atom_steps_per_s"] >= 20 else "NOT met"
    print(f"{r['potential']:22s} {r['device']:7s} {a['atom_steps_per_s']:14.0f} {b['atom_steps_per_s']:14.0f}"
          f" {r['speedup_atom_steps_per_s']:8.1f} {'>= 20':>6s}  {met}; {a['cells']}/{b['cells']}, "
          f"{'n/a' if de is None else f'{de:.1e}'}")
print(f"\nJSON: {sys.argv[1]}")
EOF
