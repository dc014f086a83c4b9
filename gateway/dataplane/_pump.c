/* The stream pump: relays the chunked body of replica responses to their clients, in C.
 *
 * Why C, and why one epoll set of its own (scripts/bench.py --paced, perf; docs/performance.md,
 * "Paced LLM traffic"):
 * on paced LLM traffic each token is one read of the replica socket and one write to the
 * client socket, the same system calls HAProxy makes; what made the Python relay cost more
 * per token was user space around them (uvloop's read callback, a bytes object, a Python
 * frame, httptools, uvloop's write path: ~5 us a token of ~18). Here every stream a step
 * made readable is served in one pass: uvloop wakes the gateway once for this epoll set
 * (its fd is added with loop.add_reader), and `run()` reads each ready replica socket and
 * writes the very same bytes, chunk framing included, to its client. Python sees a stream
 * again only when it ends (complete, cut, malformed, client gone).
 *
 * Ownership: the pump works on dup()s of the two sockets, so a socket uvloop closes can
 * never be reused under it; the uvloop transport of the replica connection is paused while
 * the pump reads it, and uvloop never writes to the client while a stream is pumped.
 * An epoll registration belongs to the open file, not to our dup: closing the dup does not
 * remove it while uvloop's fd is open. So a stream leaves the epoll set before its memory may
 * go, and a stream whose EPOLL_CTL_DEL failed is kept (a "zombie", retried) rather than freed.
 * Backpressure: a short write keeps the rest here, stops reading the replica and waits for
 * the client socket to drain (EPOLLOUT), the replica then waits in TCP flow control.
 * Coalescing: as the Python path, a stream whose reads come back to back (gap < coalesce_s)
 * while enough streams are pumped sleeps one window (a timerfd) so the next read takes a burst.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#if PY_VERSION_HEX < 0x030C0000
/* Python 3.12 moved the member types into Python.h as Py_T_* and deprecated structmember.h's T_* names;
 * 3.11 has only the old header. */
#include <structmember.h>
#define Py_T_INT T_INT
#endif
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <limits.h>

#define READ_SIZE 65536
#define MAX_EVENTS 256
#define TIMER_TAG 1u  /* epoll data of the timerfd; stream pointers are aligned, so never 1 */
#define CLIENT_BIT 2u /* tagged pointer: the client side of a stream became writable */
/* A chunk-size line (size and extensions) longer than this is refused, as Go's net/http does
 * (net/http/internal/chunked.go, maxLineLength = 4096): extensions are never used by a replica and
 * only cost us bytes to skip. */
#define MAX_CHUNK_LINE 4096
/* Trailer section cap: the same as the response head's (upstream.py, MAX_HEAD_BYTES). */
#define MAX_TRAILER_BYTES 65536

/* How a pumped stream ended (Python: Pump.COMPLETE and so on). */
enum { END_COMPLETE = 0, END_COMPLETE_EXTRA, END_EOF, END_UPSTREAM_ERROR, END_MALFORMED, END_CLIENT_ERROR,
       END_PUMP_ERROR, END_BROKEN };

/* Chunked transfer coding (RFC 9112 7.1), only to find where the message ends. */
enum { C_SIZE, C_EXT, C_SIZE_LF, C_DATA, C_DATA_CR, C_DATA_LF, C_TRAILER_START, C_TRAILER, C_TRAILER_LF,
       C_LAST_LF, C_DONE, C_BAD };

/* ---------------------------------------------------------------- fault injection (tests only)
 * _pump._fault(name, count) makes the next `count` calls of one system call fail (-1: every call), so the
 * tests can reach the error paths that a healthy kernel never takes. */
enum { F_EPOLL_ADD, F_EPOLL_DEL, F_EPOLL_WAIT, F_ALLOC, F_COUNT };
static const char *const fault_names[F_COUNT] = {"epoll_add", "epoll_del", "epoll_wait", "alloc"};
static int faults[F_COUNT];

static int faulty(int which) {
    int n = faults[which];
    if (n == 0) return 0;
    if (n > 0) faults[which] = n - 1;
    return 1;
}

/* ---------------------------------------------------------------- SSE events (resume.py, usage.py)
 * With `events` flags add() makes the pump follow the SSE events in the chunk payload as well (vLLM writes one
 * `data: {...}\n\n` event per chunk), so resumable and metered streams stay in C:
 *   EV_ON          count the JSON events and read the usage chunk's counts (token accounting); bytes relayed as they are
 *   EV_RESUME      what resume.py's ResumeStream does for the original stream (its _batch and _event): each event's
 *                  token_ids and the first prompt_token_ids are recorded (Python reads them only to resume), [DONE]
 *                  goes out only after a finish_reason (and the usage chunk when the client asked for it), vLLM's
 *                  in-band error event or anything that is not a JSON object breaks the stream (END_BROKEN, the
 *                  event withheld, Python resumes). Each read's complete events go out as one chunk, as resume.py
 *                  frames them; the last chunk is Python's to write (upstream_complete).
 *   EV_STRIP_IDS   the client did not ask for token ids: `"token_ids":[..]` and the first `"prompt_token_ids":[..]`
 *                  become `null`, as resume.py writes them (byte for byte: tests/test_pump_events.py).
 *   EV_STRIP_USAGE the gateway asked for the usage chunk, the client did not: what usage.py's StreamMeter does,
 *                  chunk by chunk with the replica's framing kept: the usage chunk is dropped, the chunks from the
 *                  one with a finish_reason on are held until it comes and get its system_fingerprint back.
 *   EV_RESUMED     (with EV_RESUME) a resumed part of a /v1/completions client's stream: resume.py's
 *                  ResumeStream._resumed, event by event. The top-level `id` and `created` get the original's values
 *                  (add()'s `ident` and `created`, orjson-encoded by Python; appended when absent, as a dict
 *                  assignment does), a choice's `prompt_token_ids` list becomes null (the resumed prompt is not the
 *                  client's), the usage numbers become those of an uninterrupted request (prompt - offset,
 *                  completion + offset); token ids are recorded and stripped as above; anything but `data:` events is
 *                  dropped; every event is its own chunk, as resume.py frames them. Values are copied where resume.py
 *                  re-serializes the event with orjson: an event that orjson would not write back byte for byte
 *                  (valid_value) breaks the stream instead (END_BROKEN, Stream.unmatched: Python resumes it
 *                  elsewhere) rather than reach the client other than the Python path writes it.
 *   EV_RESUMED_CHAT (with EV_RESUMED) the client asked for chat: `object` becomes "chat.completion.chunk" and each
 *                  completions choice is rebuilt as _resumed's chat choice, member by member (chat_choices).
 * The fields are found by their JSON key with the quote before it: vLLM's chunks are compact JSON, in which an
 * unescaped `"` cannot occur inside a string, so `"token_ids":[` is never content. */
enum { EV_ON = 1, EV_RESUME = 2, EV_STRIP_IDS = 4, EV_NEED_USAGE = 8, EV_FINISHED = 16, EV_USAGE_SENT = 32,
       EV_FIRST = 64, EV_STRIP_USAGE = 128, EV_PROMPT_KNOWN = 256, EV_RESUMED = 512, EV_RESUMED_CHAT = 1024 };
/* EV_STRIP_USAGE: a chunk not complete after this many bytes is not vLLM's: stop filtering, relay as it comes
 * (usage.py's _MAX_HELD). */
#define MAX_HELD_BYTES (1 << 20)
/* An SSE event this large is not vLLM's (one token an event): the stream is malformed. */
#define MAX_EVENT_BYTES (4 << 20)

typedef struct { char *data; size_t len, cap; } Buf;

typedef struct Pump Pump;

static void *pump_alloc(size_t n) {
    if (faulty(F_ALLOC)) return NULL;
    return PyMem_Malloc(n);
}

/* Room for n more bytes after b's data (which may move); -1: out of memory. */
static int buf_grow(Buf *b, size_t n) {
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) cap *= 2;
    char *data = faulty(F_ALLOC) ? NULL : PyMem_Realloc(b->data, cap);
    if (data == NULL) return -1;
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int buf_room(Buf *b, size_t n) {
    return b->len + n > b->cap ? buf_grow(b, n) : 0;
}

/* Inlined: called a few times an event, its call cost as much as its work (~20 instructions, callgrind). */
static inline __attribute__((always_inline)) int buf_put(Buf *b, const void *src, size_t n) {
    if (b == NULL || n == 0) return 0;
    if (buf_room(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static void buf_free(Buf *b) {
    PyMem_Free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
}


typedef struct Stream {
    PyObject_HEAD
    Pump *pump;           /* strong reference while registered */
    PyObject *on_end;     /* on_end(code, leftover bytes) */
    PyObject *weakrefs;
    int up_fd, cl_fd;     /* our dups; -1 once released */
    int state, digits, line;
    uint64_t size;
    int armed, cl_armed, blocked, sleeping, done, extra, zombie;
    double last_read, max_gap;
    long long reads, bytes_in;
    char *pending;
    Py_ssize_t pending_len, pending_off;
    struct Stream *next_sleeper;
    struct Stream *prev, *next;  /* the pump's registered streams, or its zombies */
    double wake;
    /* SSE events (EV_* flags) */
    int evflags, ev_err, done_sent, broken, finished, usage_sent, no_ids, have_prompt, got_prompt;
    int last_sent;  /* EV_RESUME: the response's last chunk went out after [DONE] (Python's to write otherwise) */
    long long events, prompt_tokens, completion_tokens;
    Buf ev;      /* payload not yet split into events */
    /* COLLECT_IN_PLACE: this read's payload, still in the pump's read buffer (ev was empty and it came in one piece):
     * handle_events reads it there and keeps only what it leaves of it in ev. Valid until that call only. */
    const char *span;
    size_t span_len;
    Buf ids;     /* token ids as the replica wrote them, comma separated: "12,7,5" */
    Buf prompt;  /* the prompt's token ids, the same way */
    Buf first;   /* the first JSON event (its id and created name a resumed stream) */
    Buf frames;  /* EV_STRIP_USAGE: the start of a chunk not complete yet */
    Buf held;    /* EV_STRIP_USAGE: whole chunks held until the usage chunk */
    int plain;   /* EV_STRIP_USAGE: relay as it comes from here on (the last chunk, or not vLLM's framing) */
    /* EV_RESUMED: the original's `id` and `created` as JSON, the tokens the resumed prompt holds, one event */
    Buf rw_ident, rw_created, rw_event;
    long long rw_offset;
    int unmatched;  /* EV_RESUMED: an event was not in the shape the rewrite follows (the stream broke on it) */
} Stream;

struct Pump {
    PyObject_HEAD
    int epfd, tfd;
    double coalesce_s;
    int min_streams;
    int in_flight;  /* the gateway's requests in flight, kept current by the relay (the coalescing threshold) */
    int active;
    int timer_armed;
    int broken;     /* epoll_wait failed: every stream was ended, nothing is watched any more */
    Stream *sleep_head, *sleep_tail;
    Stream *streams;  /* registered (each holds a reference of ours) */
    Stream *zombies;  /* released, but still in the epoll set (EPOLL_CTL_DEL failed): kept alive, retried */
    char *buf;
    Buf out;          /* a read's events as they go to the client (EV_RESUME) */
};

static PyTypeObject StreamType;
static PyTypeObject PumpType;

static double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static void list_push(Stream **head, Stream *s) {
    s->prev = NULL;
    s->next = *head;
    if (*head) (*head)->prev = s;
    *head = s;
}

static void list_remove(Stream **head, Stream *s) {
    if (s->prev) s->prev->next = s->next;
    else *head = s->next;
    if (s->next) s->next->prev = s->prev;
    s->prev = s->next = NULL;
}

/* How parse_chunked keeps the payload: not at all, copied into Stream.ev, or (COLLECT_IN_PLACE, for a read that
 * handle_events splits before the read buffer is reused) left where it is while it comes in one piece: copying each
 * read's payload into ev and moving the rest down after it cost ~100 instructions an event (callgrind, paced). */
enum { COLLECT_NONE, COLLECT_COPY, COLLECT_IN_PLACE };

/* The payload piece data[0:n] of a chunk, kept as `collect` says; `rest`: the bytes from it to the end of the read.
 * -1: out of memory. */
static int collect_piece(Stream *s, const char *data, size_t n, size_t rest, int collect) {
    if (collect == COLLECT_IN_PLACE && s->ev.len == 0 && s->span == NULL) {
        s->span = data;
        s->span_len = n;
        return 0;
    }
    /* Room for all the read can still bring at once: growing ev by doubling, piece by piece, copied a stream's
     * payload over and over when it came in large reads (realloc's copies: ~35k instructions a stream200 stream
     * with resume on, callgrind). */
    if (buf_room(&s->ev, (s->span != NULL ? s->span_len : 0) + rest) < 0) return -1;
    if (s->span != NULL) {  /* a second piece: both go to ev */
        const char *span = s->span;
        s->span = NULL;
        if (buf_put(&s->ev, span, s->span_len) < 0) return -1;
    }
    return buf_put(&s->ev, data, n);
}

/* Advance the chunked parser over data[0:len]; returns the offset just past the message end, len if the
 * message goes on, or -1 if the framing is malformed. */
static Py_ssize_t parse_chunked(Stream *s, const char *data, Py_ssize_t len, int collect) {
    Py_ssize_t i = 0;
    s->span = NULL;
    while (i < len) {
        char c = data[i];
        switch (s->state) {
        case C_SIZE: {
            int v;
            if (c >= '0' && c <= '9') v = c - '0';
            else if (c >= 'a' && c <= 'f') v = c - 'a' + 10;
            else if (c >= 'A' && c <= 'F') v = c - 'A' + 10;
            else v = -1;
            if (++s->line > MAX_CHUNK_LINE) goto bad;
            if (v >= 0) {
                /* The value is bounded, not the digit count: zero padding is valid (RFC 9112 7.1). */
                if (s->size >> 56) goto bad;  /* a chunk of 2^60 bytes or more is not a chunk */
                s->size = s->size * 16 + (uint64_t)v;
                s->digits = 1;
            } else if (s->digits == 0) {
                goto bad;
            } else if (c == '\r') {
                s->state = C_SIZE_LF;
            } else if (c == ';' || c == ' ' || c == '\t') {
                s->state = C_EXT;
            } else {
                goto bad;
            }
            i++;
            break;
        }
        case C_EXT:
            if (++s->line > MAX_CHUNK_LINE) goto bad;
            if (c == '\r') s->state = C_SIZE_LF;
            else if (c == '\n') goto bad;
            i++;
            break;
        case C_SIZE_LF:
            if (c != '\n') goto bad;
            s->state = s->size ? C_DATA : C_TRAILER_START;
            s->line = 0;
            i++;
            break;
        case C_DATA: {
            uint64_t take = (uint64_t)(len - i);
            if (take > s->size) take = s->size;
            if (collect && take && collect_piece(s, data + i, (size_t)take, (size_t)(len - i), collect) < 0)
                s->ev_err = 1;
            s->size -= take;
            i += (Py_ssize_t)take;
            if (s->size == 0) s->state = C_DATA_CR;
            break;
        }
        case C_DATA_CR:
            if (c != '\r') goto bad;
            s->state = C_DATA_LF;
            i++;
            break;
        case C_DATA_LF:
            if (c != '\n') goto bad;
            s->state = C_SIZE;
            s->digits = 0;
            s->line = 0;
            i++;
            break;
        case C_TRAILER_START:
        case C_TRAILER:
        case C_TRAILER_LF:
            if (++s->line > MAX_TRAILER_BYTES) goto bad;  /* `line` counts the whole trailer section here */
            if (s->state == C_TRAILER_START) {
                if (c == '\n') goto bad;
                s->state = c == '\r' ? C_LAST_LF : C_TRAILER;
            } else if (s->state == C_TRAILER) {
                if (c == '\r') s->state = C_TRAILER_LF;
                else if (c == '\n') goto bad;
            } else {
                if (c != '\n') goto bad;
                s->state = C_TRAILER_START;
            }
            i++;
            break;
        case C_LAST_LF:
            if (c != '\n') goto bad;
            s->state = C_DONE;
            return i + 1;
        default:
            goto bad;
        }
    }
    return len;
bad:
    s->state = C_BAD;
    return -1;
}

static int epoll_set(Pump *p, int op, int fd, uint32_t events, uint64_t tag) {
    struct epoll_event ev;
    if (op == EPOLL_CTL_ADD && faulty(F_EPOLL_ADD)) {
        errno = ENOMEM;
        return -1;
    }
    ev.events = events;
    ev.data.u64 = tag;
    return epoll_ctl(p->epfd, op, fd, &ev);
}

static int epoll_del(Pump *p, int fd) {
    if (faulty(F_EPOLL_DEL)) {
        errno = ENOMEM;
        return -1;
    }
    return epoll_ctl(p->epfd, EPOLL_CTL_DEL, fd, NULL);
}

/* Reading the replica stops by leaving the epoll set, not by an empty event mask: epoll reports a hang-up
 * even then, which would wake a blocked or sleeping stream's pump over and over. */
static int arm(Pump *p, Stream *s) {
    if (s->armed) return 0;
    if (epoll_set(p, EPOLL_CTL_ADD, s->up_fd, EPOLLIN, (uint64_t)(uintptr_t)s) < 0) return -1;
    s->armed = 1;
    return 0;
}

static int disarm(Pump *p, Stream *s) {
    if (!s->armed) return 0;
    if (epoll_del(p, s->up_fd) < 0) return -1;
    s->armed = 0;
    return 0;
}

static int disarm_client(Pump *p, Stream *s) {
    if (!s->cl_armed) return 0;
    if (epoll_del(p, s->cl_fd) < 0) return -1;
    s->cl_armed = 0;
    return 0;
}

/* Close what left the epoll set; 0 once nothing of the stream is registered any more. */
static int close_unregistered(Stream *s) {
    if (s->up_fd >= 0 && !s->armed) {
        close(s->up_fd);
        s->up_fd = -1;
    }
    if (s->cl_fd >= 0 && !s->cl_armed) {
        close(s->cl_fd);
        s->cl_fd = -1;
    }
    return s->armed || s->cl_armed;
}

/* Stop pumping: out of the epoll set, fds closed, pending bytes returned (a new reference or NULL).
 * A stream that cannot leave the epoll set stays alive among the pump's zombies, so the kernel never
 * hands us a pointer to freed memory. */
static PyObject *release(Stream *s) {
    PyObject *leftover = NULL;
    Pump *p = s->pump;
    if (p == NULL) return NULL;
    if (s->pending != NULL) {
        if (s->pending_len > s->pending_off)
            leftover = PyBytes_FromStringAndSize(s->pending + s->pending_off, s->pending_len - s->pending_off);
        PyMem_Free(s->pending);
        s->pending = NULL;
    }
    disarm(p, s);
    disarm_client(p, s);
    s->blocked = 0;
    s->sleeping = 0;  /* a sleeper left in the list is skipped when its window ends */
    list_remove(&p->streams, s);
    p->active--;
    s->pump = NULL;
    if (close_unregistered(s)) {
        s->zombie = 1;
        list_push(&p->zombies, s);  /* the pump's reference moves to the zombie list */
        return leftover;
    }
    Py_DECREF(p);
    Py_DECREF(s);  /* the pump's reference, taken in add() */
    return leftover;
}

/* A zombie's fd reported an event: try again to take it out of the epoll set. */
static void bury(Pump *p, Stream *s) {
    if (s->armed && epoll_del(p, s->up_fd) == 0) s->armed = 0;
    if (s->cl_armed && epoll_del(p, s->cl_fd) == 0) s->cl_armed = 0;
    if (close_unregistered(s)) return;
    s->zombie = 0;
    list_remove(&p->zombies, s);
    Py_DECREF(p);
    Py_DECREF(s);
}

static void finish(Stream *s, int code) {
    PyObject *on_end = s->on_end;
    Py_INCREF(s);  /* release() drops the pump's reference; the callback still needs the stream */
    PyObject *leftover = release(s);
    s->on_end = NULL;
    if (on_end != NULL) {
        PyObject *r = PyObject_CallFunction(on_end, "iO", code, leftover ? leftover : Py_None);
        if (r == NULL) PyErr_WriteUnraisable(on_end);
        Py_XDECREF(r);
        Py_DECREF(on_end);
    }
    Py_XDECREF(leftover);
    Py_DECREF(s);
}

static void arm_timer(Pump *p, double delay) {
    struct itimerspec it;
    memset(&it, 0, sizeof it);
    if (delay < 1e-6) delay = 1e-6;
    it.it_value.tv_sec = (time_t)delay;
    it.it_value.tv_nsec = (long)((delay - (double)it.it_value.tv_sec) * 1e9);
    if (timerfd_settime(p->tfd, 0, &it, NULL) == 0) p->timer_armed = 1;
}

/* Back-to-back reads: sleep one window so the next read takes what piled up meanwhile. */
static void sleep_stream(Pump *p, Stream *s, double now) {
    if (disarm(p, s) < 0) return;  /* still armed: it simply reads again, uncoalesced */
    s->sleeping = 1;
    s->wake = now + p->coalesce_s;
    s->next_sleeper = NULL;
    Py_INCREF(s);  /* the list's reference */
    if (p->sleep_tail) p->sleep_tail->next_sleeper = s;
    else p->sleep_head = s;
    p->sleep_tail = s;
    if (!p->timer_armed) arm_timer(p, p->coalesce_s);
}

static void drop_sleepers(Pump *p) {
    while (p->sleep_head != NULL) {
        Stream *s = p->sleep_head;
        p->sleep_head = s->next_sleeper;
        s->next_sleeper = NULL;
        Py_DECREF(s);
    }
    p->sleep_tail = NULL;
}

static void wake_sleepers(Pump *p) {
    uint64_t expirations;
    ssize_t r = read(p->tfd, &expirations, sizeof expirations);
    (void)r;
    p->timer_armed = 0;
    double now = monotonic_now();
    while (p->sleep_head != NULL && p->sleep_head->wake <= now + 1e-4) {
        Stream *s = p->sleep_head;
        p->sleep_head = s->next_sleeper;
        if (p->sleep_head == NULL) p->sleep_tail = NULL;
        if (s->sleeping && s->pump == p) {
            s->sleeping = 0;
            if (arm(p, s) < 0) finish(s, END_PUMP_ERROR);
        }
        Py_DECREF(s);
    }
    if (p->sleep_head != NULL) arm_timer(p, p->sleep_head->wake - now);
}

/* The client could not take everything: keep the rest, stop reading the replica, wait for EPOLLOUT.
 * -1: the pump itself failed (memory, epoll); the caller ends the stream with END_PUMP_ERROR. */
static int block(Pump *p, Stream *s, const char *rest, Py_ssize_t n) {
    if (disarm(p, s) < 0) return -1;
    s->pending = pump_alloc((size_t)n);
    if (s->pending == NULL) return -1;
    memcpy(s->pending, rest, (size_t)n);
    s->pending_len = n;
    s->pending_off = 0;
    if (epoll_set(p, EPOLL_CTL_ADD, s->cl_fd, EPOLLOUT, (uint64_t)(uintptr_t)s | CLIENT_BIT) < 0) return -1;
    s->cl_armed = 1;
    s->blocked = 1;
    return 0;
}


/* ---------------------------------------------------------------- SSE events */

#define LIT(text) text, sizeof(text) - 1

/* How common a byte is in vLLM's compact JSON events (0: rarest). find() looks for the needle's rarest byte. */
static int commonness(unsigned char c) {
    switch (c) {
    case '[': return 0;
    case '_': case ' ': case '\r': return 1;
    case '"': case ':': case ',': case '{': case '}': return 4;
    case 'a': case 'c': case 'd': case 'e': case 'i': case 'l': case 'n': case 'o': case 'r': case 's': case 't':
        return 3;
    default: return c >= '0' && c <= '9' ? 3 : 2;
    }
}

/* memmem for the short literal needles of this file: memchr for the needle's rarest byte (its offset kept per
 * needle), then memcmp around it. glibc's memmem (string/memmem.c, 2.36: a 256-byte shift table cleared and filled
 * on every call) is built for long haystacks; here it is called several times an event on ~250-byte events, and made
 * 186k of the 308k instructions token accounting added to a paced 100-event stream in the pump (callgrind,
 * docs/performance.md); this find about half as many. */
static const char *anchor_of[256];  /* the needles seen (string literals: their address names them) */
static size_t anchor_at[256];       /* and the offset of each one's rarest byte */

static size_t anchor(const char *needle, size_t m) {
    size_t slot = (size_t)(((uint64_t)(uintptr_t)needle * 0x9E3779B97F4A7C15u) >> 56);  /* literals are packed */
    if (anchor_of[slot] == needle && anchor_at[slot] < m) return anchor_at[slot];  /* any offset < m is correct */
    size_t k = 0;
    int best = commonness((unsigned char)needle[0]);
    for (size_t i = 1; i < m && best > 0; i++) {
        int r = commonness((unsigned char)needle[i]);
        if (r < best) {
            best = r;
            k = i;
        }
    }
    anchor_of[slot] = needle;
    anchor_at[slot] = k;
    return k;
}

/* find with the rare byte's offset given (k < m): inlined where it runs every event, the offset a constant there
 * (anchor's lookup and find's call were ~70 instructions a search, callgrind). A candidate's first and last bytes are
 * compared before memcmp: most candidates differ there (`"finish_reason":null` from `"finish_reason":"` at its last,
 * `,"stop_reason"` at its first), and a memcmp call costs ~30 instructions. */
static inline __attribute__((always_inline)) const char *find_k(const char *hay, size_t n, const char *needle,
                                                                size_t m, size_t k) {
    if (n < m) return NULL;
    const char *at = hay + k, *last = hay + (n - m) + k;  /* where the rare byte can be */
    while (at <= last && (at = memchr(at, needle[k], (size_t)(last - at) + 1)) != NULL) {
        const char *c = at - k;
        if (c[0] == needle[0] && c[m - 1] == needle[m - 1] && memcmp(c, needle, m) == 0) return c;
        at++;
    }
    return NULL;
}
#define FIND_K(hay, n, text, k) find_k(hay, n, text, sizeof(text) - 1, k)

static const char *find(const char *hay, size_t n, const char *needle, size_t m) {
    if (m == 0) return hay;
    return find_k(hay, n, needle, m, anchor(needle, m));
}

/* A chunk-size line ("%zx\r\n", up to 18 bytes) into line; its length. snprintf went through vfprintf and its
 * string output: ~500 instructions, once a read of a resumable stream (~50k of a paced 100-event stream's,
 * callgrind). */
static int hex_line(char *line, size_t v) {
    char digits[16];
    int n = 0;
    do {
        digits[n++] = "0123456789abcdef"[v & 15];
        v >>= 4;
    } while (v);
    for (int i = 0; i < n; i++) line[i] = digits[n - 1 - i];
    line[n] = '\r';
    line[n + 1] = '\n';
    return n + 2;
}

/* `"name"` used as a key: the quoted name, optional blanks, then a colon (vLLM's error event is written by
 * json.dumps, with a blank after each colon). */
static int has_key(const char *d, size_t n, const char *quoted, size_t m) {
    const char *end = d + n, *at = d;
    while ((at = find(at, (size_t)(end - at), quoted, m)) != NULL) {
        const char *c = at + m;
        while (c < end && (*c == ' ' || *c == '\t')) c++;
        if (c < end && *c == ':') return 1;
        at += m;
    }
    return 0;
}

/* The integer after `key` (which ends with its colon), or -1. */
static long long count_after(const char *d, size_t n, const char *key, size_t m) {
    const char *at = find(d, n, key, m), *end = d + n;
    if (at == NULL) return -1;
    const char *c = at + m;
    while (c < end && *c == ' ') c++;
    if (c == end || *c < '0' || *c > '9') return -1;
    long long v = 0;
    for (; c < end && *c >= '0' && *c <= '9'; c++) {
        if (v > (LLONG_MAX - 9) / 10) return -1;
        v = v * 10 + (*c - '0');
    }
    return v;
}

/* A choice's text is not empty (`"content":"x` or `"text":"x`): output that a resume could not rebuild without
 * its token ids. */
static int has_text(const char *d, size_t n) {
    static const char *const keys[] = {"\"content\":\"", "\"text\":\""};
    for (int k = 0; k < 2; k++) {
        size_t m = strlen(keys[k]);
        const char *at = find(d, n, keys[k], m);
        if (at != NULL && at + m < d + n && at[m] != '"') return 1;
    }
    return 0;
}

/* The next list of token ids in [from, end): `"token_ids":[` (IDS_OUTPUT) or, with `prompt`, `"prompt_token_ids":[`
 * (IDS_PROMPT), whichever comes first; its brackets in *open and *close. 0: none, or not closed before `end`. */
enum { IDS_OUTPUT = 1, IDS_PROMPT = 2 };
static int next_ids(const char *from, const char *end, int prompt, const char **open, const char **close) {
    const char *ids = find(from, (size_t)(end - from), LIT("\"token_ids\":["));
    const char *first = prompt ? find(from, (size_t)(end - from), LIT("\"prompt_token_ids\":[")) : NULL;
    int is_prompt = first != NULL && (ids == NULL || first < ids);
    const char *key = is_prompt ? first : ids;
    if (key == NULL) return 0;
    *open = key + (is_prompt ? sizeof("\"prompt_token_ids\":[") : sizeof("\"token_ids\":[")) - 2;
    *close = memchr(*open, ']', (size_t)(end - *open));
    return *close == NULL ? 0 : is_prompt ? IDS_PROMPT : IDS_OUTPUT;
}

/* The ids between a list's brackets, appended to those the stream relayed (Stream.token_ids: b"12,7,5"). */
static int record_ids(Stream *s, const char *open, const char *close) {
    if (close == open + 1) return 0;  /* [] */
    if (s->ids.len && buf_put(&s->ids, ",", 1) < 0) return -1;
    return buf_put(&s->ids, open + 1, (size_t)(close - open - 1));
}

/* The event of one token as vLLM writes it: after the choices' own `[`, the first `[` opens `"token_ids":[` and
 * holds ids only (digits and commas), and no `[` follows its `]`: then it is the event's one list of ids, and the
 * only one the loop of handle_event (next_ids, twice, with prompt_token_ids too) would find. Its `[` (and the `]` in
 * *close), or NULL: handle_event's general path decides. One memchr for each bracket where next_ids made two to
 * three finds (each a memchr and a memcmp) and has_text two more (~1,300 instructions an event before, callgrind). */
static const char *one_ids_list(const char *after, const char *end, const char **close) {
    const char *open = memchr(after, '[', (size_t)(end - after));
    if (open == NULL || open - after < 12 || memcmp(open - 12, "\"token_ids\":", 12) != 0) return NULL;
    const char *c = open + 1;
    while (c < end && ((*c >= '0' && *c <= '9') || *c == ',')) c++;
    if (c == end || *c != ']' || memchr(c + 1, '[', (size_t)(end - c - 1)) != NULL) return NULL;
    *close = c;
    return open;
}

/* handle_event's end for one_ids_list's event: the same state and bytes as its general path. The finish_reason is
 * searched for around the list only: the needle `"finish_reason":"` cannot start inside `token_ids":[ids]` (no
 * quote there it could start with), and a match that reaches into the key ends at its opening quote. */
static int handle_token_event(Stream *s, const char *ev, size_t n, const char *after, const char *open,
                              const char *close, Buf *out) {
    const char *end = ev + n, *key = open - 12;
    if (FIND_K(after, (size_t)(key + 1 - after), "\"finish_reason\":\"", 7) != NULL
            || FIND_K(close + 1, (size_t)(end - 2 - (close + 1)), "\"finish_reason\":\"", 7) != NULL)
        s->finished = 1;
    if (close > open + 1) {  /* record_ids, with one allocation check */
        size_t m = (size_t)(close - open - 1);
        if (buf_room(&s->ids, m + 1) < 0) return -1;
        if (s->ids.len) s->ids.data[s->ids.len++] = ',';
        memcpy(s->ids.data + s->ids.len, open + 1, m);
        s->ids.len += m;
    }
    if (out == NULL) return 0;
    if (!(s->evflags & EV_STRIP_IDS)) return buf_put(out, ev, n);
    size_t head = (size_t)(open - ev), tail = (size_t)(end - (close + 1));
    if (buf_room(out, head + 4 + tail) < 0) return -1;
    char *w = out->data + out->len;
    memcpy(w, ev, head);
    memcpy(w + head, "null", 4);
    memcpy(w + head + 4, close + 1, tail);
    out->len += head + 4 + tail;
    return 0;
}

/* One complete event (`ev` ends with its blank line): what it tells, and what of it goes to `out` (NULL: the
 * bytes are relayed as they came). resume.py's ResumeStream._event and _batch, event by event. */
static int handle_event(Stream *s, const char *ev, size_t n, int lines, Buf *out) {
    int flags = s->evflags;
    int resume = flags & EV_RESUME;
    if (n < 8 || memcmp(ev, "data: ", 6) != 0)
        return buf_put(out, ev, n);  /* a comment or another field: not vLLM's, not ours to drop either */
    const char *d = ev + 6;
    size_t dn = n - 8;
    if (dn == 6 && memcmp(d, "[DONE]", 6) == 0) {
        if (resume) {
            if (!(s->finished && (s->usage_sent || !(flags & EV_NEED_USAGE)))) {
                s->broken = 1;  /* the engine gave up without finishing */
                return 0;
            }
            s->done_sent = 1;
        }
        return buf_put(out, ev, n);
    }
    /* Per event the searches stop at their first match, near the event's start or end (vLLM's key order: id, object,
     * created, model, choices, then the choice's finish_reason and token_ids): only the rare events scan it all. */
    int json = dn >= 2 && d[0] == '{' && d[dn - 1] == '}' && lines == 0;
    const char *choices = FIND_K(d, dn, "\"choices\":[", 10);
    if (resume) {
        if (!json || (choices == NULL && has_key(d, dn, LIT("\"error\"")) && !has_key(d, dn, LIT("\"choices\"")))) {
            s->broken = 1;  /* vLLM's in-band engine error, or not an event of its: resume from what the client has */
            return 0;
        }
        if ((flags & EV_FIRST) && s->first.len == 0 && buf_put(&s->first, d, dn) < 0) return -1;
    }
    const char *after = choices != NULL ? choices + sizeof("\"choices\":[") - 1 : d;
    const char *usage = choices != NULL && after < d + dn && *after == ']'  /* the usage chunk: no choices */
        ? find(after, (size_t)(d + dn - after), LIT("\"usage\":")) : NULL;
    if (json && usage == NULL) s->events++;
    if (usage != NULL) {
        s->usage_sent = 1;
        size_t rest = (size_t)(d + dn - usage);
        long long prompt = count_after(usage, rest, LIT("\"prompt_tokens\":"));
        long long completion = count_after(usage, rest, LIT("\"completion_tokens\":"));
        if (prompt >= 0) {
            s->prompt_tokens = prompt;
            s->completion_tokens = completion >= 0 ? completion : 0;
        }
    }
    if (!resume) {
        if (FIND_K(after, (size_t)(d + dn - after), "\"finish_reason\":\"", 7) != NULL) s->finished = 1;
        return 0;
    }
    const char *end = ev + n, *open, *close;
    if (choices != NULL && (open = one_ids_list(after, end, &close)) != NULL)
        return handle_token_event(s, ev, n, after, open, close, out);
    if (find(after, (size_t)(d + dn - after), LIT("\"finish_reason\":\"")) != NULL) s->finished = 1;
    /* Token ids: recorded, and written as null when the client did not ask for them. */
    const char *at = ev, *from = after;  /* the ids are in the choices or after them */
    int found_ids = 0, kind;
    while ((kind = next_ids(from, end, !s->have_prompt, &open, &close)) != 0) {
        if (kind == IDS_PROMPT) {
            s->have_prompt = s->got_prompt = 1;
            s->prompt.len = 0;
            if (buf_put(&s->prompt, open + 1, (size_t)(close - open - 1)) < 0) return -1;
        } else {
            found_ids = 1;
            if (record_ids(s, open, close) < 0) return -1;
        }
        if (flags & EV_STRIP_IDS) {
            if (buf_put(out, at, (size_t)(open - at)) < 0 || buf_put(out, "null", 4) < 0) return -1;
        } else if (buf_put(out, at, (size_t)(close + 1 - at)) < 0) {
            return -1;
        }
        at = from = close + 1;
    }
    if (!found_ids && has_text(d, dn)) s->no_ids = 1;  /* output we could not resume from */
    return buf_put(out, at, (size_t)(end - at));
}

/* ---------------------------------------------------------------- EV_RESUMED: resume.py's _resumed in C */

/* The rewrite copies values as they came where resume.py re-serializes the event with orjson, so it follows only
 * what orjson writes back unchanged: compact JSON (no blanks), strings of valid UTF-8 with orjson's escapes only
 * (\" \\ \b \t \n \f \r, \u00xx for the other control characters), integers of up to 18 digits (no -0, no float:
 * orjson writes 1E2 as 100.0), no key twice in an object. Anything else is "unmatched" (see EV_RESUMED). */
#define MAX_DEPTH 32
#define MAX_KEYS 32

typedef struct { const char *at, *end; } Span;  /* a member's value */

/* Past the JSON string at c (its opening quote), or NULL. */
static const char *valid_string(const char *c, const char *end) {
    for (c++; c < end;) {
        unsigned char u = (unsigned char)*c;
        if (u == '"') return c + 1;
        if (u < 0x20) return NULL;
        if (u == '\\') {
            if (end - c < 2) return NULL;
            char x = c[1];
            if (x == '"' || x == '\\' || x == 'b' || x == 't' || x == 'n' || x == 'f' || x == 'r') {
                c += 2;
                continue;
            }
            if (x != 'u' || end - c < 6 || c[2] != '0' || c[3] != '0' || (c[4] != '0' && c[4] != '1')) return NULL;
            char lo = c[5];
            int v = (c[4] - '0') * 16 + (lo >= '0' && lo <= '9' ? lo - '0' : lo >= 'a' && lo <= 'f' ? lo - 'a' + 10 : -100);
            if (v < 0 || v == 8 || v == 9 || v == 10 || v == 12 || v == 13) return NULL;  /* those have short forms */
            c += 6;
            continue;
        }
        if (u < 0x80) {
            c++;
            continue;
        }
        int n;
        unsigned cp;
        if (u >= 0xc2 && u <= 0xdf) n = 1, cp = u & 0x1f;
        else if (u >= 0xe0 && u <= 0xef) n = 2, cp = u & 0x0f;
        else if (u >= 0xf0 && u <= 0xf4) n = 3, cp = u & 0x07;
        else return NULL;
        if (end - c <= n) return NULL;
        for (int i = 1; i <= n; i++) {
            unsigned char b = (unsigned char)c[i];
            if ((b & 0xc0) != 0x80) return NULL;
            cp = cp << 6 | (b & 0x3f);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return NULL;  /* overlong, a surrogate, past U+10FFFF: orjson refuses it */
        c += n + 1;
    }
    return NULL;
}

static const char *valid_value(const char *c, const char *end, int depth);

/* The members of an object ([c, end): between its braces): each key once, each value valid; the values of the
 * wanted keys in `found` (when not NULL). -1: not in the form above. */
static int object_members(const char *c, const char *end, int depth, const char *const *keys, int nkeys,
                          Span *found) {
    const char *seen[MAX_KEYS];
    size_t seen_len[MAX_KEYS];
    int nseen = 0;
    for (int k = 0; k < nkeys; k++) found[k].at = found[k].end = NULL;
    if (c == end) return 0;
    for (;;) {
        if (c >= end || *c != '"' || nseen == MAX_KEYS) return -1;
        const char *key = c;
        if ((c = valid_string(c, end)) == NULL || c >= end || *c != ':') return -1;
        size_t kn = (size_t)(c - key);
        for (int i = 0; i < nseen; i++)
            if (seen_len[i] == kn && memcmp(seen[i], key, kn) == 0) return -1;  /* orjson keeps one: not followed */
        seen[nseen] = key;
        seen_len[nseen++] = kn;
        const char *value = ++c;
        if ((c = valid_value(c, end, depth + 1)) == NULL) return -1;
        for (int k = 0; k < nkeys; k++) {
            if (strlen(keys[k]) == kn && memcmp(keys[k], key, kn) == 0) {
                found[k].at = value;
                found[k].end = c;
            }
        }
        if (c == end) return 0;
        if (*c != ',' || ++c == end) return -1;
    }
}

/* Past the JSON value at c, or NULL. */
static const char *valid_value(const char *c, const char *end, int depth) {
    if (c >= end || depth > MAX_DEPTH) return NULL;
    switch (*c) {
    case '"':
        return valid_string(c, end);
    case '{': {
        /* Its closing brace: the first '}' at this depth, found while validating. */
        const char *at = c + 1;
        if (at < end && *at == '}') return at + 1;
        const char *seen[MAX_KEYS];
        size_t seen_len[MAX_KEYS];
        int nseen = 0;
        for (;;) {
            if (at >= end || *at != '"' || nseen == MAX_KEYS) return NULL;
            const char *key = at;
            if ((at = valid_string(at, end)) == NULL || at >= end || *at != ':') return NULL;
            size_t kn = (size_t)(at - key);
            for (int i = 0; i < nseen; i++)
                if (seen_len[i] == kn && memcmp(seen[i], key, kn) == 0) return NULL;
            seen[nseen] = key;
            seen_len[nseen++] = kn;
            if ((at = valid_value(at + 1, end, depth + 1)) == NULL || at >= end) return NULL;
            if (*at == '}') return at + 1;
            if (*at != ',') return NULL;
            at++;
        }
    }
    case '[': {
        const char *at = c + 1;
        if (at < end && *at == ']') return at + 1;
        for (;;) {
            if ((at = valid_value(at, end, depth + 1)) == NULL || at >= end) return NULL;
            if (*at == ']') return at + 1;
            if (*at != ',') return NULL;
            at++;
        }
    }
    case 't':
        return end - c >= 4 && memcmp(c, "true", 4) == 0 ? c + 4 : NULL;
    case 'f':
        return end - c >= 5 && memcmp(c, "false", 5) == 0 ? c + 5 : NULL;
    case 'n':
        return end - c >= 4 && memcmp(c, "null", 4) == 0 ? c + 4 : NULL;
    default: {
        const char *at = c;
        if (*at == '-') at++;
        const char *digits = at;
        while (at < end && *at >= '0' && *at <= '9') at++;
        size_t n = (size_t)(at - digits);
        if (n == 0 || n > 18 || (n > 1 && *digits == '0') || (n == 1 && *digits == '0' && digits > c)) return NULL;
        if (at < end && (*at == '.' || *at == 'e' || *at == 'E')) return NULL;  /* a float: orjson may write it back otherwise */
        return at;
    }
    }
}

/* The values of the wanted keys among an object's members ([c, end): between its braces); -1: not in the form
 * above. */
static int members(const char *c, const char *end, const char *const *keys, int nkeys, Span *found) {
    return object_members(c, end, 0, keys, nkeys, found);
}

/* The integer a value holds as orjson writes one (Python's int: not a float, not a bool), in *v; 0: not one. */
static int int_value(Span v, long long *out) {
    const char *c = v.at;
    int neg = c < v.end && *c == '-';
    if (neg) c++;
    size_t digits = (size_t)(v.end - c);
    if (digits == 0 || digits > 18 || (digits > 1 && *c == '0')) return 0;
    long long n = 0;
    for (; c < v.end; c++) {
        if (*c < '0' || *c > '9') return 0;
        n = n * 10 + (*c - '0');
    }
    *out = neg ? -n : n;
    return 1;
}

static int put_int(Buf *b, long long v) {
    char text[24];
    int m = snprintf(text, sizeof text, "%lld", v);
    return buf_put(b, text, (size_t)m);
}

/* The choices' token ids: recorded (and written as null unless the client asked for them); a choice's
 * prompt_token_ids list is written as null. */
static int resumed_choices(Stream *s, Span v, Buf *out) {
    const char *at = v.at, *from = v.at, *end = v.end, *open, *close;
    int found_ids = 0, kind;
    while ((kind = next_ids(from, end, 1, &open, &close)) != 0) {
        if (kind == IDS_OUTPUT) {
            found_ids = 1;
            if (record_ids(s, open, close) < 0) return -1;
        }
        if (kind == IDS_PROMPT || (s->evflags & EV_STRIP_IDS)) {
            if (buf_put(out, at, (size_t)(open - at)) < 0 || buf_put(out, "null", 4) < 0) return -1;
        } else if (buf_put(out, at, (size_t)(close + 1 - at)) < 0) {
            return -1;
        }
        at = from = close + 1;
    }
    if (find(v.at, (size_t)(v.end - v.at), LIT("\"finish_reason\":\"")) != NULL) s->finished = 1;
    if (!found_ids && has_text(v.at, (size_t)(v.end - v.at))) s->no_ids = 1;  /* output we could not resume from */
    return buf_put(out, at, (size_t)(end - at));
}

/* The usage of an uninterrupted request: the resumed prompt held `offset` tokens the client got as output. */
static int resumed_usage(Stream *s, Span v, Buf *out) {
    static const char *const keys[] = {"\"prompt_tokens\"", "\"completion_tokens\""};
    Span f[2];
    long long prompt = 0, completion = 0;
    if (v.end - v.at < 2 || *v.at != '{' || members(v.at + 1, v.end - 1, keys, 2, f) < 0)
        return buf_put(out, v.at, (size_t)(v.end - v.at)) < 0 ? -1 : 0;  /* not a dict: as it is (scanned already) */
    if (f[0].at == NULL || !int_value(f[0], &prompt)) return buf_put(out, v.at, (size_t)(v.end - v.at));
    int has_completion = f[1].at != NULL && int_value(f[1], &completion);
    prompt -= s->rw_offset;
    if (has_completion) completion += s->rw_offset;
    s->prompt_tokens = prompt;
    s->completion_tokens = has_completion ? completion : 0;
    Span first = f[0], second = f[1];
    long long a = prompt, b = completion;
    if (has_completion && f[1].at < f[0].at) {
        first = f[1], second = f[0];
        a = completion, b = prompt;
    }
    if (buf_put(out, v.at, (size_t)(first.at - v.at)) < 0 || put_int(out, a) < 0) return -1;
    if (!has_completion) return buf_put(out, first.end, (size_t)(v.end - first.end));
    if (buf_put(out, first.end, (size_t)(second.at - first.end)) < 0 || put_int(out, b) < 0) return -1;
    return buf_put(out, second.end, (size_t)(v.end - second.end));
}

static int is_null(Span v) { return v.at == NULL || (v.end - v.at == 4 && memcmp(v.at, "null", 4) == 0); }

/* Python's truth of a JSON value (missing: None). */
static int truthy(Span v) {
    static const char *const falsy[] = {"null", "\"\"", "false", "0", "[]", "{}"};
    if (v.at == NULL) return 0;
    for (int i = 0; i < 6; i++)
        if (strlen(falsy[i]) == (size_t)(v.end - v.at) && memcmp(falsy[i], v.at, (size_t)(v.end - v.at)) == 0)
            return 0;
    return 1;
}

static int put_span(Buf *b, Span v, const char *absent, size_t n) {
    return v.at == NULL ? buf_put(b, absent, n) : buf_put(b, v.at, (size_t)(v.end - v.at));
}

/* EV_RESUMED_CHAT: each /v1/completions choice rebuilt as the chat choice resume.py's _resumed makes of it:
 * {"index","delta":{"content":text},"logprobs":null,"finish_reason"[,"stop_reason" when finished],"token_ids"}, the
 * values copied as they are (compact JSON is what orjson writes back). -2: not an array of compact objects. */
static int chat_choices(Stream *s, Span v, Buf *out) {
    static const char *const keys[] = {"\"index\"", "\"text\"", "\"finish_reason\"", "\"stop_reason\"",
                                       "\"token_ids\""};
    enum { INDEX, TEXT, FINISH, STOP, IDS };
    const char *c = v.at, *end = v.end - 1;
    if (v.end - v.at < 2 || *c != '[' || *end != ']') return -2;
    if (buf_put(out, "[", 1) < 0) return -1;
    for (c++; c < end;) {
        const char *next = *c == '{' ? valid_value(c, end, 1) : NULL;
        Span f[5];
        if (next == NULL || members(c + 1, next - 1, keys, 5, f) < 0) return -2;
        if (buf_put(out, LIT("{\"index\":")) < 0 || put_span(out, f[INDEX], LIT("0")) < 0
                || buf_put(out, LIT(",\"delta\":{\"content\":")) < 0 || put_span(out, f[TEXT], LIT("null")) < 0
                || buf_put(out, LIT("},\"logprobs\":null,\"finish_reason\":")) < 0
                || put_span(out, f[FINISH], LIT("null")) < 0)
            return -1;
        if (!is_null(f[FINISH])) {
            s->finished = 1;
            if (buf_put(out, LIT(",\"stop_reason\":")) < 0 || put_span(out, f[STOP], LIT("null")) < 0) return -1;
        }
        if (buf_put(out, LIT(",\"token_ids\":")) < 0) return -1;
        Span ids = f[IDS];
        if (ids.at != NULL && *ids.at == '[') {
            if (record_ids(s, ids.at, ids.end - 1) < 0) return -1;
            if ((s->evflags & EV_STRIP_IDS) ? buf_put(out, LIT("null")) < 0 : put_span(out, ids, NULL, 0) < 0)
                return -1;
        } else {
            if (put_span(out, ids, LIT("null")) < 0) return -1;
            if (truthy(f[TEXT])) s->no_ids = 1;  /* output we could not resume from */
        }
        if (buf_put(out, "}", 1) < 0) return -1;
        c = next;
        if (c == end) break;
        if (*c != ',' || ++c == end) return -2;
        if (buf_put(out, ",", 1) < 0) return -1;
    }
    return buf_put(out, "]", 1);
}

/* One complete event of a resumed part (EV_RESUMED), framed as its own chunk into `out`. */
static int handle_resumed(Stream *s, const char *ev, size_t n, int lines, Buf *out) {
    int flags = s->evflags;
    if (n < 8 || memcmp(ev, "data: ", 6) != 0) return 0;  /* not the client's: resume.py drops it */
    const char *d = ev + 6;
    size_t dn = n - 8;
    Buf *e = &s->rw_event;
    e->len = 0;
    if (dn == 6 && memcmp(d, "[DONE]", 6) == 0) {
        if (!(s->finished && (s->usage_sent || !(flags & EV_NEED_USAGE)))) {
            s->broken = 1;  /* the engine gave up without finishing */
            return 0;
        }
        s->done_sent = 1;
        if (buf_put(e, ev, n) < 0) return -1;
    } else {
        static const char *const keys[] = {"\"id\"", "\"created\"", "\"choices\"", "\"usage\"", "\"object\"",
                                           "\"error\""};
        enum { ID, CREATED, CHOICES, USAGE, OBJECT, ERROR };
        int chat = (flags & EV_RESUMED_CHAT) != 0;
        Span f[6];
        if (dn < 2 || d[0] != '{' || d[dn - 1] != '}' || lines) {
            s->broken = 1;  /* not a JSON object: resume from what the client has */
            return 0;
        }
        if (members(d + 1, d + dn - 1, keys, 6, f) < 0) {
            s->broken = 1;
            /* vLLM's in-band error (written by json.dumps, blanks and all) breaks it as on the Python path; anything
             * else not compact is what EV_RESUMED does not follow */
            s->unmatched = !(has_key(d, dn, LIT("\"error\"")) && !has_key(d, dn, LIT("\"choices\"")));
            return 0;
        }
        if (f[ERROR].at != NULL && f[CHOICES].at == NULL) {
            s->broken = 1;  /* vLLM's in-band engine error */
            return 0;
        }
        Span *v = &f[CHOICES];
        int no_choices = v->at == NULL || (v->end - v->at == 2 && v->at[0] == '[') || (v->end - v->at == 4 &&
                                                                                        memcmp(v->at, "null", 4) == 0);
        if (no_choices && f[USAGE].at != NULL && !(f[USAGE].end - f[USAGE].at == 4 && memcmp(f[USAGE].at, "null", 4) == 0))
            s->usage_sent = 1;
        else
            s->events++;
        /* The members to rewrite, in their order in the event. */
        int order[5] = {ID, CREATED, CHOICES, USAGE, OBJECT}, k = 0;
        for (int i = 1; i < 5; i++)
            for (int j = i; j > 0; j--) {
                const char *x = f[order[j]].at, *y = f[order[j - 1]].at;
                if (x == NULL || (y != NULL && y < x)) break;
                int t = order[j]; order[j] = order[j - 1]; order[j - 1] = t;
            }
        const char *at = d;
        if (buf_put(e, "data: ", 6) < 0) return -1;
        for (k = 0; k < 5; k++) {
            int which = order[k];
            Span m = f[which];
            if (m.at == NULL || (which == OBJECT && !chat)) continue;
            if (buf_put(e, at, (size_t)(m.at - at)) < 0) return -1;
            int r = which == ID ? buf_put(e, s->rw_ident.data, s->rw_ident.len)
                : which == CREATED ? buf_put(e, s->rw_created.data, s->rw_created.len)
                : which == CHOICES ? (no_choices ? buf_put(e, m.at, (size_t)(m.end - m.at))
                                      : chat ? chat_choices(s, m, e) : resumed_choices(s, m, e))
                : which == OBJECT ? buf_put(e, LIT("\"chat.completion.chunk\""))
                : resumed_usage(s, m, e);
            if (r == -2) {
                s->broken = s->unmatched = 1;  /* a choice not in compact JSON: see EV_RESUMED */
                e->len = 0;
                return 0;
            }
            if (r < 0) return -1;
            at = m.end;
        }
        if (buf_put(e, at, (size_t)(d + dn - 1 - at)) < 0) return -1;
        int empty = dn == 2;
        if (f[ID].at == NULL) {  /* ev["id"] = ...: a new key goes last */
            if ((!empty && buf_put(e, ",", 1) < 0) || buf_put(e, LIT("\"id\":")) < 0
                    || buf_put(e, s->rw_ident.data, s->rw_ident.len) < 0)
                return -1;
            empty = 0;
        }
        if (f[CREATED].at == NULL) {
            if ((!empty && buf_put(e, ",", 1) < 0) || buf_put(e, LIT("\"created\":")) < 0
                    || buf_put(e, s->rw_created.data, s->rw_created.len) < 0)
                return -1;
            empty = 0;
        }
        if (chat && f[OBJECT].at == NULL
                && ((!empty && buf_put(e, ",", 1) < 0) || buf_put(e, LIT("\"object\":\"chat.completion.chunk\"")) < 0))
            return -1;
        if (buf_put(e, "}\n\n", 3) < 0) return -1;
    }
    char line[18];
    int m = hex_line(line, e->len);
    if (buf_put(out, line, (size_t)m) < 0 || buf_put(out, e->data, e->len) < 0 || buf_put(out, "\r\n", 2) < 0)
        return -1;
    return 0;
}

/* Split what the payload holds into events and handle each complete one; the rest waits for the next read.
 * With `out` the events that go to the client are appended to it. -1: out of memory. */
static int handle_events(Stream *s, Buf *out) {
    const char *data = s->ev.data;
    size_t len = s->ev.len, pos = 0;
    int in_place = s->span != NULL;
    if (in_place) {
        data = s->span;
        len = s->span_len;
        s->span = NULL;
    }
    while (pos < len && !s->broken) {
        /* The event ends at the first blank line; a lone newline before it makes it a multi-line event. */
        const char *nl = data + pos, *end = data + len;
        int lines = 0;
        while ((nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL && nl + 1 < end && nl[1] != '\n') {
            lines++;
            nl++;
        }
        if (nl == NULL || nl + 1 >= end) break;
        size_t n = (size_t)(nl + 2 - (data + pos));
        if (!s->done_sent && ((s->evflags & EV_RESUMED) ? handle_resumed(s, data + pos, n, lines, out)
                              : handle_event(s, data + pos, n, lines, out)) < 0)
            return -1;
        pos += n;
    }
    if (in_place) return buf_put(&s->ev, data + pos, len - pos);  /* an event the next read completes */
    if (pos) {
        memmove(s->ev.data, data + pos, len - pos);
        s->ev.len = len - pos;
    }
    return 0;
}

/* EV_RESUME: this read's events, framed as one chunk in the pump's `out` buffer; *start is where it begins. */
static int reframe(Pump *p, Stream *s, size_t *start) {
    Buf *out = &p->out;
    out->len = 0;
    if (s->evflags & EV_RESUMED) {  /* each event framed as its own chunk already */
        *start = 0;
        return handle_events(s, out);
    }
    enum { ROOM = 18 };  /* the chunk-size line goes right before the payload */
    if (buf_room(out, ROOM) < 0) return -1;
    out->len = ROOM;
    if (handle_events(s, out) < 0) return -1;
    size_t payload = out->len - ROOM;
    if (payload == 0) {
        *start = out->len;
        return 0;
    }
    char line[ROOM];
    int m = hex_line(line, payload);
    memcpy(out->data + ROOM - (size_t)m, line, (size_t)m);
    *start = ROOM - (size_t)m;
    if (buf_room(out, 2) < 0) return -1;
    out->data[out->len] = '\r';
    out->data[out->len + 1] = '\n';
    out->len += 2;
    return 0;
}


/* ---------------------------------------------------------------- EV_STRIP_USAGE: chunk by chunk */

static size_t count_of(const char *d, size_t n, const char *needle, size_t m) {
    size_t k = 0;
    const char *at = d, *end = d + n;
    while ((at = find(at, (size_t)(end - at), needle, m)) != NULL) {
        k++;
        at += m;
    }
    return k;
}

/* A held chunk as vLLM writes it when no usage chunk follows: with the fingerprint, re-framed (usage.py's
 * _with_fingerprint). */
static int put_with_fingerprint(Buf *out, const char *frame, size_t n, const char *fp, size_t fpn) {
    const char *eol = find(frame, n, "\r\n", 2);
    const char *payload = eol + 2;
    size_t pn = (size_t)(frame + n - 2 - payload);
    if (fp == NULL || find(payload, pn, LIT("\"system_fingerprint\"")) != NULL || pn < 3
            || memcmp(payload + pn - 3, "}\n\n", 3) != 0 || find(payload, pn, LIT("\"finish_reason\":\"")) == NULL)
        return buf_put(out, frame, n);
    char line[20];
    size_t size = pn - 3 + sizeof(",\"system_fingerprint\":") - 1 + fpn + 3;
    int m = hex_line(line, size);
    if (buf_put(out, line, (size_t)m) < 0 || buf_put(out, payload, pn - 3) < 0
            || buf_put(out, LIT(",\"system_fingerprint\":")) < 0 || buf_put(out, fp, fpn) < 0
            || buf_put(out, LIT("}\n\n\r\n")) < 0)
        return -1;
    return 0;
}

/* Where a chunk of `data` ends: the offset past it, 0 if incomplete, -1 if its size line is not one; its size line's
 * CRLF in *eol. The size is read before the CRLF is looked for: vLLM's size line is the digits and CRLF, so no search
 * (a find per chunk, ~130 instructions, callgrind), and hex digits hold no CR, so the first CRLF is at the first
 * byte that is not one or after it. */
static long long frame_end(const char *data, size_t len, uint64_t *size, const char **eol) {
    uint64_t v = 0;
    const char *c = data, *end = data + len;
    int digits = 0, over = 0;
    for (; c < end; c++) {
        int d;
        if (*c >= '0' && *c <= '9') d = *c - '0';
        else if (*c >= 'a' && *c <= 'f') d = *c - 'a' + 10;
        else if (*c >= 'A' && *c <= 'F') d = *c - 'A' + 10;
        else break;
        if (v >> 56) over = 1;
        v = v * 16 + (uint64_t)d;
        digits = 1;
    }
    const char *at = end - c >= 2 && c[0] == '\r' && c[1] == '\n' ? c : find(c, (size_t)(end - c), "\r\n", 2);
    if (at == NULL) return 0;
    if (!digits || over) return -1;
    *size = v;
    *eol = at;
    size_t past = (size_t)(at - data) + 2 + (size_t)v + 2;
    return v == 0 ? (long long)(at - data) + 2 : past > len ? 0 : (long long)past;
}

static int flush_held(Stream *s, Buf *out, const char *fp, size_t fpn) {
    const char *b = s->held.data;
    size_t pos = 0;
    while (pos < s->held.len) {
        uint64_t size;
        const char *eol;
        long long end = frame_end(b + pos, s->held.len - pos, &size, &eol);  /* held chunks are whole */
        if (end <= 0) break;
        if (put_with_fingerprint(out, b + pos, (size_t)end, fp, fpn) < 0) return -1;
        pos += (size_t)end;
    }
    s->held.len = 0;
    return 0;
}

static int strip_chunk(Stream *s, const char *frame, size_t n, const char *payload, size_t pn, Buf *out) {
    if (FIND_K(payload, pn, "\"choices\":[]", 10) != NULL) {
        const char *usage = find(payload, pn, LIT("\"usage\":"));
        long long prompt = -1, completion = -1;
        if (usage != NULL) {
            size_t rest = (size_t)(payload + pn - usage);
            prompt = count_after(usage, rest, LIT("\"prompt_tokens\":"));
            completion = count_after(usage, rest, LIT("\"completion_tokens\":"));
        }
        if (prompt >= 0) {
            s->prompt_tokens = prompt;
            s->completion_tokens = completion >= 0 ? completion : 0;
            s->usage_sent = 1;
            const char *fp = find(payload, pn, LIT("\"system_fingerprint\":\"")), *fpe = NULL;
            if (fp != NULL) {
                fp += sizeof("\"system_fingerprint\":") - 1;
                for (fpe = fp + 1; fpe < payload + pn && *fpe != '"'; fpe++)
                    if (*fpe == '\\') fpe++;
                if (fpe >= payload + pn) fp = NULL;
            }
            /* vLLM writes only [DONE] and the last chunk after it: the rest passes as it comes (usage.py's _chunk,
             * _PLAIN), and strip_usage relays the rest of this read so */
            s->plain = 1;
            return flush_held(s, out, fp, fp ? (size_t)(fpe + 1 - fp) : 0);  /* the client did not ask for it */
        }
    }
    const char *ev = payload, *pend = payload + pn;  /* count_of(payload, pn, "data: {"), inlined */
    while ((ev = FIND_K(ev, (size_t)(pend - ev), "data: {", 5)) != NULL) {
        s->events++;
        ev += 7;
    }
    if ((s->held.len || FIND_K(payload, pn, "\"finish_reason\":\"", 7) != NULL)
            && !(pn >= 12 && memcmp(payload, "data: [DONE]", 12) == 0))
        return buf_put(&s->held, frame, n);  /* until the usage chunk says which fingerprint it carried */
    if (s->held.len && flush_held(s, out, NULL, 0) < 0) return -1;  /* a call a chunk otherwise (callgrind) */
    return buf_put(out, frame, n);
}

/* This read's bytes, chunk by chunk (usage.py's StreamMeter._walk): into the pump's `out` buffer. The read is walked
 * where it is; only a chunk it does not complete is kept in `frames` for the next read (copying every read there
 * first cost a buf_put and a memmove a read, callgrind). */
static int strip_usage(Pump *p, Stream *s, const char *data, size_t len) {
    Buf *out = &p->out;
    out->len = 0;
    if (s->plain) return buf_put(out, data, len);
    int kept = s->frames.len > 0;
    if (kept && buf_put(&s->frames, data, len) < 0) return -1;
    const char *b = kept ? s->frames.data : data;
    size_t n = kept ? s->frames.len : len, pos = 0;
    while (pos < n) {
        uint64_t size;
        const char *eol;
        long long end = frame_end(b + pos, n - pos, &size, &eol);
        if (end == 0) break;
        if (end < 0 || size == 0) {  /* not a chunk, or the last one: nothing may stay held */
            s->plain = 1;
            if (flush_held(s, out, NULL, 0) < 0 || buf_put(out, b + pos, n - pos) < 0) return -1;
            pos = n;
            break;
        }
        if (strip_chunk(s, b + pos, (size_t)end, eol + 2, (size_t)size, out) < 0) return -1;
        pos += (size_t)end;
        if (s->plain) {  /* the usage chunk went */
            if (buf_put(out, b + pos, n - pos) < 0) return -1;
            pos = n;
        }
    }
    if (kept) {
        if (pos && pos < n) memmove(s->frames.data, b + pos, n - pos);
        s->frames.len = n - pos;
    } else if (pos < n && buf_put(&s->frames, b + pos, n - pos) < 0) {
        return -1;
    }
    if (s->frames.len > MAX_HELD_BYTES) {
        s->plain = 1;
        if (flush_held(s, out, NULL, 0) < 0 || buf_put(out, s->frames.data, s->frames.len) < 0) return -1;
        s->frames.len = 0;
    }
    return 0;
}

/* Keep bytes the client has not taken for Python to write (the stream ends here). */
static int stash(Stream *s, const char *rest, Py_ssize_t n) {
    if (n <= 0) return 0;
    s->pending = pump_alloc((size_t)n);
    if (s->pending == NULL) return -1;
    memcpy(s->pending, rest, (size_t)n);
    s->pending_len = n;
    s->pending_off = 0;
    return 0;
}

static void on_readable(Pump *p, Stream *s, double now) {
    /* MSG_DONTWAIT as on the send side: the fd's blocking mode is uvloop's to set, not ours to trust. */
    ssize_t n = recv(s->up_fd, p->buf, READ_SIZE, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        finish(s, END_UPSTREAM_ERROR);
        return;
    }
    if (n == 0) {
        finish(s, END_EOF);
        return;
    }
    s->reads++;
    s->bytes_in += n;
    double gap = now - s->last_read;
    if (gap > s->max_gap) s->max_gap = gap;
    s->last_read = now;
    Py_ssize_t end = parse_chunked(s, p->buf, n, s->evflags != 0 && !(s->evflags & EV_STRIP_USAGE)
                                   ? COLLECT_IN_PLACE : COLLECT_NONE);
    if (end < 0) {
        finish(s, END_MALFORMED);
        return;
    }
    s->done = s->state == C_DONE;
    s->extra = s->done && end < n;
    const char *out = p->buf;
    Py_ssize_t out_len = end;
    if (s->evflags & EV_STRIP_USAGE) {
        if (strip_usage(p, s, p->buf, (size_t)end) < 0) {
            finish(s, END_PUMP_ERROR);
            return;
        }
        out = p->out.data;
        out_len = (Py_ssize_t)p->out.len;
    } else if (s->evflags) {
        size_t start = 0;
        if (s->ev_err || (s->evflags & EV_RESUME ? reframe(p, s, &start) : handle_events(s, NULL)) < 0) {
            finish(s, END_PUMP_ERROR);
            return;
        }
        if (s->ev.len > MAX_EVENT_BYTES) {
            finish(s, END_MALFORMED);
            return;
        }
        if (s->evflags & EV_RESUME) {
            /* The replica's stream ended after [DONE] went out: the client's ends here too, so its last chunk goes in
             * this send rather than in a write of its own from Python (exchange.py's upstream_complete). */
            if (s->done && s->done_sent && !s->broken) {
                if (buf_put(&p->out, "0\r\n\r\n", 5) < 0) {
                    finish(s, END_PUMP_ERROR);
                    return;
                }
                s->last_sent = 1;
            }
            out = p->out.data + start;
            out_len = (Py_ssize_t)(p->out.len - start);
        }
    }
    ssize_t w = out_len ? send(s->cl_fd, out, (size_t)out_len, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
    if (w < 0) {
        if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            finish(s, END_CLIENT_ERROR);
            return;
        }
        w = 0;
    }
    if (s->broken) {  /* Python resumes it: what the client has not taken yet is written first */
        finish(s, stash(s, out + w, out_len - w) < 0 ? END_PUMP_ERROR : END_BROKEN);
        return;
    }
    if (w < out_len) {
        if (block(p, s, out + w, out_len - w) < 0) finish(s, END_PUMP_ERROR);
        return;
    }
    if (s->done) {
        finish(s, s->extra ? END_COMPLETE_EXTRA : END_COMPLETE);
        return;
    }
    if (p->coalesce_s > 0 && gap < p->coalesce_s && p->in_flight >= p->min_streams) sleep_stream(p, s, now);
}

static void on_writable(Pump *p, Stream *s) {
    Py_ssize_t left = s->pending_len - s->pending_off;
    ssize_t w = send(s->cl_fd, s->pending + s->pending_off, (size_t)left, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        finish(s, END_CLIENT_ERROR);
        return;
    }
    s->pending_off += w;
    if (s->pending_off < s->pending_len) return;
    PyMem_Free(s->pending);
    s->pending = NULL;
    s->blocked = 0;
    if (disarm_client(p, s) < 0) {
        finish(s, END_PUMP_ERROR);
        return;
    }
    if (s->done) {
        finish(s, s->extra ? END_COMPLETE_EXTRA : END_COMPLETE);
        return;
    }
    if (arm(p, s) < 0) finish(s, END_PUMP_ERROR);
}

/* ---------------------------------------------------------------- Stream (Python side) */

static int Stream_traverse(Stream *s, visitproc visit, void *arg) {
    Py_VISIT(s->on_end);
    Py_VISIT((PyObject *)s->pump);
    return 0;
}

static int Stream_clear(Stream *s) {
    /* Only an unreachable cycle gets here: end the stream as cancel() would. */
    Py_CLEAR(s->on_end);
    if (s->pump != NULL) {
        Py_INCREF(s);
        PyObject *leftover = release(s);
        Py_XDECREF(leftover);
        Py_DECREF(s);
    }
    return 0;
}

static void Stream_dealloc(Stream *s) {
    PyObject_GC_UnTrack(s);
    if (s->weakrefs != NULL) PyObject_ClearWeakRefs((PyObject *)s);
    /* A registered stream or a zombie is referenced by its pump, so it is never freed while in the epoll set. */
    if (s->up_fd >= 0) close(s->up_fd);
    if (s->cl_fd >= 0) close(s->cl_fd);
    if (s->pending) PyMem_Free(s->pending);
    buf_free(&s->ev);
    buf_free(&s->ids);
    buf_free(&s->prompt);
    buf_free(&s->first);
    buf_free(&s->frames);
    buf_free(&s->held);
    buf_free(&s->rw_ident);
    buf_free(&s->rw_created);
    buf_free(&s->rw_event);
    Py_XDECREF(s->on_end);
    PyObject_GC_Del(s);
}

static PyObject *Stream_cancel(Stream *s, PyObject *unused) {
    /* Python ended the exchange (client gone, abort, shutdown): no callback, whatever was pending is dropped. */
    Py_CLEAR(s->on_end);
    if (s->pump != NULL) {
        Py_INCREF(s);
        PyObject *leftover = release(s);
        Py_XDECREF(leftover);
        Py_DECREF(s);
    }
    Py_RETURN_NONE;
}

static PyObject *Stream_get_reads(Stream *s, void *c) { return PyLong_FromLongLong(s->reads); }
static PyObject *Stream_get_bytes_in(Stream *s, void *c) { return PyLong_FromLongLong(s->bytes_in); }
static PyObject *Stream_get_max_gap(Stream *s, void *c) { return PyFloat_FromDouble(s->max_gap); }
static PyObject *Stream_get_blocked(Stream *s, void *c) { return PyBool_FromLong(s->blocked); }
static PyObject *Stream_get_registered(Stream *s, void *c) { return PyBool_FromLong(s->armed || s->cl_armed); }
static PyObject *Stream_get_events(Stream *s, void *c) { return PyLong_FromLongLong(s->events); }
static PyObject *Stream_get_done_sent(Stream *s, void *c) { return PyBool_FromLong(s->done_sent); }
static PyObject *Stream_get_last_sent(Stream *s, void *c) { return PyBool_FromLong(s->last_sent); }
static PyObject *Stream_get_broken(Stream *s, void *c) { return PyBool_FromLong(s->broken); }
static PyObject *Stream_get_finished(Stream *s, void *c) { return PyBool_FromLong(s->finished); }
static PyObject *Stream_get_usage_sent(Stream *s, void *c) { return PyBool_FromLong(s->usage_sent); }
static PyObject *Stream_get_no_ids(Stream *s, void *c) { return PyBool_FromLong(s->no_ids); }
static PyObject *Stream_get_token_ids(Stream *s, void *c) { return PyBytes_FromStringAndSize(s->ids.data, (Py_ssize_t)s->ids.len); }
static PyObject *Stream_get_prompt_token_ids(Stream *s, void *c) {
    if (!s->got_prompt) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(s->prompt.data, (Py_ssize_t)s->prompt.len);
}
static PyObject *Stream_get_first_event(Stream *s, void *c) {
    if (s->first.len == 0) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(s->first.data, (Py_ssize_t)s->first.len);
}
static PyObject *Stream_get_unmatched(Stream *s, void *c) { return PyBool_FromLong(s->unmatched); }
static PyObject *Stream_get_partial(Stream *s, void *c) { return PyBytes_FromStringAndSize(s->ev.data, (Py_ssize_t)s->ev.len); }
static PyObject *Stream_get_usage(Stream *s, void *c) {
    if (s->prompt_tokens < 0) Py_RETURN_NONE;
    return Py_BuildValue("(LL)", s->prompt_tokens, s->completion_tokens);
}

static PyGetSetDef Stream_getset[] = {
    {"reads", (getter)Stream_get_reads, NULL, "reads of the replica socket so far", NULL},
    {"bytes_in", (getter)Stream_get_bytes_in, NULL, "bytes read from the replica so far", NULL},
    {"max_gap", (getter)Stream_get_max_gap, NULL, "largest gap between two reads, seconds", NULL},
    {"blocked", (getter)Stream_get_blocked, NULL, "the client is not taking what the replica sends", NULL},
    {"registered", (getter)Stream_get_registered, NULL, "one of its sockets is in the pump's epoll set", NULL},
    {"events", (getter)Stream_get_events, NULL, "JSON events relayed (content events, the usage chunk)", NULL},
    {"usage", (getter)Stream_get_usage, NULL, "(prompt_tokens, completion_tokens) of the usage chunk, or None", NULL},
    {"done_sent", (getter)Stream_get_done_sent, NULL, "EV_RESUME: [DONE] went to the client", NULL},
    {"last_sent", (getter)Stream_get_last_sent, NULL, "EV_RESUME: the last chunk (0 CRLF CRLF) went to the client too",
     NULL},
    {"broken", (getter)Stream_get_broken, NULL, "EV_RESUME: an in-band error or an early [DONE] ended it", NULL},
    {"finished", (getter)Stream_get_finished, NULL, "an event carried a finish_reason", NULL},
    {"usage_sent", (getter)Stream_get_usage_sent, NULL, "the usage chunk went by", NULL},
    {"no_ids", (getter)Stream_get_no_ids, NULL, "EV_RESUME: an event had text but no token ids", NULL},
    {"token_ids", (getter)Stream_get_token_ids, NULL, "EV_RESUME: the token ids relayed, b\"12,7,5\"", NULL},
    {"prompt_token_ids", (getter)Stream_get_prompt_token_ids, NULL, "EV_RESUME: the prompt's token ids, or None",
     NULL},
    {"first_event", (getter)Stream_get_first_event, NULL, "EV_FIRST: the first JSON event's data, or None", NULL},
    {"unmatched", (getter)Stream_get_unmatched, NULL, "EV_RESUMED: an event's top level was not compact JSON (it broke "
     "the stream)", NULL},
    {"partial", (getter)Stream_get_partial, NULL, "payload of an event not complete yet", NULL},
    {NULL}
};

static PyMethodDef Stream_methods[] = {
    {"cancel", (PyCFunction)Stream_cancel, METH_NOARGS, "stop pumping this stream, without a callback"},
    {NULL}
};

static PyTypeObject StreamType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway.dataplane._pump.Stream",
    .tp_basicsize = sizeof(Stream),
    /* GC-tracked: a stream holds its on_end callback, which (a bound method of the connection) holds it. */
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "One response body being pumped (made by Pump.add).",
    .tp_dealloc = (destructor)Stream_dealloc,
    .tp_traverse = (traverseproc)Stream_traverse,
    .tp_clear = (inquiry)Stream_clear,
    .tp_weaklistoffset = offsetof(Stream, weakrefs),
    .tp_methods = Stream_methods,
    .tp_getset = Stream_getset,
};

/* ---------------------------------------------------------------- Pump */

static PyObject *Pump_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"coalesce_s", "min_streams", NULL};
    double coalesce_s = 0.0;
    int min_streams = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|di", kwlist, &coalesce_s, &min_streams)) return NULL;
    Pump *p = (Pump *)type->tp_alloc(type, 0);
    if (p == NULL) return NULL;
    p->epfd = p->tfd = -1;
    p->coalesce_s = coalesce_s;
    p->min_streams = min_streams;
    p->buf = PyMem_Malloc(READ_SIZE);
    if (p->buf == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    p->epfd = epoll_create1(EPOLL_CLOEXEC);
    if (p->epfd < 0) goto fail_errno;
    p->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (p->tfd < 0) goto fail_errno;
    if (epoll_set(p, EPOLL_CTL_ADD, p->tfd, EPOLLIN, TIMER_TAG) < 0) goto fail_errno;
    return (PyObject *)p;
fail_errno:
    PyErr_SetFromErrno(PyExc_OSError);
fail:
    Py_DECREF(p);
    return NULL;
}

/* End every stream without a callback and drop the zombies: closing the epoll fd takes every registration
 * with it, so their memory may go. */
static void Pump_release_all(Pump *p) {
    while (p->streams != NULL) {
        Stream *s = p->streams;
        Py_INCREF(s);
        Py_CLEAR(s->on_end);
        PyObject *leftover = release(s);
        Py_XDECREF(leftover);
        Py_DECREF(s);
    }
    drop_sleepers(p);
}

static int Pump_traverse(Pump *p, visitproc visit, void *arg) {
    for (Stream *s = p->streams; s != NULL; s = s->next) Py_VISIT((PyObject *)s);
    for (Stream *s = p->zombies; s != NULL; s = s->next) Py_VISIT((PyObject *)s);
    for (Stream *s = p->sleep_head; s != NULL; s = s->next_sleeper) Py_VISIT((PyObject *)s);
    return 0;
}

static void bury_all(Pump *p) {
    if (p->epfd >= 0) {
        close(p->epfd);
        p->epfd = -1;
    }
    while (p->zombies != NULL) {
        Stream *s = p->zombies;
        s->armed = s->cl_armed = 0;  /* the epoll set is gone */
        bury(p, s);
    }
}

static int Pump_clear(Pump *p) {
    Py_INCREF(p);  /* releasing the streams drops their references to us */
    Pump_release_all(p);
    bury_all(p);
    Py_DECREF(p);
    return 0;
}

static void Pump_dealloc(Pump *p) {
    PyObject_GC_UnTrack(p);
    /* Registered streams and zombies hold a reference to their pump, so there are none left here. */
    drop_sleepers(p);
    if (p->epfd >= 0) close(p->epfd);
    if (p->tfd >= 0) close(p->tfd);
    PyMem_Free(p->buf);
    buf_free(&p->out);
    Py_TYPE(p)->tp_free((PyObject *)p);
}

static PyObject *Pump_add(Pump *p, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"replica_fd", "client_fd", "on_end", "body_so_far", "events", "prefix", "ident",
                             "created", "offset", "unsent", NULL};
    int up_fd, cl_fd, evflags = 0, unsent = 0;
    long long offset = 0;
    PyObject *on_end;
    Py_buffer body, prefix = {0}, ident = {0}, created = {0};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iiOy*|iy*y*y*Lp", kwlist, &up_fd, &cl_fd, &on_end, &body, &evflags,
                                     &prefix, &ident, &created, &offset, &unsent))
        return NULL;
    int ok = PyCallable_Check(on_end);
    int resumed = (evflags & EV_RESUMED) && (evflags & EV_RESUME);
    Buf ev = {0}, rw_ident = {0}, rw_created = {0};
    int nomem = ok && ((prefix.buf != NULL && buf_put(&ev, prefix.buf, (size_t)prefix.len) < 0)
                       || (resumed && ident.buf != NULL && buf_put(&rw_ident, ident.buf, (size_t)ident.len) < 0)
                       || (resumed && created.buf != NULL && buf_put(&rw_created, created.buf, (size_t)created.len) < 0));
    if (prefix.buf != NULL) PyBuffer_Release(&prefix);
    if (ident.buf != NULL) PyBuffer_Release(&ident);
    if (created.buf != NULL) PyBuffer_Release(&created);
    if (!ok || nomem || (resumed && (rw_ident.len == 0 || rw_created.len == 0))) {
        PyBuffer_Release(&body);
        buf_free(&ev);
        buf_free(&rw_ident);
        buf_free(&rw_created);
        if (nomem) return PyErr_NoMemory();
        PyErr_SetString(PyExc_TypeError, ok ? "EV_RESUMED needs ident and created (JSON)" : "on_end must be callable");
        return NULL;
    }
    if (p->broken || p->epfd < 0) {  /* the Python path relays it */
        PyBuffer_Release(&body);
        buf_free(&ev);
        buf_free(&rw_ident);
        buf_free(&rw_created);
        Py_RETURN_NONE;
    }
    Stream *s = PyObject_GC_New(Stream, &StreamType);
    if (s == NULL) {
        PyBuffer_Release(&body);
        buf_free(&ev);
        buf_free(&rw_ident);
        buf_free(&rw_created);
        return NULL;
    }
    s->pump = NULL;
    s->on_end = NULL;
    s->weakrefs = NULL;
    s->up_fd = s->cl_fd = -1;
    s->state = C_SIZE;
    s->digits = s->line = 0;
    s->size = 0;
    s->armed = s->cl_armed = s->blocked = s->sleeping = s->done = s->extra = s->zombie = 0;
    s->reads = s->bytes_in = 0;
    s->max_gap = 0.0;
    s->last_read = monotonic_now();
    s->pending = NULL;
    s->pending_len = s->pending_off = 0;
    s->next_sleeper = s->prev = s->next = NULL;
    s->wake = 0.0;
    s->evflags = evflags & (EV_ON | EV_RESUME | EV_STRIP_IDS | EV_NEED_USAGE | EV_FIRST | EV_STRIP_USAGE
                            | (resumed ? evflags & (EV_RESUMED | EV_RESUMED_CHAT) : 0));
    /* Python has the prompt's ids already: later prompt_token_ids are left as they are (resume.py's _batch). */
    s->have_prompt = (evflags & EV_PROMPT_KNOWN) != 0;
    if (s->evflags & EV_RESUME) s->evflags = (s->evflags | EV_ON) & ~EV_STRIP_USAGE;  /* resume re-frames */
    if (s->evflags & EV_STRIP_USAGE) s->evflags |= EV_ON;
    s->plain = 0;
    s->ev_err = s->done_sent = s->broken = s->no_ids = s->got_prompt = s->last_sent = 0;
    s->finished = (evflags & EV_FINISHED) != 0;  /* what the Python path saw before handing the stream over */
    s->usage_sent = (evflags & EV_USAGE_SENT) != 0;
    s->events = 0;
    s->prompt_tokens = s->completion_tokens = -1;
    memset(&s->ids, 0, sizeof s->ids);
    memset(&s->prompt, 0, sizeof s->prompt);
    memset(&s->first, 0, sizeof s->first);
    if (s->evflags & EV_STRIP_USAGE) {  /* the start of a chunk usage.py's meter had kept back: finished here */
        s->frames = ev;
        memset(&s->ev, 0, sizeof s->ev);
    } else {
        s->ev = ev;  /* an event the Python path had begun */
        memset(&s->frames, 0, sizeof s->frames);
    }
    memset(&s->held, 0, sizeof s->held);
    s->rw_ident = rw_ident;
    s->rw_created = rw_created;
    memset(&s->rw_event, 0, sizeof s->rw_event);
    s->rw_offset = offset;
    s->unmatched = 0;
    PyObject_GC_Track(s);
    /* The body bytes that came with the head were relayed already (their events handled by Python): they only
     * move the parser. With `unsent` (EV_RESUME) they were not: their events are handled here as a read's are,
     * and what goes to the client is written below. A back-to-back stream often arrives largely with its head,
     * and that part went through resume.py's per-read Python path (docs/performance.md, "Instruction counts"). */
    unsent = unsent && (s->evflags & EV_RESUME);
    Py_ssize_t end = parse_chunked(s, body.buf, body.len, unsent ? COLLECT_COPY : COLLECT_NONE);  /* body goes */
    int usable = end == body.len && s->state != C_DONE;
    PyBuffer_Release(&body);
    size_t start = 0;
    if (usable && unsent && (s->ev_err || reframe(p, s, &start) < 0 || s->broken || s->ev.len > MAX_EVENT_BYTES))
        usable = 0;  /* an in-band error or garbage in it, or no memory: the Python path handles all of it */
    if (!usable) {  /* malformed or already complete: the Python path decides */
        Py_DECREF(s);
        Py_RETURN_NONE;
    }
    s->up_fd = fcntl(up_fd, F_DUPFD_CLOEXEC, 0);
    if (s->up_fd < 0) goto fail;
    s->cl_fd = fcntl(cl_fd, F_DUPFD_CLOEXEC, 0);
    if (s->cl_fd < 0) goto fail;
    /* Registered before the head's events are written: add() failing after it wrote them made Python relay them
     * again (the exception sends the stream back whole). What stays: a client that takes only part of them and
     * then a failing block() (its epoll registration or allocation). */
    if (arm(p, s) < 0) goto fail;
    Py_ssize_t out_len = unsent ? (Py_ssize_t)(p->out.len - start) : 0;
    ssize_t w = out_len ? send(s->cl_fd, p->out.data + start, (size_t)out_len, MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
    if (w < 0) w = 0;  /* a client error shows when its socket turns writable (on_writable ends the stream) */
    if (w < out_len && block(p, s, p->out.data + start + w, out_len - w) < 0) goto fail;
    Py_INCREF(on_end);
    s->on_end = on_end;
    Py_INCREF(p);
    s->pump = p;
    p->active++;
    list_push(&p->streams, s);
    Py_INCREF(s);  /* the pump's reference, dropped by release() */
    return (PyObject *)s;
fail:
    PyErr_SetFromErrno(PyExc_OSError);  /* before close() can change errno */
    if (disarm(p, s) < 0 || disarm_client(p, s) < 0) {  /* still in the epoll set: kept alive, retried (bury) */
        close_unregistered(s);
        s->zombie = 1;
        Py_INCREF(p);  /* a zombie's reference to its pump, dropped by bury() */
        list_push(&p->zombies, s);  /* our reference moves to the zombie list */
        return NULL;
    }
    Py_DECREF(s);  /* closes the dups */
    return NULL;
}

/* epoll_wait failed (not EINTR): nothing this pump holds can be served any more. Every stream ends with
 * END_PUMP_ERROR, the timer leaves the set so the pump's fd never turns readable again (uvloop would call
 * run() on every pass otherwise), later add()s return None (the Python path), and the error is raised once. */
static PyObject *Pump_fail(Pump *p) {
    PyObject *type, *value, *tb;
    PyErr_SetFromErrno(PyExc_OSError);
    PyErr_Fetch(&type, &value, &tb);
    p->broken = 1;
    struct itimerspec off;
    memset(&off, 0, sizeof off);
    timerfd_settime(p->tfd, 0, &off, NULL);  /* disarming also drops an expiration not read yet */
    epoll_del(p, p->tfd);
    drop_sleepers(p);
    Py_INCREF(p);
    while (p->streams != NULL) finish(p->streams, END_PUMP_ERROR);
    Py_DECREF(p);
    PyErr_Restore(type, value, tb);
    return NULL;
}

static PyObject *Pump_run(Pump *p, PyObject *unused) {
    struct epoll_event events[MAX_EVENTS];
    if (p->broken || p->epfd < 0) Py_RETURN_NONE;
    int n;
    if (faulty(F_EPOLL_WAIT)) {
        errno = EBADF;
        n = -1;
    } else {
        n = epoll_wait(p->epfd, events, MAX_EVENTS, 0);
    }
    if (n < 0) {
        if (errno == EINTR) Py_RETURN_NONE;
        return Pump_fail(p);
    }
    /* A callback may end other streams of this batch: hold each until the batch is done. */
    for (int i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        if (tag != TIMER_TAG) Py_INCREF((PyObject *)(uintptr_t)(tag & ~(uint64_t)CLIENT_BIT));
    }
    double now = monotonic_now();
    for (int i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        if (tag == TIMER_TAG) {
            wake_sleepers(p);
            continue;
        }
        Stream *s = (Stream *)(uintptr_t)(tag & ~(uint64_t)CLIENT_BIT);
        if (s->pump == p) {
            if (tag & CLIENT_BIT) {
                if (s->blocked) on_writable(p, s);
            } else if (!s->blocked && !s->sleeping) {
                on_readable(p, s, now);
            }
        } else if (s->zombie) {
            bury(p, s);
        }
    }
    for (int i = 0; i < n; i++) {
        uint64_t tag = events[i].data.u64;
        if (tag != TIMER_TAG) Py_DECREF((PyObject *)(uintptr_t)(tag & ~(uint64_t)CLIENT_BIT));
    }
    Py_RETURN_NONE;
}

static PyObject *Pump_fileno(Pump *p, PyObject *unused) { return PyLong_FromLong(p->epfd); }
static PyObject *Pump_get_active(Pump *p, void *c) { return PyLong_FromLong(p->active); }
static PyObject *Pump_get_broken(Pump *p, void *c) { return PyBool_FromLong(p->broken); }
static PyObject *Pump_get_zombies(Pump *p, void *c) {
    long n = 0;
    for (Stream *s = p->zombies; s != NULL; s = s->next) n++;
    return PyLong_FromLong(n);
}

static PyMethodDef Pump_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Pump_add, METH_VARARGS | METH_KEYWORDS,
     "add(replica_fd, client_fd, on_end, body_so_far, events=0, prefix=b'') -> Stream | None: pump this response's "
     "body from now on (events: EV_* flags; prefix: the start of an event the Python path had read, or with "
     "EV_STRIP_USAGE the start of a chunk it had kept back; unsent: with EV_RESUME, body_so_far's events were not "
     "handled yet, the pump handles and writes them)"},
    {"run", (PyCFunction)Pump_run, METH_NOARGS, "serve every ready stream once (the loop's reader callback)"},
    {"fileno", (PyCFunction)Pump_fileno, METH_NOARGS, "the epoll fd to watch for readability"},
    {NULL}
};

static PyMemberDef Pump_members[] = {
    {"in_flight", Py_T_INT, offsetof(Pump, in_flight), 0, "requests in flight (set by the relay)"},
    {NULL}
};

static PyGetSetDef Pump_getset[] = {
    {"active", (getter)Pump_get_active, NULL, "streams being pumped", NULL},
    {"broken", (getter)Pump_get_broken, NULL, "epoll_wait failed: the pump ended its streams and takes no more",
     NULL},
    {"zombies", (getter)Pump_get_zombies, NULL, "ended streams still in the epoll set (EPOLL_CTL_DEL failed)",
     NULL},
    {NULL}
};

static PyTypeObject PumpType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway.dataplane._pump.Pump",
    .tp_basicsize = sizeof(Pump),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Pump(coalesce_s=0.0, min_streams=0): relays chunked response bodies between sockets.",
    .tp_new = Pump_new,
    .tp_dealloc = (destructor)Pump_dealloc,
    .tp_traverse = (traverseproc)Pump_traverse,
    .tp_clear = (inquiry)Pump_clear,
    .tp_methods = Pump_methods,
    .tp_getset = Pump_getset,
    .tp_members = Pump_members,
};

static PyObject *fault(PyObject *module, PyObject *args) {
    const char *name;
    int count;
    if (!PyArg_ParseTuple(args, "si", &name, &count)) return NULL;
    for (int i = 0; i < F_COUNT; i++) {
        if (strcmp(name, fault_names[i]) == 0) {
            faults[i] = count;
            Py_RETURN_NONE;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown fault %s", name);
    return NULL;
}

/* resume.py's ResumeStream._batch, its loop over a read's events in C: (the read with each `"token_ids":[..]`
 * written as null when `strip`, framed as one chunk when `frame`, the ids as "12,7,5", whether the last event with
 * ids carries a finish_reason, how many ids keys, events (blank lines) and usage chunks (`"choices":[]`) there
 * were); None when an ids list does not close (resume.py then takes its own path). METH_FASTCALL and a tuple built
 * in place: the Python relay calls it once a read of a resumable stream, and PyArg_ParseTuple plus Py_BuildValue
 * were ~1,500 of its instructions (callgrind). */
static PyObject *token_ids(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    Py_buffer b;
    if (nargs < 2 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "token_ids(read, strip, frame=False)");
        return NULL;
    }
    int strip = PyObject_IsTrue(args[1]), frame = nargs == 3 ? PyObject_IsTrue(args[2]) : 0;
    if (strip < 0 || frame < 0 || PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0) return NULL;
    const char *d = b.buf, *end = d + b.len, *at = d, *seg = d, *last_start = d, *last_end = d;
    Buf out = {0}, ids = {0};
    Py_ssize_t n = 0;
    PyObject *result = NULL;
    /* Sized once for the read (its ids: a few bytes an event of ~250): grown by doubling, realloc copied a large
     * read's output several times (callgrind, stream200 with resume on). */
    if ((strip && buf_room(&out, (size_t)b.len) < 0) || buf_room(&ids, (size_t)b.len / 16 + 16) < 0) goto nomem;
    for (;;) {
        const char *key = FIND_K(at, (size_t)(end - at), "\"token_ids\":[", 12);
        if (key == NULL) break;
        const char *open = key + sizeof("\"token_ids\":[") - 2;
        const char *close = memchr(open + 1, ']', (size_t)(end - open - 1));
        if (close == NULL) {
            result = Py_None;
            Py_INCREF(result);
            goto done;
        }
        n++;
        last_start = seg;  /* resume.py's parts[-2]: from the previous key's ids to this key */
        last_end = key;
        seg = open + 1;
        if (close > open + 1 && ((ids.len && buf_put(&ids, ",", 1) < 0)
                                 || buf_put(&ids, open + 1, (size_t)(close - open - 1)) < 0))
            goto nomem;
        if (strip && (buf_put(&out, at, (size_t)(key - at)) < 0 || buf_put(&out, LIT("\"token_ids\":null")) < 0))
            goto nomem;
        at = close + 1;
    }
    int finished = n > 0 && find(last_start, (size_t)(last_end - last_start), LIT("\"finish_reason\":\"")) != NULL;
    const char *payload = d;
    size_t payload_len = (size_t)b.len;
    if (strip && n > 0) {
        if (buf_put(&out, at, (size_t)(end - at)) < 0) goto nomem;
        payload = out.data;
        payload_len = out.len;
    }
    PyObject *text;
    if (frame && payload_len) {
        char line[18];
        int m = hex_line(line, payload_len);
        text = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(m + payload_len + 2));
        if (text == NULL) goto done;
        char *t = PyBytes_AS_STRING(text);
        memcpy(t, line, (size_t)m);
        memcpy(t + m, payload, payload_len);
        memcpy(t + m + payload_len, "\r\n", 2);
    } else {
        text = PyBytes_FromStringAndSize(payload, (Py_ssize_t)payload_len);
        if (text == NULL) goto done;
    }
    Py_ssize_t events = 0, usage = 0;
    for (const char *nl = d; (nl = memchr(nl, '\n', (size_t)(end - nl))) != NULL && nl + 1 < end; nl++) {
        if (nl[1] == '\n') {
            events++;
            nl++;
        }
    }
    if (n && events != n) usage = (Py_ssize_t)count_of(d, (size_t)b.len, LIT("\"choices\":[]"));
    result = PyTuple_New(6);
    if (result == NULL) {
        Py_DECREF(text);
        goto done;
    }
    PyTuple_SET_ITEM(result, 0, text);
    PyObject *items[5] = {PyBytes_FromStringAndSize(ids.data ? ids.data : "", (Py_ssize_t)ids.len),
                          PyBool_FromLong(finished), PyLong_FromSsize_t(n), PyLong_FromSsize_t(events),
                          PyLong_FromSsize_t(usage)};
    for (int i = 0; i < 5; i++) {
        if (items[i] == NULL) {
            for (int j = i + 1; j < 5; j++) Py_XDECREF(items[j]);
            Py_CLEAR(result);  /* its items set so far go with it */
            goto done;
        }
        PyTuple_SET_ITEM(result, i + 1, items[i]);
    }
    goto done;
nomem:
    PyErr_NoMemory();
done:
    buf_free(&out);
    buf_free(&ids);
    PyBuffer_Release(&b);
    return result;
}

/* One chunk of a metered read at d[pos..n): its payload and size, and where the next chunk starts; 0 when the framing
 * does not hold there (the last chunk too: StreamMeter._walk reads those). */
static int meter_chunk(const char *d, size_t n, size_t pos, const char **payload, size_t *size, size_t *next) {
    size_t v = 0, at = pos;
    for (; at < n && at - pos < 16; at++) {
        unsigned char c = (unsigned char)d[at];
        int digit = c >= '0' && c <= '9' ? c - '0' : (c | 0x20) >= 'a' && (c | 0x20) <= 'f' ? (c | 0x20) - 'a' + 10 : -1;
        if (digit < 0) break;
        v = v * 16 + (size_t)digit;
    }
    if (at == pos || v == 0 || n - at < 2 || d[at] != '\r' || d[at + 1] != '\n' || v > n - (at + 2)
            || n - (at + 2) - v < 2 || d[at + 2 + v] != '\r' || d[at + 3 + v] != '\n')
        return 0;
    *payload = d + at + 2;
    *size = v;
    *next = at + 4 + v;
    return 1;
}

/* A chunk's events: one when it is one `data: {...}\n\n` (JSON holds no raw newline, so one memchr tells), else the
 * `data: {` in it, as usage.py counts them. */
static size_t meter_events(const char *payload, size_t size) {
    if (size >= sizeof("data: {\n\n") - 1 && memcmp(payload, "data: {", 7) == 0
            && memchr(payload, '\n', size) == payload + size - 2 && payload[size - 1] == '\n')
        return 1;
    return count_of(payload, size, LIT("data: {"));
}

/* usage.py's StreamMeter, its reads in C. meter_read(read): the events of a read a stripping meter passes as it came
 * (it ends with a whole content chunk, `}]}\n\n\r\n`, so it holds no usage chunk: vLLM writes only [DONE] after that
 * one; and no choice finishes in it: `"finish_reason":"`), else -1 (StreamMeter.feed takes it). The Python relay
 * calls it once a read of a metered stream in place of feed(): its slice compare, `partition` and call were ~3,000
 * instructions a read (callgrind). The read starts on a chunk boundary (the meter keeps nothing back): its chunks are
 * walked by their size lines; counting `data: {` with find() instead was ~250 instructions a read.
 * meter_read(read, tally), tally a meter's bytearray(8): True, the events added to the native int64 in it, or False
 * (the read is not such a read): the relay's `events >= 0` and `meter.events += events` were ~370 instructions a
 * read (callgrind). meter_read(read, True), for a read of whole chunks the meter walks: (the events of the chunks before the first
 * that finishes a choice or holds the usage chunk, where that chunk starts, or -1: none does). bytes.find and count
 * over such a read were ~3 instructions a byte (CPython 3.11 Objects/stringlib/fastsearch.h, two-way, for reads
 * over 30,000 bytes), most of accounting's cost on stream200, whose last read often holds most of it (callgrind). */
static PyObject *meter_read(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "meter_read(read: bytes, where: bool | bytearray = False)");
        return NULL;
    }
    char *tally = NULL;
    int where = 0;
    if (nargs == 2 && PyByteArray_CheckExact(args[1])) {
        if (PyByteArray_GET_SIZE(args[1]) != (Py_ssize_t)sizeof(int64_t)) {
            PyErr_SetString(PyExc_ValueError, "meter_read: the tally is a bytearray of 8 bytes");
            return NULL;
        }
        tally = PyByteArray_AS_STRING(args[1]);
    } else if (nargs == 2 && (where = PyObject_IsTrue(args[1])) < 0) {
        return NULL;
    }
    const char *d = PyBytes_AS_STRING(args[0]), *payload;
    size_t n = (size_t)PyBytes_GET_SIZE(args[0]), pos = 0, events = 0, size, next;
    if (where) {
        for (; pos < n; pos = next) {
            if (!meter_chunk(d, n, pos, &payload, &size, &next)
                    || find(payload, size, LIT("\"finish_reason\":\"")) != NULL
                    || find(payload, size, LIT("\"choices\":[]")) != NULL)
                return Py_BuildValue("(nn)", (Py_ssize_t)events, (Py_ssize_t)pos);
            events += meter_events(payload, size);
        }
        return Py_BuildValue("(nn)", (Py_ssize_t)events, (Py_ssize_t)-1);
    }
    static const char content_end[] = "}]}\n\n\r\n";
    if (n < sizeof(content_end) - 1 || memcmp(d + n - (sizeof(content_end) - 1), content_end, sizeof(content_end) - 1)
            || find(d, n, LIT("\"finish_reason\":\"")) != NULL) {
        if (tally != NULL) Py_RETURN_FALSE;
        return PyLong_FromLong(-1);
    }
    for (; pos < n; pos = next) {
        if (!meter_chunk(d, n, pos, &payload, &size, &next)) {
            events = count_of(d, n, LIT("data: {"));
            break;
        }
        events += meter_events(payload, size);
    }
    if (tally == NULL) return PyLong_FromSize_t(events);
    int64_t total;
    memcpy(&total, tally, sizeof total);  /* a bytearray's storage need not be aligned for an int64 */
    total += (int64_t)events;
    memcpy(tally, &total, sizeof total);
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"token_ids", (PyCFunction)(void (*)(void))token_ids, METH_FASTCALL,
     "token_ids(read, strip, frame=False) -> (read, ids, finished, keys, events, usage chunks) | None: resume.py's "
     "batch path over one read (frame: the read comes back as one chunk)"},
    {"meter_read", (PyCFunction)(void (*)(void))meter_read, METH_FASTCALL,
     "meter_read(read, where=False) -> events | -1; with a bytearray(8) tally -> bool, the events added to it; with "
     "where (events before, start of the first chunk that finishes a choice or holds the usage chunk | -1): "
     "usage.py's StreamMeter, its reads of a stream"},
    {"_fault", fault, METH_VARARGS,
     "_fault(name, count): the next `count` calls of epoll_add, epoll_del, epoll_wait or alloc fail (-1: all, "
     "0: none); for the tests only"},
    {NULL}
};

static struct PyModuleDef pump_module = {
    PyModuleDef_HEAD_INIT, "_pump", "The C stream pump (see the comment at the top of _pump.c).", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__pump(void) {
    if (PyType_Ready(&StreamType) < 0 || PyType_Ready(&PumpType) < 0) return NULL;
    PyObject *m = PyModule_Create(&pump_module);
    if (m == NULL) return NULL;
    if (PyModule_AddObjectRef(m, "Pump", (PyObject *)&PumpType) < 0
            || PyModule_AddObjectRef(m, "Stream", (PyObject *)&StreamType) < 0
            || PyModule_AddIntConstant(m, "COMPLETE", END_COMPLETE) < 0
            || PyModule_AddIntConstant(m, "COMPLETE_EXTRA", END_COMPLETE_EXTRA) < 0
            || PyModule_AddIntConstant(m, "EOF", END_EOF) < 0
            || PyModule_AddIntConstant(m, "UPSTREAM_ERROR", END_UPSTREAM_ERROR) < 0
            || PyModule_AddIntConstant(m, "MALFORMED", END_MALFORMED) < 0
            || PyModule_AddIntConstant(m, "CLIENT_ERROR", END_CLIENT_ERROR) < 0
            || PyModule_AddIntConstant(m, "PUMP_ERROR", END_PUMP_ERROR) < 0
            || PyModule_AddIntConstant(m, "BROKEN", END_BROKEN) < 0
            || PyModule_AddIntConstant(m, "EV_ON", EV_ON) < 0
            || PyModule_AddIntConstant(m, "EV_RESUME", EV_RESUME) < 0
            || PyModule_AddIntConstant(m, "EV_STRIP_IDS", EV_STRIP_IDS) < 0
            || PyModule_AddIntConstant(m, "EV_NEED_USAGE", EV_NEED_USAGE) < 0
            || PyModule_AddIntConstant(m, "EV_FINISHED", EV_FINISHED) < 0
            || PyModule_AddIntConstant(m, "EV_USAGE_SENT", EV_USAGE_SENT) < 0
            || PyModule_AddIntConstant(m, "EV_FIRST", EV_FIRST) < 0
            || PyModule_AddIntConstant(m, "EV_STRIP_USAGE", EV_STRIP_USAGE) < 0
            || PyModule_AddIntConstant(m, "EV_PROMPT_KNOWN", EV_PROMPT_KNOWN) < 0
            || PyModule_AddIntConstant(m, "EV_RESUMED", EV_RESUMED) < 0
            || PyModule_AddIntConstant(m, "EV_RESUMED_CHAT", EV_RESUMED_CHAT) < 0
            || PyModule_AddIntConstant(m, "MAX_CHUNK_LINE", MAX_CHUNK_LINE) < 0
            || PyModule_AddIntConstant(m, "MAX_TRAILER_BYTES", MAX_TRAILER_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
