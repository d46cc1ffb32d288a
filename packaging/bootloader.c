/* The single binary's bootloader: runs the launcher from a copy of its bundle unpacked once per user and machine.
 *
 * dist/launcher is this program with a bundle appended by packaging/bundle.py: the files of PyInstaller's
 * one-directory build of the launcher, each deflated, then an index of them, then a trailer that names the
 * bundle by its hash. A user's first start on a machine unpacks the bundle, in a directory of its own that
 * is renamed into place once complete: a copy is whole or absent whatever runs at the same time. Every start
 * checks the copy's files against the index (one fstatat each: a cleaner of old files may have taken some) and
 * execs the launcher in it, so the launcher gets this process's pid, signals and exit status; nothing of the
 * bootloader stays. PyInstaller's own onefile bootloader unpacked ~12 MB into a fresh directory at every start
 * and ran the launcher as its child.
 *
 * Where: ${TMPDIR:-/tmp}/launcher-<uid>, else (mounted noexec, not writable)
 * ${XDG_CACHE_HOME:-$HOME/.cache}/launcher. The first is the machine's own on a cluster, where the home is often
 * shared: a thousand nodes' first starts there would each write the whole bundle to one file server. A
 * directory is used only when it is this user's and nobody else can write to it. The copy is unpacked-<id>.
 * The launcher finds this binary's path in _LAUNCHER_BINARY (its sys.executable: --hosts copies it to other
 * hosts).
 *
 * Errors: one line on stderr, "launcher: ...", and exit status 1. */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>

#define TRAILER_MAGIC "LNCHBNDL"
#define ID_LENGTH 16
#define ENTRY_HEADER_SIZE 40
#define CHUNK (256 * 1024)
#define DAMAGED (-2) /* what unpacking an entry returns when its data fails its checks */
#define STALE_SECONDS (60 * 60) /* a directory of a start that was killed while unpacking; none takes this long */

/* The end of the file (little-endian; packaging/bundle.py writes it): magic, where the index starts, its size, its
 * CRC-32 (each file's deflated data carries a checksum of its own), 4 bytes of zeros, the bundle's id. */
struct trailer {
    char magic[8];
    uint64_t index_offset;
    uint64_t index_size;
    uint32_t index_crc;
    char id[ID_LENGTH];
};
#define TRAILER_SIZE 48

enum kind { KIND_DIRECTORY = 0, KIND_FILE = 1, KIND_SYMLINK = 2 };

/* One index entry: a header of ENTRY_HEADER_SIZE bytes, then the path and the NUL that ends it (relative, no
 * "." or ".." part). A file's data is deflated (zlib), a symlink's is its target; a directory has none. */
struct entry {
    uint32_t kind;
    uint32_t mode;
    uint64_t size;        /* the file's size unpacked, the target's length */
    uint64_t data_offset; /* in this file */
    uint64_t data_size;
    char *path;
};

struct bundle {
    const char *path; /* this program's, for messages */
    int fd;
    char id[ID_LENGTH + 1];
    size_t count;
    struct entry *entries;
};

static void die(const char *format, ...) {
    va_list args;
    va_start(args, format);
    fputs("launcher: ", stderr);
    vfprintf(stderr, format, args);
    fputc('\n', stderr);
    va_end(args);
    exit(1);
}

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static int read_exactly(int fd, void *buffer, size_t size, off_t offset) {
    size_t done = 0;
    while (done < size) {
        ssize_t got = pread(fd, (char *)buffer + done, size - done, offset + (off_t)done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        done += (size_t)got;
    }
    return 0;
}

static int write_all(int fd, const void *buffer, size_t size) {
    size_t done = 0;
    while (done < size) {
        ssize_t put = write(fd, (const char *)buffer + done, size - done);
        if (put < 0 && errno == EINTR) continue;
        if (put < 0) return -1;
        done += (size_t)put;
    }
    return 0;
}

static int safe_path(const char *path) {
    if (path[0] == '\0' || path[0] == '/') return 0;
    for (const char *part = path; part; part = strchr(part, '/') ? strchr(part, '/') + 1 : NULL) {
        size_t length = strcspn(part, "/");
        if (length == 0 || (length == 1 && part[0] == '.') || (length == 2 && part[0] == '.' && part[1] == '.'))
            return 0;
    }
    return 1;
}

/* The bundle appended to this program, checked enough that a truncated or altered file fails in one line. Read
 * through /proc/self/exe, which stays this program's file even where its path was replaced since it started. */
static void open_bundle(struct bundle *bundle, const char *self) {
    struct stat st;
    struct trailer trailer;
    unsigned char raw[TRAILER_SIZE];
    bundle->path = self;
    bundle->fd = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (bundle->fd < 0 || fstat(bundle->fd, &st) != 0) die("cannot read %s: %s", self, strerror(errno));
    if (st.st_size < (off_t)sizeof raw || read_exactly(bundle->fd, raw, sizeof raw, st.st_size - (off_t)sizeof raw))
        die("%s has no bundle: it is not the whole single binary (a truncated copy?)", self);
    memcpy(trailer.magic, raw, 8);
    trailer.index_offset = le64(raw + 8);
    trailer.index_size = le64(raw + 16);
    trailer.index_crc = le32(raw + 24);
    memcpy(trailer.id, raw + 32, ID_LENGTH);
    uint64_t end = (uint64_t)st.st_size - sizeof raw;
    if (memcmp(trailer.magic, TRAILER_MAGIC, 8) != 0 || trailer.index_offset > end ||
        trailer.index_size != end - trailer.index_offset || trailer.index_size < 4 || trailer.index_size > UINT32_MAX)
        die("%s has no bundle: it is not the whole single binary (a truncated copy?)", self);
    memcpy(bundle->id, trailer.id, ID_LENGTH);
    bundle->id[ID_LENGTH] = '\0';
    if (strspn(bundle->id, "0123456789abcdef") != ID_LENGTH) die("%s: the bundle's id is damaged", self);

    unsigned char *index = malloc(trailer.index_size);
    if (!index) die("out of memory");
    if (read_exactly(bundle->fd, index, trailer.index_size, (off_t)trailer.index_offset))
        die("cannot read %s: %s", self, strerror(errno ? errno : EIO));
    if (crc32(0, index, (uInt)trailer.index_size) != trailer.index_crc) die("%s: the bundle's index is damaged", self);
    uint64_t count = le32(index), at = 4;
    if (count > trailer.index_size / ENTRY_HEADER_SIZE) die("%s: the bundle's index is damaged", self);
    bundle->entries = calloc(count ? count : 1, sizeof *bundle->entries);
    if (!bundle->entries) die("out of memory");
    for (bundle->count = 0; bundle->count < count; bundle->count++) {
        struct entry *e = &bundle->entries[bundle->count];
        if (trailer.index_size - at < ENTRY_HEADER_SIZE) die("%s: the bundle's index is damaged", self);
        const unsigned char *h = index + at;
        e->kind = le32(h);
        e->mode = le32(h + 4) & 07777;
        e->size = le64(h + 8);
        e->data_offset = le64(h + 16);
        e->data_size = le64(h + 24);
        uint64_t path_length = le32(h + 32);
        at += ENTRY_HEADER_SIZE;
        if (path_length == 0 || path_length > PATH_MAX || trailer.index_size - at < path_length ||
            e->kind > KIND_SYMLINK || e->data_offset > trailer.index_offset ||
            e->data_size > trailer.index_offset - e->data_offset ||
            (e->kind == KIND_SYMLINK && e->data_size != e->size))
            die("%s: the bundle's index is damaged", self);
        e->path = (char *)index + at;
        at += path_length;
        /* path_length counts the NUL that ends the path. */
        if (index[at - 1] != '\0' || strlen(e->path) != path_length - 1 || !safe_path(e->path))
            die("%s: the bundle's index is damaged", self);
    }
}

/* mkdir -p of a path's directories, the last with mode 0700. */
static int make_directories(const char *path) {
    char copy[PATH_MAX];
    if (strlen(path) >= sizeof copy) return errno = ENAMETOOLONG, -1;
    strcpy(copy, path);
    for (char *slash = strchr(copy + 1, '/'); slash; slash = strchr(slash + 1, '/')) {
        *slash = '\0';
        if (mkdir(copy, 0755) != 0 && errno != EEXIST) return -1;
        *slash = '/';
    }
    return mkdir(copy, 0700) != 0 && errno != EEXIST ? -1 : 0;
}

/* A directory of this user that nobody else may write to, opened; -1 with errno otherwise. */
static int open_private_directory(int at, const char *path) {
    struct stat st;
    int fd = openat(at, path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) return -1;
    if (fstat(fd, &st) != 0) return close(fd), -1;
    if (st.st_uid != geteuid() || (st.st_mode & 022)) return close(fd), errno = EPERM, -1;
    return fd;
}

static int copy_is_whole(int copy, const struct bundle *bundle) {
    for (size_t i = 0; i < bundle->count; i++) {
        const struct entry *e = &bundle->entries[i];
        struct stat st;
        if (fstatat(copy, e->path, &st, AT_SYMLINK_NOFOLLOW) != 0) return 0;
        if (e->kind == KIND_DIRECTORY ? !S_ISDIR(st.st_mode)
            : e->kind == KIND_FILE    ? !S_ISREG(st.st_mode) || (uint64_t)st.st_size != e->size
                                      : !S_ISLNK(st.st_mode) || (uint64_t)st.st_size != e->size)
            return 0;
    }
    return 1;
}

static int inflate_into(int out, const struct bundle *bundle, const struct entry *e) {
    static unsigned char in[CHUNK], unpacked[CHUNK];
    z_stream z = {0};
    uint64_t read_so_far = 0, written = 0;
    int status;
    if (inflateInit(&z) != Z_OK) return errno = ENOMEM, -1;
    do {
        if (z.avail_in == 0 && read_so_far < e->data_size) {
            size_t want = e->data_size - read_so_far < CHUNK ? (size_t)(e->data_size - read_so_far) : CHUNK;
            if (read_exactly(bundle->fd, in, want, (off_t)(e->data_offset + read_so_far)))
                return inflateEnd(&z), errno = EIO, -1;
            read_so_far += want;
            z.next_in = in;
            z.avail_in = (uInt)want;
        }
        z.next_out = unpacked;
        z.avail_out = CHUNK;
        status = inflate(&z, Z_NO_FLUSH); /* Z_BUF_ERROR: no progress, the data ended too soon */
        if (status != Z_OK && status != Z_STREAM_END) break;
        size_t produced = CHUNK - z.avail_out;
        if (write_all(out, unpacked, produced)) return inflateEnd(&z), -1;
        written += produced;
    } while (status != Z_STREAM_END);
    inflateEnd(&z);
    if (status != Z_STREAM_END || written != e->size || z.avail_in != 0 || read_so_far != e->data_size)
        return DAMAGED;
    return 0;
}

static int unpack_entry(int copy, const struct bundle *bundle, const struct entry *e) {
    if (e->kind == KIND_DIRECTORY) return mkdirat(copy, e->path, 0700);
    if (e->kind == KIND_SYMLINK) {
        char target[PATH_MAX + 1];
        if (e->size > PATH_MAX) return DAMAGED;
        if (read_exactly(bundle->fd, target, e->size, (off_t)e->data_offset)) return errno = EIO, -1;
        target[e->size] = '\0';
        return symlinkat(target, copy, e->path);
    }
    int out = openat(copy, e->path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (out < 0) return -1;
    int status = inflate_into(out, bundle, e);
    if (status == 0) status = fchmod(out, e->mode & 0755);
    if (status != 0) {
        int saved = errno;
        close(out);
        return errno = saved, status;
    }
    return close(out);
}

static int remove_one(const char *path, const struct stat *st, int type, struct FTW *ftw) {
    (void)st, (void)ftw;
    return type == FTW_DP ? rmdir(path) : unlink(path);
}

static void remove_tree(const char *path) { nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS); }

/* A fresh empty directory beside the copies: where one is unpacked, or what a damaged one is renamed to. */
static char *fresh_directory(const char *root, const char *prefix) {
    char *path;
    if (asprintf(&path, "%s/.%s-XXXXXX", root, prefix) < 0) return NULL;
    if (!mkdtemp(path)) return free(path), NULL;
    return path;
}

/* Remove what starts killed while unpacking, or while removing a damaged copy, left beside the copies. */
static void remove_stale(const char *root) {
    DIR *directory = opendir(root);
    struct dirent *entry;
    struct stat st;
    if (!directory) return;
    while ((entry = readdir(directory))) {
        char *path;
        if (strncmp(entry->d_name, ".unpack-", 8) != 0 && strncmp(entry->d_name, ".damaged-", 9) != 0) continue;
        if (fstatat(dirfd(directory), entry->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode) ||
            st.st_mtime > time(NULL) - STALE_SECONDS || asprintf(&path, "%s/%s", root, entry->d_name) < 0)
            continue;
        remove_tree(path);
        free(path);
    }
    closedir(directory);
}

/* Unpack the bundle into root/name, whole or not at all. 0 once root/name is whole (ours or a concurrent start's). */
static int unpack(const char *root, int root_fd, const char *name, const struct bundle *bundle) {
    remove_stale(root);
    char *part = fresh_directory(root, "unpack");
    if (!part) return -1;
    int copy = open(part, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC), status = copy < 0 ? -1 : 0;
    size_t i;
    for (i = 0; status == 0 && i < bundle->count; i++) status = unpack_entry(copy, bundle, &bundle->entries[i]);
    if (status == DAMAGED) {
        remove_tree(part);
        die("%s: the bundle's data is damaged (%s): it is not the single binary as built", bundle->path,
            bundle->entries[i - 1].path);
    }
    if (status == 0) status = fchmod(copy, 0755);
    if (status == 0 && renameat(AT_FDCWD, part, root_fd, name) != 0) {
        /* Another start put a copy there first (renaming onto a non-empty directory fails): keep that one. */
        status = errno == EEXIST || errno == ENOTEMPTY ? 0 : -1;
        if (status == 0) remove_tree(part);
    }
    int saved = errno;
    if (copy >= 0) close(copy);
    if (status != 0) remove_tree(part);
    free(part);
    return errno = saved, status;
}

/* Set aside and remove a copy that lost files; a concurrent start may do it first. */
static void discard(const char *root, int root_fd, const char *name) {
    char *aside = fresh_directory(root, "damaged");
    if (!aside) return;
    if (renameat(root_fd, name, AT_FDCWD, aside) == 0 || errno == ENOENT) remove_tree(aside);
    else rmdir(aside);
    free(aside);
}

/* The launcher of a whole copy in root, unpacked now if needed; NULL with errno when root cannot serve. */
static char *launcher_in(const char *root, const struct bundle *bundle) {
    char name[sizeof "unpacked-" + ID_LENGTH];
    snprintf(name, sizeof name, "unpacked-%s", bundle->id);
    if (make_directories(root) != 0) return NULL;
    int root_fd = open_private_directory(AT_FDCWD, root), whole = 0;
    if (root_fd < 0) return NULL;
    struct statvfs filesystem;
    int usable = fstatvfs(root_fd, &filesystem) == 0;
    if (usable && (filesystem.f_flag & ST_NOEXEC)) usable = 0, errno = EACCES; /* nothing unpacked there could run */
    if (!usable) {
        int saved = errno;
        close(root_fd);
        return errno = saved, NULL;
    }
    /* At most: a damaged copy discarded, ours unpacked, and a concurrent start's damaged copy found in its place. */
    for (int attempt = 0; attempt < 3; attempt++) {
        int copy = open_private_directory(root_fd, name), missing = copy < 0 && errno == ENOENT;
        if (copy >= 0) {
            whole = copy_is_whole(copy, bundle);
            close(copy);
        }
        if (whole || attempt == 2) break;
        if (!missing) discard(root, root_fd, name);
        if (unpack(root, root_fd, name, bundle) != 0) break;
    }
    int saved = errno;
    close(root_fd);
    char *launcher = NULL;
    if (!whole) return errno = saved ? saved : EIO, NULL;
    if (asprintf(&launcher, "%s/%s/launcher", root, name) < 0) return NULL;
    return launcher;
}

static char *cache_root(void) {
    const char *xdg = getenv("XDG_CACHE_HOME"), *home = getenv("HOME");
    char *root = NULL;
    if (xdg && xdg[0] == '/') {
        if (asprintf(&root, "%s/launcher", xdg) < 0) return NULL;
    } else if (home && home[0] == '/') {
        if (asprintf(&root, "%s/.cache/launcher", home) < 0) return NULL;
    }
    return root;
}

static char *temporary_root(void) {
    const char *tmpdir = getenv("TMPDIR");
    char *root;
    if (asprintf(&root, "%s/launcher-%u", tmpdir && tmpdir[0] == '/' ? tmpdir : "/tmp", (unsigned)geteuid()) < 0)
        return NULL;
    return root;
}

int main(int argc, char **argv) {
    (void)argc;
    char self[PATH_MAX];
    ssize_t length = readlink("/proc/self/exe", self, sizeof self - 1);
    if (length < 0) die("cannot find its own file (/proc/self/exe): %s", strerror(errno));
    self[length] = '\0';
    struct bundle bundle;
    open_bundle(&bundle, self);

    if (setenv("_LAUNCHER_BINARY", self, 1) != 0) die("cannot set _LAUNCHER_BINARY: %s", strerror(errno));
    char *roots[2] = {temporary_root(), cache_root()};
    int errors[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        if (!roots[i]) continue;
        errno = 0;
        char *launcher = launcher_in(roots[i], &bundle);
        if (launcher) execv(launcher, argv);
        errors[i] = errno ? errno : EIO;
    }
    if (roots[1])
        die("cannot unpack and run the launcher in %s (%s) nor in %s (%s)", roots[0], strerror(errors[0]),
            roots[1], strerror(errors[1]));
    die("cannot unpack and run the launcher in %s: %s", roots[0], strerror(errors[0]));
}
