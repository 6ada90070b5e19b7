/*
 * latgen: the load generator of bench/latency.py (built by it on demand).
 *
 * Open loop: request i is due at t0 + i / rate, whatever happened to the
 * requests before it, and its latency counts from that due time to the end of
 * its reply (no coordinated omission).  Requests go round-robin over C
 * long-lived connections; a request due while its connection still waits for
 * an earlier reply is pipelined behind it.  One thread, epoll, non-blocking
 * sockets, a timerfd set to each due time and CLOCK_MONOTONIC; every latency is kept and
 * the percentiles are exact (sorted after the run, never during it).
 *
 *   latgen open   HOST PORT PROTO CONNS KEYS RATE SECONDS ROUNDS
 *   latgen closed HOST PORT PROTO CONNS KEYS REQUESTS
 *   latgen preload HOST PORT PROTO CONNS KEYS VALUE_SIZE
 *   latgen batch  HOST PORT PROTO CONNS KEYS REQUESTS DEPTH
 *
 * PROTO is redis (GET) or memcache (get).  Keys are "lat:%08d" for 0 <= n < KEYS,
 * in turn.  PORT 0 opens no connection: each request "completes" when the
 * generator gets round to sending it, so the figures are the generator's own
 * scheduling jitter (the no-op baseline).  "closed" keeps one request in flight
 * per connection (the maximum rate at that depth); "preload" is "closed" with
 * one SET of a VALUE_SIZE-byte value per key.
 *
 * "batch" is bench/run.py's pipelined load, the shape of redis-benchmark -P
 * DEPTH -r KEYS: each connection sends DEPTH requests at once and waits for all
 * their replies before the next batch; requests are SET (3-byte value) and GET
 * in turn, each on a random key "key:%012d" below KEYS; a request's latency is
 * its batch's round trip.  It prints what bench/mcload.py prints (requests,
 * seconds, rps, p50_ms, p99_ms, errors) and more.  One JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define DRAIN_NS 5000000000ULL /* replies still missing this long after the last due time are lost */
#define MAX_QUEUE (1u << 20)   /* outstanding requests per connection before we give up */
#define MIX_VALUE_SIZE 3        /* batch's SET values: redis-benchmark's default -d 3 */

enum { REDIS, MEMCACHE };

typedef struct {
    int fd;
    char *rbuf;
    size_t rlen, rcap;
    char *wbuf;
    size_t wlen, wcap;
    uint64_t *queue; /* request indexes awaiting a reply, FIFO */
    uint32_t head, tail, qcap;
    int out;              /* EPOLLOUT watched */
    uint64_t batch_first; /* closed loop: the requests sent together, waited for together */
    uint32_t batch_size;
} conn_t;

/* One request per key, built before the run. */
typedef struct {
    char **data;
    size_t *len;
} table_t;

static int proto;
static table_t requests; /* open, closed, preload: request i is key i % nkeys's */
static int mixed;        /* batch: SET and GET in turn on random keys instead */
static table_t sets, gets;
static uint64_t random_state = 1;
static uint64_t nkeys;
static uint64_t *latency;   /* per request: ns from due (open) or sent (closed) to reply */
static uint64_t *start_ns;  /* per request: when its clock started */
static uint64_t *late_ns;   /* per request: how late the generator sent it */
static uint64_t hits, misses, errors, completed;

static void die(const char *what) {
    fprintf(stderr, "latgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static void *xalloc(size_t size) {
    void *p = calloc(1, size ? size : 1);
    if (!p)
        die("out of memory");
    memset(p, 0, size); /* touch every page now, not during the measurement */
    return p;
}

static void grow(char **buf, size_t *cap, size_t need) {
    if (need <= *cap)
        return;
    size_t cap2 = *cap ? *cap : 4096;
    while (cap2 < need)
        cap2 *= 2;
    *buf = realloc(*buf, cap2);
    if (!*buf)
        die("out of memory");
    *cap = cap2;
}

/* GETs (value_size 0) or SETs of a value_size-byte value, one per key PREFIX%0WIDTHd. */
static table_t make_table(const char *prefix, int width, size_t value_size) {
    table_t t = {xalloc(nkeys * sizeof(char *)), xalloc(nkeys * sizeof(size_t))};
    for (uint64_t k = 0; k < nkeys; k++) {
        char key[48], buf[128];
        int klen = snprintf(key, sizeof key, "%s%0*llu", prefix, width, (unsigned long long)k);
        int n;
        if (!value_size)
            n = proto == REDIS ? snprintf(buf, sizeof buf, "*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n", klen, key)
                               : snprintf(buf, sizeof buf, "get %s\r\n", key);
        else
            n = proto == REDIS ? snprintf(buf, sizeof buf, "*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%zu\r\n", klen, key,
                                          value_size)
                               : snprintf(buf, sizeof buf, "set %s 0 0 %zu\r\n", key, value_size);
        size_t len = (size_t)n + (value_size ? value_size + 2 : 0);
        t.data[k] = xalloc(len + 1);
        memcpy(t.data[k], buf, (size_t)n);
        if (value_size) {
            memset(t.data[k] + n, 'v', value_size);
            memcpy(t.data[k] + n + value_size, "\r\n", 2);
        }
        t.len[k] = len;
    }
    return t;
}

/* xorshift64*: the same keys every run, and cheap enough to draw while sending. */
static uint64_t next_random(void) {
    random_state ^= random_state >> 12;
    random_state ^= random_state << 25;
    random_state ^= random_state >> 27;
    return random_state * 0x2545F4914F6CDD1DULL;
}

/* Request i's bytes: key i's in turn, or (mixed) a SET or a GET, in turn, of a random key. */
static const char *request_for(uint64_t i, size_t *len) {
    const table_t *t = &requests;
    uint64_t k = i % nkeys;
    if (mixed) {
        t = i & 1 ? &gets : &sets;
        k = (next_random() >> 11) % nkeys;
    }
    *len = t->len[k];
    return t->data[k];
}

/* Length of one complete reply at buf (0: incomplete); *kind: 0 hit, 1 miss, 2 error. */
static size_t parse_reply(const char *buf, size_t len, int *kind) {
    const char *eol = memmem(buf, len, "\r\n", 2);
    if (!eol)
        return 0;
    size_t line = (size_t)(eol - buf) + 2;
    if (proto == REDIS) {
        if (buf[0] == '$') {
            long n = strtol(buf + 1, NULL, 10);
            if (n < 0) {
                *kind = 1;
                return line;
            }
            if (len < line + (size_t)n + 2)
                return 0;
            *kind = 0;
            return line + (size_t)n + 2;
        }
        *kind = buf[0] == '-' ? 2 : 0;
        return line;
    }
    size_t off = 0;
    int values = 0;
    for (;;) {
        const char *p = buf + off;
        eol = memmem(p, len - off, "\r\n", 2);
        if (!eol)
            return 0;
        line = (size_t)(eol - p) + 2;
        if (line >= 6 && memcmp(p, "VALUE ", 6) == 0) {
            /* VALUE <key> <flags> <bytes>: the last field is the data length */
            const char *q = eol;
            while (q > p && q[-1] != ' ')
                q--;
            size_t n = strtoul(q, NULL, 10);
            if (len - off < line + n + 2)
                return 0;
            off += line + n + 2;
            values++;
            continue;
        }
        off += line;
        if (line == 5 && memcmp(p, "END", 3) == 0)
            *kind = values ? 0 : 1;
        else if (line == 8 && memcmp(p, "STORED", 6) == 0)
            *kind = 0;
        else
            *kind = 2;
        return off;
    }
}

static int connect_to(const char *host, int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1) {
        fprintf(stderr, "latgen: bad address %s\n", host);
        exit(2);
    }
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK) < 0)
        die("fcntl");
    return fd;
}

static conn_t *conns;
static int nconns;
static int ep;

static void watch(conn_t *c, int op) {
    struct epoll_event ev = {0};
    c->out = c->wlen != 0;
    ev.events = EPOLLIN | (c->out ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(ep, op, c->fd, &ev) < 0)
        die("epoll_ctl");
}

/* Send what is buffered; what the socket does not take waits for EPOLLOUT. */
static void flush(conn_t *c) {
    size_t off = 0;
    while (off < c->wlen) {
        ssize_t n = send(c->fd, c->wbuf + off, c->wlen - off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            die("send");
        }
        off += (size_t)n;
    }
    memmove(c->wbuf, c->wbuf + off, c->wlen - off);
    c->wlen -= off;
    if ((c->wlen != 0) != c->out)
        watch(c, EPOLL_CTL_MOD);
}

static void enqueue(conn_t *c, uint64_t i, uint64_t start) {
    if (c->tail - c->head == c->qcap) {
        if (c->qcap >= MAX_QUEUE) {
            fprintf(stderr, "latgen: %u requests waiting on one connection: the target stopped answering\n", c->qcap);
            exit(3);
        }
        uint64_t *q = xalloc(2 * c->qcap * sizeof(uint64_t));
        for (uint32_t k = 0; k < c->qcap; k++)
            q[k] = c->queue[(c->head + k) & (c->qcap - 1)];
        free(c->queue);
        c->queue = q;
        c->head = 0;
        c->tail = c->qcap;
        c->qcap *= 2;
    }
    c->queue[c->tail++ & (c->qcap - 1)] = i;
    start_ns[i] = start;
    size_t len;
    const char *req = request_for(i, &len);
    grow(&c->wbuf, &c->wcap, c->wlen + len);
    memcpy(c->wbuf + c->wlen, req, len);
    c->wlen += len;
}

/* Read and account every complete reply; returns how many completed. */
static uint64_t readable(conn_t *c) {
    uint64_t done = 0;
    for (;;) {
        grow(&c->rbuf, &c->rcap, c->rlen + 65536);
        size_t room = c->rcap - c->rlen;
        ssize_t n = recv(c->fd, c->rbuf + c->rlen, room, 0);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                return done;
            die("recv");
        }
        if (n == 0) {
            fprintf(stderr, "latgen: the target closed a connection\n");
            exit(3);
        }
        uint64_t now = now_ns();
        c->rlen += (size_t)n;
        size_t off = 0, m;
        int kind = 0;
        while ((m = parse_reply(c->rbuf + off, c->rlen - off, &kind)) > 0) {
            if (c->head == c->tail) {
                fprintf(stderr, "latgen: a reply nobody asked for: %.40s\n", c->rbuf + off);
                exit(3);
            }
            uint64_t i = c->queue[c->head++ & (c->qcap - 1)];
            latency[i] = now - start_ns[i];
            if (kind == 0)
                hits++;
            else if (kind == 1)
                misses++;
            else
                errors++;
            completed++;
            done++;
            off += m;
        }
        memmove(c->rbuf, c->rbuf + off, c->rlen - off);
        c->rlen -= off;
        if ((size_t)n < room)
            return done;
    }
}

static void open_conns(const char *host, int port) {
    conns = xalloc((size_t)nconns * sizeof(conn_t));
    for (int k = 0; k < nconns; k++) {
        conn_t *c = &conns[k];
        c->qcap = 1024;
        c->queue = xalloc(c->qcap * sizeof(uint64_t));
        grow(&c->rbuf, &c->rcap, 1 << 17);
        grow(&c->wbuf, &c->wcap, 1 << 16);
        if (port) {
            c->fd = connect_to(host, port);
            watch(c, EPOLL_CTL_ADD);
        }
    }
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Nearest rank: the smallest value with at least q of all values at or below it. */
static double pct(const uint64_t *sorted, uint64_t n, double q) {
    uint64_t rank = (uint64_t)(q * (double)n + 0.999999);
    if (rank < 1)
        rank = 1;
    if (rank > n)
        rank = n;
    return (double)sorted[rank - 1] / 1000.0;
}

static void print_stats(uint64_t from, uint64_t to, uint64_t *tmp) {
    uint64_t n = to - from;
    if (!n) {
        printf("{\"n\": 0}");
        return;
    }
    double sum = 0;
    memcpy(tmp, latency + from, n * sizeof(uint64_t));
    for (uint64_t i = 0; i < n; i++)
        sum += (double)tmp[i];
    qsort(tmp, n, sizeof(uint64_t), cmp_u64);
    printf("{\"n\": %llu, \"min\": %.1f, \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"p999\": %.1f, "
           "\"max\": %.1f, \"mean\": %.1f",
           (unsigned long long)n, tmp[0] / 1000.0, pct(tmp, n, 0.50), pct(tmp, n, 0.90), pct(tmp, n, 0.99),
           pct(tmp, n, 0.999), tmp[n - 1] / 1000.0, sum / (double)n / 1000.0);
    if (late_ns) {
        memcpy(tmp, late_ns + from, n * sizeof(uint64_t));
        qsort(tmp, n, sizeof(uint64_t), cmp_u64);
        printf(", \"late_p99\": %.1f, \"late_max\": %.1f", pct(tmp, n, 0.99), tmp[n - 1] / 1000.0);
    }
    printf("}");
}

static void counters(uint64_t lost, double elapsed) {
    printf("\"completed\": %llu, \"lost\": %llu, \"hits\": %llu, \"misses\": %llu, \"errors\": %llu, "
           "\"elapsed_s\": %.4f",
           (unsigned long long)completed, (unsigned long long)lost, (unsigned long long)hits,
           (unsigned long long)misses, (unsigned long long)errors, elapsed);
}

/* Replies that never came count from their due time to the end of the run (a lower bound). */
static uint64_t mark_lost(uint64_t total, uint64_t end) {
    uint64_t lost = 0;
    for (uint64_t i = 0; i < total; i++)
        if (latency[i] == UINT64_MAX) {
            latency[i] = end - start_ns[i];
            lost++;
        }
    return lost;
}

/*
 * With LATGEN_DUMP=FILE in the environment, one line per request to FILE: its
 * due time (CLOCK_MONOTONIC seconds, the clock bench/pauses.py stamps a proxy's
 * reactor iterations with), its latency and how late it was sent (us), to see
 * when in a run the slow requests were.
 */
static void dump_requests(uint64_t total) {
    const char *path = getenv("LATGEN_DUMP");
    if (!path)
        return;
    FILE *f = fopen(path, "w");
    if (!f)
        die("LATGEN_DUMP");
    for (uint64_t i = 0; i < total; i++)
        fprintf(f, "%.6f %.1f %.1f\n", start_ns[i] / 1e9, latency[i] / 1000.0, late_ns[i] / 1000.0);
    if (fclose(f) != 0)
        die("LATGEN_DUMP");
}

/*
 * One shot at the next due time, absolute: a periodic timer's whole-nanosecond
 * interval would drift from a schedule whose period has a fraction, and fire
 * just before each due time, making every request a tick late.
 */
static void arm(int tfd, uint64_t at) {
    struct itimerspec its = {{0, 0}, {(time_t)(at / 1000000000ULL), (long)(at % 1000000000ULL)}};
    if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
        die("timerfd_settime");
}

static int run_open(const char *host, int port, double rate, double seconds, int rounds) {
    uint64_t per_round = (uint64_t)(rate * seconds + 0.5);
    uint64_t total = per_round * (uint64_t)rounds;
    if (!total) {
        fprintf(stderr, "latgen: nothing to send\n");
        return 2;
    }
    latency = xalloc(total * sizeof(uint64_t));
    memset(latency, 0xff, total * sizeof(uint64_t));
    start_ns = xalloc(total * sizeof(uint64_t));
    late_ns = xalloc(total * sizeof(uint64_t));
    uint64_t *tmp = xalloc(total * sizeof(uint64_t));
    open_conns(host, port);

    double period = 1e9 / rate;
    uint64_t t0 = now_ns() + 20000000ULL; /* connections settle first */
    int tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
    if (tfd < 0)
        die("timerfd_create");
    arm(tfd, t0);
    struct epoll_event tev = {0};
    tev.events = EPOLLIN;
    tev.data.ptr = NULL;
    if (epoll_ctl(ep, EPOLL_CTL_ADD, tfd, &tev) < 0)
        die("epoll_ctl");

    uint64_t next = 0, last_due = t0 + (uint64_t)((double)(total - 1) * period), now = 0;
    char *dirty = xalloc((size_t)nconns);
    struct epoll_event events[64];
    for (;;) {
        int timeout = -1;
        if (next == total) {
            if (completed == total || now >= last_due + DRAIN_NS)
                break;
            timeout = (int)((last_due + DRAIN_NS - now) / 1000000ULL) + 1;
        }
        int n = epoll_wait(ep, events, 64, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        for (int k = 0; k < n; k++) {
            conn_t *c = events[k].data.ptr;
            if (!c) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN)
                    die("read timerfd");
                continue;
            }
            if (events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                readable(c);
            if (events[k].events & EPOLLOUT)
                flush(c);
        }
        now = now_ns();
        while (next < total) {
            uint64_t due = t0 + (uint64_t)((double)next * period);
            if (due > now)
                break;
            late_ns[next] = now - due;
            if (port) {
                int k = (int)(next % (uint64_t)nconns);
                enqueue(&conns[k], next, due);
                dirty[k] = 1;
            } else {
                start_ns[next] = due;
                latency[next] = now - due;
                completed++;
            }
            next++;
        }
        for (int k = 0; k < nconns; k++)
            if (dirty[k]) {
                dirty[k] = 0;
                flush(&conns[k]);
            }
        if (next < total)
            arm(tfd, t0 + (uint64_t)((double)next * period));
    }
    uint64_t end = now_ns();
    uint64_t lost = mark_lost(total, end);
    dump_requests(total);
    printf("{\"mode\": \"open\", \"rate\": %.1f, \"connections\": %d, \"seconds\": %g, \"requests\": %llu, ", rate,
           nconns, seconds, (unsigned long long)total);
    counters(lost, (end - t0) / 1e9);
    printf(", \"rounds\": [");
    for (int r = 0; r < rounds; r++) {
        if (r)
            printf(", ");
        print_stats((uint64_t)r * per_round, (uint64_t)(r + 1) * per_round, tmp);
    }
    printf("], \"overall\": ");
    print_stats(0, total, tmp);
    printf("}\n");
    return 0;
}

/* The next batch on c: up to depth requests from *next on, sent together. */
static void send_batch(conn_t *c, uint64_t *next, uint64_t total, uint32_t depth) {
    uint64_t now = now_ns();
    c->batch_first = *next;
    for (c->batch_size = 0; c->batch_size < depth && *next < total; c->batch_size++, (*next)++)
        enqueue(c, *next, now);
    flush(c);
}

/*
 * Closed loop: each connection sends depth requests at once and the next batch
 * once all their replies are in, total requests in all, for at most 300 s.  A
 * request's latency is its batch's round trip (its last reply's).  Returns how
 * many were sent; *t0 and *end: when it started and ended.
 */
static uint64_t closed_loop(const char *host, int port, uint64_t total, uint32_t depth, uint64_t *t0,
                            uint64_t *end) {
    latency = xalloc(total * sizeof(uint64_t));
    memset(latency, 0xff, total * sizeof(uint64_t));
    start_ns = xalloc(total * sizeof(uint64_t));
    open_conns(host, port);
    uint64_t next = 0;
    *t0 = now_ns();
    for (int k = 0; k < nconns && next < total; k++)
        send_batch(&conns[k], &next, total, depth);
    struct epoll_event events[64];
    uint64_t deadline = *t0 + 300 * 1000000000ULL;
    while (completed < total) {
        int n = epoll_wait(ep, events, 64, 1000);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait");
        }
        if (now_ns() > deadline)
            break;
        for (int k = 0; k < n; k++) {
            conn_t *c = events[k].data.ptr;
            if (events[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
                if (readable(c) && c->head == c->tail) {
                    uint64_t last = latency[c->batch_first + c->batch_size - 1];
                    for (uint32_t j = 0; j + 1 < c->batch_size; j++)
                        latency[c->batch_first + j] = last;
                    if (next < total)
                        send_batch(c, &next, total, depth);
                }
            }
            if (events[k].events & EPOLLOUT)
                flush(c);
        }
    }
    *end = now_ns();
    return next;
}

static int run_closed(const char *host, int port, uint64_t total) {
    if (!port || !total) {
        fprintf(stderr, "latgen: closed needs a port and requests\n");
        return 2;
    }
    uint64_t t0, end, next = closed_loop(host, port, total, 1, &t0, &end);
    uint64_t *tmp = xalloc(total * sizeof(uint64_t));
    uint64_t lost = mark_lost(next, end);
    double elapsed = (end - t0) / 1e9;
    printf("{\"mode\": \"closed\", \"connections\": %d, \"requests\": %llu, \"rps\": %.1f, ", nconns,
           (unsigned long long)total, completed / elapsed);
    counters(lost + (total - next), elapsed);
    printf(", \"overall\": ");
    print_stats(0, next, tmp);
    printf("}\n");
    return 0;
}

static int run_batch(const char *host, int port, uint64_t total, uint32_t depth) {
    if (!port || !total || !depth) {
        fprintf(stderr, "latgen: batch needs a port, requests and a depth\n");
        return 2;
    }
    mixed = 1;
    uint64_t t0, end, next = closed_loop(host, port, total, depth, &t0, &end);
    uint64_t lost = mark_lost(next, end) + (total - next);
    uint64_t *tmp = xalloc(next * sizeof(uint64_t));
    memcpy(tmp, latency, next * sizeof(uint64_t));
    qsort(tmp, next, sizeof(uint64_t), cmp_u64);
    double elapsed = (end - t0) / 1e9;
    printf("{\"mode\": \"batch\", \"connections\": %d, \"depth\": %u, \"requests\": %llu, \"seconds\": %.4f, "
           "\"rps\": %.1f, \"p50_ms\": %.3f, \"p99_ms\": %.3f, \"errors\": %llu, \"lost\": %llu, "
           "\"hits\": %llu, \"misses\": %llu}\n",
           nconns, depth, (unsigned long long)completed, elapsed, completed / elapsed, pct(tmp, next, 0.50) / 1000.0,
           pct(tmp, next, 0.99) / 1000.0, (unsigned long long)errors, (unsigned long long)lost,
           (unsigned long long)hits, (unsigned long long)misses);
    return 0;
}

static void usage(void) {
    fprintf(stderr, "usage: latgen open HOST PORT redis|memcache CONNS KEYS RATE SECONDS ROUNDS\n"
                    "       latgen closed HOST PORT redis|memcache CONNS KEYS REQUESTS\n"
                    "       latgen preload HOST PORT redis|memcache CONNS KEYS VALUE_SIZE\n"
                    "       latgen batch HOST PORT redis|memcache CONNS KEYS REQUESTS DEPTH\n");
    exit(2);
}

int main(int argc, char **argv) {
    if (argc < 8)
        usage();
    const char *mode = argv[1], *host = argv[2];
    int port = atoi(argv[3]);
    if (strcmp(argv[4], "redis") == 0)
        proto = REDIS;
    else if (strcmp(argv[4], "memcache") == 0)
        proto = MEMCACHE;
    else
        usage();
    nconns = atoi(argv[5]);
    nkeys = strtoull(argv[6], NULL, 10);
    if (nconns < 1 || nkeys < 1)
        usage();
    /* Wake-ups on time: the default timer slack (50 us) would be jitter of our own. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    int preload = strcmp(mode, "preload") == 0;
    if (strcmp(mode, "batch") == 0) {
        sets = make_table("key:", 12, MIX_VALUE_SIZE);
        gets = make_table("key:", 12, 0);
    } else
        requests = make_table("lat:", 8, preload ? strtoull(argv[7], NULL, 10) : 0);
    ep = epoll_create1(0);
    if (ep < 0)
        die("epoll_create1");
    int rc;
    if (strcmp(mode, "open") == 0 && argc == 10)
        rc = run_open(host, port, atof(argv[7]), atof(argv[8]), atoi(argv[9]));
    else if (strcmp(mode, "closed") == 0 && argc == 8)
        rc = run_closed(host, port, strtoull(argv[7], NULL, 10));
    else if (preload && argc == 8)
        rc = run_closed(host, port, nkeys);
    else if (strcmp(mode, "batch") == 0 && argc == 9)
        rc = run_batch(host, port, strtoull(argv[7], NULL, 10), (uint32_t)atoi(argv[8]));
    else
        usage();
    fflush(stdout);
    return rc;
}
