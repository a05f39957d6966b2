/* The thread pool every CPU kernel runs in: nthreads - 1 persistent workers that spin briefly between
   jobs (decode calls come every few tens of microseconds) and then sleep on a condition variable; the
   caller takes part in every job. One job at a time: a caller that finds the pool busy runs alone.

   A job is one or more phases of `nparts` parts each; phase p + 1 starts once every part of phase p is
   done. Parts are claimed, not assigned: each participant takes the next unclaimed part of the phase
   until none is left, then waits only for the parts others are still running. A worker that the OS
   has not scheduled yet (another program on the cores, a worker still asleep) holds nobody up: the
   caller runs its parts, and the worker, when it comes, finds the job closed and does nothing. Which
   participant runs a part never changes what the part computes, so results do not depend on timing.

   The job's state word: the job's number in the high 32 bits, a closed bit, and the count of workers
   inside it. A worker enters with a compare-and-swap that fails once the job is closed or replaced;
   the caller closes the job when every part is done and returns once the workers inside have left, so
   no worker reads a job (or the caller's stack) after its call returned. */

#include <pthread.h>
#include <sched.h>
#include <time.h>

#include "common.h"

#define SPIN_NS 300000  /* a worker spins this long for the next job before it sleeps */
#define MAX_PHASES 4
#define CLOSED (1ull << 31)
#define ACTIVE_MASK (CLOSED - 1)

static pthread_mutex_t pool_call = PTHREAD_MUTEX_INITIALIZER;   /* one job at a time */
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;     /* sleeping workers */
static pthread_cond_t pool_cv = PTHREAD_COND_INITIALIZER;
static int pool_sleepers, pool_workers, pool_atfork;

typedef struct {
    phase_fn fn;
    task_fn single;  /* a one-phase job given as a task_fn */
    void *arg;
    int phases, parts;
    int next[MAX_PHASES];  /* atomics: the next unclaimed part, the parts done, of each phase */
    int done[MAX_PHASES];
} pool_job;

static pool_job job;
static uint64_t job_state;  /* atomic: number << 32 | CLOSED | workers inside */
static uint64_t job_seq;    /* atomic: the newest job's number; workers wait for it to move */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void wait_until(const int *counter, int value) {
    for (unsigned i = 0; __atomic_load_n(counter, __ATOMIC_ACQUIRE) < value; i++) {
        if (i < 20000) CPU_RELAX(); else sched_yield();
    }
}

/* claim and run parts, phase by phase, until the job is done */
static void take_part(void) {
    for (int p = 0; p < job.phases; p++) {
        int i;
        while ((i = __atomic_fetch_add(&job.next[p], 1, __ATOMIC_ACQ_REL)) < job.parts) {
            if (job.single) job.single(job.arg, i, job.parts);
            else job.fn(job.arg, p, i, job.parts);
            __atomic_add_fetch(&job.done[p], 1, __ATOMIC_ACQ_REL);
        }
        wait_until(&job.done[p], job.parts);
    }
}

/* enter job `number` if it is still open; 1 when entered */
static int enter(uint64_t number) {
    uint64_t s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE);
    while ((s >> 32) == (number & 0xffffffffu) && !(s & CLOSED)) {
        if (__atomic_compare_exchange_n(&job_state, &s, s + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) return 1;
    }
    return 0;
}

static void *pool_worker(void *arg) {
    (void)arg;
    uint64_t seen = __atomic_load_n(&job_seq, __ATOMIC_ACQUIRE);
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
        if (enter(s)) {
            take_part();
            __atomic_sub_fetch(&job_state, 1, __ATOMIC_ACQ_REL);
        }
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

static void run_alone(phase_fn fn, task_fn single, void *arg, int phases, int parts) {
    for (int p = 0; p < phases; p++)
        for (int i = 0; i < parts; i++) {
            if (single) single(arg, i, parts);
            else fn(arg, p, i, parts);
        }
}

static void run_job(phase_fn fn, task_fn single, void *arg, int phases, int parts, int nt) {
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (phases > MAX_PHASES) phases = MAX_PHASES;
    if (nt <= 1 || parts <= 1 || pthread_mutex_trylock(&pool_call) != 0) {
        run_alone(fn, single, arg, phases, parts);
        return;
    }
    while (pool_workers < nt - 1) {
        pthread_t t;
        if (!pool_atfork) { pthread_atfork(0, 0, pool_after_fork); pool_atfork = 1; }
        if (pthread_create(&t, 0, pool_worker, 0) != 0) break;
        pthread_detach(t);
        pool_workers++;
    }
    if (pool_workers == 0) {
        pthread_mutex_unlock(&pool_call);
        run_alone(fn, single, arg, phases, parts);
        return;
    }
    job.fn = fn; job.single = single; job.arg = arg; job.phases = phases; job.parts = parts;
    for (int p = 0; p < MAX_PHASES; p++) { job.next[p] = 0; job.done[p] = 0; }
    uint64_t number = __atomic_load_n(&job_seq, __ATOMIC_RELAXED) + 1;
    __atomic_store_n(&job_state, (number & 0xffffffffu) << 32, __ATOMIC_RELEASE);  /* open, nobody inside */
    __atomic_store_n(&job_seq, number, __ATOMIC_RELEASE);
    pthread_mutex_lock(&pool_mu);
    if (pool_sleepers) pthread_cond_broadcast(&pool_cv);
    pthread_mutex_unlock(&pool_mu);
    take_part();
    uint64_t s = __atomic_fetch_or(&job_state, CLOSED, __ATOMIC_ACQ_REL) | CLOSED;
    for (unsigned i = 0; (s & ACTIVE_MASK) != 0; i++) {  /* the workers inside find nothing left: they leave */
        if (i < 20000) CPU_RELAX(); else sched_yield();
        s = __atomic_load_n(&job_state, __ATOMIC_ACQUIRE);
    }
    pthread_mutex_unlock(&pool_call);
}

void moeinf_pool_run(task_fn fn, void *arg, int nt) { run_job(0, fn, arg, 1, nt < 1 ? 1 : nt, nt); }

void moeinf_pool_run_phases(phase_fn fn, void *arg, int phases, int parts, int nt) {
    run_job(fn, 0, arg, phases, parts < 1 ? 1 : parts, nt);
}
