/*
 * A Postgres client with OpenSSL linked statically into the executable (symbols kept), for
 * the auditor's TLS tests: no libssl.so is mapped, so only hooks found in the executable
 * itself can see its plaintext.
 *
 * usage: static_tls_client PORT APPLICATION_NAME WAIT_MS QUERY...
 * Connects to 127.0.0.1:PORT, negotiates TLS (SSLRequest, SSL_connect over the socket),
 * logs in as postgres (trust), runs each QUERY with the simple protocol, and exits 0.
 */
#include <arpa/inet.h>
#include <openssl/ssl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void die(const char *what) {
    fprintf(stderr, "static_tls_client: %s\n", what);
    exit(1);
}

static void put32(unsigned char *p, uint32_t v) {
    p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void read_exact(SSL *ssl, unsigned char *buf, int n) {
    int got = 0;
    while (got < n) {
        int r = SSL_read(ssl, buf + got, n - got);
        if (r <= 0) die("SSL_read");
        got += r;
    }
}

/* Reads messages until ReadyForQuery; fails on ErrorResponse during login. */
static void until_ready(SSL *ssl, int login) {
    for (;;) {
        unsigned char head[5];
        read_exact(ssl, head, 5);
        uint32_t len = (uint32_t)head[1] << 24 | head[2] << 16 | head[3] << 8 | head[4];
        if (len < 4 || len > (1u << 24)) die("bad message length");
        unsigned char *body = malloc(len);
        if (!body) die("malloc");
        read_exact(ssl, body, (int)len - 4);
        free(body);
        if (head[0] == 'E' && login) die("login failed");
        if (head[0] == 'Z') return;
    }
}

int main(int argc, char **argv) {
    if (argc < 4) die("usage: static_tls_client PORT APP WAIT_MS QUERY...");
    usleep(atoi(argv[3]) * 1000);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sa = {0};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(atoi(argv[1]));
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0) die("connect");
    unsigned char req[8];
    put32(req, 8);
    put32(req + 4, 80877103);
    if (write(fd, req, 8) != 8) die("write SSLRequest");
    char answer;
    if (read(fd, &answer, 1) != 1 || answer != 'S') die("server refused TLS");

    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl = SSL_new(ctx);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1) die("SSL_connect");

    unsigned char startup[256];
    int n = 8;
    const char *kv[] = {"user", "postgres", "database", "postgres", "application_name", argv[2]};
    for (int i = 0; i < 6; i++) {
        size_t l = strlen(kv[i]) + 1;
        if (n + l + 1 > sizeof startup) die("startup too long");
        memcpy(startup + n, kv[i], l);
        n += l;
    }
    startup[n++] = 0;
    put32(startup, n);
    put32(startup + 4, 196608);
    if (SSL_write(ssl, startup, n) != n) die("SSL_write startup");
    until_ready(ssl, 1);

    for (int i = 4; i < argc; i++) {
        size_t l = strlen(argv[i]) + 1;
        unsigned char *q = malloc(5 + l);
        if (!q) die("malloc");
        q[0] = 'Q';
        put32(q + 1, 4 + l);
        memcpy(q + 5, argv[i], l);
        if (SSL_write(ssl, q, 5 + l) != (int)(5 + l)) die("SSL_write query");
        free(q);
        until_ready(ssl, 0);
    }
    unsigned char term[5] = {'X', 0, 0, 0, 4};
    SSL_write(ssl, term, 5);
    SSL_shutdown(ssl);
    close(fd);
    return 0;
}
