// Loopback floor: the CPU a process spends to receive N messages of SIZE
// bytes from one TCP socket and send them on another (what a broker does
// with a body at the least), measured with getrusage in the relay.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int listen_on(int *port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  bind(s, (struct sockaddr *)&a, sizeof a);
  listen(s, 1);
  socklen_t l = sizeof a;
  getsockname(s, (struct sockaddr *)&a, &l);
  *port = ntohs(a.sin_port);
  return s;
}
static int connect_to(int port) {
  int s = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  if (connect(s, (struct sockaddr *)&a, sizeof a) < 0) { perror("connect"); exit(1); }
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  return s;
}
static void full(int fd, char *b, size_t n, int rd) {
  size_t d = 0;
  while (d < n) {
    ssize_t r = rd ? read(fd, b + d, n - d) : write(fd, b + d, n - d);
    if (r <= 0) { perror("io"); exit(1); }
    d += r;
  }
}
int main(int argc, char **argv) {
  size_t size = argc > 1 ? atol(argv[1]) : 65536;
  long n = argc > 2 ? atol(argv[2]) : 100000;
  char *buf = malloc(size);
  memset(buf, 7, size);
  int pin, pout;
  int lin = listen_on(&pin), lout = listen_on(&pout);
  if (fork() == 0) { int s = connect_to(pin); for (long i = 0; i < n; i++) full(s, buf, size, 0); close(s); exit(0); }
  if (fork() == 0) { int s = connect_to(pout); for (long i = 0; i < n; i++) full(s, buf, size, 1); exit(0); }
  int in = accept(lin, 0, 0), out = accept(lout, 0, 0);
  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  for (long i = 0; i < n; i++) { full(in, buf, size, 1); full(out, buf, size, 0); }
  clock_gettime(CLOCK_MONOTONIC, &t1);
  struct rusage ru;
  getrusage(RUSAGE_SELF, &ru);
  double cpu = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
  double wall = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
  wait(0); wait(0);
  printf("size %zu: %.2f us CPU per message in the relay (user %.2f), %.0f msg/s\n", size, cpu / n * 1e6,
         (ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6) / n * 1e6, n / wall);
  return 0;
}
