/* A tiny HTTP/1.1 and websocket echo server for the lab's busybox image (no libraries), so
 * that tests and benchmarks can send real long-lived traffic through Caddy to an instance.
 *
 * Build (static, so it runs in the busybox lab image):  gcc -static -Os -o icf_server icf_server.c
 * Use:  icf_server PORT [NAME]
 *   GET /            200 "hello from NAME port PORT (icf_server)\n", keep-alive
 *   GET /sleep/MS    the same after MS milliseconds (at most 10000): a request in flight
 *   GET / with Upgrade: websocket    a websocket that echoes every text or binary message
 * Or:   icf_server --port-open PORT FILE
 *   connects to 127.0.0.1:PORT every 0.5 ms (at most 60 s) and writes the wall-clock time
 *   of the first accepted connection to FILE ("SECONDS.NANOSECONDS"): when a service inside
 *   the instance started to accept, measured without any packet from outside (the host's
 *   clock is the instance's).
 *
 * Shutdown is graceful, as a real service's: on SIGTERM the listening socket is closed at
 * once (new connections are refused), a request in flight is finished and answered with
 * `Connection: close`, an idle keep-alive connection is closed, and the process exits when the
 * last connection is done. One process per connection (fork).
 */
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t stopping = 0;
static const char *name = "icf_server";
static int port = 8081;

static void on_term(int sig) { (void)sig; stopping = 1; }

/* ---- SHA-1 (FIPS 180-1), only for the websocket handshake ---- */
typedef struct { uint32_t h[5]; uint64_t len; unsigned char buf[64]; size_t n; } sha1;
static uint32_t rol(uint32_t x, int k) { return (x << k) | (x >> (32 - k)); }
static void sha1_block(sha1 *s, const unsigned char *p) {
    uint32_t w[80], a, b, c, d, e, f, k, t;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    a = s->h[0]; b = s->h[1]; c = s->h[2]; d = s->h[3]; e = s->h[4];
    for (int i = 0; i < 80; i++) {
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        t = rol(a, 5) + f + e + k + w[i]; e = d; d = c; c = rol(b, 30); b = a; a = t;
    }
    s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d; s->h[4] += e;
}
static void sha1_init(sha1 *s) {
    s->h[0] = 0x67452301; s->h[1] = 0xEFCDAB89; s->h[2] = 0x98BADCFE; s->h[3] = 0x10325476;
    s->h[4] = 0xC3D2E1F0; s->len = 0; s->n = 0;
}
static void sha1_add(sha1 *s, const unsigned char *p, size_t n) {
    s->len += n;
    while (n--) { s->buf[s->n++] = *p++; if (s->n == 64) { sha1_block(s, s->buf); s->n = 0; } }
}
static void sha1_end(sha1 *s, unsigned char out[20]) {
    uint64_t bits = s->len * 8;
    unsigned char one = 0x80, zero = 0, len[8];
    sha1_add(s, &one, 1);
    while (s->n != 56) sha1_add(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (unsigned char)(bits >> (56 - 8 * i));
    sha1_add(s, len, 8);
    for (int i = 0; i < 20; i++) out[i] = (unsigned char)(s->h[i / 4] >> (24 - 8 * (i % 4)));
}
static void base64(const unsigned char *in, size_t n, char *out) {
    static const char t[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = t[v >> 18]; out[o++] = t[(v >> 12) & 63]; out[o++] = t[(v >> 6) & 63]; out[o++] = t[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)in[i] << 16 | (i + 1 < n ? (uint32_t)in[i + 1] << 8 : 0);
        out[o++] = t[v >> 18]; out[o++] = t[(v >> 12) & 63];
        out[o++] = i + 1 < n ? t[(v >> 6) & 63] : '=';
        out[o++] = '=';
    }
    out[o] = '\0';
}

/* ---- I/O helpers ---- */
static int write_all(int fd, const void *data, size_t n) {
    const char *p = data;
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w; n -= (size_t)w;
    }
    return 0;
}
static int read_full(int fd, unsigned char *p, size_t n) {
    while (n) {
        ssize_t r = read(fd, p, n);
        if (r < 0 && errno == EINTR) continue;  /* a websocket lives on through SIGTERM */
        if (r <= 0) return -1;
        p += r; n -= (size_t)r;
    }
    return 0;
}
static void sleep_ms(long ms) {  /* finishes the whole sleep, signals or not */
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) < 0 && errno == EINTR) {}
}
/* The value of header `field` in the header block, copied to out; 0 when absent. */
static int header(const char *head, const char *field, char *out, size_t size) {
    size_t len = strlen(field);
    for (const char *line = strstr(head, "\r\n"); line && line[2] != '\r'; line = strstr(line + 2, "\r\n")) {
        const char *p = line + 2;
        if (strncasecmp(p, field, len) == 0 && p[len] == ':') {
            p += len + 1;
            while (*p == ' ' || *p == '\t') p++;
            size_t n = strcspn(p, "\r\n");
            if (n >= size) n = size - 1;
            memcpy(out, p, n);
            out[n] = '\0';
            return 1;
        }
    }
    return 0;
}

/* ---- websocket: echo until the peer closes ---- */
static void websocket(int fd, const char *key) {
    char accept[64], reply[256];
    unsigned char digest[20];
    sha1 s;
    sha1_init(&s);
    sha1_add(&s, (const unsigned char *)key, strlen(key));
    sha1_add(&s, (const unsigned char *)"258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    sha1_end(&s, digest);
    base64(digest, 20, accept);
    int n = snprintf(reply, sizeof reply,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n", accept);
    if (write_all(fd, reply, (size_t)n) < 0) return;
    static unsigned char payload[1 << 16];
    for (;;) {
        unsigned char h[2], mask[4], ext[8], out[10];
        if (read_full(fd, h, 2) < 0) return;
        int opcode = h[0] & 0x0f, masked = h[1] & 0x80;
        uint64_t len = h[1] & 0x7f;
        if (len == 126) {
            if (read_full(fd, ext, 2) < 0) return;
            len = (uint64_t)ext[0] << 8 | ext[1];
        } else if (len == 127) {
            if (read_full(fd, ext, 8) < 0) return;
            len = 0;
            for (int i = 0; i < 8; i++) len = len << 8 | ext[i];
        }
        if (len > sizeof payload) return;
        if (masked && read_full(fd, mask, 4) < 0) return;
        if (read_full(fd, payload, (size_t)len) < 0) return;
        if (masked)
            for (uint64_t i = 0; i < len; i++) payload[i] ^= mask[i % 4];
        if (opcode == 0x8) {  /* close: answer it and end */
            unsigned char bye[2] = {0x88, 0x00};
            write_all(fd, bye, 2);
            return;
        }
        if (opcode == 0xA) continue;  /* pong */
        size_t o = 0;
        out[o++] = (unsigned char)(0x80 | (opcode == 0x9 ? 0xA : opcode));  /* ping -> pong */
        if (len < 126) out[o++] = (unsigned char)len;
        else { out[o++] = 126; out[o++] = (unsigned char)(len >> 8); out[o++] = (unsigned char)len; }
        if (write_all(fd, out, o) < 0 || write_all(fd, payload, (size_t)len) < 0) return;
    }
}

/* ---- HTTP/1.1 with keep-alive ---- */
static void serve(int fd) {
    static char buf[16384];
    size_t have = 0;
    for (;;) {
        char *end;
        buf[have] = '\0';
        while ((end = strstr(buf, "\r\n\r\n")) == NULL) {
            if (stopping && have == 0) return;  /* idle keep-alive connection: close it */
            if (have >= sizeof buf - 1) return;
            ssize_t r = read(fd, buf + have, sizeof buf - 1 - have);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) return;
            have += (size_t)r;
            buf[have] = '\0';
        }
        end[2] = '\0';  /* the header block, each line ending in \r\n */
        char value[256], key[128], path[256] = "/";
        sscanf(buf, "%*s %255s", path);
        size_t used = (size_t)(end + 4 - buf);
        if (header(buf, "Content-Length", value, sizeof value)) used += (size_t)atol(value);
        if (header(buf, "Upgrade", value, sizeof value) && strcasecmp(value, "websocket") == 0 &&
            header(buf, "Sec-WebSocket-Key", key, sizeof key)) {
            websocket(fd, key);
            return;
        }
        if (strncmp(path, "/sleep/", 7) == 0) {
            long ms = atol(path + 7);
            sleep_ms(ms < 0 ? 0 : ms > 10000 ? 10000 : ms);
        }
        char body[256], reply[512];
        int blen = snprintf(body, sizeof body, "hello from %s port %d (icf_server)\n", name, port);
        int n = snprintf(reply, sizeof reply,
                         "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         "Connection: %s\r\n\r\n%s", blen, stopping ? "close" : "keep-alive", body);
        if (write_all(fd, reply, (size_t)n) < 0 || stopping) return;
        if (used > have) return;  /* a body we did not read: give up the connection */
        memmove(buf, buf + used, have - used);
        have -= used;
    }
}

static int port_open(int p, const char *file) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)p)};
    addr.sin_addr.s_addr = htonl(0x7f000001);
    for (int i = 0; i < 120000; i++) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        int ok = fd >= 0 && connect(fd, (struct sockaddr *)&addr, sizeof addr) == 0;
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        if (fd >= 0) close(fd);
        if (ok) {
            FILE *out = fopen(file, "w");
            if (!out) return 1;
            fprintf(out, "%ld.%09ld\n", (long)now.tv_sec, now.tv_nsec);
            return fclose(out) == 0 ? 0 : 1;
        }
        struct timespec half = {0, 500000L};
        nanosleep(&half, NULL);
    }
    return 1;
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "--port-open") == 0) return port_open(atoi(argv[2]), argv[3]);
    if (argc > 1) port = atoi(argv[1]);
    if (argc > 2) name = argv[2];
    struct sigaction sa = {0};
    sa.sa_handler = on_term;  /* no SA_RESTART: a blocked accept or read returns EINTR */
    sigaction(SIGTERM, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    signal(SIGCHLD, SIG_IGN);  /* children are reaped by the kernel */
    int ls = socket(AF_INET6, SOCK_STREAM, 0), one = 1, zero = 0;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(ls, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    struct sockaddr_in6 addr = {.sin6_family = AF_INET6, .sin6_port = htons((uint16_t)port)};
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 256) < 0) {
        perror("icf_server: listen");
        return 1;
    }
    while (!stopping) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) continue;  /* EINTR (SIGTERM) or a transient error */
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        pid_t pid = fork();
        if (pid == 0) {
            close(ls);
            serve(fd);
            close(fd);
            _exit(0);
        }
        close(fd);
    }
    close(ls);  /* new connections are refused from now on */
    while (wait(NULL) > 0 || errno == EINTR) {}  /* with SIGCHLD ignored: until none is left */
    return 0;
}
