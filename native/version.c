#include "engine.h"

const char *idma_version(void)
{
    return "iommu-dma-native 0.1.0";
}
