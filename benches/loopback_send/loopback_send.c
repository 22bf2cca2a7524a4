/*
 * The kernel's floor for one small TCP send over loopback: N connected pairs on 127.0.0.1,
 * ROUNDS rounds of one non-blocking sendmsg of BYTES bytes to each, then the receiving ends
 * drained (not timed). Prints the sending thread's user and system CPU per send: what any
 * submission method (sendmsg, io_uring) pays in the kernel's TCP and loopback path per
 * message, before the syscall itself.
 *
 *   cc -O2 -o /tmp/loopback_send benches/loopback_send/loopback_send.c
 *   /tmp/loopback_send [N=1000] [ROUNDS=200] [BYTES=128]
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
#include <unistd.h>

static double secs(struct timeval t) { return t.tv_sec + t.tv_usec / 1e6; }

int main(int argc, char **argv) {
  int n = argc > 1 ? atoi(argv[1]) : 1000;
  int rounds = argc > 2 ? atoi(argv[2]) : 200;
  int bytes = argc > 3 ? atoi(argv[3]) : 128;
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
    for (int i = 0; i < n; i++)
      if (sendmsg(snd[i], &msg, MSG_DONTWAIT | MSG_NOSIGNAL) == bytes) sent++;
    getrusage(RUSAGE_THREAD, &r1);
    user += secs(r1.ru_utime) - secs(r0.ru_utime);
    sys += secs(r1.ru_stime) - secs(r0.ru_stime);
    for (int i = 0; i < n; i++)
      while (recv(rcv[i], sink, sizeof sink, MSG_DONTWAIT) > 0) {}
  }
  printf("%ld sends of %d B to %d loopback TCP connections: user %.0f ns, system %.0f ns, "
         "total %.0f ns per send\n",
         sent, bytes, n, user / sent * 1e9, sys / sent * 1e9, (user + sys) / sent * 1e9);
  return 0;
}
