"""Lets PyPI's CUDA torchvision import beside a CPU-only torch (installed as a .pth hook).

PyPI has no CPU torchvision for torch 2.13.0+cpu; its CUDA build's compiled operators do not
load, and ``torchvision/_meta_registrations.py`` then fails on the missing ``torchvision::nms``
schema. Defining the two schemas first lets torchvision import; its image transforms (all
Qwen2-VL's processor needs) are pure PyTorch. scripts/setup.sh installs this only where
``import torchvision`` fails; remove it once a CPU torchvision can be installed.
"""

import importlib.abc
import sys


class _DefineOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision._meta_registrations":
            sys.meta_path.remove(self)
            import torch

            if not hasattr(torch.ops.torchvision, "nms"):
                lib = torch.library.Library("torchvision", "FRAGMENT")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                sys.modules[__name__]._lib = lib  # keep the fragment alive
        return None


def install() -> None:
    if not any(isinstance(f, _DefineOpsFirst) for f in sys.meta_path):
        sys.meta_path.insert(0, _DefineOpsFirst())
