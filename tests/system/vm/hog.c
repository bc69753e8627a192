/* hog: the guest's memory hog for the client-restart test (tests/system/vm).
 *
 * Fills MIB MiB of anonymous memory (more than the guest's RAM, so most of it is swapped
 * out) with a pattern that depends on each 8-byte word's position, prints
 * "HOG written ...", then blocks until a line arrives on stdin (the host restarts the remem
 * client meanwhile), prints "HOG verifying", reads every word back (printing
 * "HOG verify-progress N%" at each tenth, where the host may restart the client again, this
 * time while pages come in) and prints "HOG verified ... bad_words=N". pswpin/pswpout from /proc/vmstat are printed at each step.
 * Exit status 0 only if every word matched; a page-in the kernel could not serve kills it
 * with SIGBUS instead.
 *
 * usage: hog MIB          build: gcc -O2 -static -o hog hog.c
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

static inline uint64_t mix(uint64_t x) /* splitmix64's finaliser */
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static long vmstat(const char *key)
{
	char name[64];
	long value, found = -1;
	FILE *f = fopen("/proc/vmstat", "r");
	if (!f)
		return -1;
	while (fscanf(f, "%63s %ld", name, &value) == 2)
		if (!strcmp(name, key)) {
			found = value;
			break;
		}
	fclose(f);
	return found;
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s MIB\n", argv[0]);
		return 2;
	}
	size_t mib = strtoull(argv[1], NULL, 10);
	size_t words = mib << 17;
	const uint64_t seed = 0x72656d656dULL; /* "remem" */
	uint64_t *p = mmap(NULL, words * 8, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	/* 4 KiB pages, the unit the kernel swaps */
	madvise(p, words * 8, MADV_NOHUGEPAGE);
	long in0 = vmstat("pswpin"), out0 = vmstat("pswpout");
	double t0 = now();
	for (size_t i = 0; i < words; i++)
		p[i] = mix(i ^ seed);
	double t1 = now();
	printf("HOG written mib=%zu write_s=%.2f pswpin=%ld pswpout=%ld\n", mib, t1 - t0,
	       vmstat("pswpin") - in0, vmstat("pswpout") - out0);
	fflush(stdout);

	char line[64];
	if (!fgets(line, sizeof(line), stdin)) {
		puts("HOG FAIL: stdin closed before the go line");
		return 2;
	}
	long in1 = vmstat("pswpin"), out1 = vmstat("pswpout");
	printf("HOG verifying pswpin=%ld pswpout=%ld\n", in1 - in0, out1 - out0);
	fflush(stdout);
	double t2 = now();
	size_t bad = 0, tenth = words / 10;
	for (size_t i = 0; i < words; i++) {
		if (tenth && i % tenth == 0 && i && i / tenth < 10) {
			/* the host may restart the client again here, under page-ins */
			printf("HOG verify-progress %zu%%\n", i / tenth * 10);
			fflush(stdout);
		}
		if (p[i] != mix(i ^ seed)) {
			if (bad < 5)
				printf("HOG mismatch word %zu (page %zu): %016llx\n", i, i / 512,
				       (unsigned long long)p[i]);
			bad++;
		}
	}
	double t3 = now();
	printf("HOG verified mib=%zu verify_s=%.2f bad_words=%zu pswpin=%ld pswpout=%ld "
	       "pswpin_after_go=%ld pswpout_after_go=%ld\n",
	       mib, t3 - t2, bad, vmstat("pswpin") - in0, vmstat("pswpout") - out0,
	       vmstat("pswpin") - in1, vmstat("pswpout") - out1);
	fflush(stdout);
	return bad ? 1 : 0;
}
