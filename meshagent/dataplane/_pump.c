/* meshagent.dataplane._pump: the byte pump of established L4 connections (and the HTTP
 * relay of an inbound's plain requests), in C.
 *
 * Theory of operation. Once an L4 connection is set up in Python (accepted, TLS
 * handshake done, peer checked, upstream connected), its two sockets are handed to an
 * Engine: one epoll set per agent process, registered edge-triggered for both
 * directions of both sockets, served by Engine.serve() in a thread of its own that
 * never takes the GIL: read a chunk, write it on, until a call would block, for every
 * ready connection, then epoll_wait again. Neither trio nor Python runs per chunk; the
 * trio side hears from the engine only when a connection ended (Engine.collect(), an
 * eventfd to wait on).
 *
 * Threads. One mutex guards the engine: serve() holds it while it works (not while it
 * waits in epoll_wait), the Python calls (add, remove, resume, collect, stop) hold it
 * briefly. serve() never needs the GIL while it holds the mutex, so a Python call that
 * waits for the mutex with the GIL held cannot deadlock. epoll events carry a
 * (generation, slot, side) key, not a pointer: an event that raced with remove() finds
 * a free slot or a newer generation.
 *
 * The engine never owns a descriptor or a TLS session: Python keeps both and closes
 * them after the engine reported the end (or after Engine.remove). TLS uses the SSL
 * object of Python's own ssl.SSLSocket (same process, same libssl), found through the
 * _ssl._SSLSocket object's layout and checked with SSL_get_fd against the socket's
 * descriptor: a mismatch refuses the connection, which then stays in Python. Python
 * does not touch the SSL object while the engine has the connection; when a TLS 1.3
 * client's first bytes arrive (its session ticket came with them), the connection is
 * paused and reported (FIRST_READ) so Python can take the session, then resumed.
 * libssl is not linked: its functions are looked up in the copy Python's _ssl module
 * already loaded (dl_iterate_phdr + dlopen RTLD_NOLOAD), so no OpenSSL headers are
 * needed to build this file and there can be no second copy of OpenSSL.
 *
 * TLS sessions (tls_set_session, tls_server_cache, at the end of this file). Two calls
 * of the ssl module cost more than the handshake they save with OpenSSL 3.0, which
 * builds a decoder for the peer's public key whenever it parses a session:
 * SSLSocket.session = s copies the session through DER (a workaround for OpenSSL 1.1.0
 * making a shared session unresumable when a connection using it is freed without a
 * shutdown), and a stateless TLS 1.3 ticket is parsed back into a session on every
 * resumption. tls_set_session copies the session with SSL_SESSION_dup (certificates
 * shared by reference, nothing parsed); tls_server_cache bounds the server context's
 * session cache so that stateful tickets (SSL_OP_NO_TICKET, set by Python) can be used:
 * a resumption then finds the session in memory.
 *
 * Semantics (those of tcp_proxy.splice, which stays the reference and the fallback):
 * - one direction holds at most one read (CHUNK, or up to BIG_CHUNK in bulk: see
 *   bulk_size); it reads again only when that read was written (backpressure);
 * - end of stream becomes a half-close: FIN (shutdown SHUT_WR) on a plain socket, an
 *   END frame on a framed TLS side, nothing on a raw TLS side;
 * - framing (meshagent/1): DATA/END frames, with the decoder's checks (unknown type,
 *   empty DATA, END with payload, payload over max_payload, bytes after END, close
 *   inside a frame);
 * - TLS end of stream is a close_notify; EOF without one is an error;
 * - a read that emptied the socket (a short recv; on a TLS side, OpenSSL's last read of
 *   the socket came back short, seen by a BIO callback, and nothing is buffered) is not
 *   followed by one that would only find EAGAIN: epoll reports the next bytes;
 * - idle: no byte moved either way for idle seconds finishes the connection (not an
 *   error);
 * - a TLS write that would block is retried with the same bytes (OpenSSL's rule);
 * - a copy (add with a limit, for an HTTP body of known length) moves exactly that many
 *   bytes one way, reads none past them (they are the next message's, Python's), sends
 *   no EOF, and fails if the source ends first; with until_reply it also stops, with
 *   nothing half-written, once the destination turns readable (an upstream answering
 *   before the request body ended: Python relays that answer);
 * - a tunnel (add with EITHER_END, for an upgraded HTTP connection) is done when either
 *   direction is: the end of one way ends both, as in http_proxy._tunnel.
 * - a relay (Engine.relay) serves HTTP/1.1 requests and their responses itself, from
 *   a request boundary, and hands back what it does not take: see "the HTTP/1.1 relay"
 *   below.
 * Fairness: a direction moves at most BUDGET CHUNKs' worth per pass; a connection with more
 * to do is kept on a ready list for the next pass, which first takes whatever else
 * epoll has. Idle expiry is a timerfd in the epoll set, armed at the earliest possible
 * expiry; new connections and stop() write an eventfd in the set.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <ctype.h>
#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <linux/sock_diag.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (64 * 1024)
#define BIG_CHUNK (256 * 1024) /* a bulk read, bounded by the room the destination has */
#define TLS_RECORD (16 * 1024) /* the most plaintext one TLS record holds */
#define HEADER 4
#define LOWATS 64         /* sides with a raised SO_RCVLOWAT at once, per engine */
#define LOWAT_WAIT 0.001  /* seconds such a side waits at most for its mark */
#define LOWAT_SLACK (32 * 1024)
#define BUDGET 16
#define MAX_EVENTS 256
#define FRAME_DATA 0x01
#define FRAME_END 0x02

enum { KIND_PLAIN = 0, KIND_FRAMED = 1, KIND_RAW = 2 };
enum { DONE_OK = 0, DONE_IDLE = 1, DONE_ERROR = 2, FIRST_READ = 3 };
/* add() flags: a copy that stops when b speaks; a splice that ends with either way */
enum { FLAG_UNTIL_REPLY = 1, FLAG_EITHER_END = 2 };
enum { ERR_IO = 0, ERR_FRAME = 1 };
/* added to a reported error kind: the end that failed (neither: the engine itself) */
enum { ERR_AT_A = 16, ERR_AT_B = 32 };

/* ---- OpenSSL, from the copy the _ssl module loaded -------------------------------- */

typedef struct ssl_st SSL;
typedef struct bio_st BIO;
typedef long (*bio_callback_ex)(BIO *, int, const char *, size_t, int, long, int, size_t *);
#define BIO_CB_READ 0x02
#define BIO_CB_RETURN 0x80
typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_session_st SSL_SESSION;
#define SSL_ERROR_SSL 1
#define SSL_ERROR_WANT_READ 2
#define SSL_ERROR_WANT_WRITE 3
#define SSL_ERROR_SYSCALL 5
#define SSL_ERROR_ZERO_RETURN 6
#define SSL_CTRL_MODE 33
#define SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2L
#define SSL_CTRL_SET_SESS_CACHE_SIZE 42
#define SSL_CTRL_SET_TLSEXT_TICKET_KEYS 59
#define TICKET_KEYS_LEN 80
#define SSL_SENT_SHUTDOWN 1
#define SSL_RECEIVED_SHUTDOWN 2

static int (*p_SSL_read_ex)(SSL *, void *, size_t, size_t *);
static int (*p_SSL_write_ex)(SSL *, const void *, size_t, size_t *);
static int (*p_SSL_get_error)(const SSL *, int);
static int (*p_SSL_get_fd)(const SSL *);
static long (*p_SSL_ctrl)(SSL *, int, long, void *);
static int (*p_SSL_is_init_finished)(const SSL *);
static int (*p_SSL_has_pending)(const SSL *);
static BIO *(*p_SSL_get_rbio)(const SSL *);
static void (*p_BIO_set_callback_ex)(BIO *, bio_callback_ex);
static void (*p_BIO_set_callback_arg)(BIO *, char *);
static char *(*p_BIO_get_callback_arg)(const BIO *);
static void (*p_SSL_set_read_ahead)(SSL *, int);
static int (*p_SSL_in_before)(const SSL *);
static void (*p_SSL_set_shutdown)(SSL *, int);
static int (*p_SSL_set_session)(SSL *, SSL_SESSION *);
static SSL_SESSION *(*p_SSL_SESSION_dup)(const SSL_SESSION *);
static void (*p_SSL_SESSION_free)(SSL_SESSION *);
static const unsigned char *(*p_SSL_SESSION_get_id)(const SSL_SESSION *, unsigned int *);
static uint64_t (*p_SSL_CTX_get_options)(const SSL_CTX *);
static long (*p_SSL_CTX_ctrl)(SSL_CTX *, int, long, void *);
static void (*p_ERR_clear_error)(void);
static unsigned long (*p_ERR_get_error)(void);
static void (*p_ERR_error_string_n)(unsigned long, char *, size_t);
static int ssl_loaded = 0;
static char ssl_problem[200] = "ssl not loaded yet";

/* The layout of CPython's _ssl._SSLSocket (Modules/_ssl.c, unchanged since 3.7). */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    SSL *ssl;
    PyObject *ctx;
} PySSLSocketHead;

/* ... of _ssl._SSLContext and _ssl.SSLSession (the same since 3.6). */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} PySSLContextHead;

typedef struct {
    PyObject_HEAD
    SSL_SESSION *session;
    PyObject *ctx;
} PySSLSessionHead;

static char found_ssl[512], found_crypto[512];

static int find_libs(struct dl_phdr_info *info, size_t size, void *data) {
    (void)size;
    (void)data;
    const char *name = info->dlpi_name;
    if (name == NULL || name[0] == '\0') return 0;
    const char *base = strrchr(name, '/');
    base = base ? base + 1 : name;
    if (strncmp(base, "libssl.so", 9) == 0 && !found_ssl[0])
        snprintf(found_ssl, sizeof found_ssl, "%s", name);
    if (strncmp(base, "libcrypto.so", 12) == 0 && !found_crypto[0])
        snprintf(found_crypto, sizeof found_crypto, "%s", name);
    return 0;
}

#define LOOKUP(handle, sym)                                                          \
    do {                                                                             \
        *(void **)(&p_##sym) = dlsym(handle, #sym);                                  \
        if (p_##sym == NULL) {                                                       \
            snprintf(ssl_problem, sizeof ssl_problem, "libssl has no %s", #sym);     \
            return 0;                                                                \
        }                                                                            \
    } while (0)

static int load_ssl(void) {
    if (ssl_loaded) return 1;
    found_ssl[0] = found_crypto[0] = '\0';
    dl_iterate_phdr(find_libs, NULL);
    if (!found_ssl[0] || !found_crypto[0]) {
        snprintf(ssl_problem, sizeof ssl_problem,
                 "Python's ssl module does not use a shared libssl (statically linked?)");
        return 0;
    }
    void *hssl = dlopen(found_ssl, RTLD_NOW | RTLD_NOLOAD);
    void *hcrypto = dlopen(found_crypto, RTLD_NOW | RTLD_NOLOAD);
    if (hssl == NULL || hcrypto == NULL) {
        snprintf(ssl_problem, sizeof ssl_problem, "cannot open %s", found_ssl);
        return 0;
    }
    LOOKUP(hssl, SSL_read_ex);
    LOOKUP(hssl, SSL_write_ex);
    LOOKUP(hssl, SSL_get_error);
    LOOKUP(hssl, SSL_get_fd);
    LOOKUP(hssl, SSL_ctrl);
    LOOKUP(hssl, SSL_is_init_finished);
    LOOKUP(hssl, SSL_has_pending);
    LOOKUP(hssl, SSL_get_rbio);
    LOOKUP(hcrypto, BIO_set_callback_ex);
    LOOKUP(hcrypto, BIO_set_callback_arg);
    LOOKUP(hcrypto, BIO_get_callback_arg);
    LOOKUP(hssl, SSL_set_read_ahead);
    LOOKUP(hssl, SSL_in_before);
    LOOKUP(hssl, SSL_set_shutdown);
    LOOKUP(hssl, SSL_set_session);
    LOOKUP(hssl, SSL_SESSION_dup);
    LOOKUP(hssl, SSL_SESSION_free);
    LOOKUP(hssl, SSL_SESSION_get_id);
    LOOKUP(hssl, SSL_CTX_get_options);
    LOOKUP(hssl, SSL_CTX_ctrl);
    LOOKUP(hcrypto, ERR_clear_error);
    LOOKUP(hcrypto, ERR_get_error);
    LOOKUP(hcrypto, ERR_error_string_n);
    ssl_loaded = 1;
    ssl_problem[0] = '\0';
    return 1;
}

/* ---- connections ------------------------------------------------------------------ */

struct conn;

typedef struct side {
    struct conn *conn;
    int fd;
    SSL *ssl;
    int kind;
    int rd, wr; /* may read / write without blocking, as far as we know */
    int hup;    /* the peer shut down or the socket failed (EPOLLRDHUP/HUP/ERR seen) */
    BIO *probed;   /* TLS: the socket BIO whose reads read_probe watches, while pumped */
    int bio_short; /* its last read returned less than asked: the socket was emptied */
    int lowat;     /* SO_RCVLOWAT raised by lowat_wait (0 or 1: not raised) */
} side_t;

typedef struct dir {
    side_t *src, *dst;
    /* bytes waiting for dst (malloc'd only when a write could not finish at once) */
    char *buf;
    size_t off, len;
    size_t payload; /* stream bytes in the pending write (frame headers excluded) */
    int eof_in, eof_sent, done;
    side_t *wait_side; /* blocked until wait_side is readable (wait_in) or writable */
    int wait_in;
    /* frame decoder state, for a framed src */
    unsigned char hdr[HEADER];
    int hdr_have, ended;
    size_t payload_left;
    unsigned long long count;
    /* a one-way copy (add with limit): stream bytes to move, and read so far; 0 = none */
    unsigned long long limit, taken;
    int bulk; /* its last read filled its room and all went on: read up to BIG_CHUNK */
    /* a TLS read failed after this direction had read bytes in the same pass (gather):
     * those go first, then this error (malloc'd) ends the connection */
    struct late_error *late;
} dir_t;

typedef struct conn {
    uint32_t slot, gen;
    side_t a, b;
    dir_t d[2];
    double idle, last;
    int ready;        /* on the ready list */
    int notify_first; /* report the first bytes read from a TLS side */
    int paused;       /* FIRST_READ reported: untouched until resume() */
    int first_due;    /* FIRST_READ to report */
    int until_reply;  /* a copy that stops early once b has something to say */
    int either_end;   /* a tunnel: done when either direction is (no half-close) */
    int replied;      /* b reported readable (or closed) since add() */
    int finished;     /* ended (status, error): to report, then freed by collect() */
    int status;
    int error_kind;
    char *error;      /* malloc'd message, or NULL */
    int queued;       /* on the done list */
    struct relay *relay; /* an HTTP relay (Engine.relay), or NULL for a pump or copy */
    struct conn *next_ready, *next_done;
} conn_t;

/* A relay's exchanges summed up, when no one wants them one by one (Engine.relay's
 * summary: the latency bounds of the metrics). */
#define SUMMARY_BOUNDS 32
typedef struct {
    unsigned long long classes[6];                /* by status / 100 (0: anything else) */
    unsigned long long first[SUMMARY_BOUNDS + 1]; /* by the first bound >= the seconds */
    unsigned long long count;
    double total, since; /* seconds summed; when the first one was added */
    int nfirst;          /* the bounds, plus one for +Inf */
} summary_t;

/* What Engine.records() reports of a relay, in order: a finished exchange, a summary
 * of some, that its block is over (a relay that renews ahead), that it switched to the
 * upstream relay_next() gave. */
enum { RECORD_EXCHANGE, RECORD_SUMMARY, RECORD_RENEW_DUE, RECORD_SWITCHED };

typedef struct {
    int kind;
    int reusable; /* RECORD_SWITCHED: the upstream left fit for another request */
    unsigned long long handle, bytes_in, bytes_out;
    int status;
    double seconds;
    char method[8];
    char *path, *request_id; /* malloc'd; request_id NULL when the request had none */
    summary_t *summary;      /* malloc'd; a summary (the fields above unused), or NULL */
} record_t;

typedef struct {
    PyObject_HEAD
    pthread_mutex_t lock; /* everything below, between serve() and the Python calls */
    int epfd;
    int kickfd;  /* eventfd in the epoll set: new work or stop, from the trio thread */
    int timerfd; /* in the epoll set: fires at next_scan, the earliest idle expiry */
    int donefd;  /* eventfd the trio side waits on: the done list has entries */
    int stopped, serving; /* stop() is final: serve() returns, now or when it starts */
    conn_t **slots;
    uint32_t *gens;
    uint32_t nslots, *free_slots, nfree;
    size_t active; /* connections not finished */
    conn_t *ready_head, *done_head;
    double next_scan;
    size_t max_payload;
    char *scratch;
    /* sides waiting with SO_RCVLOWAT raised (lowat_wait), by epoll key, each with the
     * time its raised mark is dropped: a wake-up waits at most LOWAT_WAIT */
    struct {
        uint64_t key;
        double until;
    } lowats[LOWATS];
    int nlowats;
    /* finished relay exchanges not yet taken by records(); recfd is readable meanwhile */
    record_t *records;
    size_t nrecords, records_cap;
    unsigned long long records_dropped;
    int recfd;
    /* random bytes for the ids relays generate (getrandom, refilled when spent) */
    unsigned char random[4096];
    size_t random_used;
    int connecting; /* connects of relays' own in progress (relay_reconnect), at most
                     * RELAY_CONNECTS */
} Engine;

static void arm(Engine *eng);
static void relay_free(struct relay *r);
static void relay_let_go(Engine *eng, struct conn *c);
static void relay_close_own(struct conn *c);
static void relay_drop_next(struct relay *r);
static int watch(Engine *eng, struct conn *c, int side, int fd);

/* epoll data: (generation << 32) | (slot << 1) | side for a connection's socket, so an
 * event that raced with remove() finds a freed slot or a newer generation, never a
 * freed pointer. Generations start at 1; these two are the engine's own descriptors. */
#define KEY_KICK 0u
#define KEY_TIMER 1u

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Why a connection failed, for its log line: ERR_IO or ERR_FRAME, and a message; at:
 * the end whose socket, TLS or framing failed (NULL: the engine, out of memory). */
typedef struct late_error {
    int kind;
    char text[240];
    side_t *at;
} error_t_;

/* The text is strerror's, lower case ("connection reset by peer"), as Python's pumps
 * say it (errors.describe_failure). */
static void io_error(error_t_ *err, int code) {
    char buf[128];
    const char *text = strerror_r(code, buf, sizeof buf); /* GNU: thread-safe */
    err->kind = ERR_IO;
    snprintf(err->text, sizeof err->text, "%s", text);
    err->text[0] = (char)tolower((unsigned char)err->text[0]);
}

static void frame_error(error_t_ *err, const char *text) {
    err->kind = ERR_FRAME;
    snprintf(err->text, sizeof err->text, "%s", text);
}

static void ssl_error(error_t_ *err, SSL *ssl, int ret, int saved_errno) {
    int code = p_SSL_get_error(ssl, ret);
    unsigned long e = p_ERR_get_error();
    err->kind = ERR_IO;
    if (e != 0) {
        char text[200];
        p_ERR_error_string_n(e, text, sizeof text);
        if (strstr(text, "unexpected eof") != NULL)
            snprintf(err->text, sizeof err->text, "the peer closed without close_notify");
        else
            snprintf(err->text, sizeof err->text, "TLS error: %s", text);
    } else if ((code == SSL_ERROR_SYSCALL || code == SSL_ERROR_ZERO_RETURN) &&
               saved_errno != 0) {
        io_error(err, saved_errno);
    } else if (code == SSL_ERROR_SYSCALL) {
        snprintf(err->text, sizeof err->text, "the peer closed without close_notify");
    } else if (code == SSL_ERROR_ZERO_RETURN) { /* a write after the peer's close_notify */
        snprintf(err->text, sizeof err->text, "the peer closed (after its close_notify)");
    } else {
        snprintf(err->text, sizeof err->text, "TLS error (SSL_get_error %d)", code);
    }
    p_ERR_clear_error();
}

/* d waits until s is readable (in) or writable: that readiness is known to be gone. */
static int block(dir_t *d, side_t *s, int in) {
    if (in) s->rd = 0; else s->wr = 0;
    d->wait_side = s;
    d->wait_in = in;
    return 0;
}

/* A plain recv/send failed with errno: 0 (blocked, d waits) or -1 (err set). */
static int plain_failed(dir_t *d, side_t *s, int in, error_t_ *err) {
    if (errno == EAGAIN || errno == EWOULDBLOCK) return block(d, s, in);
    io_error(err, errno);
    err->at = s;
    return -1;
}

/* An SSL call on s returned ret (not 1), with SSL_get_error code: 0 when OpenSSL wants
 * the socket (d waits), -1 otherwise (err set). */
static int ssl_failed(dir_t *d, side_t *s, int ret, int code, int saved_errno,
                      error_t_ *err) {
    if (code == SSL_ERROR_WANT_READ || code == SSL_ERROR_WANT_WRITE) {
        p_ERR_clear_error();
        return block(d, s, code == SSL_ERROR_WANT_READ);
    }
    ssl_error(err, s->ssl, ret, saved_errno);
    err->at = s;
    return -1;
}

/* A BIO callback on a pumped TLS side's socket BIO: whether OpenSSL's last read of the
 * socket came back short (it emptied the socket). OpenSSL calls it before and after
 * each operation of the BIO (reads and writes: one BIO does both); it returns what the
 * operation returns. */
static long read_probe(BIO *b, int oper, const char *argp, size_t len, int argi, long argl,
                       int ret, size_t *processed) {
    (void)argp;
    (void)argi;
    (void)argl;
    if (oper == (BIO_CB_READ | BIO_CB_RETURN)) {
        side_t *s = (side_t *)p_BIO_get_callback_arg(b);
        if (s != NULL) s->bio_short = ret > 0 && processed != NULL && *processed < len;
    }
    return ret;
}

/* The side's SO_RCVLOWAT to `want` (1: the kernel's default), and s->lowat with it. */
static void set_lowat(side_t *s, int want) {
    if (setsockopt(s->fd, SOL_SOCKET, SO_RCVLOWAT, &want, sizeof want) == 0 || want == 1)
        s->lowat = want > 1 ? want : 0;
}

/* The side's mark goes back to 1 and its BIO gets its callback back (none: Python's
 * _ssl sets none on socket BIOs). Before the engine gives the SSL object back, or frees
 * the side. */
static void side_release(side_t *s) {
    if (s->lowat > 1) set_lowat(s, 1);
    if (s->probed == NULL) return;
    p_BIO_set_callback_ex(s->probed, NULL);
    p_BIO_set_callback_arg(s->probed, NULL);
    s->probed = NULL;
}

static void conn_free(conn_t *c) {
    side_release(&c->a);
    side_release(&c->b);
    relay_free(c->relay);
    free(c);
}

/* Read up to n bytes from s into p. 1: *got bytes (0 = end of stream); 0: blocked
 * (d->wait_* set); -1: error. */
static int side_read(dir_t *d, side_t *s, char *p, size_t n, size_t *got, error_t_ *err) {
    if (s->ssl == NULL) {
        for (;;) {
            ssize_t r = recv(s->fd, p, n, 0);
            if (r >= 0) {
                *got = (size_t)r;
                /* A short read emptied the socket: edge-triggered epoll reports the next
                 * bytes or FIN, so skip the recv that would only say EAGAIN. Not once a
                 * FIN or an error was reported: its edge is spent, and the next recv
                 * says so. */
                if (r > 0 && (size_t)r < n && !s->hup) s->rd = 0;
                return 1;
            }
            if (errno != EINTR) return plain_failed(d, s, 1, err);
        }
    }
    p_ERR_clear_error();
    errno = 0;
    s->bio_short = 0;
    int ret = p_SSL_read_ex(s->ssl, p, n, got);
    if (ret == 1) {
        /* As for a plain short read: the socket is empty and OpenSSL holds nothing, so
         * skip the SSL_read that would only find EAGAIN; epoll reports the next bytes.
         * Not once a FIN or an error was reported (its edge is spent). */
        if (s->bio_short && !s->hup && !p_SSL_has_pending(s->ssl)) s->rd = 0;
        return 1;
    }
    int saved = errno;
    int code = p_SSL_get_error(s->ssl, ret);
    if (code == SSL_ERROR_ZERO_RETURN) { /* close_notify */
        p_ERR_clear_error();
        *got = 0;
        return 1;
    }
    return ssl_failed(d, s, ret, code, saved, err);
}

/* Write p[0:n] to s. 1: *put bytes written (TLS: all of them); 0: blocked; -1: error. */
static int side_write(dir_t *d, side_t *s, const char *p, size_t n, size_t *put,
                      error_t_ *err) {
    if (s->ssl == NULL) {
        for (;;) {
            ssize_t r = send(s->fd, p, n, MSG_NOSIGNAL);
            if (r >= 0) {
                *put = (size_t)r;
                if ((size_t)r < n) s->wr = 0; /* the socket buffer is full */
                return 1;
            }
            if (errno != EINTR) return plain_failed(d, s, 0, err);
        }
    }
    p_ERR_clear_error();
    errno = 0;
    /* More than a record: OpenSSL sends each record on its own. Corked, the kernel
     * sends them as one (one wake-up of the peer, fewer segments), at the uncork below:
     * 8-10 % less CPU for the pair in the bulk benchmark. */
    int corked = 0, on = 1, off = 0;
    if (n > TLS_RECORD) corked = setsockopt(s->fd, IPPROTO_TCP, TCP_CORK, &on, sizeof on) == 0;
    int ret = p_SSL_write_ex(s->ssl, p, n, put);
    if (corked) {
        int saved = errno;
        setsockopt(s->fd, IPPROTO_TCP, TCP_CORK, &off, sizeof off);
        errno = saved;
    }
    if (ret == 1) return 1;
    int saved = errno;
    return ssl_failed(d, s, ret, p_SSL_get_error(s->ssl, ret), saved, err);
}

/* Write what d holds (buf[off:len], or p[0:n] when buf is NULL, copied if it cannot
 * all go now). 1: all written; 0: blocked; -1: error. */
static int flush(dir_t *d, const char *p, size_t n, error_t_ *err) {
    if (d->buf == NULL && n > 0) {
        size_t put = 0;
        int r = side_write(d, d->dst, p, n, &put, err);
        if (r < 0) return -1;
        if (r == 1 && put == n) return 1;
        /* keep the rest; a TLS write must be retried with the very same bytes */
        size_t from = (r == 1) ? put : 0;
        d->buf = malloc(n - from);
        if (d->buf == NULL) {
            io_error(err, ENOMEM);
            return -1;
        }
        memcpy(d->buf, p + from, n - from);
        d->off = 0;
        d->len = n - from;
        if (r == 1) block(d, d->dst, 0); /* a plain socket took part of it: wait for room */
        return 0;
    }
    while (d->buf != NULL && d->off < d->len) {
        size_t put = 0;
        int r = side_write(d, d->dst, d->buf + d->off, d->len - d->off, &put, err);
        if (r <= 0) return r;
        d->off += put;
        if (d->off < d->len && d->dst->ssl == NULL) return block(d, d->dst, 0);
    }
    free(d->buf);
    d->buf = NULL;
    d->off = d->len = 0;
    return 1;
}

static Py_ssize_t unframe_(dir_t *d, char *p, size_t n, size_t max_payload, error_t_ *err);

/* Decode frames in place: p[0:n] holds TLS plaintext; payload bytes are moved to the
 * front. Returns the payload length, or -1 (err set, at the source). Sets d->ended on
 * END. */
static Py_ssize_t unframe(dir_t *d, char *p, size_t n, size_t max_payload, error_t_ *err) {
    Py_ssize_t out = unframe_(d, p, n, max_payload, err);
    if (out < 0) err->at = d->src;
    return out;
}

static Py_ssize_t unframe_(dir_t *d, char *p, size_t n, size_t max_payload, error_t_ *err) {
    size_t i = 0, out = 0;
    while (i < n) {
        if (d->ended) {
            frame_error(err, "data after END frame");
            return -1;
        }
        if (d->payload_left > 0) {
            size_t take = n - i < d->payload_left ? n - i : d->payload_left;
            memmove(p + out, p + i, take);
            out += take;
            i += take;
            d->payload_left -= take;
            continue;
        }
        while (d->hdr_have < HEADER && i < n) d->hdr[d->hdr_have++] = (unsigned char)p[i++];
        if (d->hdr_have < HEADER) break;
        d->hdr_have = 0;
        size_t size = ((size_t)d->hdr[1] << 16) | ((size_t)d->hdr[2] << 8) | d->hdr[3];
        if (d->hdr[0] == FRAME_DATA) {
            if (size == 0) {
                frame_error(err, "empty DATA frame");
                return -1;
            }
            if (size > max_payload) {
                snprintf(err->text, sizeof err->text,
                         "DATA frame of %zu bytes exceeds the limit of %zu", size, max_payload);
                err->kind = ERR_FRAME;
                return -1;
            }
            d->payload_left = size;
        } else if (d->hdr[0] == FRAME_END) {
            if (size != 0) {
                frame_error(err, "END frame with a payload");
                return -1;
            }
            d->ended = 1;
        } else {
            snprintf(err->text, sizeof err->text,
                     "unknown frame type 0x%02x (peer is not a meshagent/1 agent)", d->hdr[0]);
            err->kind = ERR_FRAME;
            return -1;
        }
    }
    return (Py_ssize_t)out;
}

/* Half-close dst. 1 done, 0 blocked (END frame pending), -1 error. */
static int send_eof(dir_t *d, error_t_ *err) {
    side_t *dst = d->dst;
    if (dst->kind == KIND_PLAIN) {
        if (shutdown(dst->fd, SHUT_WR) != 0 && errno != ENOTCONN) {
            io_error(err, errno);
            err->at = dst;
            return -1;
        }
        return 1;
    }
    if (dst->kind == KIND_FRAMED) {
        static const char end_frame[HEADER] = {FRAME_END, 0, 0, 0};
        return flush(d, end_frame, HEADER, err);
    }
    return 1; /* raw TLS cannot half-close */
}

static int runnable(dir_t *d) {
    if (d->done) return 0;
    if (d->wait_side == NULL) return 1;
    return d->wait_in ? d->wait_side->rd : d->wait_side->wr;
}

/* How much a bulk read takes: what dst's socket buffer has room for (its size less
 * what is queued, as the kernel counts both; less a sixteenth for the kernel's
 * overhead per packet and TLS's per record), between CHUNK and BIG_CHUNK, in whole
 * TLS records. Fewer, larger reads and writes mean fewer wake-ups of the peers (10-15 %
 * less CPU per GiB for the pair). Sized to the room, a write seldom blocks; when it
 * does (the kernel's accounting is not the whole story), the direction holds at most
 * BIG_CHUNK, and its next read is CHUNK again. */
static size_t bulk_size(side_t *dst) {
    uint32_t mem[SK_MEMINFO_VARS] = {0};
    socklen_t len = sizeof mem;
    if (getsockopt(dst->fd, SOL_SOCKET, SO_MEMINFO, mem, &len) != 0 ||
        len < sizeof(uint32_t) * (SK_MEMINFO_WMEM_QUEUED + 1))
        return CHUNK;
    uint32_t size = mem[SK_MEMINFO_SNDBUF], queued = mem[SK_MEMINFO_WMEM_QUEUED];
    size_t room = size > queued ? (size_t)(size - queued) : 0;
    room -= room / 16;
    if (room > BIG_CHUNK) room = BIG_CHUNK;
    room -= room % TLS_RECORD;
    return room < CHUNK ? CHUNK : room;
}

/* A source waits while more of a known length is on its way: the rest of a DATA frame
 * (its sender writes it whole) or of a copy (an HTTP body). Tell the kernel to wake
 * the engine once most of it is here (SO_RCVLOWAT: the rest less LOWAT_SLACK, for
 * what OpenSSL may hold of it, between CHUNK and BIG_CHUNK), not at each 64 KiB
 * segment, and for no longer than LOWAT_WAIT (lowat_expire drops the mark; the
 * kernel then reports what is there). A slow sender costs at most that much latency
 * per wait; a fast one a quarter of the wake-ups. Short rests, and a copy that is
 * done, put the mark back to 1. */
static uint64_t key_of(conn_t *c, int side);
static side_t *side_of(Engine *eng, uint64_t key);

static void lowat_drop(Engine *eng, int i) {
    eng->lowats[i] = eng->lowats[--eng->nlowats];
}

static void lowat_wait(Engine *eng, dir_t *d) {
    side_t *s = d->src;
    unsigned long long rest = 0;
    if (!d->done) {
        if (s->kind == KIND_FRAMED) rest = d->payload_left;
        else if (d->limit != 0) rest = d->limit - d->taken;
    }
    int want = 1;
    if (rest > LOWAT_SLACK + CHUNK) {
        rest -= LOWAT_SLACK;
        want = (int)(rest > BIG_CHUNK ? BIG_CHUNK : rest);
    }
    if (want == 1 && s->lowat <= 1) return; /* the common case: nothing to do */
    conn_t *c = s->conn;
    uint64_t key = key_of(c, s == &c->b);
    int i = 0;
    while (i < eng->nlowats && eng->lowats[i].key != key) i++;
    if (want > 1 && i == eng->nlowats) {
        if (eng->nlowats == LOWATS) want = 1; /* full: this one wakes per segment */
        else eng->lowats[eng->nlowats++].key = key;
    }
    if (want > 1) eng->lowats[i].until = now_seconds() + LOWAT_WAIT;
    else if (i < eng->nlowats) lowat_drop(eng, i);
    if (want != (s->lowat > 1 ? s->lowat : 1)) set_lowat(s, want);
}

/* Drop the marks whose wait is over (the kernel then reports the bytes there), and
 * the entries of sides that are gone or back to 1. Returns the milliseconds until
 * the next one is due, or -1 for none. With the lock held. */
static int lowat_expire(Engine *eng) {
    if (eng->nlowats == 0) return -1;
    double now = now_seconds(), next = 0;
    for (int i = 0; i < eng->nlowats;) {
        side_t *s = side_of(eng, eng->lowats[i].key);
        if (s == NULL || s->lowat <= 1) {
            lowat_drop(eng, i);
            continue;
        }
        if (eng->lowats[i].until <= now) {
            set_lowat(s, 1);
            lowat_drop(eng, i);
            continue;
        }
        if (next == 0 || eng->lowats[i].until < next) next = eng->lowats[i].until;
        i++;
    }
    if (next == 0) return -1;
    int ms = (int)((next - now) * 1000.0) + 1;
    return ms < 1 ? 1 : ms;
}

/* A TLS source gave *got bytes, one record's worth (SSL_read returns one record at a
 * time): read on into p[*got:room] while OpenSSL holds more or the socket may, so a
 * chunk goes on in one write, not one per record (a quarter of the sends and of the
 * peer's wake-ups in bulk). An end of stream stops it and is read again by the next
 * read (OpenSSL says close_notify on every SSL_read after one); an error after some
 * bytes is kept in d->late, reported once those went on. -1 only when out of memory
 * or on bad framing.
 *
 * A framed source (payload != NULL) has each record unframed as it comes, the first
 * one included (*payload: the payload so far, at the front of p), the next one read in
 * after it, and stops at the END frame: the record after it is the caller's next
 * stream (meshagent/2 sends OPEN once both directions ended), Python's to read. */
static int gather(Engine *eng, dir_t *d, char *p, size_t room, size_t *got, size_t *payload,
                  error_t_ *err) {
    side_t *s = d->src;
    if (payload != NULL) {
        Py_ssize_t n = unframe(d, p, *got, eng->max_payload, err);
        if (n < 0) return -1;
        *payload = (size_t)n;
    }
    size_t at = payload != NULL ? *payload : *got; /* where the next record goes */
    while (at < room && !d->ended && (s->rd || p_SSL_has_pending(s->ssl))) {
        size_t more = 0;
        error_t_ failed = {0, "", NULL};
        int r = side_read(d, s, p + at, room - at, &more, &failed);
        if (r == 0) break; /* blocked: d->wait_* says on what, as for any read */
        if (r < 0) {
            d->late = malloc(sizeof *d->late);
            if (d->late == NULL) {
                io_error(err, ENOMEM);
                return -1;
            }
            *d->late = failed;
            break;
        }
        if (more == 0) break; /* close_notify: the next read says it again */
        *got += more;
        if (payload == NULL) {
            at = *got;
            continue;
        }
        Py_ssize_t n = unframe(d, p + at, more, eng->max_payload, err);
        if (n < 0) return -1;
        *payload += (size_t)n;
        at = *payload;
    }
    return 1;
}

/* Move one direction on until it blocks, ends or spends its budget.
 * 1: budget spent (more to do); 0: blocked or done; -1: error. */
static int pump(Engine *eng, conn_t *c, dir_t *d, int *first_read, error_t_ *err) {
    d->wait_side = NULL;
    for (int budget = BUDGET;;) {
        if (d->buf != NULL) {
            int r = flush(d, NULL, 0, err);
            if (r <= 0) return r;
            if (d->eof_sent) { /* that was the END frame */
                d->done = 1;
                return 0;
            }
            d->count += d->payload;
            d->payload = 0;
            c->last = now_seconds();
        }
        if (d->limit != 0 && (d->taken == d->limit || (c->until_reply && c->replied))) {
            /* The copy is complete, or its destination spoke (an early answer): stop
             * with nothing half-written and no EOF; the count says which. */
            d->done = 1;
            lowat_wait(eng, d); /* its source's next reader expects every byte */
            return 0;
        }
        if (d->eof_in) {
            d->eof_sent = 1;
            int r = send_eof(d, err);
            if (r <= 0) return r;
            d->done = 1;
            return 0;
        }
        if (budget <= 0) return 1;
        if (d->late != NULL) { /* the bytes read before it went on */
            *err = *d->late;
            return -1;
        }
        if (!d->src->rd) { /* known empty: short read or want-read */
            lowat_wait(eng, d);
            return block(d, d->src, 1);
        }
        char *base = eng->scratch;
        size_t got = 0;
        size_t size = d->bulk ? bulk_size(d->dst) : CHUNK;
        budget -= (int)(size / CHUNK); /* the budget is in CHUNKs: a pass moves as much */
        /* A frame of exactly size bytes is whole TLS records; size bytes of payload
         * plus its header would cost one more record for 4 bytes. */
        size_t room = d->dst->kind == KIND_FRAMED ? size - HEADER : size;
        /* A copy reads no byte past its limit: what follows belongs to Python. */
        if (d->limit != 0 && d->limit - d->taken < room) room = (size_t)(d->limit - d->taken);
        int r = side_read(d, d->src, base + HEADER, room, &got, err);
        if (r == 0 && d->wait_side == d->src) lowat_wait(eng, d);
        if (r <= 0) return r;
        /* A framed source's payload (frames are taken record by record, see gather). */
        size_t payload = 0;
        int framed = d->src->kind == KIND_FRAMED;
        if (got > 0 && d->src->ssl != NULL &&
            gather(eng, d, base + HEADER, room, &got, framed ? &payload : NULL, err) < 0)
            return -1;
        d->bulk = got >= room; /* unless the write below blocks (framed: headers too) */
        d->taken += got;
        if (got == 0 && d->limit != 0) {
            snprintf(err->text, sizeof err->text,
                     "closed after %llu of %llu bytes", d->taken, d->limit);
            err->kind = ERR_IO;
            err->at = d->src;
            return -1;
        }
        if (got == 0) { /* end of stream: a FIN, or a TLS close_notify */
            if (d->src->kind == KIND_FRAMED && (d->hdr_have > 0 || d->payload_left > 0)) {
                frame_error(err, "connection closed inside a frame");
                err->at = d->src;
                return -1;
            }
            d->eof_in = 1;
            continue;
        }
        if (d->src->ssl != NULL && c->notify_first) *first_read = 1;
        if (framed) {
            got = payload;
            if (d->ended) d->eof_in = 1;
        }
        if (got == 0) continue;
        const char *p = base + HEADER;
        size_t n = got;
        if (d->dst->kind == KIND_FRAMED) {
            base[0] = FRAME_DATA;
            base[1] = (char)((got >> 16) & 0xFF);
            base[2] = (char)((got >> 8) & 0xFF);
            base[3] = (char)(got & 0xFF);
            p = base;
            n = got + HEADER;
        }
        r = flush(d, p, n, err);
        if (r < 0) return -1;
        if (r == 0) { /* kept in d->buf; counted once it went */
            d->payload = got;
            d->bulk = 0;
            return 0;
        }
        d->count += got;
        c->last = now_seconds();
    }
}

static unsigned long long handle_of(conn_t *c) {
    return ((unsigned long long)c->gen << 32) | c->slot;
}

static void signal_fd(int fd) {
    uint64_t one = 1;
    ssize_t r = write(fd, &one, sizeof one);
    (void)r; /* EAGAIN: the counter is already non-zero, readable anyway */
}

static void unready(Engine *eng, conn_t *c) {
    if (!c->ready) return;
    for (conn_t **p = &eng->ready_head; *p != NULL; p = &(*p)->next_ready) {
        if (*p == c) {
            *p = c->next_ready;
            break;
        }
    }
    c->ready = 0;
}

/* Put c on the done list for collect() (once), and wake the trio side. */
static void queue_done(Engine *eng, conn_t *c) {
    if (c->queued) return;
    c->queued = 1;
    c->next_done = eng->done_head;
    eng->done_head = c;
    signal_fd(eng->donefd);
}

/* c stops being pumped: out of epoll and the ready list, buffers freed. */
static void stop_pumping(Engine *eng, conn_t *c) {
    epoll_ctl(eng->epfd, EPOLL_CTL_DEL, c->a.fd, NULL);
    epoll_ctl(eng->epfd, EPOLL_CTL_DEL, c->b.fd, NULL);
    side_release(&c->a);
    side_release(&c->b);
    relay_drop_next(c->relay); /* offered, not switched to: Python's again */
    if (c->relay != NULL) relay_let_go(eng, c);
    for (int i = 0; i < 2; i++) {
        free(c->d[i].buf);
        c->d[i].buf = NULL;
        free(c->d[i].late);
        c->d[i].late = NULL;
    }
    unready(eng, c);
    eng->active--;
}

/* c ended: no longer pumped; reported by collect(), which then discards it. */
static void queue_summary(Engine *eng, conn_t *c);

static void finish(Engine *eng, conn_t *c, int status, error_t_ *err) {
    queue_summary(eng, c); /* a relay's last exchanges reach records() before its end */
    stop_pumping(eng, c);
    c->finished = 1;
    c->status = status;
    if (err != NULL) {
        int at = err->at == &c->a ? ERR_AT_A : err->at == &c->b ? ERR_AT_B : 0;
        c->error_kind = err->kind | at;
        c->error = strdup(err->text); /* NULL when out of memory: reported without text */
    }
    queue_done(eng, c);
}

/* Free c and its slot (finished and reported, or taken back by remove()). */
static void discard(Engine *eng, conn_t *c) {
    if (!c->finished) stop_pumping(eng, c);
    if (c->relay != NULL) relay_close_own(c); /* ended, its upstream not taken: remove() */
    if (c->queued) {
        for (conn_t **p = &eng->done_head; *p != NULL; p = &(*p)->next_done) {
            if (*p == c) {
                *p = c->next_done;
                break;
            }
        }
    }
    free(c->error);
    eng->slots[c->slot] = NULL;
    eng->gens[c->slot]++;
    eng->free_slots[eng->nfree++] = c->slot;
    conn_free(c);
}

/* ---- the HTTP/1.1 relay (Engine.relay) ---------------------------------------------
 *
 * An HTTP connection whose requests are plain (the common case) is served here, request
 * after request, without Python: a (downstream, upstream) pair is handed over at a
 * request boundary, and the relay reads a request head (and its small body), forwards
 * it with the hop-by-hop fields dropped and the configured fields dropped and added
 * (an outbound's: x-request-id and traceparent when missing, from getrandom, then
 * X-Forwarded-For), reads the response head, forwards it the same way and copies its
 * Content-Length body (as a copy does, with backpressure). Each finished exchange
 * becomes a record (Engine.records) for the metrics and the access log. A new TLS
 * upstream's first bytes pause the relay (FIRST_READ) while Python takes the session.
 *
 * Python stays the reference: the relay takes only messages whose bytes it can forward
 * exactly as http_proxy would, and hands everything else back untouched:
 * - at a request boundary (outcome RELAY_REQUEST), with the downstream bytes it read:
 *   a head it does not take (see relay_request_head), a body that does not fit RELAY_IN,
 *   an end of stream inside a request. Python then serves that request itself;
 * - after a request went up (RELAY_RESPONSE), with the request's bytes and the response
 *   bytes read so far: a response head it does not take (1xx, chunked or until-close
 *   bodies, odd forms), or an upstream that failed before its head (with why). Python
 *   then relays that response, or answers 502, as it always did.
 * It also ends at a boundary when the downstream closes (RELAY_CLOSED), after
 * `hold` seconds without a request (RELAY_IDLE: the upstream goes back to its pool
 * rather than wait with the client), when Python asked it to stop (relay_stop, for a
 * drain: RELAY_STOPPED), when a head takes more than head_seconds (RELAY_HEAD_TIMEOUT:
 * Python answers 408), after an exchange that closes the downstream (RELAY_CLOSE) and
 * after one that leaves the upstream unusable (RELAY_UPSTREAM_SPENT), and after
 * max_requests exchanges or max_seconds (RELAY_RENEW: an outbound chooses again). With
 * renew_ahead it does not end there: it reports RECORD_RENEW_DUE and goes on with its
 * upstream until relay_next() gives the next one, which it switches to when the next
 * request begins (RECORD_SWITCHED gives the previous one back), or none (RENEW at the
 * next boundary). A
 * failure after the response head went down is DONE_ERROR (Python closes both, as it
 * would), and no byte moved for idle seconds in the middle of an exchange is DONE_IDLE.
 */

#define RELAY_IN (64 * 1024)   /* downstream bytes held: a request head, its body, more */
#define RELAY_HEAD (16 * 1024) /* the longest head (request or response) the relay takes */
#define RELAY_LINE (8 * 1024)  /* the longest start line (Python's limit: 414 beyond) */
#define RELAY_FIELDS 100       /* the most fields (Python's limit: 431 beyond) */
#define RECORDS_MAX 65536      /* records held for records(); more are counted, dropped */
#define SUMMARY_EVERY 64       /* a summary goes to records() after this many exchanges */
#define SUMMARY_SECONDS 0.05   /* or at the first exchange this long after its first */
/* The relay's buffers start this small and double when full; a relay waiting for a
 * request holds none (release_buffers). */
#define RELAY_IN_FIRST 4096
#define RELAY_HEAD_FIRST 2048
/* Connects of relays' own (relay_reconnect) in progress at once, per engine: past it a
 * relay ends UPSTREAM_SPENT and the request waits in Python's line (the app pool's
 * bound, pool.MAX_CONNECTING_PER_KEY, is the same). */
#define RELAY_CONNECTS 64
#define APP_NOTSENT_LOWAT (16 * 1024) /* plainsocket.tune's */

enum { R_REQUEST, R_SEND, R_RESPONSE, R_REPLY, R_BODY };
enum {
    RELAY_CLOSED = 1, RELAY_IDLE, RELAY_STOPPED, RELAY_REQUEST, RELAY_HEAD_TIMEOUT,
    RELAY_UPSTREAM_SPENT, RELAY_CLOSE, RELAY_RESPONSE, RELAY_RENEW
};

/* Lower-case field names. */
typedef struct {
    char **name;
    size_t *len;
    int n;
} names_t;

/* What a relay does to every request (Engine.relay's arguments). */
typedef struct {
    names_t drop;   /* fields dropped */
    names_t refuse; /* fields that make a request Python's */
    char *add;      /* field lines added last ("Name: value\r\n"...) */
    size_t add_len;
    int gen_ids;    /* add x-request-id and traceparent when missing (an outbound) */
} edits_t;

#define IDS_HEX 80 /* hex digits a request's generated ids take: 32 + 32 + 16 */

typedef struct relay {
    edits_t edits;
    double hold, head_seconds;
    unsigned long long max_requests, served; /* a session's limit (0: none), and count */
    double renew_at; /* RENEW at the first boundary from then (0: never) */
    /* state */
    int state, stop, outcome, up_keep;
    char *in;           /* downstream bytes: the current request at in[0:req_len], then more */
    size_t in_len, in_cap, req_len;
    char *resp;         /* upstream bytes of a response head not complete yet */
    size_t resp_len, resp_cap;
    char *out;          /* a head (and body bytes) to write next */
    size_t out_len;
    int out_started;    /* out was given to flush(): the rest, if any, is in the dir's buf */
    int req_keep, head_method, down_close;
    unsigned long long body_left, body_total, bytes_in, bytes_out;
    double started, head_started;
    int status;
    char method[8];
    char *path, *request_id;
    char *error;        /* why the upstream failed before its response head (RELAY_RESPONSE) */
    int resp_unread;    /* resp holds bytes not looked at yet (a FIRST_READ pause) */
    char ids[IDS_HEX];  /* random hex for the next request's generated ids */
    int ids_ready;
    /* summarize: exchanges are summed up in sum, not recorded one by one */
    int summarize, nbounds;
    double bounds[SUMMARY_BOUNDS];
    summary_t sum;
    /* renewing ahead: at a block's end (max_requests, max_seconds) the relay reports
     * RECORD_RENEW_DUE once and goes on with its upstream until relay_next() gives the
     * next one (switched to at the next boundary) or none (renew_now: RENEW there) */
    int ahead, due_said, renew_now;
    double max_seconds;
    int next_ready, next_notify;
    side_t next_b;
    char *next_add;
    size_t next_add_len;
    /* reconnecting (Engine.relay's reconnect): a plain upstream spent by an exchange
     * (an app with keep-alive off) is replaced, once the next request begins, by a
     * connection the engine opens itself to `app`. spent: b may not carry another
     * request; connecting: b's connect is in progress; own_b: b's descriptor is the
     * engine's (closed by it, or handed to Python at the end: relay_result) */
    int reconnect, spent, connecting, own_b;
    struct sockaddr_storage app;
    socklen_t app_len;
    double connect_seconds, connect_started;
} relay_t;

/* -- heads: pure functions, also exposed for tests (relay_request_head & co) -- */

static int is_tchar(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch != 0 && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/* A request target the relay forwards as is: origin form, RFC 3986 characters only. */
static int is_target_char(unsigned char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           (ch != 0 && strchr("-._~!$&'()*+,;=:@/?%", ch) != NULL);
}

static int name_is(const char *p, size_t n, const char *lower) {
    return strlen(lower) == n && strncasecmp(p, lower, n) == 0;
}

/* A field line p[0:n] (no CRLF) in the one form the relay forwards unchanged: a token,
 * ": ", a value of visible ASCII with inner spaces or tabs, nothing around it. The
 * length of the name, or 0 for any other form (Python normalises those). */
static size_t field_name_len(const char *p, size_t n) {
    size_t i = 0;
    while (i < n && is_tchar((unsigned char)p[i])) i++;
    if (i == 0 || i + 2 >= n || p[i] != ':' || p[i + 1] != ' ') return 0;
    const unsigned char *v = (const unsigned char *)p + i + 2;
    size_t vn = n - i - 2;
    if (v[0] == ' ' || v[0] == '\t' || v[vn - 1] == ' ' || v[vn - 1] == '\t') return 0;
    for (size_t j = 0; j < vn; j++)
        if (!((v[j] >= 0x21 && v[j] <= 0x7E) || v[j] == ' ' || v[j] == '\t')) return 0;
    return i;
}

/* A Connection value of "close" / "keep-alive" tokens only: 1 (*close set), else 0. */
static int connection_tokens(const char *v, size_t n, int *close, int *keep_alive) {
    size_t i = 0;
    while (i <= n) {
        size_t j = i;
        while (j < n && v[j] != ',') j++;
        size_t a = i, b = j;
        while (a < b && (v[a] == ' ' || v[a] == '\t')) a++;
        while (b > a && (v[b - 1] == ' ' || v[b - 1] == '\t')) b--;
        if (name_is(v + a, b - a, "close")) *close = 1;
        else if (name_is(v + a, b - a, "keep-alive")) *keep_alive = 1;
        else return 0;
        i = j + 1;
    }
    return 1;
}

static int content_length(const char *v, size_t n, unsigned long long *out) {
    if (n == 0 || n > 15) return 0;
    unsigned long long x = 0;
    for (size_t i = 0; i < n; i++) {
        if (v[i] < '0' || v[i] > '9') return 0;
        x = x * 10 + (unsigned long long)(v[i] - '0');
    }
    *out = x;
    return 1;
}

/* Fields that never cross a proxy (protocol/headers.HOP_BY_HOP and every Proxy-*). */
static int hop_by_hop(const char *p, size_t n) {
    return name_is(p, n, "connection") || name_is(p, n, "keep-alive") || name_is(p, n, "te") ||
           name_is(p, n, "trailer") || name_is(p, n, "transfer-encoding") ||
           name_is(p, n, "upgrade") || (n >= 6 && strncasecmp(p, "proxy-", 6) == 0);
}

typedef struct {
    size_t head_len;          /* bytes through the blank line */
    size_t out_len;           /* the head to forward, built in out */
    unsigned long long body;  /* Content-Length (request), body bytes to copy (response) */
    int keep_alive;           /* request: the client keeps the connection; response: the upstream does */
    int down_close;           /* response: the downstream closes after it */
    const char *method, *path, *request_id;
    size_t method_len, path_len, request_id_len;
} head_t;

/* Where a head at the start of buf[0:len] ends: 1 with *end (its blank line's CRLF
 * CRLF), *head_len and *line (the start line's length) set; 0 when not complete yet;
 * -1 when too long for the relay. */
static int head_bounds(const char *buf, size_t len, const char **end, size_t *head_len,
                       size_t *line) {
    *end = memmem(buf, len, "\r\n\r\n", 4);
    if (*end == NULL) return len >= RELAY_HEAD ? -1 : 0;
    *head_len = (size_t)(*end - buf) + 4;
    if (*head_len > RELAY_HEAD) return -1;
    *line = (size_t)((const char *)memmem(buf, *head_len, "\r\n", 2) - buf);
    return *line > RELAY_LINE ? -1 : 1;
}

/* The next field line of a head: p (no CRLF) of *n bytes, its name of *k; stop is the
 * head's blank line. 1, or 0 after the last field; -1 when the line is not for the
 * relay (another form than "Name: value", or one field too many). */
static int next_field(const char **p, const char *stop, int *count, size_t *n, size_t *k) {
    if (*p >= stop + 2) return 0;
    *n = (size_t)((const char *)memmem(*p, (size_t)(stop + 2 - *p), "\r\n", 2) - *p);
    *k = field_name_len(*p, *n);
    return *k == 0 || ++*count > RELAY_FIELDS ? -1 : 1;
}

/* What both heads have: their framing and the fields that never cross a proxy. */
typedef struct {
    int lengths, close, keep;
    unsigned long long length;
} framing_t;

enum { F_KEEP, F_DROP, F_REFUSE };

/* A field of either head as for framing: Content-Length counted, Connection read
 * (close / keep-alive only) and dropped, Transfer-Encoding or a field named "close"
 * (which Connection could nominate) refused, the other hop-by-hop ones dropped. */
static int framing_field(framing_t *f, const char *p, size_t k, const char *v, size_t vn) {
    if (name_is(p, k, "content-length"))
        return ++f->lengths > 1 || !content_length(v, vn, &f->length) ? F_REFUSE : F_KEEP;
    if (name_is(p, k, "connection"))
        return connection_tokens(v, vn, &f->close, &f->keep) ? F_DROP : F_REFUSE;
    if (name_is(p, k, "transfer-encoding") || name_is(p, k, "close")) return F_REFUSE;
    return hop_by_hop(p, k) ? F_DROP : F_KEEP;
}

static const char *const METHODS[] = {"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS",
                                      "PATCH", NULL};

/* The request head at the start of buf[0:len], as the relay forwards it with edits,
 * written to out (room: RELAY_HEAD + 128 + add_len). 1: taken (h filled); 0: not
 * complete yet; -1: not for the relay (Python serves it). ids: IDS_HEX hex digits for
 * the ids edits->gen_ids adds (h->request_id may point into out). */
static int in_names(const names_t *names, const char *p, size_t k) {
    for (int i = 0; i < names->n; i++)
        if (names->len[i] == k && strncasecmp(p, names->name[i], k) == 0) return 1;
    return 0;
}

static int request_head(const char *buf, size_t len, const edits_t *edits, const char *ids,
                        char *out, head_t *h) {
    const char *end;
    size_t head_len, line;
    int found = head_bounds(buf, len, &end, &head_len, &line);
    if (found <= 0) return found;
    const char *sp = memchr(buf, ' ', line);
    if (sp == NULL) return -1;
    size_t mlen = (size_t)(sp - buf);
    int known = 0;
    for (int i = 0; METHODS[i] != NULL; i++)
        known |= strlen(METHODS[i]) == mlen && memcmp(buf, METHODS[i], mlen) == 0;
    if (!known || line < mlen + 11 || memcmp(buf + line - 9, " HTTP/1.1", 9) != 0) return -1;
    const char *target = sp + 1;
    size_t tlen = line - 9 - mlen - 1;
    if (tlen == 0 || target[0] != '/') return -1;
    size_t plen = tlen;
    for (size_t i = 0; i < tlen; i++) {
        if (!is_target_char((unsigned char)target[i])) return -1;
        if (target[i] == '?' && plen == tlen) plen = i;
    }
    memset(h, 0, sizeof *h);
    h->method = buf;
    h->method_len = mlen;
    h->path = target;
    h->path_len = plen;
    size_t o = line + 2;
    memcpy(out, buf, o);
    framing_t f = {0, 0, 0, 0};
    int hosts = 0, fields = 0, trace = 0, more;
    size_t n, k;
    for (const char *p = buf + line + 2; (more = next_field(&p, end, &fields, &n, &k)) != 0;
         p += n + 2) {
        if (more < 0) return -1;
        const char *v = p + k + 2;
        size_t vn = n - k - 2;
        /* Upgrade first: it is hop-by-hop too, but a request that has it is Python's. */
        int verdict = name_is(p, k, "upgrade") || name_is(p, k, "expect")
                          ? F_REFUSE
                          : framing_field(&f, p, k, v, vn);
        if (verdict == F_KEEP) {
            if (name_is(p, k, "host")) {
                hosts++;
            } else if (in_names(&edits->refuse, p, k)) {
                verdict = F_REFUSE;
            } else if (in_names(&edits->drop, p, k)) {
                verdict = F_DROP;
            } else if (h->request_id == NULL && name_is(p, k, "x-request-id")) {
                h->request_id = v;
                h->request_id_len = vn;
            } else if (name_is(p, k, "traceparent")) {
                trace = 1;
            }
        }
        if (verdict == F_REFUSE) return -1;
        if (verdict == F_KEEP) {
            memcpy(out + o, p, n + 2);
            o += n + 2;
        }
    }
    if (hosts != 1) return -1;
    h->body = f.length;
    if (edits->gen_ids && h->request_id == NULL) { /* as http_outbound._mesh_headers */
        memcpy(out + o, "x-request-id: ", 14);
        memcpy(out + o + 14, ids, 32);
        h->request_id = out + o + 14;
        h->request_id_len = 32;
        memcpy(out + o + 46, "\r\n", 2);
        o += 48;
    }
    if (edits->gen_ids && !trace) {
        memcpy(out + o, "traceparent: 00-", 16);
        memcpy(out + o + 16, ids + 32, 32);
        out[o + 48] = '-';
        memcpy(out + o + 49, ids + 64, 16);
        memcpy(out + o + 65, "-01\r\n", 5);
        o += 70;
    }
    memcpy(out + o, edits->add, edits->add_len);
    o += edits->add_len;
    memcpy(out + o, "\r\n", 2);
    h->out_len = o + 2;
    h->head_len = head_len;
    h->keep_alive = !f.close;
    return 1;
}

/* The response head at the start of buf[0:len] to a request (HEAD or not, whose client
 * keeps the connection or not), written to out as it goes down (room: RELAY_HEAD + 32).
 * The status (200..599) when taken, 0 when not complete yet, -1 when not for the relay. */
static int response_head(const char *buf, size_t len, int head_method, int req_keep, char *out,
                         head_t *h) {
    const char *end;
    size_t head_len, line;
    int found = head_bounds(buf, len, &end, &head_len, &line);
    if (found <= 0) return found;
    if (line < 13) return -1;
    int http11 = memcmp(buf, "HTTP/1.1 ", 9) == 0;
    if (!http11 && memcmp(buf, "HTTP/1.0 ", 9) != 0) return -1;
    if (buf[9] < '2' || buf[9] > '5' || buf[10] < '0' || buf[10] > '9' || buf[11] < '0' ||
        buf[11] > '9' || buf[12] != ' ')
        return -1;
    int status = (buf[9] - '0') * 100 + (buf[10] - '0') * 10 + (buf[11] - '0');
    for (size_t i = 13; i < line; i++) {
        unsigned char ch = (unsigned char)buf[i];
        if (!((ch >= 0x20 && ch <= 0x7E) || ch == '\t')) return -1;
    }
    if (line > 13 && (buf[line - 1] == ' ' || buf[line - 1] == '\t')) return -1;
    memset(h, 0, sizeof *h);
    memcpy(out, "HTTP/1.1", 8);
    memcpy(out + 8, buf + 8, line + 2 - 8);
    size_t o = line + 2;
    framing_t f = {0, 0, 0, 0};
    int fields = 0, more;
    size_t n, k;
    for (const char *p = buf + line + 2; (more = next_field(&p, end, &fields, &n, &k)) != 0;
         p += n + 2) {
        if (more < 0) return -1;
        int verdict = framing_field(&f, p, k, p + k + 2, n - k - 2);
        if (verdict == F_REFUSE) return -1;
        if (verdict == F_KEEP) {
            memcpy(out + o, p, n + 2);
            o += n + 2;
        }
    }
    if (head_method || status == 204 || status == 304) {
        h->body = 0;
    } else if (f.lengths == 1) {
        h->body = f.length;
    } else {
        return -1; /* until-close: Python re-chunks it */
    }
    h->keep_alive = http11 ? !f.close : f.keep;
    /* Only the client's own close ends its connection: an upstream's is hop-by-hop, and
     * this body's end is known to the client (a length, or none), so it stays open. */
    h->down_close = !req_keep;
    if (h->down_close) {
        memcpy(out + o, "Connection: close\r\n", 19);
        o += 19;
    }
    memcpy(out + o, "\r\n", 2);
    h->out_len = o + 2;
    h->head_len = head_len;
    return status;
}

/* -- the relay's I/O ------------------------------------------------------------------ */

static void due_soon(Engine *eng, double t);

/* Renewing ahead, the block's time is up and not said yet. */
static int renew_time_due(relay_t *r) {
    return r->ahead && !r->due_said && r->renew_at != 0;
}

/* When the relay's wait ends: a boundary holds `hold` (renewing ahead, it wakes at the
 * block's end to say so), a head head_seconds, the rest of an exchange the connection's
 * idle time. */
static double relay_deadline(conn_t *c) {
    relay_t *r = c->relay;
    if (r->connecting) return r->connect_started + r->connect_seconds;
    if (r->state == R_REQUEST && r->in_len == 0) {
        double t = c->last + r->hold;
        return renew_time_due(r) && r->renew_at < t ? r->renew_at : t;
    }
    if (r->state == R_REQUEST) return r->head_started + r->head_seconds;
    return c->last + c->idle;
}

static int relay_end(Engine *eng, conn_t *c, int outcome) {
    c->relay->outcome = outcome;
    finish(eng, c, DONE_OK, NULL);
    return -1;
}

/* The upstream failed or turned out not to be for the relay after the request went up:
 * Python takes the exchange over from the response (with why, if it failed). */
static int relay_hand_response(Engine *eng, conn_t *c, const char *why) {
    relay_t *r = c->relay;
    if (why != NULL) r->error = strdup(why);
    return relay_end(eng, c, RELAY_RESPONSE);
}

/* The next free record for records(), or NULL (full, or out of memory: the `lost`
 * exchanges are counted as dropped). */
static record_t *new_record(Engine *eng, conn_t *c, unsigned long long lost) {
    if (eng->nrecords >= RECORDS_MAX && lost > 0) { /* reports (lost 0) always get in */
        eng->records_dropped += lost;
        return NULL;
    }
    if (eng->nrecords == eng->records_cap) {
        size_t cap = eng->records_cap ? eng->records_cap * 2 : 64;
        record_t *more = realloc(eng->records, cap * sizeof *more);
        if (more == NULL) {
            eng->records_dropped += lost;
            return NULL;
        }
        eng->records = more;
        eng->records_cap = cap;
    }
    record_t *rec = &eng->records[eng->nrecords++];
    memset(rec, 0, sizeof *rec);
    rec->handle = handle_of(c);
    if (eng->nrecords == 1) signal_fd(eng->recfd);
    return rec;
}

/* The relay's summary so far goes to records() (if it holds any exchange). */
static void queue_summary(Engine *eng, conn_t *c) {
    relay_t *r = c->relay;
    if (r == NULL || r->sum.count == 0) return;
    summary_t *copy = malloc(sizeof *copy);
    record_t *rec = copy != NULL ? new_record(eng, c, r->sum.count) : NULL;
    if (rec != NULL) {
        memcpy(copy, &r->sum, sizeof *copy);
        copy->nfirst = r->nbounds + 1;
        rec->kind = RECORD_SUMMARY;
        rec->summary = copy;
    } else {
        if (copy == NULL) eng->records_dropped += r->sum.count;
        free(copy);
    }
    memset(&r->sum, 0, sizeof r->sum);
}

/* An exchange the relay finished, with the status it counts as. */
static void queue_record(Engine *eng, conn_t *c, int status) {
    relay_t *r = c->relay;
    double now = now_seconds(), seconds = now - r->started;
    if (r->summarize) {
        summary_t *s = &r->sum;
        if (s->count == 0) s->since = now;
        s->classes[status >= 100 && status < 600 ? status / 100 : 0]++;
        int i = 0; /* Python's bisect_left */
        while (i < r->nbounds && r->bounds[i] < seconds) i++;
        s->first[i]++;
        s->count++;
        s->total += seconds;
        if (s->count >= SUMMARY_EVERY || now - s->since >= SUMMARY_SECONDS)
            queue_summary(eng, c);
        return;
    }
    record_t *rec = new_record(eng, c, 1);
    if (rec == NULL) return;
    rec->status = status;
    rec->bytes_in = r->bytes_in;
    rec->bytes_out = r->bytes_out;
    rec->seconds = seconds;
    memcpy(rec->method, r->method, sizeof rec->method);
    rec->path = r->path; /* ownership moves to the record */
    rec->request_id = r->request_id;
    r->path = r->request_id = NULL;
}

/* The relay's block is over: say so once (records(), read with collect()'s), and go
 * on meanwhile. */
static void renew_due(Engine *eng, conn_t *c) {
    relay_t *r = c->relay;
    if (r->due_said) return;
    r->due_said = 1;
    record_t *rec = new_record(eng, c, 0);
    if (rec == NULL) return; /* out of memory: the block goes on until the relay ends */
    rec->kind = RECORD_RENEW_DUE;
    signal_fd(eng->donefd); /* now, not with the next batch: Python reads records then */
}

/* A renewing relay's block starts over: counted from now, its end not said yet. */
static void new_block(relay_t *r) {
    r->served = 0;
    r->due_said = 0;
    r->renew_at = r->max_seconds > 0 ? now_seconds() + r->max_seconds : 0;
}

/* At a request boundary: the upstream relay_next() gave replaces the current one,
 * which goes back to Python (RECORD_SWITCHED, after the exchanges it served), and a
 * new block begins. 0 when it could not be reported (out of memory: the next boundary
 * tries again), -1 when the new upstream cannot be watched (the relay ends). */
static int switch_upstream(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    queue_summary(eng, c); /* the old upstream's exchanges, under its labels */
    record_t *rec = new_record(eng, c, 0);
    if (rec == NULL) return 0;
    rec->kind = RECORD_SWITCHED;
    rec->reusable = r->up_keep;
    epoll_ctl(eng->epfd, EPOLL_CTL_DEL, c->b.fd, NULL);
    side_release(&c->b);
    c->b = r->next_b;
    c->b.conn = c;
    if (c->b.probed != NULL) p_BIO_set_callback_arg(c->b.probed, (char *)&c->b);
    memset(&r->next_b, 0, sizeof r->next_b);
    r->next_ready = 0;
    free(r->edits.add);
    r->edits.add = r->next_add;
    r->edits.add_len = r->next_add_len;
    r->next_add = NULL;
    c->notify_first = r->next_notify;
    r->up_keep = 1;
    new_block(r);
    if (watch(eng, c, 1, c->b.fd) != 0) {
        io_error(err, errno);
        r->up_keep = 0;
        return -1;
    }
    return 1;
}

/* n hex digits (n even) from the engine's pool of random bytes. */
static void random_hex(Engine *eng, char *out, size_t n) {
    static const char digits[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i += 2) {
        if (eng->random_used == 0 || eng->random_used >= sizeof eng->random) {
            size_t got = 0;
            while (got < sizeof eng->random) {
                ssize_t r = getrandom(eng->random + got, sizeof eng->random - got, 0);
                if (r > 0) got += (size_t)r;
                else if (errno != EINTR) break; /* cannot happen after boot; keep old bytes */
            }
            eng->random_used = 0;
        }
        unsigned char byte = eng->random[eng->random_used++];
        out[i] = digits[byte >> 4];
        out[i + 1] = digits[byte & 15];
    }
}

/* A request head (and its body) is complete in r->in: start the exchange. */
static void relay_begin(Engine *eng, conn_t *c, head_t *h) {
    relay_t *r = c->relay;
    size_t body = (size_t)h->body;
    r->req_len = h->head_len + body;
    r->out = malloc(h->out_len + body);
    /* out of memory: an empty out fails below as a write would (the relay ends) */
    if (r->out != NULL) {
        memcpy(r->out, eng->scratch, h->out_len);
        memcpy(r->out + h->out_len, r->in + h->head_len, body);
        r->out_len = h->out_len + body;
    }
    r->out_started = 0;
    r->req_keep = h->keep_alive;
    r->head_method = h->method_len == 4 && memcmp(h->method, "HEAD", 4) == 0;
    memcpy(r->method, h->method, h->method_len);
    r->method[h->method_len] = '\0';
    free(r->path);
    free(r->request_id);
    r->path = r->summarize ? NULL : strndup(h->path, h->path_len);
    r->request_id = h->request_id != NULL ? strndup(h->request_id, h->request_id_len) : NULL;
    r->ids_ready = 0; /* the next request gets new ones */
    r->bytes_in = body;
    r->bytes_out = 0;
    r->started = now_seconds();
    r->state = R_SEND;
}

/* Room for more in a relay buffer: first bytes when it has none (released, or not
 * made yet), else doubled up to max. 0 when it is at max already (or out of memory):
 * the relay hands over to Python. */
static int more_room(char **buf, size_t *cap, size_t first, size_t max) {
    if (*cap >= max) return 0;
    size_t bigger = *cap == 0 ? first : *cap * 2 < max ? *cap * 2 : max;
    char *p = realloc(*buf, bigger);
    if (p == NULL) return 0;
    *buf = p;
    *cap = bigger;
    return 1;
}

/* A relay waiting for its next request with nothing of it read gives its buffers
 * back (as OpenSSL's SSL_MODE_RELEASE_BUFFERS): an idle keep-alive connection then
 * holds none, whatever size its last exchange grew them to. The next read makes
 * them again (more_room). */
static void release_buffers(relay_t *r) {
    if (r->in_len == 0 && r->in != NULL) {
        free(r->in);
        r->in = NULL;
        r->in_cap = 0;
    }
    if (r->resp != NULL) { /* a response head is read only after a request went up */
        free(r->resp);
        r->resp = NULL;
        r->resp_cap = r->resp_len = 0;
    }
}

/* relay_reconnect's connect is no longer in progress (done, failed, or let go). */
static void connect_over(Engine *eng, relay_t *r) {
    if (!r->connecting) return;
    r->connecting = 0;
    eng->connecting--;
}

/* The connect of relay_reconnect failed (errno e, or 0: timed out): the request goes to
 * Python with why, which answers 502 with it (http_proxy: the relay's connect_failed). */
static int relay_connect_failed(Engine *eng, conn_t *c, int e) {
    relay_t *r = c->relay;
    connect_over(eng, r);
    char why[128];
    if (e == 0) {
        snprintf(why, sizeof why, "timed out"); /* as Python's connect says it */
    } else {
        error_t_ err = {0, "", NULL};
        io_error(&err, e);
        snprintf(why, sizeof why, "%s", err.text);
    }
    free(r->error);
    r->error = strdup(why);
    return relay_end(eng, c, RELAY_UPSTREAM_SPENT); /* b (spent, ours) is closed there */
}

/* A request begins and the upstream is spent (the app closed after its last answer):
 * replace it with a connection of the engine's own to the same app, rather than end
 * the relay for Python to connect (a connect, a relay started again, each request).
 * 1: connected, go on; 0: connecting (b's EPOLLOUT, or the connect timeout, steps the
 * relay again); -1: ended (the bound of connects at once reached: UPSTREAM_SPENT, and
 * Python connects as it would have; or the connect failed: relay_connect_failed). */
static int relay_reconnect(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    if (!r->connecting) {
        if (eng->connecting >= RELAY_CONNECTS) return relay_end(eng, c, RELAY_UPSTREAM_SPENT);
        int fd = socket(r->app.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0) return relay_connect_failed(eng, c, errno);
        int one = 1, lowat = APP_NOTSENT_LOWAT;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        setsockopt(fd, IPPROTO_TCP, TCP_NOTSENT_LOWAT, &lowat, sizeof lowat);
        int rc = connect(fd, (struct sockaddr *)&r->app, r->app_len);
        if (rc != 0 && errno != EINPROGRESS) {
            int e = errno;
            close(fd);
            return relay_connect_failed(eng, c, e);
        }
        /* The spent upstream leaves the engine: Python's is closed by Python at the end
         * (reported not reusable), one of ours is closed now. */
        epoll_ctl(eng->epfd, EPOLL_CTL_DEL, c->b.fd, NULL);
        side_release(&c->b);
        if (r->own_b) close(c->b.fd);
        memset(&c->b, 0, sizeof c->b);
        c->b.conn = c;
        c->b.fd = fd;
        c->b.kind = KIND_PLAIN;
        r->own_b = 1;
        r->up_keep = 0; /* until it served an exchange */
        if (watch(eng, c, 1, fd) != 0) {
            io_error(err, errno);
            err->at = &c->b;
            finish(eng, c, DONE_ERROR, err);
            return -1;
        }
        r->connecting = 1;
        eng->connecting++;
        r->connect_started = now_seconds();
        /* On loopback the handshake is done inside connect(2), though it says
         * EINPROGRESS: one poll spares a pass through epoll. */
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        if (rc == 0 || poll(&pfd, 1, 0) == 1) c->b.wr = 1;
    }
    if (!c->b.wr) {
        due_soon(eng, relay_deadline(c));
        return 0;
    }
    int e = 0;
    socklen_t len = sizeof e;
    if (getsockopt(c->b.fd, SOL_SOCKET, SO_ERROR, &e, &len) != 0) e = errno;
    if (e != 0) return relay_connect_failed(eng, c, e);
    connect_over(eng, r);
    r->spent = 0;
    r->up_keep = 1;
    c->b.rd = c->b.wr = 1; /* try first, as for any side */
    return 1;
}

/* R_REQUEST: read until a request is complete. 1 progress, 0 blocked, -1 ended. */
static int relay_request(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    if (r->renew_now) return relay_end(eng, c, RELAY_RENEW); /* relay_next(None) */
    if (r->in_len > 0) {
        if (r->spent) { /* a request begins after the app closed: connect it again */
            int k = relay_reconnect(eng, c, err);
            if (k <= 0) return k;
        }
        /* a request begins: to the next upstream, if there is one */
        if (r->next_ready && switch_upstream(eng, c, err) < 0) {
            finish(eng, c, DONE_ERROR, err);
            return -1;
        }
        head_t h;
        if (r->edits.gen_ids && !r->ids_ready) {
            random_hex(eng, r->ids, IDS_HEX);
            r->ids_ready = 1;
        }
        int taken = request_head(r->in, r->in_len, &r->edits, r->ids, eng->scratch, &h);
        if (taken < 0) return relay_end(eng, c, RELAY_REQUEST);
        if (taken > 0 && h.head_len + h.body > RELAY_IN) return relay_end(eng, c, RELAY_REQUEST);
        if (taken > 0 && h.head_len + h.body <= r->in_len) {
            relay_begin(eng, c, &h);
            return 1;
        }
    } else if (r->stop) {
        return relay_end(eng, c, RELAY_STOPPED);
    } else if (r->renew_at != 0 && !r->due_said && now_seconds() >= r->renew_at) {
        if (!r->ahead) return relay_end(eng, c, RELAY_RENEW); /* before a new request */
        renew_due(eng, c);
    }
    if (!c->a.rd) {
        release_buffers(r);
        return 0;
    }
    if (r->in_len == r->in_cap && !more_room(&r->in, &r->in_cap, RELAY_IN_FIRST, RELAY_IN))
        return relay_end(eng, c, RELAY_REQUEST);
    size_t got = 0;
    dir_t reading = {0}; /* side_read's wait bookkeeping: the relay waits on a.rd itself */
    int rr = side_read(&reading, &c->a, r->in + r->in_len, r->in_cap - r->in_len, &got, err);
    if (rr == 0) {
        release_buffers(r);
        return 0;
    }
    if (rr < 0) /* dropped between or inside requests: Python ends it quietly, as its own */
        return relay_end(eng, c, RELAY_CLOSED);
    if (got == 0) /* end of stream: a clean end, or (inside a request) Python's 400 */
        return relay_end(eng, c, r->in_len == 0 ? RELAY_CLOSED : RELAY_REQUEST);
    double now = now_seconds();
    if (r->in_len == 0) {
        r->head_started = now;
        due_soon(eng, now + r->head_seconds);
    }
    r->in_len += got;
    c->last = now;
    return 1;
}

/* Write r->out on d (given to flush once; flush keeps what could not go at once).
 * 1 all written, 0 blocked, -1 failed (err set). */
static int relay_write(conn_t *c, dir_t *d, error_t_ *err) {
    relay_t *r = c->relay;
    if (r->out_started && d->wait_side != NULL &&
        !(d->wait_in ? d->wait_side->rd : d->wait_side->wr))
        return 0;
    d->wait_side = NULL;
    int w;
    if (!r->out_started) {
        r->out_started = 1;
        if (r->out == NULL) {
            io_error(err, ENOMEM);
            return -1;
        }
        w = flush(d, r->out, r->out_len, err);
        free(r->out);
        r->out = NULL;
    } else {
        w = flush(d, NULL, 0, err);
    }
    if (w == 1) c->last = now_seconds();
    return w;
}

/* R_SEND: the request goes up. */
static int relay_send(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    int w = relay_write(c, &c->d[0], err);
    if (w < 0) return relay_hand_response(eng, c, err->text);
    if (w == 0) return 0;
    r->resp_len = 0;
    r->state = R_RESPONSE;
    return 1;
}

/* R_RESPONSE: read until the response head is complete. */
static int relay_response(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    if (!r->resp_unread) { /* bytes read before a FIRST_READ pause are looked at first */
        if (!c->b.rd) return 0;
        if (r->resp_len == r->resp_cap &&
            !more_room(&r->resp, &r->resp_cap, RELAY_HEAD_FIRST, RELAY_HEAD))
            return relay_hand_response(eng, c, NULL);
        size_t got = 0;
        dir_t reading = {0};
        int rr = side_read(&reading, &c->b, r->resp + r->resp_len, r->resp_cap - r->resp_len,
                           &got, err);
        if (rr == 0) return 0;
        if (rr < 0) return relay_hand_response(eng, c, err->text);
        if (got == 0) return relay_hand_response(eng, c, NULL); /* Python reads the end */
        r->resp_len += got;
        c->last = now_seconds();
        if (c->notify_first && c->b.ssl != NULL) {
            /* A new TLS connection's first bytes: its session ticket came with them.
             * Python takes the session (FIRST_READ) while the relay waits. */
            c->notify_first = 0;
            c->first_due = 1;
            c->paused = 1;
            r->resp_unread = 1;
            queue_done(eng, c);
            return 0;
        }
    }
    r->resp_unread = 0;
    head_t h;
    int status = response_head(r->resp, r->resp_len, r->head_method, r->req_keep,
                               eng->scratch, &h);
    if (status < 0) return relay_hand_response(eng, c, NULL);
    if (status == 0) return 1;
    size_t extra = r->resp_len - h.head_len; /* body bytes read with the head */
    size_t body_now = extra < h.body ? extra : (size_t)h.body;
    r->out = malloc(h.out_len + body_now);
    if (r->out != NULL) {
        memcpy(r->out, eng->scratch, h.out_len);
        memcpy(r->out + h.out_len, r->resp + h.head_len, body_now);
        r->out_len = h.out_len + body_now;
    }
    r->out_started = 0;
    r->status = status;
    r->bytes_out = body_now;
    r->body_left = h.body - body_now;
    r->body_total = h.body;
    r->down_close = h.down_close;
    /* Bytes past the response: the upstream broke HTTP; it is not used again. */
    r->up_keep = h.keep_alive && extra <= h.body;
    r->state = R_REPLY;
    return 1;
}

/* A failure once the response head went down: counted as Python counts it (502), and
 * the connection ends with the error. */
static int relay_fail(Engine *eng, conn_t *c, error_t_ *err) {
    queue_record(eng, c, 502);
    finish(eng, c, DONE_ERROR, err);
    return -1;
}

/* The exchange ended well: record it, then the next request, or the end. */
static int relay_done(Engine *eng, conn_t *c) {
    relay_t *r = c->relay;
    queue_record(eng, c, r->status);
    memmove(r->in, r->in + r->req_len, r->in_len - r->req_len);
    r->in_len -= r->req_len;
    r->req_len = 0;
    for (int i = 0; i < 2; i++) {
        dir_t *d = &c->d[i];
        d->limit = d->taken = 0;
        d->done = d->eof_in = d->eof_sent = 0;
        d->wait_side = NULL;
    }
    r->state = R_REQUEST;
    if (r->down_close) return relay_end(eng, c, RELAY_CLOSE);
    if (!r->up_keep) {
        if (!r->reconnect) return relay_end(eng, c, RELAY_UPSTREAM_SPENT);
        r->spent = 1; /* replaced when the next request begins (relay_reconnect) */
    }
    if (r->max_requests != 0 && ++r->served >= r->max_requests) {
        if (!r->ahead) return relay_end(eng, c, RELAY_RENEW); /* Python chooses again */
        renew_due(eng, c);
    }
    double now = now_seconds();
    c->last = now;
    r->head_started = now;
    due_soon(eng, relay_deadline(c));
    return 1;
}

/* R_REPLY: the response head (and the body bytes that came with it) goes down. */
static int relay_reply(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    int w = relay_write(c, &c->d[1], err);
    if (w < 0) return relay_fail(eng, c, err);
    if (w == 0) return 0;
    if (r->body_left == 0) return relay_done(eng, c);
    dir_t *d = &c->d[1]; /* the rest of the body: a copy from b to a */
    d->limit = r->body_left;
    d->taken = 0;
    d->done = 0;
    d->wait_side = NULL;
    r->state = R_BODY;
    return 1;
}

/* R_BODY: the copy of the response body. 1 when its budget was spent. */
static int relay_body(Engine *eng, conn_t *c, error_t_ *err) {
    relay_t *r = c->relay;
    dir_t *d = &c->d[1];
    if (!runnable(d) && !d->done) return 0;
    int first = 0;
    unsigned long long before = d->taken;
    int p = d->done ? 0 : pump(eng, c, d, &first, err);
    r->bytes_out += d->taken - before;
    if (p < 0 && strncmp(err->text, "closed after", 12) == 0)
        snprintf(err->text, sizeof err->text, "closed after %llu of %llu body bytes",
                 r->bytes_out, r->body_total);
    if (p < 0) return relay_fail(eng, c, err);
    if (d->done) return relay_done(eng, c);
    return p; /* 1: budget spent, go on; 0: blocked */
}

static void relay_step(Engine *eng, conn_t *c) {
    error_t_ err = {0, "", NULL};
    for (int budget = BUDGET; budget > 0; budget--) {
        int res;
        switch (c->relay->state) {
        case R_REQUEST: res = relay_request(eng, c, &err); break;
        case R_SEND: res = relay_send(eng, c, &err); break;
        case R_RESPONSE: res = relay_response(eng, c, &err); break;
        case R_REPLY: res = relay_reply(eng, c, &err); break;
        default: res = relay_body(eng, c, &err); break;
        }
        if (res < 0) return; /* ended */
        if (res == 0) {      /* blocked: an event steps it again, or its deadline */
            /* A new state may wait less than the timer is set for (a response: the
             * idle time, where a head had head_seconds). */
            due_soon(eng, relay_deadline(c));
            return;
        }
    }
    if (!c->ready) { /* budget spent: after whatever else epoll has */
        c->ready = 1;
        c->next_ready = eng->ready_head;
        eng->ready_head = c;
    }
}

/* The relay's wait ran out (process()'s scan). */
static void relay_expired(Engine *eng, conn_t *c) {
    relay_t *r = c->relay;
    if (r->connecting) {
        relay_connect_failed(eng, c, 0);
        return;
    }
    if (r->state == R_SEND || r->state == R_RESPONSE) {
        /* No answer for the idle time: Python answers 502 with why (nothing went down). */
        char why[96];
        snprintf(why, sizeof why, "no byte moved for %gs before the response", c->idle);
        relay_hand_response(eng, c, why);
        return;
    }
    if (r->state != R_REQUEST) { /* inside the response: cut, counted as Python counts it */
        queue_record(eng, c, 502);
        finish(eng, c, DONE_IDLE, NULL);
        return;
    }
    if (r->in_len == 0) {
        if (renew_time_due(r) && now_seconds() < c->last + r->hold) {
            renew_due(eng, c); /* the block's time, not the hold: Python chooses meanwhile */
            return;
        }
        relay_end(eng, c, RELAY_IDLE);
        return;
    }
    head_t h;
    int taken = request_head(r->in, r->in_len, &r->edits, r->ids, eng->scratch, &h);
    /* a head that took too long gets Python's 408; a body that did goes to Python */
    relay_end(eng, c, taken > 0 ? RELAY_REQUEST : RELAY_HEAD_TIMEOUT);
}

static void free_records(record_t *recs, size_t n) {
    for (size_t i = 0; i < n; i++) {
        free(recs[i].path);
        free(recs[i].request_id);
        free(recs[i].summary);
    }
    free(recs);
}

static void edits_free(edits_t *e);

/* An upstream relay_next() gave and the relay did not switch to goes back as it was. */
static void relay_drop_next(relay_t *r) {
    if (r == NULL || !r->next_ready) return;
    side_release(&r->next_b);
    free(r->next_add);
    r->next_add = NULL;
    r->next_ready = 0;
}

/* The engine stops pumping a relay's connection: a connect of its own in progress no
 * longer counts; an upstream of its own goes to Python with the relay's end
 * (relay_result) when it may serve again, and is closed otherwise (spent, failed, or
 * no end: an error, remove()). */
static void relay_let_go(Engine *eng, conn_t *c) {
    relay_t *r = c->relay;
    connect_over(eng, r);
    if (r->spent || r->outcome == 0) relay_close_own(c);
}

/* Close b if it is the engine's own (not handed to Python by relay_result). */
static void relay_close_own(conn_t *c) {
    if (!c->relay->own_b) return;
    close(c->b.fd);
    c->relay->own_b = 0;
}

static void relay_free(relay_t *r) {
    if (r == NULL) return;
    relay_drop_next(r);
    edits_free(&r->edits);
    free(r->in);
    free(r->resp);
    free(r->out);
    free(r->path);
    free(r->request_id);
    free(r->error);
    free(r);
}

static void due_soon(Engine *eng, double t) {
    if (t < eng->next_scan) {
        eng->next_scan = t;
        arm(eng);
    }
}

/* Work on c until every direction blocked, ended or spent its budget. */
static void step(Engine *eng, conn_t *c) {
    if (c->paused || c->finished) return;
    if (c->relay != NULL) {
        relay_step(eng, c);
        return;
    }
    error_t_ err = {0, "", NULL};
    int more = 0, first = 0;
    /* A copy whose destination spoke ends now, unless a write is half done (it ends
     * once that went: pump() checks again after every write). */
    if (c->until_reply && c->replied && c->d[0].buf == NULL) c->d[0].done = 1;
    for (int i = 0; i < 2; i++) {
        dir_t *d = &c->d[i];
        if (!runnable(d)) continue;
        int r = pump(eng, c, d, &first, &err);
        if (r < 0) {
            finish(eng, c, DONE_ERROR, &err);
            return;
        }
        if (r == 1) more = 1;
    }
    if ((c->d[0].done && c->d[1].done) || (c->either_end && (c->d[0].done || c->d[1].done))) {
        finish(eng, c, DONE_OK, NULL);
        return;
    }
    if (first) {
        /* Python reads the TLS session now; the SSL object is not touched meanwhile. */
        c->notify_first = 0;
        c->first_due = 1;
        c->paused = 1;
        queue_done(eng, c);
        return;
    }
    if (more && !c->ready) {
        c->ready = 1;
        c->next_ready = eng->ready_head;
        eng->ready_head = c;
    }
}

static uint64_t key_of(conn_t *c, int side) {
    return ((uint64_t)c->gen << 32) | ((uint64_t)c->slot << 1) | (uint64_t)side;
}

/* Watch a side's socket (edge-triggered, both ways): epoll_ctl's result. */
static int watch(Engine *eng, conn_t *c, int side, int fd) {
    struct epoll_event ev;
    ev.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET;
    ev.data.u64 = key_of(c, side);
    return epoll_ctl(eng->epfd, EPOLL_CTL_ADD, fd, &ev);
}

static side_t *side_of(Engine *eng, uint64_t key) {
    uint32_t gen = (uint32_t)(key >> 32), slot = (uint32_t)(key & 0xFFFFFFFFu) >> 1;
    if (gen == 0 || slot >= eng->nslots) return NULL;
    conn_t *c = eng->slots[slot];
    if (c == NULL || c->gen != gen || c->finished) return NULL;
    return (key & 1) ? &c->b : &c->a;
}

/* One pass: the events, the ready list, idle expiry. Called with the lock held. */
static void process(Engine *eng, struct epoll_event *events, int n) {
    conn_t *ready = eng->ready_head;
    eng->ready_head = NULL;
    int scan = 0;
    for (int i = 0; i < n; i++) {
        uint64_t key = events[i].data.u64;
        if (key == KEY_KICK || key == KEY_TIMER) {
            uint64_t drained;
            ssize_t r = read(key == KEY_KICK ? eng->kickfd : eng->timerfd, &drained,
                             sizeof drained);
            (void)r;
            if (key == KEY_TIMER) scan = 1;
            continue;
        }
        side_t *s = side_of(eng, key);
        if (s == NULL) continue;
        uint32_t ev = events[i].events;
        if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
            s->rd = 1;
            if (s == &s->conn->b) s->conn->replied = 1;
        }
        if (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) s->hup = 1;
        if (ev & (EPOLLOUT | EPOLLHUP | EPOLLERR)) s->wr = 1;
    }
    /* The ready list was taken whole: steps push onto a new one. A connection may be
     * stepped twice here (ready, and an event on each socket): harmless, as a step of
     * a finished or paused connection does nothing, and finished connections stay
     * allocated until collect(), which needs the lock this pass holds. */
    while (ready != NULL) {
        conn_t *c = ready;
        ready = c->next_ready;
        c->ready = 0;
        step(eng, c);
    }
    for (int i = 0; i < n; i++) {
        side_t *s = side_of(eng, events[i].data.u64);
        if (s != NULL) step(eng, s->conn);
    }
    double now = now_seconds();
    if (scan || now >= eng->next_scan) {
        double next = 1e300;
        for (uint32_t i = 0; i < eng->nslots; i++) {
            conn_t *c = eng->slots[i];
            if (c == NULL || c->finished) continue;
            double due = c->relay != NULL ? relay_deadline(c) : c->last + c->idle;
            if (now >= due) {
                if (c->relay != NULL) relay_expired(eng, c);
                else finish(eng, c, DONE_IDLE, NULL);
                due = c->relay != NULL && !c->finished ? relay_deadline(c) : next;
                if (due < next) next = due; /* a relay woken for its block's end waits on */
            } else if (due < next) {
                next = due;
            }
        }
        eng->next_scan = next;
        arm(eng);
    }
}

/* ---- the Python type -------------------------------------------------------------- */

static int Engine_init(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"max_payload", NULL};
    Py_ssize_t max_payload = 256 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|n", kwlist, &max_payload)) return -1;
    if (max_payload < 1 || max_payload >= (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "max_payload must be 1..16777215");
        return -1;
    }
    if (self->epfd > 0) {
        PyErr_SetString(PyExc_RuntimeError, "Engine.__init__ called twice");
        return -1;
    }
    self->max_payload = (size_t)max_payload;
    self->next_scan = 1e300;
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->kickfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->donefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    self->timerfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    self->recfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->epfd < 0 || self->kickfd < 0 || self->donefd < 0 || self->timerfd < 0 ||
        self->recfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN};
    ev.data.u64 = KEY_KICK;
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->kickfd, &ev) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    ev.data.u64 = KEY_TIMER;
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->timerfd, &ev) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->scratch = malloc(BIG_CHUNK + HEADER);
    if (self->scratch == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    pthread_mutex_init(&self->lock, NULL);
    return 0;
}

/* Fire the timer at next_scan (monotonic seconds), or never. */
static void arm(Engine *self) {
    struct itimerspec at = {{0, 0}, {0, 0}};
    if (self->next_scan < 1e299) {
        double t = self->next_scan;
        at.it_value.tv_sec = (time_t)t;
        at.it_value.tv_nsec = (long)((t - (double)(time_t)t) * 1e9);
        if (at.it_value.tv_sec == 0 && at.it_value.tv_nsec == 0) at.it_value.tv_nsec = 1;
    }
    timerfd_settime(self->timerfd, TFD_TIMER_ABSTIME, &at, NULL);
}

static void Engine_dealloc(Engine *self) {
    /* serve() holds a reference while it runs: no thread is in the engine here. */
    for (uint32_t i = 0; i < self->nslots; i++)
        if (self->slots[i] != NULL) discard(self, self->slots[i]);
    free(self->slots);
    free(self->gens);
    free(self->free_slots);
    free(self->scratch);
    free_records(self->records, self->nrecords);
    if (self->recfd > 0) close(self->recfd);
    if (self->epfd > 0) {
        close(self->epfd);
        close(self->kickfd);
        close(self->donefd);
        close(self->timerfd);
        pthread_mutex_destroy(&self->lock);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Engine_done_fileno(Engine *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(self->donefd);
}

/* The SSL of an _ssl._SSLSocket whose descriptor is fd (NULL with an exception set). */
static SSL *ssl_of(PyObject *sslobj, int fd) {
    if (strcmp(Py_TYPE(sslobj)->tp_name, "_ssl._SSLSocket") != 0) {
        PyErr_Format(PyExc_TypeError, "expected an _ssl._SSLSocket, got %s",
                     Py_TYPE(sslobj)->tp_name);
        return NULL;
    }
    SSL *ssl = ((PySSLSocketHead *)sslobj)->ssl;
    if (ssl == NULL || p_SSL_get_fd(ssl) != fd) {
        PyErr_SetString(PyExc_RuntimeError,
                        "the TLS object does not match its socket (unknown _ssl layout)");
        return NULL;
    }
    return ssl;
}

static int side_from(side_t *s, int fd, PyObject *sslobj, int kind) {
    s->fd = fd;
    s->kind = kind;
    s->rd = s->wr = 1;
    s->ssl = NULL;
    if (kind != KIND_PLAIN && kind != KIND_FRAMED && kind != KIND_RAW) {
        PyErr_SetString(PyExc_ValueError, "unknown side kind");
        return -1;
    }
    if ((kind == KIND_PLAIN) != (sslobj == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "a plain side has no TLS object, a TLS side needs one");
        return -1;
    }
    if (kind == KIND_PLAIN) return 0;
    if (!load_ssl()) {
        PyErr_SetString(PyExc_RuntimeError, ssl_problem);
        return -1;
    }
    SSL *ssl = ssl_of(sslobj, fd);
    if (ssl == NULL) return -1;
    if (!p_SSL_is_init_finished(ssl)) {
        PyErr_SetString(PyExc_RuntimeError, "the TLS handshake is not done");
        return -1;
    }
    p_SSL_ctrl(ssl, SSL_CTRL_MODE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, NULL);
    /* One recv per record (or several), not one for the 5-byte header and one for the
     * body. The engine reads until OpenSSL asks for the socket, so records read ahead
     * into OpenSSL's buffer are never left behind a wait. */
    p_SSL_set_read_ahead(ssl, 1);
    s->ssl = ssl;
    BIO *rbio = p_SSL_get_rbio(ssl);
    if (rbio != NULL) {
        p_BIO_set_callback_arg(rbio, (char *)s);
        p_BIO_set_callback_ex(rbio, read_probe);
        s->probed = rbio;
    }
    return 0;
}

static int grow(Engine *self) {
    uint32_t n = self->nslots ? self->nslots * 2 : 64;
    if (n > (1u << 30)) return -1;
    conn_t **slots = realloc(self->slots, n * sizeof *slots);
    if (slots == NULL) return -1;
    self->slots = slots;
    uint32_t *gens = realloc(self->gens, n * sizeof *gens);
    if (gens == NULL) return -1;
    self->gens = gens;
    uint32_t *free_slots = realloc(self->free_slots, n * sizeof *free_slots);
    if (free_slots == NULL) return -1;
    self->free_slots = free_slots;
    for (uint32_t i = self->nslots; i < n; i++) {
        slots[i] = NULL;
        gens[i] = 1;
    }
    for (uint32_t i = n; i > self->nslots; i--) free_slots[self->nfree++] = i - 1;
    self->nslots = n;
    return 0;
}

/* Register c (its sides set up) in the engine: a slot, epoll, a first pass. Frees c and
 * raises on failure; returns the handle. */
static PyObject *enlist(Engine *self, conn_t *c, int afd, int bfd) {
    pthread_mutex_lock(&self->lock);
    if (self->nfree == 0 && grow(self) < 0) {
        pthread_mutex_unlock(&self->lock);
        conn_free(c);
        return PyErr_NoMemory();
    }
    c->slot = self->free_slots[--self->nfree];
    c->gen = self->gens[c->slot];
    int failed = watch(self, c, 0, afd) != 0;
    if (!failed) {
        failed = watch(self, c, 1, bfd) != 0;
        if (failed) {
            int saved = errno;
            epoll_ctl(self->epfd, EPOLL_CTL_DEL, afd, NULL);
            errno = saved;
        }
    }
    if (failed) {
        int saved = errno;
        self->free_slots[self->nfree++] = c->slot;
        pthread_mutex_unlock(&self->lock);
        conn_free(c);
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->slots[c->slot] = c;
    self->active++;
    /* First pass from the ready list: bytes may already wait inside OpenSSL. */
    c->ready = 1;
    c->next_ready = self->ready_head;
    self->ready_head = c;
    due_soon(self, c->relay != NULL ? relay_deadline(c) : c->last + c->idle);
    unsigned long long handle = handle_of(c);
    pthread_mutex_unlock(&self->lock);
    signal_fd(self->kickfd);
    return PyLong_FromUnsignedLongLong(handle);
}

static PyObject *Engine_add(Engine *self, PyObject *args) {
    int afd, akind, bfd, bkind, notify;
    PyObject *assl, *bssl;
    double idle;
    unsigned long long limit = 0;
    int flags = 0;
    if (!PyArg_ParseTuple(args, "iOiiOidp|Ki", &afd, &assl, &akind, &bfd, &bssl, &bkind, &idle,
                          &notify, &limit, &flags))
        return NULL;
    if (limit != 0 && (akind == KIND_FRAMED || bkind == KIND_FRAMED)) {
        PyErr_SetString(PyExc_ValueError, "a copy with a limit takes plain or raw TLS sides");
        return NULL;
    }
    if ((flags & ~(FLAG_UNTIL_REPLY | FLAG_EITHER_END)) != 0 ||
        ((flags & FLAG_UNTIL_REPLY) && limit == 0) || ((flags & FLAG_EITHER_END) && limit != 0)) {
        PyErr_SetString(PyExc_ValueError,
                        "UNTIL_REPLY needs a limit, EITHER_END takes none, no other flags");
        return NULL;
    }
    if (afd < 0 || bfd < 0 || afd == bfd) {
        PyErr_SetString(PyExc_ValueError, "two distinct open descriptors are needed");
        return NULL;
    }
    if (!(idle > 0)) {
        PyErr_SetString(PyExc_ValueError, "idle must be > 0 seconds");
        return NULL;
    }
    conn_t *c = calloc(1, sizeof *c);
    if (c == NULL) return PyErr_NoMemory();
    if (side_from(&c->a, afd, assl, akind) < 0 || side_from(&c->b, bfd, bssl, bkind) < 0) {
        conn_free(c);
        return NULL;
    }
    c->a.conn = c->b.conn = c;
    c->d[0].src = &c->a;
    c->d[0].dst = &c->b;
    c->d[1].src = &c->b;
    c->d[1].dst = &c->a;
    if (limit != 0) { /* one way: a to b, limit bytes, then done without an EOF */
        c->d[0].limit = limit;
        c->d[1].done = 1;
        c->until_reply = (flags & FLAG_UNTIL_REPLY) != 0;
    }
    c->either_end = (flags & FLAG_EITHER_END) != 0;
    c->idle = idle;
    c->last = now_seconds();
    c->notify_first = notify;
    return enlist(self, c, afd, bfd);
}

static conn_t *lookup(Engine *self, PyObject *arg, unsigned long long *handle) {
    unsigned long long h = PyLong_AsUnsignedLongLong(arg);
    *handle = h;
    if (h == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    uint32_t slot = (uint32_t)(h & 0xFFFFFFFFu), gen = (uint32_t)(h >> 32);
    if (slot >= self->nslots || self->slots[slot] == NULL || self->slots[slot]->gen != gen)
        return NULL;
    return self->slots[slot];
}

static PyObject *Engine_remove(Engine *self, PyObject *arg) {
    unsigned long long h;
    pthread_mutex_lock(&self->lock);
    conn_t *c = lookup(self, arg, &h);
    if (c == NULL) {
        pthread_mutex_unlock(&self->lock);
        if (PyErr_Occurred()) return NULL;
        Py_RETURN_NONE;
    }
    unsigned long long a = c->d[0].count, b = c->d[1].count;
    discard(self, c);
    pthread_mutex_unlock(&self->lock);
    return Py_BuildValue("(KK)", a, b);
}

static PyObject *Engine_resume(Engine *self, PyObject *arg) {
    unsigned long long h;
    pthread_mutex_lock(&self->lock);
    conn_t *c = lookup(self, arg, &h);
    int wake = 0;
    if (c != NULL && c->paused && !c->finished) {
        c->paused = 0;
        if (!c->ready) {
            c->ready = 1;
            c->next_ready = self->ready_head;
            self->ready_head = c;
        }
        wake = 1;
    }
    pthread_mutex_unlock(&self->lock);
    if (PyErr_Occurred()) return NULL;
    if (wake) signal_fd(self->kickfd);
    Py_RETURN_NONE;
}

/* Lower-cased copies of a tuple of non-empty bytes (what; NULL: none) into names. -1
 * with an exception set. */
static int names_config(names_t *names, PyObject *tuple, const char *what) {
    if (tuple == NULL) return 0; /* not given: none */
    if (!PyTuple_Check(tuple)) {
        PyErr_Format(PyExc_TypeError, "%s must be a tuple of bytes", what);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    names->name = calloc((size_t)n + 1, sizeof *names->name);
    names->len = calloc((size_t)n + 1, sizeof *names->len);
    if (names->name == NULL || names->len == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(tuple, i);
        if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) == 0) {
            PyErr_Format(PyExc_TypeError, "%s must be a tuple of non-empty bytes", what);
            return -1;
        }
        size_t len = (size_t)PyBytes_GET_SIZE(item);
        names->name[i] = malloc(len + 1);
        if (names->name[i] == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        for (size_t j = 0; j < len; j++)
            names->name[i][j] = (char)tolower((unsigned char)PyBytes_AS_STRING(item)[j]);
        names->name[i][len] = '\0';
        names->len[i] = len;
        names->n = (int)i + 1;
    }
    return 0;
}

static void names_free(names_t *names) {
    for (int i = 0; i < names->n; i++) free(names->name[i]);
    free(names->name);
    free(names->len);
}

static void edits_free(edits_t *e) {
    names_free(&e->drop);
    names_free(&e->refuse);
    free(e->add);
}

/* The field lines a relay adds (Engine.relay's add): -1 with an exception set. */
static int check_add(const char *add, Py_ssize_t add_len) {
    if (add_len > 4096) {
        PyErr_SetString(PyExc_ValueError, "add holds at most 4096 bytes");
        return -1;
    }
    if (memchr(add, '\0', (size_t)add_len) != NULL ||
        (add_len > 0 && (add_len < 2 || memcmp(add + add_len - 2, "\r\n", 2) != 0))) {
        PyErr_SetString(PyExc_ValueError, "add must be field lines, each ending with CRLF");
        return -1;
    }
    return 0;
}

/* A relay's edits from Python's arguments. -1 with an exception set (free with
 * edits_free either way). */
static int edits_config(edits_t *e, PyObject *drop, PyObject *refuse, const char *add,
                        Py_ssize_t add_len, int gen_ids) {
    e->gen_ids = gen_ids;
    if (names_config(&e->drop, drop, "drop") < 0 || names_config(&e->refuse, refuse, "refuse") < 0)
        return -1;
    if (check_add(add, add_len) < 0) return -1;
    e->add = malloc((size_t)add_len + 1);
    if (e->add == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(e->add, add, (size_t)add_len);
    e->add_len = (size_t)add_len;
    return 0;
}

/* A relay's summary argument: None, or ascending latency bounds (seconds). The count
 * of bounds, -1 with an exception set. */
static Py_ssize_t summary_bounds(PyObject *summary, double *bounds) {
    if (summary == Py_None) return 0;
    if (!PyTuple_Check(summary) || PyTuple_GET_SIZE(summary) > SUMMARY_BOUNDS) {
        PyErr_Format(PyExc_ValueError, "summary must be None or a tuple of at most %d "
                     "ascending bounds (seconds)", SUMMARY_BOUNDS);
        return -1;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(summary);
    for (Py_ssize_t i = 0; i < n; i++) {
        bounds[i] = PyFloat_AsDouble(PyTuple_GET_ITEM(summary, i));
        if (bounds[i] == -1.0 && PyErr_Occurred()) return -1;
        if (!(bounds[i] == bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
            PyErr_SetString(PyExc_ValueError, "summary bounds must be ascending numbers");
            return -1;
        }
    }
    return n;
}

static PyObject *Engine_relay(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"a_fd", "a_ssl", "a_kind", "b_fd", "b_ssl", "b_kind", "idle",
                             "hold", "head_seconds", "drop", "add", "initial", "refuse",
                             "gen_ids", "max_requests", "notify_first", "max_seconds", "summary",
                             "renew_ahead", "reconnect", NULL};
    int afd, akind, bfd, bkind, gen_ids = 0, notify = 0, ahead = 0;
    PyObject *assl, *bssl, *drop = NULL, *refuse = NULL, *summary = Py_None;
    PyObject *reconnect = Py_None;
    double idle, hold, head_seconds, max_seconds = 0;
    const char *add = "", *initial = "";
    Py_ssize_t add_len = 0, initial_len = 0;
    unsigned long long max_requests = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOiiOiddd|$Oy#y#OpKpdOpO", kwlist, &afd,
                                     &assl, &akind, &bfd, &bssl, &bkind, &idle, &hold,
                                     &head_seconds, &drop, &add, &add_len, &initial,
                                     &initial_len, &refuse, &gen_ids, &max_requests, &notify,
                                     &max_seconds, &summary, &ahead, &reconnect))
        return NULL;
    /* reconnect: (ip literal, port, connect seconds) of a plain upstream's app */
    const char *app_host = NULL;
    int app_port = 0;
    double connect_seconds = 0;
    struct sockaddr_storage app;
    socklen_t app_len = 0;
    memset(&app, 0, sizeof app);
    if (reconnect != Py_None) {
        if (!PyArg_ParseTuple(reconnect, "sid", &app_host, &app_port, &connect_seconds))
            return NULL;
        struct sockaddr_in *v4 = (struct sockaddr_in *)&app;
        struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)&app;
        if (inet_pton(AF_INET, app_host, &v4->sin_addr) == 1) {
            v4->sin_family = AF_INET;
            v4->sin_port = htons((uint16_t)app_port);
            app_len = sizeof *v4;
        } else if (inet_pton(AF_INET6, app_host, &v6->sin6_addr) == 1) {
            v6->sin6_family = AF_INET6;
            v6->sin6_port = htons((uint16_t)app_port);
            app_len = sizeof *v6;
        }
    }
    double bounds[SUMMARY_BOUNDS];
    Py_ssize_t nbounds = summary_bounds(summary, bounds);
    if (nbounds < 0) return NULL;
    const char *problem = NULL;
    if (initial_len > RELAY_IN) problem = "initial holds at most RELAY_IN bytes";
    else if (akind == KIND_FRAMED || bkind == KIND_FRAMED)
        problem = "a relay takes plain or raw TLS sides";
    else if (afd < 0 || bfd < 0 || afd == bfd)
        problem = "two distinct open descriptors are needed";
    else if (!(idle > 0) || !(hold > 0) || !(head_seconds > 0))
        problem = "idle, hold and head_seconds must be > 0 seconds";
    else if (!(max_seconds >= 0))
        problem = "max_seconds must be >= 0 (0: no limit)";
    else if (reconnect != Py_None && app_len == 0)
        problem = "reconnect takes an IP address, not a name";
    else if (reconnect != Py_None && (app_port < 1 || app_port > 65535))
        problem = "reconnect's port must be 1..65535";
    else if (reconnect != Py_None && !(connect_seconds > 0))
        problem = "reconnect's connect seconds must be > 0";
    else if (reconnect != Py_None && (bkind != KIND_PLAIN || ahead))
        problem = "reconnect takes a plain upstream, without renew_ahead";
    if (problem != NULL) {
        PyErr_SetString(PyExc_ValueError, problem);
        return NULL;
    }
    conn_t *c = calloc(1, sizeof *c);
    relay_t *r = calloc(1, sizeof *r);
    if (c == NULL || r == NULL) {
        free(c);
        free(r);
        return PyErr_NoMemory();
    }
    c->relay = r;
    /* Buffers are made when bytes come (more_room): the request one here only when
     * bytes came with the relay, the response one at the first response. */
    if (initial_len > 0) {
        r->in_cap = (size_t)initial_len > RELAY_IN_FIRST ? RELAY_IN : RELAY_IN_FIRST;
        r->in = malloc(r->in_cap);
        if (r->in == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(r->in, initial, (size_t)initial_len);
    }
    if (edits_config(&r->edits, drop, refuse, add, add_len, gen_ids) < 0) goto fail;
    if (side_from(&c->a, afd, assl, akind) < 0 || side_from(&c->b, bfd, bssl, bkind) < 0)
        goto fail;
    c->a.conn = c->b.conn = c;
    c->d[0].src = &c->a;
    c->d[0].dst = &c->b;
    c->d[1].src = &c->b;
    c->d[1].dst = &c->a;
    r->hold = hold;
    r->head_seconds = head_seconds;
    r->max_requests = max_requests;
    r->summarize = summary != Py_None;
    r->ahead = ahead;
    r->max_seconds = max_seconds;
    r->nbounds = (int)nbounds;
    memcpy(r->bounds, bounds, (size_t)nbounds * sizeof *bounds);
    c->notify_first = notify; /* the upstream's first bytes, in relay_response */
    r->up_keep = 1;
    r->state = R_REQUEST;
    c->idle = idle;
    c->last = now_seconds();
    r->in_len = (size_t)initial_len;
    r->head_started = c->last;
    r->renew_at = max_seconds > 0 ? c->last + max_seconds : 0;
    if (reconnect != Py_None) {
        r->reconnect = 1;
        r->app = app;
        r->app_len = app_len;
        r->connect_seconds = connect_seconds;
    }
    return enlist(self, c, afd, bfd);
fail:
    conn_free(c); /* and its relay */
    return NULL;
}

static PyObject *Engine_relay_stop(Engine *self, PyObject *arg) {
    unsigned long long h;
    pthread_mutex_lock(&self->lock);
    conn_t *c = lookup(self, arg, &h);
    if (c != NULL && c->relay != NULL && !c->finished) {
        c->relay->stop = 1;
        if (c->relay->state == R_REQUEST && c->relay->in_len == 0)
            relay_end(self, c, RELAY_STOPPED);
    }
    pthread_mutex_unlock(&self->lock);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* The relay `handle` names, when it may be told what its next block does (relay_next,
 * relay_keep); NULL when it has ended (no error) or may not (a ValueError set). With
 * the lock held. */
static conn_t *renewing(Engine *self, PyObject *handle) {
    unsigned long long h;
    conn_t *c = lookup(self, handle, &h);
    relay_t *r = c != NULL ? c->relay : NULL;
    if (r == NULL || c->finished) return NULL; /* ended (or not a relay) */
    if (!r->ahead) {
        PyErr_SetString(PyExc_ValueError, "the relay was not started with renew_ahead");
        return NULL;
    }
    if (r->next_ready || r->renew_now) {
        PyErr_SetString(PyExc_ValueError, "the relay has its next upstream already");
        return NULL;
    }
    return c;
}

static PyObject *Engine_relay_next(Engine *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"handle", "b", "add", "notify_first", NULL};
    PyObject *handle, *b, *bssl = Py_None;
    const char *add = "";
    Py_ssize_t add_len = 0;
    int notify = 0, bfd = -1, bkind = KIND_PLAIN;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|$y#p", kwlist, &handle, &b, &add, &add_len,
                                     &notify))
        return NULL;
    if (b != Py_None && !PyArg_ParseTuple(b, "iOi", &bfd, &bssl, &bkind)) return NULL;
    if (check_add(add, add_len) < 0) return NULL;
    if (bkind == KIND_FRAMED) {
        PyErr_SetString(PyExc_ValueError, "a relay takes plain or raw TLS sides");
        return NULL;
    }
    char *copy = malloc((size_t)add_len + 1);
    if (copy == NULL) return PyErr_NoMemory();
    memcpy(copy, add, (size_t)add_len);
    int taken = 0;
    pthread_mutex_lock(&self->lock);
    conn_t *c = renewing(self, handle);
    relay_t *r = c != NULL ? c->relay : NULL;
    if (r == NULL) {
        /* ended (the upstream stays the caller's), or refused (the error is set) */
    } else if (b == Py_None) {
        r->renew_now = 1;
        taken = 1;
        if (r->state == R_REQUEST && r->in_len == 0) relay_end(self, c, RELAY_RENEW);
    } else if (bfd < 0 || bfd == c->a.fd || bfd == c->b.fd) {
        PyErr_SetString(PyExc_ValueError, "the next upstream needs a descriptor of its own");
    } else if (side_from(&r->next_b, bfd, bssl, bkind) == 0) {
        r->next_add = copy;
        r->next_add_len = (size_t)add_len;
        r->next_notify = notify;
        r->next_ready = 1;
        copy = NULL;
        taken = 1;
    } else {
        side_release(&r->next_b);
    }
    pthread_mutex_unlock(&self->lock);
    free(copy);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(taken);
}

static PyObject *Engine_relay_keep(Engine *self, PyObject *handle) {
    int kept = 0;
    pthread_mutex_lock(&self->lock);
    conn_t *c = renewing(self, handle);
    relay_t *r = c != NULL ? c->relay : NULL;
    if (r != NULL) {
        new_block(r); /* on the same upstream */
        if (r->state == R_REQUEST && r->in_len == 0) due_soon(self, relay_deadline(c));
        kept = 1;
    }
    pthread_mutex_unlock(&self->lock);
    if (PyErr_Occurred()) return NULL;
    return PyBool_FromLong(kept);
}

static PyObject *Engine_records_fileno(Engine *self, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(self->recfd);
}

static PyObject *Engine_records(Engine *self, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&self->lock);
    uint64_t drained;
    ssize_t rd = read(self->recfd, &drained, sizeof drained);
    (void)rd;
    record_t *recs = self->records;
    size_t n = self->nrecords;
    unsigned long long dropped = self->records_dropped;
    self->records = NULL;
    self->nrecords = self->records_cap = 0;
    self->records_dropped = 0;
    pthread_mutex_unlock(&self->lock);
    PyObject *list = PyList_New((Py_ssize_t)n);
    if (list == NULL) goto fail;
    for (size_t i = 0; i < n; i++) {
        record_t *rec = &recs[i];
        PyObject *item;
        if (rec->kind == RECORD_RENEW_DUE) {
            item = Py_BuildValue("(KiO)", rec->handle, rec->kind, Py_None);
        } else if (rec->kind == RECORD_SWITCHED) {
            item = Py_BuildValue("(KiN)", rec->handle, rec->kind, PyBool_FromLong(rec->reusable));
        } else if (rec->kind == RECORD_SUMMARY) {
            summary_t *s = rec->summary;
            PyObject *first = PyTuple_New(s->nfirst);
            if (first == NULL) goto fail;
            for (int j = 0; j < s->nfirst; j++) {
                PyObject *count = PyLong_FromUnsignedLongLong(s->first[j]);
                if (count == NULL) {
                    Py_DECREF(first);
                    goto fail;
                }
                PyTuple_SET_ITEM(first, j, count);
            }
            item = Py_BuildValue("(Ki((KKKKKK)NKd))", rec->handle, rec->kind,
                                 s->classes[0], s->classes[1], s->classes[2], s->classes[3],
                                 s->classes[4], s->classes[5], first, s->count, s->total);
        } else {
            item = Py_BuildValue("(Ki(iKKdssy))", rec->handle, rec->kind, rec->status,
                                 rec->bytes_in, rec->bytes_out, rec->seconds, rec->method,
                                 rec->path != NULL ? rec->path : "", rec->request_id);
        }
        if (item == NULL) goto fail;
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    free_records(recs, n);
    return Py_BuildValue("(NK)", list, dropped);
fail:
    Py_XDECREF(list);
    free_records(recs, n);
    return NULL;
}

/* What Python needs of a finished relay (see collect()). An upstream of the engine's
 * own still open goes with it (its descriptor, else -1): Python's once collect() has
 * handed the result over. */
static PyObject *relay_result(conn_t *c) {
    relay_t *r = c->relay;
    int handed = r->outcome == RELAY_RESPONSE;
    int fd = r->own_b ? c->b.fd : -1;
    /* y# makes None of NULL: a released buffer is b"" */
    return Py_BuildValue(
        "(iy#y#izyi)", r->outcome, r->in ? r->in : "", (Py_ssize_t)r->in_len,
        r->resp && handed ? r->resp : "", (Py_ssize_t)(handed ? r->resp_len : 0), r->up_keep,
        r->error, handed ? r->request_id : NULL, fd);
}

/* Module-level: the relay's head functions, for tests. */
static PyObject *mod_relay_request_head(PyObject *mod, PyObject *args, PyObject *kwds) {
    (void)mod;
    static char *kwlist[] = {"data", "drop", "add", "refuse", "ids", NULL};
    const char *data, *add = "", *ids = NULL;
    Py_ssize_t len, add_len = 0, ids_len = 0;
    PyObject *drop = NULL, *refuse = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y#|Oy#Oy#", kwlist, &data, &len, &drop, &add,
                                     &add_len, &refuse, &ids, &ids_len))
        return NULL;
    if (ids != NULL && ids_len != IDS_HEX) {
        PyErr_Format(PyExc_ValueError, "ids are %d hex digits", IDS_HEX);
        return NULL;
    }
    edits_t edits;
    memset(&edits, 0, sizeof edits);
    PyObject *result = NULL;
    char *out = malloc(RELAY_HEAD + 128 + (size_t)add_len + 2);
    if (out == NULL) return PyErr_NoMemory();
    if (edits_config(&edits, drop, refuse, add, add_len, ids != NULL) == 0) {
        head_t h;
        int taken = request_head(data, (size_t)len, &edits, ids, out, &h);
        if (taken == 0) {
            result = Py_NewRef(Py_None);
        } else if (taken < 0) {
            result = Py_NewRef(Py_False);
        } else {
            result = Py_BuildValue("(ny#Kis#s#y#)", (Py_ssize_t)h.head_len, out,
                                   (Py_ssize_t)h.out_len, h.body, h.keep_alive, h.method,
                                   (Py_ssize_t)h.method_len, h.path, (Py_ssize_t)h.path_len,
                                   h.request_id, (Py_ssize_t)h.request_id_len);
        }
    }
    edits_free(&edits);
    free(out);
    return result;
}

static PyObject *mod_relay_response_head(PyObject *mod, PyObject *args) {
    (void)mod;
    const char *data;
    Py_ssize_t len;
    int head_method, req_keep;
    if (!PyArg_ParseTuple(args, "y#pp", &data, &len, &head_method, &req_keep)) return NULL;
    char *out = malloc(RELAY_HEAD + 32);
    if (out == NULL) return PyErr_NoMemory();
    head_t h;
    int status = response_head(data, (size_t)len, head_method, req_keep, out, &h);
    PyObject *result;
    if (status == 0) result = Py_NewRef(Py_None);
    else if (status < 0) result = Py_NewRef(Py_False);
    else
        result = Py_BuildValue("(iny#Kii)", status, (Py_ssize_t)h.head_len, out,
                               (Py_ssize_t)h.out_len, h.body, h.keep_alive, h.down_close);
    free(out);
    return result;
}

static PyObject *Engine_serve(Engine *self, PyObject *unused) {
    (void)unused;
    struct epoll_event events[MAX_EVENTS];
    int failed = 0, saved = 0;
    pthread_mutex_lock(&self->lock);
    if (self->serving) {
        pthread_mutex_unlock(&self->lock);
        PyErr_SetString(PyExc_RuntimeError, "the engine is already serving");
        return NULL;
    }
    self->serving = 1;
    int stopped = self->stopped;
    pthread_mutex_unlock(&self->lock);
    if (stopped) {
        pthread_mutex_lock(&self->lock);
        self->serving = 0;
        pthread_mutex_unlock(&self->lock);
        Py_RETURN_NONE;
    }
    Py_BEGIN_ALLOW_THREADS
    int timeout = 0;
    for (;;) {
        int n = epoll_wait(self->epfd, events, MAX_EVENTS, timeout);
        if (n < 0 && errno != EINTR) {
            failed = 1;
            saved = errno;
            break;
        }
        pthread_mutex_lock(&self->lock);
        if (self->stopped) {
            pthread_mutex_unlock(&self->lock);
            break;
        }
        process(self, events, n < 0 ? 0 : n);
        /* Work left over (a budget spent, a connection just added): go again at once,
         * after whatever else epoll has; otherwise sleep until something happens. */
        timeout = lowat_expire(self);
        if (self->ready_head != NULL) timeout = 0;
        pthread_mutex_unlock(&self->lock);
    }
    Py_END_ALLOW_THREADS
    pthread_mutex_lock(&self->lock);
    self->serving = 0;
    pthread_mutex_unlock(&self->lock);
    if (failed) {
        errno = saved;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    Py_RETURN_NONE;
}

static PyObject *Engine_stop(Engine *self, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&self->lock);
    self->stopped = 1;
    pthread_mutex_unlock(&self->lock);
    signal_fd(self->kickfd);
    Py_RETURN_NONE;
}

static PyObject *Engine_collect(Engine *self, PyObject *unused) {
    (void)unused;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    pthread_mutex_lock(&self->lock);
    uint64_t drained;
    ssize_t r = read(self->donefd, &drained, sizeof drained);
    (void)r;
    conn_t *c = self->done_head;
    self->done_head = NULL;
    while (c != NULL) {
        conn_t *next = c->next_done;
        c->queued = 0;
        PyObject *item = NULL;
        if (c->first_due) {
            c->first_due = 0;
            item = Py_BuildValue("(KiKKisO)", handle_of(c), FIRST_READ, c->d[0].count,
                                 c->d[1].count, 0, "", Py_None);
            if (item == NULL || PyList_Append(out, item) < 0) goto fail;
            Py_CLEAR(item);
        }
        if (c->finished) {
            PyObject *relay = c->relay != NULL ? relay_result(c) : Py_NewRef(Py_None);
            if (relay == NULL) goto fail;
            item = Py_BuildValue("(KiKKisN)", handle_of(c), c->status, c->d[0].count,
                                 c->d[1].count, c->error_kind,
                                 c->error != NULL ? c->error
                                 : c->status == DONE_ERROR ? "error (out of memory for its text)"
                                 : "",
                                 relay);
            if (item == NULL || PyList_Append(out, item) < 0) goto fail;
            Py_CLEAR(item);
            if (c->relay != NULL) c->relay->own_b = 0; /* its descriptor is Python's now */
            discard(self, c);
        }
        c = next;
        continue;
    fail:
        Py_XDECREF(item);
        /* put this one and the rest back for the next collect() */
        while (c != NULL) {
            conn_t *rest = c->next_done;
            c->queued = 0;
            queue_done(self, c);
            c = rest;
        }
        pthread_mutex_unlock(&self->lock);
        Py_DECREF(out);
        return NULL;
    }
    pthread_mutex_unlock(&self->lock);
    return out;
}

static PyObject *Engine_held(Engine *self, PyObject *unused) {
    (void)unused;
    size_t n = 0;
    pthread_mutex_lock(&self->lock);
    for (uint32_t i = 0; i < self->nslots; i++) {
        conn_t *c = self->slots[i];
        if (c == NULL) continue;
        for (int k = 0; k < 2; k++)
            if (c->d[k].buf != NULL) n += c->d[k].len - c->d[k].off;
    }
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSize_t(n);
}

static PyObject *Engine_relay_buffers(Engine *self, PyObject *unused) {
    (void)unused;
    size_t n = 0;
    pthread_mutex_lock(&self->lock);
    for (uint32_t i = 0; i < self->nslots; i++) {
        conn_t *c = self->slots[i];
        if (c != NULL && c->relay != NULL) n += c->relay->in_cap + c->relay->resp_cap;
    }
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSize_t(n);
}

static PyObject *Engine_active(Engine *self, PyObject *unused) {
    (void)unused;
    pthread_mutex_lock(&self->lock);
    size_t n = self->active;
    pthread_mutex_unlock(&self->lock);
    return PyLong_FromSize_t(n);
}

static PyMethodDef Engine_methods[] = {
    {"done_fileno", (PyCFunction)Engine_done_fileno, METH_NOARGS,
     "An eventfd, readable when collect() has results."},
    {"add", (PyCFunction)Engine_add, METH_VARARGS,
     "add(a_fd, a_ssl, a_kind, b_fd, b_ssl, b_kind, idle, notify_first[, limit, flags])"
     " -> handle\n\n"
     "With limit (> 0): only a to b, exactly limit bytes, then done with no EOF sent and "
     "no byte read past them; an end of stream before that is an error. With flags "
     "UNTIL_REPLY, such a copy also ends (early, nothing half-written) once b turns "
     "readable. With EITHER_END (no limit), the connection is done when either direction "
     "is (a tunnel)."},
    {"remove", (PyCFunction)Engine_remove, METH_O,
     "remove(handle) -> (a_to_b, b_to_a), or None if it is not in the engine (any more)"},
    {"resume", (PyCFunction)Engine_resume, METH_O,
     "resume(handle): go on with a connection paused by its FIRST_READ result"},
    {"serve", (PyCFunction)Engine_serve, METH_NOARGS,
     "serve(): pump until stop(), without the GIL. Run it in a thread of its own."},
    {"stop", (PyCFunction)Engine_stop, METH_NOARGS,
     "Make serve() return soon (or at once if it has not started): final."},
    {"collect", (PyCFunction)Engine_collect, METH_NOARGS,
     "collect() -> [(handle, status, a_to_b, b_to_a, error_kind, error, relay)]: "
     "connections that ended (status DONE_*), and FIRST_READ reports (the connection is "
     "paused until resume(handle)); relay is None but for relays (see relay())."},
    {"active", (PyCFunction)Engine_active, METH_NOARGS, "connections being pumped"},
    {"relay_buffers", (PyCFunction)Engine_relay_buffers, METH_NOARGS,
     "bytes of request and response buffers the relays hold (none while they wait for "
     "a request)"},
    {"held", (PyCFunction)Engine_held, METH_NOARGS,
     "bytes read and not yet written on, over all connections (a destination that "
     "does not take them)"},
    {"relay", (PyCFunction)(void (*)(void))Engine_relay, METH_VARARGS | METH_KEYWORDS,
     "relay(a_fd, a_ssl, a_kind, b_fd, b_ssl, b_kind, idle, hold, head_seconds, *, "
     "drop=(), add=b'', initial=b'', refuse=(), gen_ids=False, max_requests=0, "
     "notify_first=False, max_seconds=0) -> handle\n\n"
     "Serve HTTP/1.1 requests from a (downstream) to b (upstream) at a request boundary, "
     "dropping the fields named in drop (bytes), adding x-request-id and traceparent "
     "when missing (gen_ids) and the lines in add, leaving to Python the requests with a "
     "field named in refuse (initial: downstream bytes already read), "
     "until one it does not take, hold seconds without a request, max_requests served or "
     "max_seconds passed (RENEW), or "
     "relay_stop(); with notify_first, b's first bytes are reported as for add(). With "
     "summary (a tuple of ascending latency bounds, seconds), its exchanges come to "
     "records() summed up, not one by one. With renew_ahead, the end of a block "
     "(max_requests, max_seconds) is a RECORD_RENEW_DUE report instead, and the relay "
     "goes on with b until relay_next(). Its "
     "collect() entry ends with (outcome, downstream_bytes, response_bytes, "
     "upstream_reusable, upstream_error, request_id); see the relay's comment in _pump.c."},
    {"relay_next", (PyCFunction)(void (*)(void))Engine_relay_next, METH_VARARGS | METH_KEYWORDS,
     "relay_next(handle, b, *, add=b'', notify_first=False) -> bool\n\n"
     "For a relay with renew_ahead: b = (fd, ssl, kind) is the next upstream, switched to "
     "(with its add lines and notify_first) at the next request boundary, when the "
     "previous one comes back (RECORD_SWITCHED); b = None ends the relay (RENEW) at the "
     "next boundary. False when the relay has ended (b stays the caller's)."},
    {"relay_keep", (PyCFunction)Engine_relay_keep, METH_O,
     "relay_keep(handle) -> bool\n\n"
     "For a relay with renew_ahead, at a block's end (RECORD_RENEW_DUE), instead of "
     "relay_next: the same upstream serves another block, counted from now. False when "
     "the relay has ended."},
    {"relay_stop", (PyCFunction)Engine_relay_stop, METH_O,
     "relay_stop(handle): end the relay at its next request boundary (now if it waits)"},
    {"records_fileno", (PyCFunction)Engine_records_fileno, METH_NOARGS,
     "An eventfd, readable when records() has entries."},
    {"records", (PyCFunction)Engine_records, METH_NOARGS,
     "records() -> ([(handle, kind, item)], dropped): what the relays reported since the "
     "last call, in order, and how many exchanges were dropped because none called for "
     "them. kind RECORD_EXCHANGE: item = (status, bytes_in, bytes_out, seconds, method, "
     "path, request_id); RECORD_SUMMARY (a relay with summary): item = ((by status class "
     "0-5), (by the first bound >= seconds, then +Inf), count, total_seconds); "
     "RECORD_RENEW_DUE: None; RECORD_SWITCHED: whether the previous upstream is reusable."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject EngineType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "meshagent.dataplane._pump.Engine",
    .tp_basicsize = sizeof(Engine),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pumps established L4 connections in C (see meshagent/dataplane/_pump.c).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Engine_init,
    .tp_dealloc = (destructor)Engine_dealloc,
    .tp_methods = Engine_methods,
};

static PyObject *mod_tls_problem(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    if (load_ssl()) Py_RETURN_NONE;
    return PyUnicode_FromString(ssl_problem);
}

/* ---- TLS sessions (see the top of this file) --------------------------------------- */

/* Whether obj's type is the type named name or a subclass of it (ssl.SSLContext
 * derives from _ssl._SSLContext). */
static int derives_from(PyObject *obj, const char *name) {
    for (PyTypeObject *t = Py_TYPE(obj); t != NULL; t = t->tp_base)
        if (strcmp(t->tp_name, name) == 0) return 1;
    return 0;
}

static int ssl_ready(void) {
    if (load_ssl()) return 1;
    PyErr_SetString(PyExc_RuntimeError, ssl_problem);
    return 0;
}

/* The SSL_SESSION of an _ssl.SSLSession whose id is want_id (NULL with an exception
 * set). */
static SSL_SESSION *session_of(PyObject *sessobj, const char *want_id, Py_ssize_t want_len) {
    if (strcmp(Py_TYPE(sessobj)->tp_name, "_ssl.SSLSession") != 0) {
        PyErr_Format(PyExc_TypeError, "expected an _ssl.SSLSession, got %s",
                     Py_TYPE(sessobj)->tp_name);
        return NULL;
    }
    SSL_SESSION *session = ((PySSLSessionHead *)sessobj)->session;
    unsigned int id_len = 0;
    const unsigned char *id = session ? p_SSL_SESSION_get_id(session, &id_len) : NULL;
    if (id == NULL || id_len != (size_t)want_len || memcmp(id, want_id, id_len) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "the TLS session does not match (unknown _ssl layout)");
        return NULL;
    }
    return session;
}

static PyObject *mod_tls_own_session(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *sessobj;
    const char *want_id;
    Py_ssize_t want_len;
    if (!PyArg_ParseTuple(args, "Oy#", &sessobj, &want_id, &want_len)) return NULL;
    if (!ssl_ready()) return NULL;
    SSL_SESSION *session = session_of(sessobj, want_id, want_len);
    if (session == NULL) return NULL;
    SSL_SESSION *copy = p_SSL_SESSION_dup(session);
    if (copy == NULL) return PyErr_NoMemory();
    ((PySSLSessionHead *)sessobj)->session = copy;
    p_SSL_SESSION_free(session);
    Py_RETURN_NONE;
}

static PyObject *mod_tls_set_session(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *sslobj, *sessobj;
    int fd;
    const char *want_id;
    Py_ssize_t want_len;
    if (!PyArg_ParseTuple(args, "OiOy#", &sslobj, &fd, &sessobj, &want_id, &want_len))
        return NULL;
    if (!ssl_ready()) return NULL;
    SSL *ssl = ssl_of(sslobj, fd);
    if (ssl == NULL) return NULL;
    SSL_SESSION *session = session_of(sessobj, want_id, want_len);
    if (session == NULL) return NULL;
    if (((PySSLSessionHead *)sessobj)->ctx != ((PySSLSocketHead *)sslobj)->ctx) {
        PyErr_SetString(PyExc_ValueError, "the session was made with another SSLContext");
        return NULL;
    }
    if (!p_SSL_in_before(ssl)) {
        PyErr_SetString(PyExc_ValueError, "the handshake has started: too late for a session");
        return NULL;
    }
    SSL_SESSION *copy = p_SSL_SESSION_dup(session);
    if (copy == NULL) return PyErr_NoMemory();
    int ok = p_SSL_set_session(ssl, copy);
    p_SSL_SESSION_free(copy); /* SSL_set_session took its own reference */
    if (!ok) {
        p_ERR_clear_error();
        PyErr_SetString(PyExc_ValueError, "OpenSSL refused the session");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *mod_tls_keep_on_close(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *sslobj;
    int fd;
    if (!PyArg_ParseTuple(args, "Oi", &sslobj, &fd)) return NULL;
    if (!ssl_ready()) return NULL;
    SSL *ssl = ssl_of(sslobj, fd);
    if (ssl == NULL) return NULL;
    p_SSL_set_shutdown(ssl, SSL_SENT_SHUTDOWN | SSL_RECEIVED_SHUTDOWN);
    Py_RETURN_NONE;
}

/* The SSL_CTX of an SSLContext whose options are options (NULL with an exception set). */
static SSL_CTX *ctx_of(PyObject *ctxobj, unsigned long long options) {
    if (!derives_from(ctxobj, "_ssl._SSLContext")) {
        PyErr_Format(PyExc_TypeError, "expected an SSLContext, got %s", Py_TYPE(ctxobj)->tp_name);
        return NULL;
    }
    SSL_CTX *ctx = ((PySSLContextHead *)ctxobj)->ctx;
    if (ctx == NULL || p_SSL_CTX_get_options(ctx) != (uint64_t)options) {
        PyErr_SetString(PyExc_RuntimeError, "the TLS context does not match (unknown _ssl layout)");
        return NULL;
    }
    return ctx;
}

static PyObject *mod_tls_server_cache(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *ctxobj;
    unsigned long long options;
    long size;
    if (!PyArg_ParseTuple(args, "OKl", &ctxobj, &options, &size)) return NULL;
    if (!ssl_ready()) return NULL;
    SSL_CTX *ctx = ctx_of(ctxobj, options);
    if (ctx == NULL) return NULL;
    if (size < 1) {
        PyErr_SetString(PyExc_ValueError, "the cache holds at least one session");
        return NULL;
    }
    p_SSL_CTX_ctrl(ctx, SSL_CTRL_SET_SESS_CACHE_SIZE, size, NULL);
    Py_RETURN_NONE;
}

static PyObject *mod_tls_ticket_keys(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *ctxobj;
    unsigned long long options;
    const char *keys;
    Py_ssize_t keys_len;
    if (!PyArg_ParseTuple(args, "OKy#", &ctxobj, &options, &keys, &keys_len)) return NULL;
    if (!ssl_ready()) return NULL;
    SSL_CTX *ctx = ctx_of(ctxobj, options);
    if (ctx == NULL) return NULL;
    if (keys_len != TICKET_KEYS_LEN) {
        PyErr_Format(PyExc_ValueError, "ticket keys are %d bytes, not %zd", TICKET_KEYS_LEN,
                     keys_len);
        return NULL;
    }
    if (p_SSL_CTX_ctrl(ctx, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_LEN, (void *)keys) != 1) {
        p_ERR_clear_error();
        PyErr_SetString(PyExc_RuntimeError, "OpenSSL refused the ticket keys");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"tls_problem", mod_tls_problem, METH_NOARGS,
     "None if TLS sides can be pumped here, else why not (import ssl first)."},
    {"tls_own_session", mod_tls_own_session, METH_VARARGS,
     "tls_own_session(session, session_id): make the session object hold a copy of its "
     "own (SSLSocket.session shares the connection's, which OpenSSL marks unresumable "
     "when that connection is freed without a shutdown)."},
    {"tls_set_session", mod_tls_set_session, METH_VARARGS,
     "tls_set_session(sslobj, fd, session, session_id): what SSLSocket.session = session "
     "does, without parsing the session (a copy by SSL_SESSION_dup). Before the handshake."},
    {"tls_keep_on_close", mod_tls_keep_on_close, METH_VARARGS,
     "tls_keep_on_close(sslobj, fd): mark the connection shut down (it sends no "
     "close_notify), so that freeing it leaves its session resumable."},
    {"tls_ticket_keys", mod_tls_ticket_keys, METH_VARARGS,
     "tls_ticket_keys(context, options, keys): the 80 bytes (name, HMAC and AES keys) "
     "that encrypt a server context's stateless tickets, shared by processes that set "
     "the same ones (options: context.options, checked against OpenSSL's)."},
    {"relay_request_head", (PyCFunction)(void (*)(void))mod_relay_request_head,
     METH_VARARGS | METH_KEYWORDS,
     "relay_request_head(data, drop=(), add=b'', refuse=(), ids=None) -> None (not "
     "complete), False (not for the relay) or (head_len, forwarded_head, content_length, "
     "keep_alive, method, path, request_id): the relay's reading of a request head, for "
     "tests (ids: 80 hex digits, for the ids an outbound adds)."},
    {"relay_response_head", mod_relay_response_head, METH_VARARGS,
     "relay_response_head(data, head_method, request_keep_alive) -> None, False or "
     "(status, head_len, forwarded_head, body_length, keep_alive, downstream_close)."},
    {"tls_server_cache", mod_tls_server_cache, METH_VARARGS,
     "tls_server_cache(context, options, size): bound the session cache of a server "
     "context (options: context.options, checked against OpenSSL's)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "meshagent.dataplane._pump",
    .m_doc = "The C byte pump of L4 connections.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&EngineType) < 0) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&EngineType);
    if (PyModule_AddObject(m, "Engine", (PyObject *)&EngineType) < 0) {
        Py_DECREF(&EngineType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "UNTIL_REPLY", FLAG_UNTIL_REPLY);
    PyModule_AddIntConstant(m, "EITHER_END", FLAG_EITHER_END);
    PyModule_AddIntConstant(m, "PLAIN", KIND_PLAIN);
    PyModule_AddIntConstant(m, "FRAMED", KIND_FRAMED);
    PyModule_AddIntConstant(m, "RAW", KIND_RAW);
    PyModule_AddIntConstant(m, "DONE_OK", DONE_OK);
    PyModule_AddIntConstant(m, "DONE_IDLE", DONE_IDLE);
    PyModule_AddIntConstant(m, "DONE_ERROR", DONE_ERROR);
    PyModule_AddIntConstant(m, "FIRST_READ", FIRST_READ);
    PyModule_AddIntConstant(m, "ERROR_IO", ERR_IO);
    PyModule_AddIntConstant(m, "ERROR_FRAME", ERR_FRAME);
    PyModule_AddIntConstant(m, "ERROR_AT_A", ERR_AT_A);
    PyModule_AddIntConstant(m, "ERROR_AT_B", ERR_AT_B);
    PyModule_AddIntConstant(m, "CHUNK", CHUNK);
    PyModule_AddIntConstant(m, "BIG_CHUNK", BIG_CHUNK);
    PyModule_AddIntConstant(m, "RELAY_CLOSED", RELAY_CLOSED);
    PyModule_AddIntConstant(m, "RELAY_IDLE", RELAY_IDLE);
    PyModule_AddIntConstant(m, "RELAY_STOPPED", RELAY_STOPPED);
    PyModule_AddIntConstant(m, "RELAY_REQUEST", RELAY_REQUEST);
    PyModule_AddIntConstant(m, "RELAY_HEAD_TIMEOUT", RELAY_HEAD_TIMEOUT);
    PyModule_AddIntConstant(m, "RELAY_UPSTREAM_SPENT", RELAY_UPSTREAM_SPENT);
    PyModule_AddIntConstant(m, "RELAY_CLOSE", RELAY_CLOSE);
    PyModule_AddIntConstant(m, "RELAY_RESPONSE", RELAY_RESPONSE);
    PyModule_AddIntConstant(m, "RELAY_RENEW", RELAY_RENEW);
    PyModule_AddIntConstant(m, "RECORD_EXCHANGE", RECORD_EXCHANGE);
    PyModule_AddIntConstant(m, "RECORD_SUMMARY", RECORD_SUMMARY);
    PyModule_AddIntConstant(m, "RECORD_RENEW_DUE", RECORD_RENEW_DUE);
    PyModule_AddIntConstant(m, "RECORD_SWITCHED", RECORD_SWITCHED);
    PyModule_AddIntConstant(m, "RELAY_IN", RELAY_IN);
    return m;
}
