# Sourced at the start of each call on the GPU machine (the device tool), from the repository root:
#   source bench/gpu_setup.sh && python bench/…
# That machine has torch, transformers, peft and accelerate but no diffusers and no network: the wheels travel in
# .whl/ (carry it; download them here with `pip download diffusers==0.42.1 --no-deps -d .whl`, plus
# importlib_metadata and zipp) and install into /tmp/site, which stays while the machine is warm.
# torchao (bench/flux_memory.py, the 8-bit presets) travels apart, in .whl_ao/ (`pip download torchao==0.18.0 --no-deps
# -d .whl_ao`; carry it too): installed only when carried, since diffusers imports it, and torch._dynamo with it,
# whenever it is there, which would add to every load that issue 19 times.
#
# The machine sets PYTHONDONTWRITEBYTECODE=1, so every process compiled the stack's sources again: 2,225 compile
# calls, 5.0 s of a profiled 18.7-s model load (2026-12-06, H100). A user's pip install keeps .pyc files, so the
# timings here keep them too, outside the read-only site-packages, and warm them once per machine.
# START (epoch seconds) is when the call began, for scripts that stop within a budget (bench/world_v2_protocol.sh's
# LIMIT): taken here, before this file's own work, unless set already. On 2026-12-07 a START taken after a fresh
# machine's set-up left that out of a LIMIT of 570 s: the call ran 610 s, was killed at the device's 600 s before it
# could save its work, and ten minutes of a test-split run were lost.
export START=${START:-$(date +%s)}
if [ ! -d /tmp/site/diffusers ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl/*.whl || return 1
fi
if [ -d .whl_ao ] && [ ! -d /tmp/site/torchao ]; then
  python3 -m pip install -q --no-index --no-deps --no-cache-dir --target /tmp/site .whl_ao/*.whl || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 PYTHONPYCACHEPREFIX=/tmp/pycache
unset PYTHONDONTWRITEBYTECODE
if [ ! -d /tmp/pycache ]; then  # the first import of a fresh machine writes the caches (not a user's cost)
  python3 -c "import diffusers.models.autoencoders, diffusers.models.unets, transformers, peft, accelerate, b4m.cli" \
    >/dev/null 2>&1 || true
fi
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
