// A kernel profile without Nsight: a CUPTI injection library (CUDA_INJECTION64_PATH) that
// records every kernel's GPU time and, at exit, writes the busiest kernels by total time to
// $KPROF_OUT (default stderr). The GPU machine has the CUDA toolkit (CUPTI included) but no nsys.
// Built there by scripts/gpu/bench.sh, which names the toolkit's newest kernel record in KREC.
#include <cupti.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef KREC
#define KREC CUpti_ActivityKernel9
#endif

#define SLOTS 4096  // distinct kernel names; llama.cpp instantiates a few hundred

typedef struct {
    char *name;
    uint64_t ns, n;
} slot_t;

static slot_t slots[SLOTS];
static uint64_t first_start = UINT64_MAX, last_end, total_ns, launches;

static void add(const char *name, uint64_t start, uint64_t end) {
    uint64_t h = 1469598103934665603ull;
    for (const char *p = name; *p; p++) h = (h ^ (unsigned char)*p) * 1099511628211ull;
    for (size_t i = h % SLOTS, k = 0; k < SLOTS; i = (i + 1) % SLOTS, k++) {
        if (!slots[i].name) slots[i].name = strdup(name);
        if (strcmp(slots[i].name, name) == 0) {
            slots[i].ns += end - start;
            slots[i].n++;
            break;
        }
    }
    if (start < first_start) first_start = start;
    if (end > last_end) last_end = end;
    total_ns += end - start;
    launches++;
}

static void CUPTIAPI requested(uint8_t **buf, size_t *size, size_t *max_records) {
    *size = 16 << 20;
    *buf = aligned_alloc(8, *size);
    *max_records = 0;
}

static void CUPTIAPI completed(CUcontext ctx, uint32_t stream, uint8_t *buf, size_t size, size_t valid) {
    CUpti_Activity *rec = NULL;
    (void)ctx, (void)stream, (void)size;
    while (cuptiActivityGetNextRecord(buf, valid, &rec) == CUPTI_SUCCESS) {
        if (rec->kind == CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL || rec->kind == CUPTI_ACTIVITY_KIND_KERNEL) {
            const KREC *k = (const KREC *)rec;
            add(k->name ? k->name : "?", k->start, k->end);
        }
    }
    free(buf);
}

static int by_time(const void *a, const void *b) {
    const slot_t *x = a, *y = b;
    return x->ns < y->ns ? 1 : x->ns > y->ns ? -1 : 0;
}

static void report(void) {
    cuptiActivityFlushAll(1);
    const char *path = getenv("KPROF_OUT");
    FILE *out = path ? fopen(path, "w") : stderr;
    if (!out) out = stderr;
    qsort(slots, SLOTS, sizeof slots[0], by_time);
    double span = last_end > first_start ? (last_end - first_start) / 1e9 : 0;
    fprintf(out, "kernels: %.2f s of GPU time in %llu launches over %.2f s (first to last kernel)\n",
            total_ns / 1e9, (unsigned long long)launches, span);
    for (int i = 0; i < 20 && slots[i].name; i++)
        fprintf(out, "  %5.1f%%  %7.3f s  %9llu  %.150s\n", 100.0 * slots[i].ns / (total_ns ? total_ns : 1),
                slots[i].ns / 1e9, (unsigned long long)slots[i].n, slots[i].name);
    if (out != stderr) fclose(out);
}

int InitializeInjection(void) {
    cuptiActivityRegisterCallbacks(requested, completed);
    cuptiActivityEnable(CUPTI_ACTIVITY_KIND_CONCURRENT_KERNEL);
    // Buffers are also handed over every second: the last flush at exit may find CUDA gone.
    cuptiActivityFlushPeriod(1000);
    atexit(report);
    return 1;
}
