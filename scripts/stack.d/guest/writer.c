/*
 * novasnap-writer: appends numbered, fsync'd records to a file on the guest's root
 * filesystem for as long as it runs, so that a snapshot's consistency can be checked from
 * the image alone (scripts/check-image reads them back).
 *
 *   novasnap-writer [-i INTERVAL_MS] [-r RESERVE_MIB] FILE
 *
 * Record format (64 bytes, little-endian, record k at byte offset 64*k):
 *
 *   off len field
 *    0   4  magic    "NSWR"
 *    4   4  boot     u32: 1 for the first writer run on this file, +1 for each restart
 *    8   8  seq      u64: the record's index k (so seq == offset / 64)
 *   16   8  real_ns  u64: CLOCK_REALTIME in ns when the record was made
 *   24   8  mono_ns  u64: CLOCK_MONOTONIC in ns (guest uptime) when the record was made
 *   32  28  fill     byte i = (seq + i) & 0xff: content that changes with every record
 *   60   4  crc      u32: CRC-32 (IEEE, as zlib's crc32) of bytes 0..59
 *
 * A record is valid when magic, seq and crc all match. Each record is written with one
 * pwrite() and made durable with fsync() before the next one is made, so at most one
 * record (the one in flight) may be missing or torn after a crash; every record before it
 * must be intact. Records are 64-byte aligned, so none straddles a 512-byte sector or a
 * page.
 *
 * On start the writer keeps the file's longest valid tail-anchored prefix: it drops
 * trailing bytes that are not a whole valid record (a record torn by a crash) and goes on
 * at the next seq, with boot = last boot + 1. It does not re-read the whole file; the
 * checker does that.
 *
 * Pace: one record every INTERVAL_MS (default 50 ms: 20 records/s, 1280 B/s, about
 * 110 MB a day), on absolute deadlines so a slow fsync does not accumulate drift, and
 * without catching up in a burst after a stall (such as a filesystem freeze): the gap
 * shows in the timestamps instead. The stack's 256 MiB root disk has some 209 MB free, so
 * it would fill after about 45 hours (1.9 days); before that, the writer stops appending
 * once less than RESERVE_MIB (default 16) is free (after about 42 hours) and checks again
 * every 10 s, so it never fills the disk.
 *
 * Messages go to stderr (the guest's init points it at the console). Built statically
 * with `gcc -static -O2` on the host.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>

#define REC_SIZE 64
#define CRC_OFF 60
static const char MAGIC[4] = {'N', 'S', 'W', 'R'};

static uint32_t crc_table[256];

static void crc_init(void)
{
	for (uint32_t n = 0; n < 256; n++) {
		uint32_t c = n;
		for (int k = 0; k < 8; k++)
			c = c & 1 ? 0xedb88320u ^ (c >> 1) : c >> 1;
		crc_table[n] = c;
	}
}

static uint32_t crc32_ieee(const unsigned char *p, size_t len)
{
	uint32_t c = 0xffffffffu;
	while (len--)
		c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
	return c ^ 0xffffffffu;
}

static void put_u32(unsigned char *p, uint32_t v)
{
	for (int i = 0; i < 4; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static void put_u64(unsigned char *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (unsigned char)(v >> (8 * i));
}

static uint32_t get_u32(const unsigned char *p)
{
	uint32_t v = 0;
	for (int i = 3; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static uint64_t get_u64(const unsigned char *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static uint64_t now_ns(clockid_t clock)
{
	struct timespec ts;
	clock_gettime(clock, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void make_record(unsigned char *r, uint32_t boot, uint64_t seq)
{
	memcpy(r, MAGIC, 4);
	put_u32(r + 4, boot);
	put_u64(r + 8, seq);
	put_u64(r + 16, now_ns(CLOCK_REALTIME));
	put_u64(r + 24, now_ns(CLOCK_MONOTONIC));
	for (int i = 0; i < 28; i++)
		r[32 + i] = (unsigned char)(seq + (uint64_t)i);
	put_u32(r + CRC_OFF, crc32_ieee(r, CRC_OFF));
}

static int record_valid(const unsigned char *r, uint64_t seq)
{
	return memcmp(r, MAGIC, 4) == 0 && get_u64(r + 8) == seq &&
	       get_u32(r + CRC_OFF) == crc32_ieee(r, CRC_OFF);
}

static void die(const char *what)
{
	fprintf(stderr, "novasnap-writer: %s: %s\n", what, strerror(errno));
	exit(1);
}

/* The directory entry of a file just created is durable only once its directory is. */
static void fsync_dir_of(const char *path)
{
	char *copy = strdup(path);
	int dfd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (dfd < 0 || fsync(dfd) < 0)
		die("fsync of the file's directory");
	close(dfd);
	free(copy);
}

/* Keeps the longest run of valid records that the file ends in; returns the next seq and
 * sets *boot to the last record's boot (0 for an empty file). */
static uint64_t recover(int fd, uint32_t *boot)
{
	struct stat st;
	unsigned char r[REC_SIZE];
	if (fstat(fd, &st) < 0)
		die("fstat");
	uint64_t n = (uint64_t)st.st_size / REC_SIZE;
	*boot = 0;
	while (n > 0) {
		if (pread(fd, r, REC_SIZE, (off_t)((n - 1) * REC_SIZE)) != REC_SIZE)
			die("pread");
		if (record_valid(r, n - 1)) {
			*boot = get_u32(r + 4);
			break;
		}
		n--;
	}
	if ((uint64_t)st.st_size != n * REC_SIZE) {
		fprintf(stderr, "novasnap-writer: dropping %llu trailing bytes that are not a valid record\n",
			(unsigned long long)((uint64_t)st.st_size - n * REC_SIZE));
		if (ftruncate(fd, (off_t)(n * REC_SIZE)) < 0 || fsync(fd) < 0)
			die("ftruncate");
	}
	return n;
}

static int space_left(int fd, uint64_t reserve)
{
	struct statvfs sv;
	if (fstatvfs(fd, &sv) < 0)
		die("fstatvfs");
	return (uint64_t)sv.f_bavail * sv.f_frsize >= reserve;
}

static void sleep_until(uint64_t mono_ns)
{
	struct timespec ts = {.tv_sec = (time_t)(mono_ns / 1000000000u),
			      .tv_nsec = (long)(mono_ns % 1000000000u)};
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

int main(int argc, char **argv)
{
	uint64_t interval_ms = 50, reserve_mib = 16;
	int opt;
	while ((opt = getopt(argc, argv, "i:r:")) != -1) {
		switch (opt) {
		case 'i': interval_ms = strtoull(optarg, NULL, 10); break;
		case 'r': reserve_mib = strtoull(optarg, NULL, 10); break;
		default: goto usage;
		}
	}
	if (optind != argc - 1 || interval_ms == 0) {
	usage:
		fprintf(stderr, "usage: novasnap-writer [-i INTERVAL_MS] [-r RESERVE_MIB] FILE\n");
		return 2;
	}
	const char *path = argv[optind];
	crc_init();

	int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
	if (fd < 0)
		die(path);
	fsync_dir_of(path);
	uint32_t boot;
	uint64_t seq = recover(fd, &boot);
	boot++;
	fprintf(stderr, "novasnap-writer: %s: boot %u, starting at seq %llu, one record every %llu ms\n",
		path, boot, (unsigned long long)seq, (unsigned long long)interval_ms);

	const uint64_t interval = interval_ms * 1000000u, reserve = reserve_mib << 20;
	uint64_t next = now_ns(CLOCK_MONOTONIC);
	int paused = 0;
	for (;;) {
		if (seq % 100 == 0 || paused) {
			int ok = space_left(fd, reserve);
			if (!ok && !paused)
				fprintf(stderr, "novasnap-writer: less than %llu MiB free; pausing at seq %llu\n",
					(unsigned long long)reserve_mib, (unsigned long long)seq);
			if (ok && paused)
				fprintf(stderr, "novasnap-writer: space again; resuming at seq %llu\n",
					(unsigned long long)seq);
			paused = !ok;
			if (paused) {
				sleep(10);
				next = now_ns(CLOCK_MONOTONIC);
				continue;
			}
		}
		unsigned char r[REC_SIZE];
		make_record(r, boot, seq);
		ssize_t w = pwrite(fd, r, REC_SIZE, (off_t)(seq * REC_SIZE));
		if (w != REC_SIZE) {
			if (w >= 0)
				errno = EIO; /* a short write to a regular file: the disk is full */
			die("pwrite");
		}
		if (fsync(fd) < 0)
			die("fsync");
		seq++;
		next += interval;
		uint64_t now = now_ns(CLOCK_MONOTONIC);
		if (now > next + interval)
			next = now; /* stalled (frozen, or a slow fsync): no burst to catch up */
		sleep_until(next);
	}
}
