/* The CPU's single-precision FMA ceiling: 24 independent chains of 512-bit FMAs per thread
 * (enough to cover the FMA latency on both pipes), on 1 and then 2 threads.
 *
 *   gcc -O2 -mavx512f -mfma -pthread benches/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *
 * Prints GFLOP/s (2 per FMA lane). On a shared machine run it several times and take the best:
 * other processes on the cores lower every figure. Used for BENCHMARKS.md's GFLOP/s-vs-peak. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <time.h>

#define ITERS 200000000L
#define ALL(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) \
    X(12) X(13) X(14) X(15) X(16) X(17) X(18) X(19) X(20) X(21) X(22) X(23)
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)i);
#define STEP(i) a##i = _mm512_fmadd_ps(a##i, m, c);
#define KEEP(i) __asm__ volatile("" : "+v"(a##i));
#define SUM(i) s = _mm512_add_ps(s, a##i);

static volatile float sink[2];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *run(void *arg) {
    __m512 m = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
    ALL(DECL)
    for (long it = 0; it < ITERS; it++) {
        ALL(STEP)
        ALL(KEEP) /* keeps every chain live and in a register */
    }
    __m512 s = _mm512_setzero_ps();
    ALL(SUM)
    sink[(long)arg] = _mm512_reduce_add_ps(s);
    return 0;
}

int main(void) {
    double flops = (double)ITERS * 24 * 16 * 2;
    for (long th = 1; th <= 2; th++) {
        pthread_t t[2];
        double t0 = now();
        for (long i = 0; i < th; i++) pthread_create(&t[i], 0, run, (void *)i);
        for (long i = 0; i < th; i++) pthread_join(t[i], 0);
        printf("%ld thread(s): %.1f GFLOP/s\n", th, flops * th / (now() - t0) / 1e9);
    }
    return 0;
}
