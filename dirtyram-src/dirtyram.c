/*
 * dirtyram - guest memory-dirtying workload for dirtylog.
 *
 * Usage: dirtyram [--id N] [--hugetlb | --thp] TOTAL_PAGES DIRTY_PAGES INTERVAL_MS
 *
 * Command-line compatible with the 2014 dirtyram binary. Every page write
 * stamps the 40-byte header described in FORMAT.md (format version 1) so a
 * raw RAM image can be decoded without the guest's help.
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE_4K 4096u
#define HUGE_2M (2u * 1024u * 1024u)

#define DLPG_MAGIC 0x47504c44u /* "DLPG" little-endian */
#define FMT_VERSION 1u
#define FLAG_HUGETLB (1u << 0)
#define FLAG_THP (1u << 1)
#define HDR_SIZE 40u
#define HDR_CSUM_OFF 36u

#define barrier() __asm__ __volatile__("" ::: "memory")

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dirtyram's page header is little-endian; big-endian targets are not supported"
#endif

static void usage(void)
{
	fprintf(stderr, "usage: dirtyram [--id N] [--hugetlb | --thp] "
			"TOTAL_PAGES DIRTY_PAGES INTERVAL_MS\n");
	exit(2);
}

/*
 * Strict unsigned decimal parse: digits only (no sign, no spaces, no
 * trailing garbage), must fit in 'max'. Returns 0 on success.
 */
static int parse_u64(const char *s, uint64_t max, uint64_t *out)
{
	uint64_t v = 0;

	if (!s || !*s)
		return -1;
	for (; *s; s++) {
		unsigned d;

		if (*s < '0' || *s > '9')
			return -1;
		d = (unsigned)(*s - '0');
		if (v > (max - d) / 10)
			return -1;
		v = v * 10 + d;
	}
	*out = v;
	return 0;
}

static uint32_t fnv1a32(const volatile unsigned char *p, size_t n)
{
	uint32_t h = 0x811c9dc5u;
	size_t i;

	for (i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x01000193u;
	}
	return h;
}

static inline void st32(volatile unsigned char *p, uint32_t v)
{
	*(volatile uint32_t *)(void *)p = v;
}

static inline void st64(volatile unsigned char *p, uint64_t v)
{
	/* two 32-bit stores: 64-bit fields need not be 8-aligned on armv7 anyway */
	st32(p, (uint32_t)v);
	st32(p + 4, (uint32_t)(v >> 32));
}

struct inst {
	volatile unsigned char *buf;
	uint32_t id;
	uint32_t total;
	uint32_t flags;
	uint64_t write_seq;
};

static void stamp(struct inst *in, uint32_t index, uint64_t gen)
{
	volatile unsigned char *p = in->buf + (size_t)index * PAGE_SIZE_4K;
	uint32_t csum;

	st32(p + 0, DLPG_MAGIC);
	st32(p + 4, in->id);
	st32(p + 8, index);
	st32(p + 12, in->total);
	st64(p + 16, gen);
	st64(p + 24, in->write_seq);
	st32(p + 32, in->flags);
	csum = fnv1a32(p, HDR_CSUM_OFF);
	barrier();
	st32(p + HDR_CSUM_OFF, csum);
	barrier();
	in->write_seq++;
}

static void sleep_ms(uint32_t ms)
{
	struct timespec ts;
	int rc;

	ts.tv_sec = (time_t)(ms / 1000u);
	ts.tv_nsec = (long)(ms % 1000u) * 1000000L;
	/* clock_nanosleep returns the error and updates ts with the remainder */
	do {
		rc = clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts);
	} while (rc == EINTR);
}

int main(int argc, char **argv)
{
	struct inst in;
	uint64_t total, dirty, interval, id = 0, v;
	int have_id = 0, hugetlb = 0, thp = 0;
	int i = 1;
	size_t len, maplen;
	void *map;
	uint32_t stride;
	uint64_t g;

	_Static_assert(HDR_SIZE == 40u, "header size");

	while (i < argc && argv[i][0] == '-' && argv[i][1] == '-') {
		if (strcmp(argv[i], "--") == 0) {
			i++;
			break;
		} else if (strcmp(argv[i], "--id") == 0) {
			if (have_id || i + 1 >= argc ||
			    parse_u64(argv[i + 1], UINT32_MAX, &v))
				usage();
			id = v;
			have_id = 1;
			i += 2;
		} else if (strcmp(argv[i], "--hugetlb") == 0) {
			if (hugetlb || thp)
				usage();
			hugetlb = 1;
			i++;
		} else if (strcmp(argv[i], "--thp") == 0) {
			if (hugetlb || thp)
				usage();
			thp = 1;
			i++;
		} else {
			usage();
		}
	}
	if (argc - i != 3)
		usage();
	/* pages are indexed by u32 in the header */
	if (parse_u64(argv[i], UINT32_MAX, &total) ||
	    parse_u64(argv[i + 1], UINT32_MAX, &dirty) ||
	    parse_u64(argv[i + 2], UINT32_MAX, &interval))
		usage();
	if (total == 0 || dirty == 0 || interval == 0 || dirty > total)
		usage();
	/* TOTAL*4096 (+ 2 MiB rounding/alignment slack) must fit in size_t */
	if (total > (SIZE_MAX - 2 * (uint64_t)HUGE_2M) / PAGE_SIZE_4K)
		usage();
	if (!have_id)
		id = (uint64_t)getpid();

	len = (size_t)total * PAGE_SIZE_4K;
	in.id = (uint32_t)id;
	in.total = (uint32_t)total;
	in.flags = FMT_VERSION << 8;
	in.write_seq = 0;

	if (hugetlb) {
		maplen = (len + HUGE_2M - 1) & ~(size_t)(HUGE_2M - 1);
		map = mmap(NULL, maplen, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0);
		if (map == MAP_FAILED) {
			fprintf(stderr, "dirtyram: mmap of %zu bytes with MAP_HUGETLB "
					"(2 MiB pages) failed: %s (are enough hugepages "
					"reserved in /proc/sys/vm/nr_hugepages?)\n",
				maplen, strerror(errno));
			return 1;
		}
		in.buf = map;
		in.flags |= FLAG_HUGETLB;
	} else if (thp) {
		uintptr_t a;

		/* over-allocate so a 2 MiB-aligned window of 'len' bytes fits */
		maplen = len + HUGE_2M;
		map = mmap(NULL, maplen, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (map == MAP_FAILED) {
			fprintf(stderr, "dirtyram: mmap of %zu bytes failed: %s\n",
				maplen, strerror(errno));
			return 1;
		}
		a = ((uintptr_t)map + HUGE_2M - 1) & ~(uintptr_t)(HUGE_2M - 1);
		/* trim the slack so the mapping is exactly 'len' bytes */
		if (a > (uintptr_t)map)
			munmap(map, a - (uintptr_t)map);
		if ((uintptr_t)map + maplen > a + len)
			munmap((void *)(a + len), (uintptr_t)map + maplen - (a + len));
		in.buf = (volatile unsigned char *)a;
		if (madvise((void *)a, len, MADV_HUGEPAGE) != 0) {
			fprintf(stderr, "dirtyram: madvise(MADV_HUGEPAGE) failed: %s\n",
				strerror(errno));
			return 1;
		}
		in.flags |= FLAG_THP;
	} else {
		map = mmap(NULL, len, PROT_READ | PROT_WRITE,
			   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		if (map == MAP_FAILED) {
			fprintf(stderr, "dirtyram: mmap of %zu bytes failed: %s\n",
				len, strerror(errno));
			return 1;
		}
		in.buf = map;
	}

	stride = (uint32_t)(total / dirty);
	printf("param: total=0x%x, dirty ram=0x%x, interval=%u mS, step=%u id=%u flags=0x%x\n",
	       (unsigned)total, (unsigned)dirty, (unsigned)interval, (unsigned)stride,
	       (unsigned)in.id, (unsigned)in.flags);
	fflush(stdout);

	for (uint32_t p = 0; p < in.total; p++)
		stamp(&in, p, 0);
	printf("dirtyram[%u]: initial pass done\n", (unsigned)in.id);
	fflush(stdout);

	for (g = 1;; g++) {
		uint32_t start = (uint32_t)((g - 1) % stride);

		sleep_ms((uint32_t)interval);
		for (uint32_t k = 0; k < (uint32_t)dirty; k++)
			stamp(&in, start + k * stride, g);
	}
	return 0;
}
