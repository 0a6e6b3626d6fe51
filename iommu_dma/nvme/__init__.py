"""The NVMe driver: controller, namespaces, queues, commands and status names."""

from iommu_dma.nvme.status import NvmeError, NvmeTimeoutError, status_name

__all__ = ["NvmeError", "NvmeTimeoutError", "status_name"]
