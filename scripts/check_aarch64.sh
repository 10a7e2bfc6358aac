#!/usr/bin/env bash
# The CPU kernels on aarch64 (phones, Apple laptops, Graviton), checked from an x86-64 Debian 12 host as root:
#
#  1. cross-compile: every src/lordba/kernels/cpu/*.cpp with Debian's aarch64 g++ 12 against the host torch's
#     headers, with the loader's flags (-std=c++20 -O3 -fopenmp -ffp-contract=off) and warnings on, for each of
#     $MARCHES (default armv8-a, and armv8.2-a+fp16+dotprod: Apple M1, recent phones), `-c` to an object file;
#  2. run (emulated by qemu-user: correctness only, no timings): a Debian bookworm arm64 userland
#     (debootstrap) with python3.11, g++ 12 and a venv holding PyPI's aarch64 torch $TORCH (2.8.0: the newest
#     CPU-only aarch64 wheel there; later ones are CUDA builds that need ~GBs of nvidia-* wheels to import),
#     this worktree bind-mounted at /wt; the kernels built there by lordba's loader (native aarch64 g++,
#     -march=native), then the kernel tests ($TESTS, -k $TESTS_K) and a forward + greedy decode of the tests'
#     tiny q4 model with a packed adapter (int8 scale codes) against the pure-PyTorch reference
#     (LORDBA_NO_EXT=1) in the same emulated python.
#
# Installs (apt): g++-aarch64-linux-gnu qemu-user-static binfmt-support debootstrap; mounts binfmt_misc if
# needed. Disk: ~1.9 GB in $ROOT (default /var/tmp/lordba-arm64root), ~160 MB of wheels in $ROOT/wheels.
# Time on a 2-core host: step 1 ~3 min; the userland ~15 min the first time; the venv ~5 min; the kernels'
# build ~15 min emulated (one compile at a time); the tests 10-30 min. Idempotent: a finished userland, venv
# or kernel build is kept (remove $ROOT to start over). Emulated processes run one at a time.
#
#   sudo bash scripts/check_aarch64.sh [cross|run|all]     # default all; exit 1 if a check failed
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
ROOT=${ROOT:-/var/tmp/lordba-arm64root}
PYTHON=${PYTHON:-python3}
MARCHES=${MARCHES:-"armv8-a armv8.2-a+fp16+dotprod"}
TORCH=${TORCH:-2.8.0}
k=tests/kernels
TESTS=${TESTS:-"$k/test_q4_kernels.py $k/cpu/test_cpu_op.py $k/cpu/test_branch_rows.py $k/cpu/test_q4_group.py"}
# the host's /proc/cpuinfo (x86 flags, amx_bf16 among them) makes this test expect the tile unit: left out
TESTS_K=${TESTS_K:-"not prefill_factors_are_the_folded"}
status=0

apt_install() {
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"; }
}

cross() {
  apt_install g++-aarch64-linux-gnu
  local inc py out=/tmp/lordba-aarch64-objs
  inc=$($PYTHON -c 'from torch.utils import cpp_extension as c; print(" ".join("-isystem " + p for p in c.include_paths()))')
  py=$($PYTHON -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  mkdir -p "$out"
  for march in $MARCHES; do
    for src in "$here"/src/lordba/kernels/cpu/*.cpp; do
      local name log
      name=$(basename "$src" .cpp)
      log="$out/$name.$march.log"
      # shellcheck disable=SC2086
      if aarch64-linux-gnu-g++ -DTORCH_EXTENSION_NAME=lordba_cpu_check -DTORCH_API_INCLUDE_EXTENSION_H $inc \
        -isystem "$py" -fPIC -std=c++20 -O3 -fopenmp -ffp-contract=off -march="$march" -Wall -Wextra \
        -c -o "$out/$name.$march.o" "$src" >"$log" 2>&1; then
        echo "cross $march $name: ok, $(grep -c 'kernels/cpu/.*warning' "$log") warnings in our files"
      else
        echo "cross $march $name: FAILED"; grep -m5 error "$log"; status=1
      fi
    done
  done
}

# A command in the arm64 userland, a clean environment. Its /proc is the host's, so lordba's cpu_flags() reads
# the x86 flags line: ONEDNN_MAX_CPU_ISA=AVX2 makes native_bfloat16() say False, as on a real ARM CPU (whose
# cpuinfo has a Features line without avx512_bf16); oneDNN's aarch64 build ignores the x86 name.
in_root() {
  chroot "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 ONEDNN_MAX_CPU_ISA=AVX2 \
    LORDBA_KERNEL_CACHE=/root/kcache PYTHONPATH=/wt/src:/wt/lab:/wt/tests MAX_JOBS=1 "$@"
}

userland() {
  apt_install qemu-user-static binfmt-support debootstrap
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 || { echo "qemu-aarch64 binfmt (F flag) missing"; return 1; }
  if [ ! -x "$ROOT/usr/bin/python3" ] || [ ! -e "$ROOT/usr/bin/g++" ]; then
    rm -rf "$ROOT" && mkdir -p "$ROOT"
    debootstrap --arch=arm64 --foreign --variant=minbase \
      --include=python3,python3-venv,python3-dev,g++,ninja-build bookworm "$ROOT" http://deb.debian.org/debian &&
      chroot "$ROOT" /debootstrap/debootstrap --second-stage || return 1
  fi
  mkdir -p "$ROOT/wt" "$ROOT/wheels"
  mountpoint -q "$ROOT/wt" || mount --bind "$here" "$ROOT/wt"
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  mountpoint -q "$ROOT/sys" || mount --bind /sys "$ROOT/sys"  # torch's cpuinfo reads the CPU lists
  if [ ! -x "$ROOT/opt/venv/bin/python" ] || ! in_root python -c 'import torch, transformers, pytest, hqq' 2>/dev/null; then
    local plat="--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64"
    # torch's requirements carry x86-64 markers that `pip download` evaluates for this host: torch alone
    # shellcheck disable=SC2086
    $PYTHON -m pip download -q --no-deps $plat --python-version 3.11 --only-binary=:all: -d "$ROOT/wheels" \
      "torch==$TORCH" &&
      $PYTHON -m pip download -q $plat --python-version 3.11 --only-binary=:all: -d "$ROOT/wheels" numpy \
        safetensors "transformers>=4.46" rich tqdm google-re2 pytest hypothesis ninja filelock \
        typing-extensions sympy networkx jinja2 fsspec setuptools || return 1
    # the q4 base quantizes with HQQ's optimiser: hqq (an sdist only: built here, pure Python) and what it
    # imports, without their torch requirement
    # shellcheck disable=SC2086
    $PYTHON -m pip wheel -q --no-deps -w "$ROOT/wheels" hqq &&
      $PYTHON -m pip download -q --no-deps $plat --python-version 3.11 --only-binary=:all: -d "$ROOT/wheels" \
        einops termcolor accelerate psutil || return 1
    in_root python3 -m venv /opt/venv &&
      in_root pip install -q --no-index --find-links /wheels torch numpy safetensors transformers rich tqdm \
        google-re2 pytest hypothesis ninja &&
      in_root pip install -q --no-index --no-deps --find-links /wheels hqq einops termcolor accelerate psutil ||
      return 1
  fi
}

FORWARD=$(
  cat <<'EOF'
import os, sys, torch
from conftest import tiny_q4
from lordba import kernels
torch.manual_seed(0)
lm = tiny_q4(adapter=True)
ids = torch.randint(0, 101, (2, 21))
with torch.no_grad():
    prefill = lm(input_ids=ids).logits
    one = lm(input_ids=ids[:1, :1]).logits
    tokens = lm.generate(input_ids=ids[:1, :5], max_new_tokens=8, do_sample=False)
torch.save({"prefill": prefill, "one": one, "tokens": tokens}, sys.argv[1])
print("kernels" if kernels.cpu_available() else "reference", torch.ops.lordba.isa() if kernels.cpu_available() else "")
EOF
)

run() {
  userland || { echo "the arm64 userland could not be made"; status=1; return; }
  in_root uname -m
  echo "building the kernels (emulated)..."
  in_root sh -c 'cd /wt && python -c "
from lordba.kernels import cpu; import torch
r = cpu.load(); print(r.ok, r.message[-3000:]); print(\"isa:\", torch.ops.lordba.isa() if r.ok else None)
assert r.ok"' || { status=1; return; }
  echo "forward of the tiny q4 model + adapter, kernels against LORDBA_NO_EXT=1"
  in_root sh -c "cd /wt && python -c '$FORWARD' /tmp/kernels.pt && LORDBA_NO_EXT=1 python -c '$FORWARD' /tmp/reference.pt" &&
    in_root python -c '
import torch
k, r = torch.load("/tmp/kernels.pt"), torch.load("/tmp/reference.pt")
for name in ("prefill", "one"):
    d = (k[name] - r[name]).abs().max().item()
    print(name, "max |kernels - reference| =", d, "of", r[name].abs().max().item())
    assert d <= 1e-4 * r[name].abs().max().item(), name
assert torch.equal(k["tokens"], r["tokens"]), (k["tokens"], r["tokens"])
print("greedy tokens equal:", k["tokens"].tolist())' || status=1
  echo "kernel tests (emulated): $TESTS -k '$TESTS_K'"
  # shellcheck disable=SC2086
  in_root sh -c "cd /wt && python -m pytest -x -q -p no:cacheprovider -k '$TESTS_K' $TESTS" || status=1
}

case $what in
cross) cross ;;
run) run ;;
all) cross && run ;;
*) echo "usage: $0 [cross|run|all]" && exit 2 ;;
esac
exit $status
