/*
 * Guest program of the real-client tier's live-migration test (tests/vm/test_migrate.py).
 *
 * The migrating guest has no 9p share (a mounted virtio-9p export blocks migration in
 * qemu), so there is no python in it: this program is built by tests/vm/guest/build-mig.sh
 * with the host's gcc (-static) when the tier runs, and goes into the migration initramfs
 * beside busybox. Nothing compiled is kept in the repository.
 *
 * It runs two kinds of traffic at once, until the host writes "stop" on the serial
 * console (the guest's stdin) or --max-secs pass:
 *
 *   ping    ICMP echo requests to the peer through the kernel's IP stack (a raw ICMP
 *           socket), one every --ping-ms. One console line per reply:
 *             MIGT P <seq> <rtt_us> [DUP]
 *           The host stamps each console line with its own clock: the last reply on the
 *           source's console and the first on the destination's give the gap a
 *           migration leaves in the traffic.
 *   stream  numbered frames over AF_PACKET: ICMP echo requests built byte by byte
 *           (Ethernet, IPv4, ICMP), so that a peer that answers ping (DPDK testpmd's
 *           icmpecho mode, svq's embedded echo responder) sends each one back. Frame
 *           lengths cycle over 60..1514 bytes. The ICMP data holds "SVQ2", the u32
 *           sequence number, the u16 data length, then pseudo-random bytes derived from
 *           the sequence number. A reply counts when its ICMP checksum verifies, its
 *           addresses are the request's swapped, and its data equals what was sent, byte
 *           for byte. --rate frames/s, at most --window unanswered (a frame unanswered
 *           for --late-ms no longer holds the window back).
 *
 * Once stopped it waits --drain-ms for replies still in flight and prints one line
 *     MIGT RESULT {json}
 * with, for each kind: sent, received, lost (= sent - received, with the lost sequence
 * numbers as ranges), duplicates, out-of-order and damaged replies, and the guest's
 * interface, packet-socket and ICMP counters. Every line it prints starts with "MIGT ".
 *
 * Options come from the kernel command line (svqmig.NAME=VALUE) and then argv
 * (--NAME VALUE): iface, peer, peer-mac, ping-ms, rate, window, late-ms, drain-ms, max-secs,
 * report-ms, first-within.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/filter.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PING_ID 0x5051   /* "PQ": the ping's ICMP identifier */
#define PROBE_ID 0x5052  /* the first probes (they also resolve ARP) */
#define STREAM_ID 0x5353 /* "SS": the stream's */
#define PING_DATA 56
#define MAX_RANGES 64

static const uint8_t MAGIC[4] = {'S', 'V', 'Q', '2'};

struct opts {
    char iface[IFNAMSIZ];
    char peer[32];
    char peer_mac[32]; /* default: from the ARP cache once the peer answered */
    long ping_ms, rate, window, late_ms, drain_ms, max_secs, report_ms, first_within;
};

static struct opts O = {"", "10.0.0.2", "", 50, 1000, 32, 1000, 1500, 180, 1000, 60};

/* ------------------------------------------------------------------ output */
static void say(const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (n > (int)sizeof buf - 2)
        n = sizeof buf - 2;
    buf[n++] = '\n';
    /* One write per line: kernel messages on the console do not cut into it. */
    for (int off = 0; off < n;) {
        ssize_t w = write(1, buf + off, n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;
        off += w;
    }
}

static void die(const char *what)
{
    say("MIGT FAIL %s: %s", what, strerror(errno));
    exit(1);
}

/* A growing string for the result JSON. */
struct sb {
    char *p;
    size_t n, cap;
};

static void sbf(struct sb *s, const char *fmt, ...)
{
    va_list ap;
    for (;;) {
        va_start(ap, fmt);
        int n = vsnprintf(s->p ? s->p + s->n : NULL, s->p ? s->cap - s->n : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return;
        if (s->p && s->n + n < s->cap) {
            s->n += n;
            return;
        }
        s->cap = (s->cap + n + 1) * 2;
        s->p = realloc(s->p, s->cap);
        if (!s->p)
            exit(3);
    }
}

/* ------------------------------------------------------------------ time, options */
static int64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static double uptime_s(void)
{
    FILE *f = fopen("/proc/uptime", "r");
    double u = -1;
    if (f) {
        if (fscanf(f, "%lf", &u) != 1)
            u = -1;
        fclose(f);
    }
    return u;
}

static void set_opt(const char *name, const char *value)
{
    struct {
        const char *name;
        long *v;
    } nums[] = {{"ping-ms", &O.ping_ms},   {"rate", &O.rate},         {"window", &O.window},
                {"late-ms", &O.late_ms},   {"drain-ms", &O.drain_ms}, {"max-secs", &O.max_secs},
                {"report-ms", &O.report_ms}, {"first-within", &O.first_within}};
    if (!strcmp(name, "iface")) {
        snprintf(O.iface, sizeof O.iface, "%s", value);
        return;
    }
    if (!strcmp(name, "peer-mac")) {
        snprintf(O.peer_mac, sizeof O.peer_mac, "%s", value);
        return;
    }
    if (!strcmp(name, "peer")) {
        snprintf(O.peer, sizeof O.peer, "%s", value);
        return;
    }
    for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++) {
        if (!strcmp(name, nums[i].name)) {
            char *end;
            long v = strtol(value, &end, 10);
            if (*value && !*end && v >= 0) {
                *nums[i].v = v;
                return;
            }
        }
    }
    say("MIGT FAIL bad option %s=%s", name, value);
    exit(2);
}

static void parse_options(int argc, char **argv)
{
    char line[4096] = "";
    FILE *f = fopen("/proc/cmdline", "r");
    if (f) {
        if (!fgets(line, sizeof line, f))
            line[0] = 0;
        fclose(f);
    }
    for (char *save, *w = strtok_r(line, " \n", &save); w; w = strtok_r(NULL, " \n", &save)) {
        if (strncmp(w, "svqmig.", 7))
            continue;
        char *eq = strchr(w, '=');
        if (!eq)
            continue;
        *eq = 0;
        for (char *c = w + 7; *c; c++)
            if (*c == '_')
                *c = '-';
        if (strcmp(w + 7, "mac") && strcmp(w + 7, "addr")) /* those are mig-init's */
            set_opt(w + 7, eq + 1);
    }
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strncmp(argv[i], "--", 2)) {
            say("MIGT FAIL bad argument %s", argv[i]);
            exit(2);
        }
        set_opt(argv[i] + 2, argv[i + 1]);
    }
    if (!O.iface[0] || !O.ping_ms || !O.rate || !O.window || !O.report_ms) {
        say("MIGT FAIL need iface and non-zero ping-ms, rate, window, report-ms");
        exit(2);
    }
}

/* ------------------------------------------------------------------ packets */
static uint16_t csum(const void *data, size_t len, uint32_t sum)
{
    const uint8_t *b = data;
    for (; len > 1; b += 2, len -= 2)
        sum += (uint32_t)b[0] << 8 | b[1];
    if (len)
        sum += (uint32_t)b[0] << 8;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v; }
static void put32(uint8_t *p, uint32_t v) { p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3]; }

/* Frame length of stream frame `seq` (Ethernet header included, no FCS): 60..1514. */
static size_t frame_len(uint32_t seq) { return 60 + (size_t)(seq * 389u % 1455u); }

/* The ICMP data of stream frame `seq` (len bytes). */
static void stream_data(uint32_t seq, uint8_t *d, size_t len)
{
    memcpy(d, MAGIC, 4);
    put32(d + 4, seq);
    put16(d + 8, (uint16_t)len);
    uint32_t x = seq * 0x9E3779B9u ^ 0xA5A5F00Du;
    for (size_t i = 10; i < len; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        d[i] = (uint8_t)(x >> 11);
    }
}

struct addrs {
    uint8_t mac[6], peer_mac[6];
    uint8_t ip[4], peer_ip[4];
    int ifindex;
};

/* Ethernet + IPv4 + ICMP echo request carrying stream frame `seq`; returns its length. */
static size_t build_frame(const struct addrs *a, uint32_t seq, uint8_t *f)
{
    size_t len = frame_len(seq), ip_len = len - 14, data = ip_len - 28;
    memcpy(f, a->peer_mac, 6);
    memcpy(f + 6, a->mac, 6);
    put16(f + 12, ETHERTYPE_IP);
    uint8_t *ip = f + 14, *ic = ip + 20;
    ip[0] = 0x45;
    ip[1] = 0;
    put16(ip + 2, (uint16_t)ip_len);
    put16(ip + 4, (uint16_t)seq);
    put16(ip + 6, 0x4000); /* DF */
    ip[8] = 64;
    ip[9] = IPPROTO_ICMP;
    put16(ip + 10, 0);
    memcpy(ip + 12, a->ip, 4);
    memcpy(ip + 16, a->peer_ip, 4);
    put16(ip + 10, csum(ip, 20, 0));
    ic[0] = 8;
    ic[1] = 0;
    put16(ic + 2, 0);
    put16(ic + 4, STREAM_ID);
    put16(ic + 6, (uint16_t)seq);
    stream_data(seq, ic + 8, data);
    put16(ic + 2, csum(ic, 8 + data, 0));
    return len;
}

/* ------------------------------------------------------------------ bookkeeping */
struct track {
    const char *name;
    uint32_t cap, sent, received, duplicates, out_of_order, late;
    int64_t highest;
    uint8_t *got;      /* per seq: 0 unanswered, 1 answered */
    int64_t *sent_at;  /* guest monotonic ns */
    int64_t first_reply, last_reply, max_gap;
    uint64_t rtt_sum, rtt_n;
    int64_t rtt_min, rtt_max;
};

static void track_init(struct track *t, const char *name, uint32_t cap)
{
    memset(t, 0, sizeof *t);
    t->name = name;
    t->cap = cap;
    t->highest = -1;
    t->rtt_min = -1;
    t->got = calloc(cap, 1);
    t->sent_at = calloc(cap, sizeof *t->sent_at);
    if (!t->got || !t->sent_at)
        die("calloc");
}

/* Accounts for the reply to `seq` at `now`: 1 new, 0 duplicate. */
static int track_reply(struct track *t, uint32_t seq, int64_t now)
{
    if (t->got[seq]) {
        t->duplicates++;
        return 0;
    }
    t->got[seq] = 1;
    t->received++;
    if ((int64_t)seq < t->highest)
        t->out_of_order++;
    else
        t->highest = seq;
    int64_t rtt = now - t->sent_at[seq];
    if (rtt > O.late_ms * 1000000)
        t->late++;
    if (t->rtt_min < 0 || rtt < t->rtt_min)
        t->rtt_min = rtt;
    if (rtt > t->rtt_max)
        t->rtt_max = rtt;
    t->rtt_sum += rtt;
    t->rtt_n++;
    if (t->last_reply && now - t->last_reply > t->max_gap)
        t->max_gap = now - t->last_reply;
    if (!t->first_reply)
        t->first_reply = now;
    t->last_reply = now;
    return 1;
}

static void track_json(struct sb *s, const struct track *t)
{
    sbf(s, "\"%s\":{\"sent\":%u,\"received\":%u,\"lost\":%u,\"duplicates\":%u,\"out_of_order\":%u,"
           "\"late\":%u,\"lost_seqs\":[",
        t->name, t->sent, t->received, t->sent - t->received, t->duplicates, t->out_of_order, t->late);
    unsigned ranges = 0;
    for (uint32_t i = 0; i < t->sent; i++) {
        if (t->got[i])
            continue;
        uint32_t j = i;
        while (j + 1 < t->sent && !t->got[j + 1])
            j++;
        if (ranges < MAX_RANGES)
            sbf(s, "%s[%u,%u]", ranges ? "," : "", i, j);
        ranges++;
        i = j;
    }
    sbf(s, "],\"lost_ranges\":%u,\"rtt_us\":{\"min\":%lld,\"avg\":%lld,\"max\":%lld},"
           "\"max_reply_gap_ms\":%.1f,\"replies_span_ms\":%.1f",
        ranges, (long long)(t->rtt_min / 1000), (long long)(t->rtt_n ? t->rtt_sum / t->rtt_n / 1000 : 0),
        (long long)(t->rtt_max / 1000), t->max_gap / 1e6, (t->last_reply - t->first_reply) / 1e6);
}

/* ------------------------------------------------------------------ setup */
static void iface_addrs(struct addrs *a)
{
    struct ifreq r;
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0)
        die("socket");
    memset(&r, 0, sizeof r);
    snprintf(r.ifr_name, sizeof r.ifr_name, "%s", O.iface);
    if (ioctl(s, SIOCGIFHWADDR, &r) < 0)
        die("SIOCGIFHWADDR");
    memcpy(a->mac, r.ifr_hwaddr.sa_data, 6);
    if (ioctl(s, SIOCGIFADDR, &r) < 0)
        die("SIOCGIFADDR");
    memcpy(a->ip, &((struct sockaddr_in *)&r.ifr_addr)->sin_addr, 4);
    if (ioctl(s, SIOCGIFINDEX, &r) < 0)
        die("SIOCGIFINDEX");
    a->ifindex = r.ifr_ifindex;
    close(s);
    if (inet_pton(AF_INET, O.peer, a->peer_ip) != 1) {
        say("MIGT FAIL bad peer address %s", O.peer);
        exit(2);
    }
}

static int parse_mac(const char *text, uint8_t *mac)
{
    unsigned m[6];
    if (sscanf(text, "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]) != 6)
        return 0;
    for (int i = 0; i < 6; i++)
        mac[i] = (uint8_t)m[i];
    return 1;
}

/* The peer's MAC: --peer-mac, else the ARP cache (the first reply resolved it). */
static int peer_mac(struct addrs *a)
{
    char line[256], ip[64], hw[64], dev[64];
    unsigned flags, type;
    if (O.peer_mac[0])
        return parse_mac(O.peer_mac, a->peer_mac);
    FILE *f = fopen("/proc/net/arp", "r");
    if (!f)
        return 0;
    int found = 0;
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%63s 0x%x 0x%x %63s %*s %63s", ip, &type, &flags, hw, dev) != 5)
            continue;
        if (!strcmp(ip, O.peer) && (flags & 2) && parse_mac(hw, a->peer_mac))
            found = 1;
    }
    fclose(f);
    return found;
}

static void send_echo(int fd, const struct addrs *a, uint16_t id, uint16_t seq, int64_t stamp)
{
    uint8_t p[8 + PING_DATA];
    struct sockaddr_in to = {.sin_family = AF_INET};
    memcpy(&to.sin_addr, a->peer_ip, 4);
    p[0] = 8;
    p[1] = 0;
    put16(p + 2, 0);
    put16(p + 4, id);
    put16(p + 6, seq);
    memcpy(p + 8, &stamp, 8);
    for (int i = 16; i < 8 + PING_DATA; i++)
        p[i] = (uint8_t)(seq + i);
    put16(p + 2, csum(p, sizeof p, 0));
    if (sendto(fd, p, sizeof p, 0, (struct sockaddr *)&to, sizeof to) < 0 && errno != ENOBUFS)
        die("sendto (ping)");
}

/* An echo reply from the raw ICMP socket (IP header first): identifier and sequence. */
static int parse_reply(const uint8_t *b, ssize_t n, uint16_t *id, uint16_t *seq, int *intact)
{
    if (n < 20)
        return 0;
    size_t ihl = (size_t)(b[0] & 0x0f) * 4;
    if ((size_t)n < ihl + 8 || b[ihl] != 0 || b[ihl + 1] != 0)
        return 0;
    *id = get16(b + ihl + 4);
    *seq = get16(b + ihl + 6);
    *intact = csum(b + ihl, n - ihl, 0) == 0;
    return 1;
}

static void tty_noecho(void)
{
    struct termios t;
    if (tcgetattr(0, &t) == 0) {
        t.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
        tcsetattr(0, TCSANOW, &t);
    }
}

static void read_counters(struct sb *s)
{
    static const char *names[] = {"rx_packets", "tx_packets", "rx_bytes", "tx_bytes", "rx_dropped",
                                  "tx_dropped", "rx_errors", "tx_errors"};
    sbf(s, "\"nic\":{");
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char path[128];
        unsigned long long v = 0;
        snprintf(path, sizeof path, "/sys/class/net/%s/statistics/%s", O.iface, names[i]);
        FILE *f = fopen(path, "r");
        if (f) {
            if (fscanf(f, "%llu", &v) != 1)
                v = 0;
            fclose(f);
        }
        sbf(s, "%s\"%s\":%llu", i ? "," : "", names[i], v);
    }
    sbf(s, "}");
    /* Icmp: InMsgs InErrors InCsumErrors ... (the second "Icmp:" line holds the values) */
    FILE *f = fopen("/proc/net/snmp", "r");
    char hdr[1024] = "", line[1024];
    sbf(s, ",\"icmp\":{");
    int first = 1;
    while (f && fgets(line, sizeof line, f)) {
        if (strncmp(line, "Icmp:", 5))
            continue;
        if (!hdr[0]) {
            snprintf(hdr, sizeof hdr, "%s", line);
            continue;
        }
        char *hs, *vs, *h = strtok_r(hdr + 5, " \n", &hs), *v = strtok_r(line + 5, " \n", &vs);
        for (; h && v; h = strtok_r(NULL, " \n", &hs), v = strtok_r(NULL, " \n", &vs)) {
            if (!strcmp(h, "InMsgs") || !strcmp(h, "InErrors") || !strcmp(h, "InCsumErrors") ||
                !strcmp(h, "InEchoReps") || !strcmp(h, "OutMsgs") || !strcmp(h, "OutEchos")) {
                sbf(s, "%s\"%s\":%s", first ? "" : ",", h, v);
                first = 0;
            }
        }
        break;
    }
    if (f)
        fclose(f);
    sbf(s, "}");
}

/* Classic BPF: the ping socket takes only the ping's and the probes' replies, the packet
 * socket only the stream's ICMP frames (fewer wake-ups for the guest's one vCPU). */
static void attach(int fd, struct sock_filter *code, unsigned short len)
{
    struct sock_fprog prog = {len, code};
    if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof prog) < 0)
        die("SO_ATTACH_FILTER");
}

static void filter_ping(int fd)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 0),           /* X = IP header length */
        BPF_STMT(BPF_LD | BPF_H | BPF_IND, 4),            /* ICMP identifier */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PING_ID, 2, 0),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PROBE_ID, 1, 0),
        BPF_STMT(BPF_RET | BPF_K, 0),
        BPF_STMT(BPF_RET | BPF_K, 0xffff),
    };
    attach(fd, f, sizeof f / sizeof f[0]);
}

static void filter_stream(int fd)
{
    struct sock_filter f[] = {
        BPF_STMT(BPF_LD | BPF_H | BPF_ABS, 12),           /* EtherType */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, ETHERTYPE_IP, 0, 6),
        BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 14 + 9),       /* IP protocol */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, IPPROTO_ICMP, 0, 4),
        BPF_STMT(BPF_LDX | BPF_B | BPF_MSH, 14),
        BPF_STMT(BPF_LD | BPF_H | BPF_IND, 14 + 4),       /* ICMP identifier */
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, STREAM_ID, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, 0x40000),
        BPF_STMT(BPF_RET | BPF_K, 0),
    };
    attach(fd, f, sizeof f / sizeof f[0]);
}

/* ------------------------------------------------------------------ main */
int main(int argc, char **argv)
{
    parse_options(argc, argv);
    tty_noecho();
    struct addrs a;
    memset(&a, 0, sizeof a);
    iface_addrs(&a);
    double up0 = uptime_s();

    int ping = socket(AF_INET, SOCK_RAW | SOCK_NONBLOCK, IPPROTO_ICMP);
    if (ping < 0)
        die("socket (raw ICMP)");
    int big = 4 << 20;
    setsockopt(ping, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    filter_ping(ping);
    uint8_t buf[2048];

    /* The first reply: retried every 250 ms, bounded. It also resolves ARP. */
    int64_t t0 = now_ns();
    int probes = 0, answered = 0;
    while (!answered && now_ns() - t0 < O.first_within * 1000000000LL) {
        send_echo(ping, &a, PROBE_ID, (uint16_t)probes++, now_ns());
        int64_t until = now_ns() + 250000000;
        while (!answered && now_ns() < until) {
            struct pollfd p = {ping, POLLIN, 0};
            poll(&p, 1, 20);
            ssize_t n;
            while ((n = recv(ping, buf, sizeof buf, 0)) > 0) {
                uint16_t id, seq;
                int ok;
                if (parse_reply(buf, n, &id, &seq, &ok) && id == PROBE_ID && ok)
                    answered = 1;
            }
        }
    }
    if (!answered) {
        say("MIGT FAIL no echo reply from %s within %ld s (%d probes)", O.peer, O.first_within, probes);
        return 1;
    }
    if (!peer_mac(&a)) {
        say("MIGT FAIL no ARP entry for %s after its reply", O.peer);
        return 1;
    }

    int pkt = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_IP));
    if (pkt < 0)
        die("socket (AF_PACKET)");
    struct sockaddr_ll ll = {.sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP), .sll_ifindex = a.ifindex};
    if (bind(pkt, (struct sockaddr *)&ll, sizeof ll) < 0)
        die("bind (AF_PACKET)");
    setsockopt(pkt, SOL_SOCKET, SO_RCVBUF, &big, sizeof big);
    filter_stream(pkt);
    int one = 1;
    int ignore_outgoing = setsockopt(pkt, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof one) == 0;

    /* Capacities: what --max-secs can send at the configured rates, plus slack. */
    uint32_t ping_cap = (uint32_t)(O.max_secs * 1000 / O.ping_ms + 16);
    if (ping_cap > 65535) {
        say("MIGT FAIL more than 65535 pings (max-secs / ping-ms): the ICMP sequence would wrap");
        return 2;
    }
    struct track tp, ts;
    track_init(&tp, "ping", ping_cap);
    track_init(&ts, "stream", (uint32_t)(O.max_secs * O.rate + 16));

    char mac[18], pmac[18];
    snprintf(mac, sizeof mac, "%02x:%02x:%02x:%02x:%02x:%02x", a.mac[0], a.mac[1], a.mac[2], a.mac[3], a.mac[4], a.mac[5]);
    snprintf(pmac, sizeof pmac, "%02x:%02x:%02x:%02x:%02x:%02x", a.peer_mac[0], a.peer_mac[1], a.peer_mac[2],
             a.peer_mac[3], a.peer_mac[4], a.peer_mac[5]);
    say("MIGT READY iface=%s mac=%s peer=%s peer_mac=%s probes=%d ping_ms=%ld rate=%ld window=%ld "
        "ignore_outgoing=%d uptime=%.2f",
        O.iface, mac, O.peer, pmac, probes, O.ping_ms, O.rate, O.window, ignore_outgoing, uptime_s());

    /* Stream damage, by kind. */
    unsigned bad_length = 0, bad_checksum = 0, bad_payload = 0, bad_header = 0, unknown_seq = 0;
    unsigned enobufs = 0, behind = 0, outgoing = 0, ping_damaged = 0, ping_unknown = 0;
    uint64_t bytes_sent = 0;
    uint32_t lo = 0, answered_pending = 0; /* frames [lo, sent) are in flight unless answered */

    int64_t start = now_ns(), ping_ns = O.ping_ms * 1000000, late_ns = O.late_ms * 1000000;
    int64_t next_ping = start, next_report = start + O.report_ms * 1000000;
    int64_t stream_base = start; /* frame k is due at stream_base + k / rate */
    uint32_t stream_base_seq = 0;
    int64_t deadline = start + O.max_secs * 1000000000LL, drain_until = 0;
    const char *stop_reason = NULL;
    char in[256];
    size_t in_len = 0;
    uint8_t frame[1600];

    for (;;) {
        int64_t now = now_ns();
        if (!stop_reason && now >= deadline) {
            stop_reason = "max-secs";
            drain_until = now + O.drain_ms * 1000000;
            say("MIGT STOP %s", stop_reason);
        }
        if (stop_reason && now >= drain_until)
            break;
        if (!stop_reason) {
            /* ping */
            if (now >= next_ping && tp.sent < tp.cap) {
                tp.sent_at[tp.sent] = now;
                send_echo(ping, &a, PING_ID, (uint16_t)tp.sent, now);
                tp.sent++;
                next_ping += ping_ns;
                if (next_ping <= now)
                    next_ping = now + ping_ns;
            }
            /* stream: the window holds frames answered by nobody yet and not yet late */
            while (lo < ts.sent && (ts.got[lo] || now - ts.sent_at[lo] > late_ns)) {
                if (ts.got[lo])
                    answered_pending--;
                lo++;
            }
            uint64_t due = stream_base_seq + (uint64_t)((now - stream_base) * (double)O.rate / 1e9) + 1;
            if (due > (uint64_t)ts.sent + (uint64_t)O.window + (uint64_t)O.rate / 10) {
                /* More than 100 ms behind the schedule: start a new schedule from here. */
                behind++;
                stream_base = now;
                stream_base_seq = ts.sent;
                due = ts.sent + 1;
            }
            while (ts.sent < due && ts.sent < ts.cap && ts.sent - lo - answered_pending < (uint32_t)O.window) {
                size_t len = build_frame(&a, ts.sent, frame);
                ts.sent_at[ts.sent] = now_ns();
                if (send(pkt, frame, len, 0) < 0) {
                    if (errno == ENOBUFS || errno == EAGAIN) {
                        enobufs++;
                        break;
                    }
                    die("send (AF_PACKET)");
                }
                bytes_sent += len;
                ts.sent++;
            }
        }
        if (now >= next_report) {
            say("MIGT S t=%lld ping=%u/%u stream=%u/%u dup=%u ooo=%u bad=%u",
                (long long)((now - start) / 1000000), tp.received, tp.sent, ts.received, ts.sent,
                ts.duplicates + tp.duplicates, ts.out_of_order, bad_length + bad_checksum + bad_payload + bad_header);
            next_report += O.report_ms * 1000000;
            if (next_report <= now)
                next_report = now + O.report_ms * 1000000;
        }

        /* Sleep until the next thing to do (at most 10 ms: frames age out of the window). */
        int64_t wake = now + 10000000;
        if (stop_reason) {
            if (drain_until < wake)
                wake = drain_until;
        } else {
            if (next_ping < wake)
                wake = next_ping;
            int64_t next_frame = stream_base + (int64_t)((ts.sent - stream_base_seq) * 1e9 / (double)O.rate);
            if (ts.sent - lo - answered_pending < (uint32_t)O.window && next_frame < wake)
                wake = next_frame;
        }
        if (next_report < wake)
            wake = next_report;
        struct pollfd pf[3] = {{ping, POLLIN, 0}, {pkt, POLLIN, 0}, {0, POLLIN, 0}};
        int64_t wait = wake - now_ns();
        struct timespec tmo = {0, wait > 0 ? wait : 0};
        if (ppoll(pf, 3, &tmo, NULL) < 0 && errno != EINTR)
            die("ppoll");

        if (pf[2].revents & POLLIN) {
            ssize_t n = read(0, in + in_len, sizeof in - 1 - in_len);
            if (n > 0) {
                in_len += n;
                in[in_len] = 0;
                if (strstr(in, "stop") && !stop_reason) {
                    stop_reason = "host";
                    drain_until = now_ns() + O.drain_ms * 1000000;
                    say("MIGT STOP %s", stop_reason);
                }
                if (in_len > sizeof in / 2) { /* keep the tail only */
                    memmove(in, in + in_len - 8, 8);
                    in_len = 8;
                }
            } else {
                pf[2].events = 0; /* no console input (EOF): --max-secs ends the run */
            }
        }
        if (pf[0].revents & POLLIN) {
            ssize_t n;
            while ((n = recv(ping, buf, sizeof buf, 0)) > 0) {
                uint16_t id, seq;
                int intact;
                if (!parse_reply(buf, n, &id, &seq, &intact) || id != PING_ID)
                    continue; /* the stream's replies reach this socket too */
                if (!intact) {
                    ping_damaged++;
                    continue;
                }
                if (seq >= tp.sent) {
                    ping_unknown++;
                    continue;
                }
                int64_t t = now_ns();
                int fresh = track_reply(&tp, seq, t);
                say("MIGT P %u %lld%s", seq, (long long)((t - tp.sent_at[seq]) / 1000), fresh ? "" : " DUP");
            }
        }
        if (pf[1].revents & POLLIN) {
            ssize_t n;
            struct sockaddr_ll from;
            socklen_t fl = sizeof from;
            while ((n = recvfrom(pkt, buf, sizeof buf, 0, (struct sockaddr *)&from, &fl)) > 0) {
                fl = sizeof from;
                if (from.sll_pkttype == PACKET_OUTGOING) {
                    outgoing++;
                    continue;
                }
                if (n < 14 + 20 + 8 + 14 || get16(buf + 12) != ETHERTYPE_IP)
                    continue;
                const uint8_t *ip = buf + 14;
                size_t ihl = (size_t)(ip[0] & 0x0f) * 4;
                if (ip[9] != IPPROTO_ICMP || ihl != 20)
                    continue;
                const uint8_t *ic = ip + 20, *d = ic + 8;
                if (ic[0] != 0 || get16(ic + 4) != STREAM_ID)
                    continue; /* not a reply of the stream (the ping's, or ARP-resolved others) */
                if (memcmp(d, MAGIC, 4)) {
                    bad_payload++;
                    continue;
                }
                uint32_t seq = get32(d + 4);
                if (seq >= ts.sent) {
                    unknown_seq++;
                    continue;
                }
                size_t ip_len = get16(ip + 2), want = frame_len(seq) - 14;
                if (ip_len != want || (size_t)n < 14 + ip_len) {
                    bad_length++;
                    continue;
                }
                if (csum(ic, ip_len - 20, 0) != 0) {
                    bad_checksum++;
                    continue;
                }
                if (memcmp(ip + 12, a.peer_ip, 4) || memcmp(ip + 16, a.ip, 4) || get16(ic + 6) != (uint16_t)seq ||
                    memcmp(buf, a.mac, 6)) {
                    bad_header++;
                    continue;
                }
                uint8_t expect[1514];
                stream_data(seq, expect, ip_len - 28);
                if (memcmp(d, expect, ip_len - 28)) {
                    bad_payload++;
                    continue;
                }
                if (track_reply(&ts, seq, now_ns()) && seq >= lo)
                    answered_pending++;
            }
        }
    }

    struct tpacket_stats pst = {0, 0};
    socklen_t pl = sizeof pst;
    getsockopt(pkt, SOL_PACKET, PACKET_STATISTICS, &pst, &pl);
    struct sb s = {0};
    sbf(&s, "MIGT RESULT {\"stop\":\"%s\",\"iface\":\"%s\",\"mac\":\"%s\",\"peer\":\"%s\",\"peer_mac\":\"%s\",\"probes\":%d,"
            "\"ping_ms\":%ld,\"rate\":%ld,\"window\":%ld,\"late_ms\":%ld,\"drain_ms\":%ld,"
            "\"uptime_start_s\":%.2f,\"uptime_end_s\":%.2f,\"elapsed_ms\":%lld,",
        stop_reason, O.iface, mac, O.peer, pmac, probes, O.ping_ms, O.rate, O.window, O.late_ms, O.drain_ms, up0,
        uptime_s(), (long long)((now_ns() - start) / 1000000));
    track_json(&s, &tp);
    sbf(&s, ",\"damaged\":%u,\"unknown_seq\":%u},", ping_damaged, ping_unknown);
    track_json(&s, &ts);
    sbf(&s, ",\"bad_length\":%u,\"bad_checksum\":%u,\"bad_payload\":%u,\"bad_header\":%u,\"unknown_seq\":%u,"
            "\"enobufs\":%u,\"behind_schedule\":%u,\"outgoing_seen\":%u,\"ignore_outgoing\":%d,"
            "\"bytes_sent\":%llu},",
        bad_length, bad_checksum, bad_payload, bad_header, unknown_seq, enobufs, behind, outgoing, ignore_outgoing,
        (unsigned long long)bytes_sent);
    sbf(&s, "\"packet_socket\":{\"packets\":%u,\"drops\":%u},", pst.tp_packets, pst.tp_drops);
    read_counters(&s);
    sbf(&s, "}\n");
    /* One line, however long: the host joins what the two consoles carried. */
    for (size_t off = 0; off < s.n;) {
        ssize_t w = write(1, s.p + off, s.n - off);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return 1;
        off += w;
    }
    return 0;
}
