/* A stand-in for libnvidia-ml.so.1, built by the fake_nvml_library fixture (tests/conftest.py).
 * Its GPUs come from FAKE_NVML_UUIDS and FAKE_NVML_BUS_IDS (comma lists); FAKE_NVML_INIT_RC makes
 * nvmlInit_v2 fail. FAKE_NVML_LOG, when set, is a file that records init and shutdown calls. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} pci_info;

static int item(const char *var, unsigned int index, char *out, size_t size) {
    const char *list = getenv(var);
    if (!list) return 0;
    for (unsigned int i = 0; i < index; i++) {
        list = strchr(list, ',');
        if (!list) return 0;
        list++;
    }
    size_t n = strcspn(list, ",");
    if (n == 0 || n >= size) return 0;
    memcpy(out, list, n);
    out[n] = 0;
    return 1;
}

static void note(const char *what) {
    const char *path = getenv("FAKE_NVML_LOG");
    if (!path) return;
    FILE *f = fopen(path, "a");
    if (f) { fprintf(f, "%s\n", what); fclose(f); }
}

int nvmlInit_v2(void) {
    note("init");
    const char *rc = getenv("FAKE_NVML_INIT_RC");
    return rc ? atoi(rc) : 0;
}

int nvmlShutdown(void) { note("shutdown"); return 0; }

int nvmlDeviceGetCount_v2(unsigned int *count) {
    char uuid[96];
    unsigned int n = 0;
    while (item("FAKE_NVML_UUIDS", n, uuid, sizeof uuid)) n++;
    *count = n;
    return 0;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **handle) {
    *handle = (void *)(size_t)(index + 1);
    return 0;
}

int nvmlDeviceGetUUID(void *handle, char *uuid, unsigned int length) {
    return item("FAKE_NVML_UUIDS", (unsigned int)(size_t)handle - 1, uuid, length) ? 0 : 2;
}

int nvmlDeviceGetPciInfo(void *handle, pci_info *pci) {
    char bus_id[32];
    memset(pci, 0, sizeof *pci);
    if (!item("FAKE_NVML_BUS_IDS", (unsigned int)(size_t)handle - 1, bus_id, sizeof bus_id)) return 2;
    if (sscanf(bus_id, "%x:%x:%x", &pci->domain, &pci->bus, &pci->device) != 3) return 2;
    strncpy(pci->busIdLegacy, bus_id, sizeof pci->busIdLegacy - 1);
    return 0;
}
