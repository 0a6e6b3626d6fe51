"""`iommu-dma`: an nvme-cli-like command line for NVMe controllers driven through VFIO."""
