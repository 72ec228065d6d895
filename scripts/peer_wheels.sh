#!/usr/bin/env bash
# The benchmark peers and drop-in originals that the lent GPU's image lacks (Inf-CL, OpenCLIP, lightly,
# solo-learn), as wheels for its Python (3.12, x86-64), into .whl/ (ignored by git). Name ".whl" in the device
# call's `carry`; scripts/gpu_check.sh and scripts/gpu_tune.sh install whatever lies there, without network.
# Versions: the drop-in tests' pins (requirements/cpu.txt, requirements/no-deps.txt); the image has the rest of
# their needs (numpy, timm, torchvision, pytorch-lightning, regex, tqdm, huggingface-hub, safetensors).
#   bash scripts/peer_wheels.sh        (needs pip and the package index; about 3 MB)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
exclude="$(git rev-parse --git-path info/exclude)"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
mkdir -p .whl
"${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  inf-cl==1.2.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.1 lightly==1.6.0 solo-learn==1.0.2
ls -la .whl
