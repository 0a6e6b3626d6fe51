"""The package's public face: the documented import line, and one root for every error."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import iommu_dma


def test_documented_imports() -> None:
    from iommu_dma import (  # noqa: F401 - the README's import line, verbatim
        ClosedError,
        Container,
        Controller,
        DmaAllocator,
        DmaBuffer,
        IommuDmaError,
        Namespace,
        NvmeError,
    )

    assert set(iommu_dma.__all__) >= {"Controller", "Namespace", "Container", "DmaAllocator",
                                      "DmaBuffer", "IommuDmaError", "NvmeError", "ClosedError"}


def test_every_exception_of_the_package_derives_from_iommu_dma_error() -> None:
    found = []
    for info in pkgutil.walk_packages(iommu_dma.__path__, "iommu_dma."):
        if info.name.endswith(("pytest_plugin", "__main__", "demo", "_native", "_native_asan",
                               "nbd.plugin")):      # nbd.plugin: nbdkit's module exists in nbdkit
            continue
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException):
                found.append(cls)
    assert len(found) > 10
    stray = [f"{c.__module__}.{c.__name__}" for c in found
             if not issubclass(c, iommu_dma.IommuDmaError)]
    assert not stray, f"exceptions outside IommuDmaError: {stray}"
