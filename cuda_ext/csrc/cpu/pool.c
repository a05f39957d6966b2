/* The thread pool every CPU kernel runs in: nthreads - 1 persistent workers that spin briefly between
   jobs (decode calls come every few tens of microseconds) and then sleep on a condition variable; the
   caller takes part in every job. One job at a time: a caller that finds the pool busy runs alone. */

#include <pthread.h>
#include <sched.h>
#include <time.h>

#include "common.h"

#define SPIN_NS 300000  /* a worker spins this long for the next job before it sleeps */

static pthread_mutex_t pool_call = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;     /* sleeping workers */
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_sleepers, pool_workers, pool_atfork;
static task_fn job_fn;
static void *job_arg;
static int job_nt;
static uint64_t job_seq;    /* atomics: __atomic builtins */
static int job_done;
static int bar_count;
static uint64_t bar_gen;
static uint64_t spawn_seq;  /* job_seq when the newest worker was made: the first job it waits for is the next */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

void moeinf_pool_barrier(int nt) {
    if (nt <= 1) return;
    uint64_t gen = __atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&bar_count, 1, __ATOMIC_ACQ_REL) == nt) {
        __atomic_store_n(&bar_count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&bar_gen, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    for (unsigned i = 0; __atomic_load_n(&bar_gen, __ATOMIC_ACQUIRE) == gen; i++) {
        if (i < 20000) CPU_RELAX(); else sched_yield();
    }
}

static void *pool_worker(void *arg) {
    int tid = (int)(intptr_t)arg;
    uint64_t seen = __atomic_load_n(&spawn_seq, __ATOMIC_ACQUIRE);
    for (;;) {
        uint64_t s = __atomic_load_n(&job_seq, __ATOMIC_ACQUIRE);
        if (s == seen) {
            uint64_t t0 = now_ns();
            for (unsigned i = 1; (s = __atomic_load_n(&job_seq, __ATOMIC_ACQUIRE)) == seen; i++) {
                CPU_RELAX();
                if ((i & 255) == 0 && now_ns() - t0 > SPIN_NS) {
                    pthread_mutex_lock(&pool_mu);
                    pool_sleepers++;
                    while ((s = __atomic_load_n(&job_seq, __ATOMIC_ACQUIRE)) == seen) pthread_cond_wait(&pool_cv, &pool_mu);
                    pool_sleepers--;
                    pthread_mutex_unlock(&pool_mu);
                    break;
                }
            }
        }
        seen = s;
        if (tid < job_nt) job_fn(job_arg, tid, job_nt);
        __atomic_add_fetch(&job_done, 1, __ATOMIC_ACQ_REL);
    }
    return 0;
}

static void pool_after_fork(void) {  /* the workers are not forked */
    pool_workers = 0;
    pool_sleepers = 0;
    pthread_mutex_init(&pool_call, 0);
    pthread_mutex_init(&pool_mu, 0);
    pthread_cond_init(&pool_cv, 0);
}

void moeinf_pool_run(task_fn fn, void *arg, int nt) {
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt <= 1 || pthread_mutex_trylock(&pool_call) != 0) {
        fn(arg, 0, 1);
        return;
    }
    while (pool_workers < nt - 1) {
        pthread_t t;
        if (!pool_atfork) { pthread_atfork(0, 0, pool_after_fork); pool_atfork = 1; }
        __atomic_store_n(&spawn_seq, __atomic_load_n(&job_seq, __ATOMIC_ACQUIRE), __ATOMIC_RELEASE);
        if (pthread_create(&t, 0, pool_worker, (void *)(intptr_t)(pool_workers + 1)) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    if (nt > pool_workers + 1) nt = pool_workers + 1;
    int workers = pool_workers;
    job_fn = fn; job_arg = arg; job_nt = nt;
    __atomic_store_n(&job_done, 0, __ATOMIC_RELAXED);
    __atomic_add_fetch(&job_seq, 1, __ATOMIC_ACQ_REL);
    pthread_mutex_lock(&pool_mu);
    if (pool_sleepers) pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    fn(arg, 0, nt);
    for (unsigned i = 0; __atomic_load_n(&job_done, __ATOMIC_ACQUIRE) != workers; i++) {
        if (i < 20000) CPU_RELAX(); else sched_yield();
    }
    pthread_mutex_unlock(&pool_call);
}
