/*
 * The kernel's floor for one small TCP send over loopback: N connected pairs on 127.0.0.1,
 * ROUNDS rounds of one non-blocking send of BYTES bytes to each, then the receiving ends
 * drained (not timed). Prints the sending thread's user and system CPU per send: what a
 * submission method pays in the kernel's TCP and loopback path per message. MODE `sendmsg`
 * makes one sendmsg system call per send; `uring` submits each round's sends as IORING_OP_SENDMSG
 * entries of one io_uring, up to 1024 per io_uring_enter (as herald's shards do).
 *
 *   cc -O2 -o /tmp/loopback_send benches/loopback_send/loopback_send.c
 *   /tmp/loopback_send [N=1000] [ROUNDS=200] [BYTES=128] [MODE=sendmsg|uring]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <linux/io_uring.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ENTRIES 1024

/* A minimal ring: its submission and completion queues mapped, no library. */
struct ring {
  int fd;
  unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
  struct io_uring_sqe *sqes;
  struct io_uring_cqe *cqes;
};

static int ring_init(struct ring *r) {
  struct io_uring_params p = {0};
  r->fd = syscall(__NR_io_uring_setup, ENTRIES, &p);
  if (r->fd < 0) return -1;
  char *sq = mmap(0, p.sq_off.array + p.sq_entries * sizeof(unsigned), PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQ_RING);
  char *cq = mmap(0, p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe),
                  PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_CQ_RING);
  r->sqes = mmap(0, p.sq_entries * sizeof(struct io_uring_sqe), PROT_READ | PROT_WRITE,
                 MAP_SHARED | MAP_POPULATE, r->fd, IORING_OFF_SQES);
  if (sq == MAP_FAILED || cq == MAP_FAILED || r->sqes == MAP_FAILED) return -1;
  r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
  r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
  r->sq_array = (unsigned *)(sq + p.sq_off.array);
  r->cq_head = (unsigned *)(cq + p.cq_off.head);
  r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
  r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
  r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
  return 0;
}

/* Sends `msg` on each of fds[0..n) through the ring; returns the sends that wrote it all. */
static long ring_send(struct ring *r, const int *fds, int n, struct msghdr *msg, int bytes) {
  long ok = 0;
  for (int at = 0; at < n; at += ENTRIES) {
    int k = n - at < ENTRIES ? n - at : ENTRIES;
    unsigned tail = *r->sq_tail;
    for (int i = 0; i < k; i++, tail++) {
      unsigned idx = tail & *r->sq_mask;
      struct io_uring_sqe *e = &r->sqes[idx];
      memset(e, 0, sizeof *e);
      e->opcode = IORING_OP_SENDMSG;
      e->fd = fds[at + i];
      e->addr = (unsigned long)msg;
      e->len = 1;
      e->msg_flags = MSG_DONTWAIT | MSG_NOSIGNAL;
      r->sq_array[idx] = idx;
    }
    __atomic_store_n(r->sq_tail, tail, __ATOMIC_RELEASE);
    int reaped = 0, submit = k;
    while (reaped < k) {
      if (syscall(__NR_io_uring_enter, r->fd, submit, k - reaped, IORING_ENTER_GETEVENTS, 0, 0) >= 0)
        submit = 0;
      unsigned head = *r->cq_head, ctail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
      for (; head != ctail; head++, reaped++)
        if (r->cqes[head & *r->cq_mask].res == bytes) ok++;
      __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
  }
  return ok;
}

static double secs(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1000;
  int rounds = argc > 2 ? atoi(argv[2]) : 200;
  int bytes = argc > 3 ? atoi(argv[3]) : 128;
  int uring = argc > 4 && strcmp(argv[4], "uring") == 0;
  struct ring ring = {0};
  if (uring && ring_init(&ring)) {
    perror("io_uring");
    return 1;
  }
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  socklen_t al = sizeof a;
  if (bind(lfd, (void *)&a, sizeof a) || listen(lfd, 4096) || getsockname(lfd, (void *)&a, &al)) {
    perror("listen");
    return 1;
  }
  int *snd = calloc(n, sizeof *snd), *rcv = calloc(n, sizeof *rcv);
  for (int i = 0; i < n; i++) {
    rcv[i] = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(rcv[i], (void *)&a, sizeof a)) { perror("connect"); return 1; }
    snd[i] = accept(lfd, NULL, NULL);
    if (snd[i] < 0) { perror("accept"); return 1; }
    int one = 1;
    setsockopt(snd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  char *buf = calloc(1, bytes), sink[65536];
  struct iovec iov = {buf, bytes};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  double user = 0, sys = 0;
  long sent = 0;
  for (int r = 0; r < rounds; r++) {
    struct rusage r0, r1;
    getrusage(RUSAGE_THREAD, &r0);
    if (uring)
      sent += ring_send(&ring, snd, n, &msg, bytes);
    else
      for (int i = 0; i < n; i++)
        if (sendmsg(snd[i], &msg, MSG_DONTWAIT | MSG_NOSIGNAL) == bytes) sent++;
    getrusage(RUSAGE_THREAD, &r1);
    user += secs(r1.ru_utime) - secs(r0.ru_utime);
    sys += secs(r1.ru_stime) - secs(r0.ru_stime);
    for (int i = 0; i < n; i++)
      while (recv(rcv[i], sink, sizeof sink, MSG_DONTWAIT) > 0) {}
  }
  printf("%s: %ld sends of %d B to %d loopback TCP connections: user %.0f ns, system %.0f ns, "
         "total %.0f ns per send\n",
         uring ? "io_uring" : "sendmsg", sent, bytes, n, user / sent * 1e9, sys / sent * 1e9, (user + sys) / sent * 1e9);
  return 0;
}
